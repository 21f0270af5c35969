"""The few statements that SQLite and PostgreSQL spell differently, in one place.

Everything else in the repository is dialect-neutral SQLAlchemy Core. Row locks
(``with_for_update``) need no case here: SQLite's compiler leaves them out, and there the
single writer (BEGIN IMMEDIATE) already serialises every transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Insert, Table, TableClause
from sqlalchemy.dialects import postgresql, sqlite

from batch_runner.store.connection import Conn, Reader

#: Class of the PostgreSQL advisory locks that serialise one run's manifest ingest.
INGEST_LOCK_CLASS = 0x696E67  # "ing"


def is_postgres(conn: Reader) -> bool:
    return conn.dialect.name == "postgresql"


def insert_ignoring_duplicates(conn: Conn, table: Table | TableClause) -> Insert:
    """INSERT that skips rows whose unique key exists (runners may insert the same row)."""
    if is_postgres(conn):
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def upsert(conn: Conn, table: Table, keys: Sequence[str], **values: Any) -> Insert:
    """INSERT, or UPDATE the row with the same ``keys`` columns."""
    changes = {k: v for k, v in values.items() if k not in keys}
    if is_postgres(conn):
        pg = postgresql.insert(table).values(**values)
        return pg.on_conflict_do_update(index_elements=list(keys), set_=changes)
    lite = sqlite.insert(table).values(**values)
    return lite.on_conflict_do_update(index_elements=list(keys), set_=changes)


@asynccontextmanager
async def ingest_lock(conn: Conn, run_id: int) -> AsyncIterator[None]:
    """One ingest of a run at a time across runners; a no-op for SQLite's single runner.

    A session-level advisory lock, because an ingest commits in batches.
    """
    if not is_postgres(conn):
        yield
        return
    await conn.exec_driver_sql(f"SELECT pg_advisory_lock({INGEST_LOCK_CLASS}, {int(run_id)})")
    await conn.commit()
    try:
        yield
    finally:
        # After a failed batch the transaction is aborted; end it before unlocking.
        await conn.rollback()
        await conn.exec_driver_sql(f"SELECT pg_advisory_unlock({INGEST_LOCK_CLASS}, {int(run_id)})")
        await conn.commit()
