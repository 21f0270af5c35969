"""Opening a run database: SQLite pragmas, the single-runner lock, and migrations on open."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event, inspect, text
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from batch_runner.errors import RunLocked, SchemaError

if TYPE_CHECKING:
    from alembic.config import Config

BUSY_TIMEOUT_MS = 10_000
#: Key of the PostgreSQL advisory lock that lets one runner at a time apply migrations.
MIGRATION_LOCK_KEY = 0x62617463  # "batc"
#: The newest revision in migrations/ (a test keeps the two in step). A database already
#: there opens without importing Alembic, which costs a tenth of a second at every start.
HEAD_REVISION = "0005"


def migrations_dir() -> Path:
    """Where the Alembic scripts are: packaged in a wheel, or the repository's migrations/."""
    packaged = Path(__file__).resolve().parents[1] / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def sqlite_engine(path: Path) -> Engine:
    """The engine of the store's write connection: one SQLite connection, since SQLite allows
    one writer, and one connection also avoids the WAL-reset corruption bug that concurrent
    writers trigger on SQLite < 3.44.6.

    The store uses the connection from its event loop's thread and its own thread in turn,
    never both at once, hence ``check_same_thread=False``.
    """
    engine = sa_create_engine(
        f"sqlite:///{path}",
        pool_size=1,
        max_overflow=0,
        pool_timeout=3600,
        connect_args={"check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN IMMEDIATE below is the only BEGIN.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit that returned survives power loss; the write-ahead rule relies on it.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock up front; a deferred upgrade fails at once with SQLITE_BUSY.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def sqlite_quick_reader_engine(path: Path) -> Engine:
    """The engine of the store's second read connection, used on the loop's thread for reads
    of a few rows through an index (see ``Store._reading_quick``)."""
    engine = sa_create_engine(
        f"sqlite:///{path}",
        pool_size=1,
        max_overflow=0,
        pool_timeout=3600,
        connect_args={"check_same_thread": False},  # closed by whichever thread disposes
    )

    event.listen(engine, "connect", _read_only)
    return engine


def sqlite_reader_engine(path: Path) -> AsyncEngine:
    """The engine of the store's read connection: SQLAlchemy's async engine on aiosqlite, so
    a long read (counts over a million jobs, an export) runs on aiosqlite's thread while the
    loop goes on. In WAL mode it sees the last commit and never takes the write lock."""
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{path}", pool_size=1, max_overflow=0, pool_timeout=3600
    )

    event.listen(engine.sync_engine, "connect", _read_only)
    return engine


def _read_only(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA query_only=ON")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.close()


def migrate(conn: Connection) -> None:
    """Bring the schema to the newest migration; refuse a database made by a newer version.

    Runs inside the caller's transaction on ``conn``.
    """
    if conn.dialect.name == "postgresql":
        # Runners starting together: the first migrates, the others wait and find it done.
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
    if current_revision(conn) == HEAD_REVISION:
        return
    if conn.dialect.name == "sqlite" and not inspect(conn).get_table_names():
        create_current(conn)
        return
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = alembic_config()
    scripts = ScriptDirectory.from_config(cfg)
    current = set(MigrationContext.configure(conn).get_current_heads())
    known = {rev.revision for rev in scripts.walk_revisions()}
    if current - known:
        raise SchemaError(
            f"this database was written by a newer batch-runner (schema {', '.join(current)});"
            " upgrade batch-runner to use it"
        )
    if current != set(scripts.get_heads()):
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def create_current(conn: Connection) -> None:
    """Give a new, empty SQLite file today's schema straight from the models, stamped with the
    newest revision: what running every migration gives (a test compares the two), in a few
    milliseconds instead of a tenth of a second, and without importing Alembic. (A shared
    PostgreSQL database is created once for many runs; it keeps the migrations.)"""
    from batch_runner.store.models import metadata

    metadata.create_all(conn)
    # Alembic's own layout of its table, so later migrations find the revision as usual.
    conn.exec_driver_sql(
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
        "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
    )
    conn.execute(
        text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": HEAD_REVISION}
    )


def current_revision(conn: Connection) -> str | None:
    """The one revision in ``alembic_version``; None when there is no table, or not one row."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    return str(rows[0][0]) if len(rows) == 1 else None


@contextmanager
def runner_lock(db_path: Path) -> Iterator[IO[str]]:
    """Hold an exclusive lock beside the database for as long as a runner works on it.

    The OS drops the lock when the process dies, even by SIGKILL, so a crash never leaves a
    stale lock behind.
    """
    # Beside the file itself: a runner that reaches it through a symlink takes the same lock.
    real = db_path.resolve()
    lock_path = real.with_name(real.name + ".lock")
    handle = lock_path.open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLocked(
            f"{db_path} is in use by another batch-runner ({holder}); wait for it to finish, "
            "or stop it, or use a different --db"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    try:
        yield handle
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
