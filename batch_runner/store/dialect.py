"""The few statements that SQLite and PostgreSQL spell differently, in one place.

Everything else in the repository is dialect-neutral SQLAlchemy Core. Row locks
(``with_for_update``) need no case here: SQLite's compiler leaves them out, and there the
single writer (BEGIN IMMEDIATE) already serialises every transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Insert, Table, TableClause, insert
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


async def lock_ingest(conn: Conn, run_id: int) -> None:
    """One ingest of a run at a time across runners; a no-op for SQLite, whose write
    transaction already excludes every other writer.

    A transaction-level advisory lock: the ingest is one transaction, and the lock goes
    with its commit or rollback. Under READ COMMITTED the statements after it see the rows
    an ingest that held it before committed.
    """
    if is_postgres(conn):
        await conn.exec_driver_sql(
            f"SELECT pg_advisory_xact_lock({INGEST_LOCK_CLASS}, {int(run_id)})"
        )


def insert_sql(conn: Reader, table: Table, columns: Sequence[str]) -> str:
    """The driver's own INSERT text for ``columns`` in that order, for executemany with
    plain tuples (no per-row parameter processing)."""
    compiled = insert(table).compile(
        dialect=conn.dialect, column_keys=list(columns), for_executemany=True
    )
    if compiled.positiontup != list(columns):  # a column with a default was left out
        raise ValueError(f"name every column of the INSERT: {compiled.positiontup}")
    return str(compiled)
