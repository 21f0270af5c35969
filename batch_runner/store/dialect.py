"""The few statements that SQLite and PostgreSQL spell differently, in one place.

Everything else in the repository is dialect-neutral SQLAlchemy Core. Row locks
(``with_for_update``) need no case here: SQLite's compiler leaves them out, and there the
single writer (BEGIN IMMEDIATE) already serialises every transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Insert, Table, TableClause, insert, literal, select
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


async def drop_indexes_while_empty(conn: Conn, table: Table) -> list[str]:
    """On SQLite, when ``table`` has no rows at all: drop the secondary indexes the models
    declare on it, in the caller's transaction; return the statements that create them again.

    Filling an empty table and then building its indexes costs about a quarter less than
    keeping the indexes up to date row by row. The statements are the database's own (its
    schema text), so the schema after they run is the one it had. SQLite's DDL is
    transactional: a rollback keeps the indexes. Nothing is dropped on PostgreSQL, where
    dropping an index locks the whole table against the other runners sharing it, nor while
    any run has rows, which the indexes would have to be rebuilt over.
    """
    if is_postgres(conn):
        return []
    if (await conn.execute(select(literal(1)).select_from(table).limit(1))).first() is not None:
        return []
    declared = {index.name for index in table.indexes}
    found = await conn.exec_driver_sql(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?",
        (table.name,),
    )
    indexes = [(name, sql) for name, sql in found if name in declared and sql]
    preparer = conn.dialect.identifier_preparer
    for name, _ in indexes:
        await conn.exec_driver_sql(f"DROP INDEX {preparer.quote(name)}")
    return [sql for _, sql in indexes]


async def create_indexes(conn: Conn, statements: Sequence[str]) -> None:
    """Run the statements ``drop_indexes_while_empty`` returned, on SQLite's store thread: an
    index over a million rows takes most of a second, which the loop spends elsewhere."""
    from batch_runner.store.sqlite import SqliteConnection

    for statement in statements:
        if isinstance(conn, SqliteConnection):
            await conn.exec_long(statement)
        else:
            await conn.exec_driver_sql(statement)
