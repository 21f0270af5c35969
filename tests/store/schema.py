"""How a database's schema differs from the models (Alembic's comparison), for the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import create_async_engine

from batch_runner.store.models import metadata


def sqlite_schema_diff(path: Path) -> list[object]:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), metadata))
    finally:
        engine.dispose()


async def postgres_schema_diff(url: str) -> list[object]:
    def diff(sync: Any) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(sync), metadata))

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(diff)
    finally:
        await engine.dispose()


def migrate_sqlite(path: Path) -> None:
    """Build ``path``'s schema by running every migration (not from the models)."""
    from alembic import command

    from batch_runner.store.engine import alembic_config

    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()
