"""The seam between the repository and a database: what a connection must offer, and the
two backends behind it.

The repository's statements are dialect-neutral SQLAlchemy Core run through ``Conn`` (inside
a write transaction) or ``Reader`` (outside one). SQLAlchemy's ``AsyncConnection`` satisfies
both, and serves PostgreSQL through asyncpg (``ServerBackend``); an SQLite file gets a faster
path of its own (``batch_runner.store.sqlite``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from sqlalchemy import Dialect, Executable
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from batch_runner.store import engine as engine_mod
from batch_runner.store.location import Database

if TYPE_CHECKING:
    from sqlalchemy import CursorResult, Result
    from sqlalchemy.engine import FrozenResult

    #: rows of any shape, as the repository's untyped Core statements give them
    Rows: TypeAlias = Result[*tuple[Any, ...]]
    CursorRows: TypeAlias = CursorResult[*tuple[Any, ...]]
    FrozenRows: TypeAlias = FrozenResult[*tuple[Any, ...]]


class Begun(Protocol):
    """A transaction being begun: awaited (and ended by the connection's commit or rollback),
    or entered with ``async with`` (committed at the end, rolled back on an error)."""

    def __await__(self) -> Generator[Any, Any, Any]: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, type_: Any, value: Any, traceback: Any, /) -> Any: ...


class Reader(Protocol):
    """What a read needs: statements, their rows, and which dialect answers."""

    @property
    def dialect(self) -> Dialect: ...

    async def execute(self, statement: Executable, parameters: Any = None) -> Rows: ...

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> Rows: ...


class Conn(Reader, Protocol):
    """The write connection: statements plus transaction control."""

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorRows: ...

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> CursorRows: ...

    def begin(self) -> Begun: ...

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...


class Backend(Protocol):
    """One database's connections, as the store uses them."""

    def writer(self, *, durable: bool = True) -> AbstractAsyncContextManager[Conn]:
        """The connection for writes; the store holds its lock while using it.

        ``durable``: whether a commit must reach the disk before it returns (see
        ``Store._tx``); a backend that cannot tell the difference makes every commit durable.
        """
        ...

    def reader(self) -> AbstractAsyncContextManager[Reader]:
        """A connection for reads that take no write lock; each sees the last commit."""
        ...

    def quick_reader(self) -> AbstractAsyncContextManager[Reader]:
        """Like :meth:`reader`, for reads of a few rows through an index; may run them on
        the loop's thread."""
        ...

    async def flush(self) -> None:
        """Return once every commit made so far is on disk (called after a durable commit,
        outside the store's lock)."""
        ...

    async def migrate(self) -> None: ...

    async def dispose(self) -> None: ...


class ServerBackend:
    """A database server (PostgreSQL) through SQLAlchemy's async engine and asyncpg."""

    def __init__(self, db: Database) -> None:
        # A small pool: writes take turns under the store's lock; reads and heartbeats share it.
        self.engine: AsyncEngine = create_async_engine(
            db.url, pool_size=3, max_overflow=0, pool_pre_ping=True
        )

    @asynccontextmanager
    async def writer(self, *, durable: bool = True) -> AsyncIterator[Conn]:
        async with self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[Reader]:
        async with self.engine.connect() as conn:
            yield conn

    def quick_reader(self) -> AbstractAsyncContextManager[Reader]:
        return self.reader()

    async def flush(self) -> None:
        """Nothing to wait for: the server's COMMIT returned once it was durable."""

    async def migrate(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(engine_mod.migrate)

    async def dispose(self) -> None:
        await self.engine.dispose()


def open_backend(db: Database) -> Backend:
    if db.path is None:
        return ServerBackend(db)
    from batch_runner.store.sqlite import SqliteBackend

    return SqliteBackend(db)
