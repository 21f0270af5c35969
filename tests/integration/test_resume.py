"""Resuming after the world changed: edited manifests, an older database copy, a schema upgrade."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine

from batch_runner.config import RunSettings
from batch_runner.emulator import Emulator, EmulatorConfig
from batch_runner.runner import RunSummary, run_batch, template_for
from batch_runner.states import JobState
from batch_runner.store.engine import alembic_config
from tests.helpers import make_image, settings_for, write_csv

FAST = EmulatorConfig(step_ms=2.0, video_max_side=32)


async def run(settings: RunSettings) -> RunSummary:
    return await run_batch(settings, template_for(settings), asyncio.Event())


def rows(*items: tuple[str, str]) -> list[dict[str, object]]:
    return [{"id": i, "image": "a.png", "prompt": p, "frames": 5} for i, p in items]


def job_states(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT key, state FROM jobs WHERE in_manifest"))


async def test_edited_manifest_runs_new_rows_and_reports_the_rest(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    manifest = write_csv(tmp_path / "jobs.csv", rows(("a", "one"), ("b", "two"), ("c", "three")))
    async with Emulator(FAST) as emulator:
        settings = settings_for(manifest, [emulator.url])
        assert (await run(settings)).exit_code == 0
        first = dict(emulator.executions)

        # b changes its prompt, c is removed, d is new.
        write_csv(manifest, rows(("a", "one"), ("b", "two, but windier"), ("d", "four")))
        edited = await run(settings)
        assert edited.ingest.added == 1
        assert edited.ingest.changed == ("b",)
        assert edited.ingest.removed == ("c",)
        assert edited.exit_code == 0
        assert len(emulator.executions) == len(first) + 1, "only the new row ran"
        assert set(job_states(settings.db)) == {"a", "b", "d"}

        rerun = await run(RunSettings(**{**settings.__dict__, "rerun_changed": True}))
        assert rerun.ingest.updated == 1
        assert len(emulator.executions) == len(first) + 2, "the changed row ran once more"
    assert set(job_states(settings.db).values()) == {"succeeded"}


async def test_older_database_copy_converges_without_repeating_known_prompts(
    tmp_path: Path,
) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    manifest = write_csv(tmp_path / "jobs.csv", rows(*[(f"k{i}", f"p{i}") for i in range(6)]))
    snapshot = tmp_path / "snapshot.sqlite"
    async with Emulator(EmulatorConfig(step_ms=15.0, video_max_side=32)) as emulator:
        settings = settings_for(manifest, [emulator.url], max_inflight=2)
        task = asyncio.create_task(run(settings))
        deadline = time.monotonic() + 30
        while not _in_flight_and_done(settings.db):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        # A backup taken mid-run, as a power cut with a stale disk cache would leave it.
        with sqlite3.connect(settings.db) as live, sqlite3.connect(snapshot) as copy:
            live.backup(copy)
        assert (await task).exit_code == 0
        with sqlite3.connect(snapshot) as copy:
            known = {r[0] for r in copy.execute("SELECT prompt_id FROM attempts")}
        before = dict(emulator.executions)

        for suffix in ("", "-wal", "-shm"):
            Path(f"{settings.db}{suffix}").unlink(missing_ok=True)
        shutil.copy(snapshot, settings.db)
        summary = await run(settings)
    assert summary.exit_code == 0
    assert summary.counts[JobState.SUCCEEDED] == 6
    for prompt_id in known:
        assert emulator.executions.get(prompt_id, 0) <= 1, "a prompt the server knew ran again"
        assert emulator.executions.get(prompt_id) == before.get(prompt_id)


def _in_flight_and_done(db: Path) -> bool:
    if not db.exists():
        return False
    try:
        states = list(job_states(db).values())
    except sqlite3.OperationalError:
        return False
    return "succeeded" in states and any(s in ("submitted", "running") for s in states)


async def test_database_from_the_previous_schema_upgrades_and_resumes(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    manifest = write_csv(tmp_path / "jobs.csv", rows(("a", "one"), ("b", "two")))
    async with Emulator(FAST) as emulator:
        settings = settings_for(manifest, [emulator.url])
        assert (await run(settings)).exit_code == 0
        _set_schema(settings.db, "0001")
        write_csv(manifest, rows(("a", "one"), ("b", "two"), ("c", "three")))
        summary = await run(settings)
        assert summary.exit_code == 0
        assert len(emulator.executions) == 3, "finished jobs kept, the new row ran"
    with sqlite3.connect(settings.db) as conn:
        [(head,)] = conn.execute("SELECT version_num FROM alembic_version")
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(attempts)")}
    assert head == "0003"
    assert "ix_attempts_endpoint_id_state" in indexes


def _set_schema(db: Path, revision: str) -> None:
    """Turn a current database into what the previous release left behind."""
    cfg = alembic_config()
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
    finally:
        engine.dispose()
