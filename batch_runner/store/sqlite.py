"""An SQLite run database, driven from the event loop's thread.

With WAL and the write lock taken, a statement only touches memory and the page cache, in
microseconds; a hop to another thread per statement used to cost more than the statement.
So statements run where the repository awaits them, on one connection shared by the loop
and the store's thread (never both at once: the store's lock serialises transactions, and a
step handed to the thread is waited for even when its caller is cancelled). Only the steps
that can block go to the thread: a BEGIN IMMEDIATE that has to wait out another program's
lock (for up to the busy timeout; a free lock is taken at once, on the loop's thread), the
fsync that makes commits durable, and a checkpoint every CHECKPOINT_EVERY commits (SQLite's
automatic one is off for this connection, so that none runs on the loop's thread).

Every commit only appends to the write-ahead log (synchronous=NORMAL), on the loop's thread.
A durable one then waits, after the store's lock is released, for an fsync of the log: the
same thing synchronous=FULL does inside COMMIT, but one fsync serves every commit made before
it started (group commit), and other transactions go on while it runs. A commit that returned
without that fsync survives the process being killed; only a power cut can undo it.

Reads that are not part of a write go to a second, read-only connection, through
SQLAlchemy's async engine on aiosqlite: in WAL mode they see the last commit without taking
the write lock, and a long one (counts over a million jobs, an export) runs on aiosqlite's
thread without stalling the loop. Reads of a few rows through an index (the scheduler's
"anything left to claim?") take microseconds, less than the hops to aiosqlite's thread and
back, which cost milliseconds on a busy loop: they use a third connection, on the loop's
thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Dialect, Executable
from sqlalchemy.exc import OperationalError

from batch_runner.disk import fsync_path
from batch_runner.store import engine as engine_mod
from batch_runner.store.location import Database
from batch_runner.threads import run_to_the_end

if TYPE_CHECKING:
    from batch_runner.store.connection import CursorRows, Reader

T = TypeVar("T")

#: An executemany of at least this many rows runs on the store's thread.
BULK_ROWS = 500
#: PRAGMA synchronous levels
FULL = 2
NORMAL = 1
#: Commits between two checkpoints: a job's commits add ~10 pages each to the log, so the
#: log stays near the ~1,000 pages (4 MB) after which SQLite's own would checkpoint.
CHECKPOINT_EVERY = 100


def is_busy(exc: OperationalError) -> bool:
    """Whether SQLite refused for another connection's lock (SQLITE_BUSY or SQLITE_LOCKED)."""
    return "locked" in str(exc) or "busy" in str(exc)


class _Thread:
    """One worker thread for one connection."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        # The connection is the thread's until ``fn`` returns, even for a cancelled caller,
        # so the next caller never shares it with this one.
        return await run_to_the_end(fn, *args, executor=self._pool)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _Begin:
    """``conn.begin()``: awaited, or entered with ``async with`` (committed at the end,
    rolled back on an error), as with SQLAlchemy's AsyncConnection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: SqliteConnection) -> None:
        self._conn = conn

    def __await__(self) -> Generator[Any, Any, None]:
        return self._conn.start().__await__()

    async def __aenter__(self) -> _Begin:
        await self._conn.start()
        return self

    async def __aexit__(self, type_: Any, value: Any, traceback: Any, /) -> None:
        if type_ is None:
            await self._conn.commit()
        else:
            await self._conn.rollback()


