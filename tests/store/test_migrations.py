"""The migrations produce exactly the models, and apply to a fresh file on open."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from batch_runner.store import Store
from batch_runner.store.models import metadata


async def test_migrated_schema_matches_models(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    async with Store.open(path):
        pass
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert diff == []
