"""The migrations produce exactly the models; a new file gets the same schema on open."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from batch_runner.errors import SchemaError
from batch_runner.store import Store
from tests.store.schema import migrate_sqlite, sqlite_schema_diff


def _revision(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [v for (v,) in conn.execute("SELECT version_num FROM alembic_version")]


def test_migrations_produce_exactly_the_models(tmp_path: Path) -> None:
    from batch_runner.store.engine import HEAD_REVISION

    path = tmp_path / "run.sqlite"
    migrate_sqlite(path)
    assert sqlite_schema_diff(path) == []
    assert _revision(path) == [HEAD_REVISION]


def _index_definitions(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        found = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )
        return sorted(found)


async def test_migrated_indexes_keep_the_models_conditions(tmp_path: Path) -> None:
    """Alembic's comparison leaves out a partial index's condition; the definitions do not."""
    migrated, created = tmp_path / "migrated.sqlite", tmp_path / "created.sqlite"
    migrate_sqlite(migrated)
    async with Store.open(created):
        pass
    definitions = _index_definitions(migrated)
    assert definitions == _index_definitions(created)
    assert any(sql.endswith("WHERE runner_id IS NOT NULL") for _, sql in definitions)


async def test_a_new_file_gets_the_models_schema_stamped_with_the_newest_revision(
    tmp_path: Path,
) -> None:
    from batch_runner.store.engine import HEAD_REVISION

    path = tmp_path / "run.sqlite"
    async with Store.open(path):
        pass
    assert sqlite_schema_diff(path) == []
    assert _revision(path) == [HEAD_REVISION]


def test_head_revision_is_the_newest_migration() -> None:
    from alembic.script import ScriptDirectory

    from batch_runner.store.engine import HEAD_REVISION, alembic_config

    assert ScriptDirectory.from_config(alembic_config()).get_heads() == [HEAD_REVISION]


def test_a_new_or_current_database_opens_without_alembic(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    script = (
        "import asyncio, sys\n"
        "from batch_runner.store import Store\n"
        "async def main():\n"
        "    for _ in ('create', 'reopen'):\n"
        "        async with Store.open(sys.argv[1]):\n"
        "            pass\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "[]", done.stdout


async def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    async with Store.open(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaError, match="newer batch-runner"):
        async with Store.open(path):
            pass
