"""Opening a run database: SQLite pragmas, the single-runner lock, and migrations on open."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from batch_runner.errors import RunLocked, SchemaError
from batch_runner.store.location import Database

BUSY_TIMEOUT_MS = 10_000
#: Key of the PostgreSQL advisory lock that lets one runner at a time apply migrations.
MIGRATION_LOCK_KEY = 0x62617463  # "batc"


def migrations_dir() -> Path:
    """Where the Alembic scripts are: packaged in a wheel, or the repository's migrations/."""
    packaged = Path(__file__).resolve().parents[1] / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def engine_for(db: Database) -> AsyncEngine:
    if db.path is not None:
        return create_engine(db.path)
    # A small pool: the store runs one transaction at a time, and heartbeats share the pool.
    return create_async_engine(db.url, pool_size=2, max_overflow=0, pool_pre_ping=True)


def create_engine(path: Path) -> AsyncEngine:
    """An engine with one connection: SQLite allows one writer, and one connection also avoids
    the WAL-reset corruption bug that concurrent writers trigger on SQLite < 3.44.6."""
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{path}", pool_size=1, max_overflow=0, pool_timeout=3600
    )

    @event.listens_for(engine.sync_engine, "connect")
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

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock up front; a deferred upgrade fails at once with SQLITE_BUSY.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest migration; refuse a database made by a newer version."""
    cfg = alembic_config()
    heads = set(ScriptDirectory.from_config(cfg).get_heads())

    def _upgrade(conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            # Runners starting together: the first migrates, the others wait and find it done.
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        current = set(MigrationContext.configure(conn).get_current_heads())
        known = {rev.revision for rev in ScriptDirectory.from_config(cfg).walk_revisions()}
        if current - known:
            raise SchemaError(
                f"this database was written by a newer batch-runner (schema {', '.join(current)});"
                " upgrade batch-runner to use it"
            )
        if current != heads:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


@contextmanager
def runner_lock(db_path: Path) -> Iterator[IO[str]]:
    """Hold an exclusive lock beside the database for as long as a runner works on it.

    The OS drops the lock when the process dies, even by SIGKILL, so a crash never leaves a
    stale lock behind.
    """
    lock_path = db_path.with_name(db_path.name + ".lock")
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