class SqliteConnection:
    """The write connection (a ``connection.Conn``)."""

    __slots__ = (
        "_level",
        "_since_checkpoint",
        "_sync",
        "_thread",
        "commits",
        "durable",
        "log_path",
        "wal",
    )

    def __init__(self, sync: Connection, thread: _Thread) -> None:
        self._sync = sync
        self._thread = thread
        #: whether the next transaction's commit must reach the disk
        self.durable = True
        self._level = FULL  # as the engine sets it on connect
        self._since_checkpoint = 0
        #: commits so far (see ``SqliteBackend.flush``)
        self.commits = 0
        raw = sync.connection.dbapi_connection
        assert raw is not None
        raw.execute("PRAGMA wal_autocheckpoint=0")
        # Where the log cannot be used (some network file systems), a durable commit is a
        # synchronous=FULL one, as SQLite makes it, on the store's thread.
        self.wal = raw.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        # Where SQLite keeps the log: beside the file it opened, a symlink's target.
        self.log_path = raw.execute("PRAGMA database_list").fetchone()[2] + "-wal"

    @property
    def dialect(self) -> Dialect:
        return self._sync.dialect

    @property
    def sync(self) -> Connection:
        return self._sync

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorRows:
        if not self._sync.in_transaction():
            await self.start()
        return self._sync.execute(statement, parameters)

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> CursorRows:
        if not self._sync.in_transaction():
            await self.start()
        if isinstance(parameters, list) and len(parameters) >= BULK_ROWS:
            # Thousands of rows take milliseconds: on the store's thread (SQLite lets go of
            # the GIL while it writes) the loop goes on, reading the manifest's next rows.
            return await self._thread.run(self._sync.exec_driver_sql, statement, parameters)
        return self._sync.exec_driver_sql(statement, parameters)

    def begin(self) -> _Begin:
        return _Begin(self)

    async def start(self) -> None:
        level = FULL if self.durable and not self.wal else NORMAL
        try:
            # Almost always the lock is free (the runner lock keeps other runners out), and
            # taking it without waiting costs less than a hop to the store's thread.
            self._begin(level, wait_ms=0)
        except OperationalError as exc:
            if not is_busy(exc):
                raise
            self._sync.rollback()
            await self._thread.run(self._begin, level, engine_mod.BUSY_TIMEOUT_MS)

    def _begin(self, level: int, wait_ms: int) -> None:
        """BEGIN IMMEDIATE, waiting up to ``wait_ms`` for another program's write lock."""
        # Between transactions, on the driver's connection (SQLAlchemy would begin one).
        raw = self._sync.connection.dbapi_connection
        assert raw is not None
        if level != self._level:
            raw.execute(f"PRAGMA synchronous={level}")
            self._level = level
        if wait_ms == engine_mod.BUSY_TIMEOUT_MS:
            self._sync.begin()
            return
        raw.execute(f"PRAGMA busy_timeout={wait_ms}")
        try:
            self._sync.begin()
        finally:
            raw.execute(f"PRAGMA busy_timeout={engine_mod.BUSY_TIMEOUT_MS}")

    async def commit(self) -> None:
        if not self._sync.in_transaction():
            return
        self._since_checkpoint += 1
        if self._since_checkpoint >= CHECKPOINT_EVERY and self.wal:
            await self._thread.run(self._commit_and_checkpoint)
            self._since_checkpoint = 0
        elif self.durable and not self.wal:
            await self._thread.run(self._sync.commit)  # synchronous=FULL: waits for fsync
        else:
            self._sync.commit()  # appends to the log: no fsync, no checkpoint
        self.commits += 1

    def _commit_and_checkpoint(self) -> None:
        self._sync.commit()
        raw = self._sync.connection.dbapi_connection
        assert raw is not None
        # PASSIVE: copies what no reader still needs and never waits for one.
        raw.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def rollback(self) -> None:
        # Nothing to wait for: a rollback drops this transaction's pages and its lock.
        self._sync.rollback()


class _QuickReader:
    """A ``connection.Reader`` whose statements run at once on the loop's thread."""

    __slots__ = ("_sync",)

    def __init__(self, sync: Connection) -> None:
        self._sync = sync

    @property
    def dialect(self) -> Dialect:
        return self._sync.dialect

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorRows:
        return self._sync.execute(statement, parameters)

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> CursorRows:
        return self._sync.exec_driver_sql(statement, parameters)


class SqliteBackend:
    """An SQLite file (a ``connection.Backend``)."""

    def __init__(self, db: Database) -> None:
        assert db.path is not None
        self.engine = engine_mod.sqlite_engine(db.path)
        self.reader_engine = engine_mod.sqlite_reader_engine(db.path)
        self.quick_engine = engine_mod.sqlite_quick_reader_engine(db.path)
        self._quick: Connection | None = None
        self._thread = _Thread("store")
        self._conn: SqliteConnection | None = None
        self._flushing = asyncio.Lock()
        #: commits known to be on disk (``SqliteConnection.commits`` when the last fsync began)
        self._flushed = 0

    async def _connection(self) -> SqliteConnection:
        if self._conn is None:
            self._conn = SqliteConnection(await self._thread.run(self.engine.connect), self._thread)
        return self._conn

    @asynccontextmanager
    async def writer(self, *, durable: bool = True) -> AsyncIterator[SqliteConnection]:
        conn = await self._connection()
        conn.durable = durable
        try:
            yield conn
        finally:
            conn.durable = True
            # As a pool does when a connection comes back: nothing stays half done.
            await conn.rollback()

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[Reader]:
        # Returned to the pool at the end, which ends the read: a snapshot held open would
        # keep checkpoints from finishing.
        async with self.reader_engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def quick_reader(self) -> AsyncIterator[Reader]:
        if self._quick is None:
            self._quick = self.quick_engine.connect()
        try:
            yield _QuickReader(self._quick)
        finally:
            # Ends the read: a snapshot held open would keep checkpoints from finishing.
            self._quick.rollback()

    async def flush(self) -> None:
        """Wait until every commit made so far is on disk. One fsync of the log serves all
        the commits made before it began, so callers that come while one runs share the
        next."""
        conn = self._conn
        if conn is None or not conn.wal:
            return
        wanted = conn.commits
        async with self._flushing:
            if self._flushed >= wanted:
                return  # an fsync that began after our commit has finished
            covered = conn.commits
            await self._thread.run(fsync_path, conn.log_path)
            self._flushed = covered

    async def migrate(self) -> None:
        conn = await self._connection()

        def upgrade() -> None:
            with conn.sync.begin():
                engine_mod.migrate(conn.sync)

        await self._thread.run(upgrade)

    async def dispose(self) -> None:
        if self._conn is not None:
            await self._thread.run(self._conn.sync.close)
        if self._quick is not None:
            self._quick.close()
        self._thread.close()
        self.engine.dispose()
        self.quick_engine.dispose()
        await self.reader_engine.dispose()
