"""Resuming after the world changed: edited manifests, an older database copy, a schema upgrade."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine

from batch_runner import output_check
from batch_runner.config import RunSettings
from batch_runner.emulator import Emulator, EmulatorConfig
from batch_runner.runner import RunSummary, run_batch, template_for
from batch_runner.scheduler import Scheduler
from batch_runner.states import JobState
from batch_runner.store.engine import HEAD_REVISION, alembic_config
from tests.helpers import make_image, settings_for, write_csv

FAST = EmulatorConfig(step_ms=2.0, video_max_side=32)


async def run(settings: RunSettings, stopping: asyncio.Event | None = None) -> RunSummary:
    return await run_batch(settings, template_for(settings), stopping or asyncio.Event())


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
        [(runner_index,)] = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'ix_jobs_runner_id_state'"
        )
    assert head == HEAD_REVISION
    assert "ix_attempts_endpoint_id_state" in indexes
    assert runner_index.endswith("WHERE runner_id IS NOT NULL")


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


class ChecksumGate:
    """Holds the output check's checksum pass until the scheduler's only slot has found
    nothing to claim and gone idle: the moment a run would end if it did not wait for it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.idle = threading.Event()
        self.hashed: list[Path] = []
        real_sha256, real_idle = output_check.sha256_file, Scheduler._idle

        def gated_sha256(path: Path) -> str:
            self.idle.wait(timeout=20)
            self.hashed.append(path)
            return real_sha256(path)

        async def noted_idle(scheduler: Scheduler, seconds: float) -> None:
            self.on_idle()
            await real_idle(scheduler, seconds)

        monkeypatch.setattr(output_check, "sha256_file", gated_sha256)
        monkeypatch.setattr(Scheduler, "_idle", noted_idle)

    def on_idle(self) -> None:
        self.idle.set()


def alter_keeping_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def recorded_sha256(db: Path, key: str) -> str:
    with sqlite3.connect(db) as conn:
        [(digest,)] = conn.execute("SELECT output_sha256 FROM jobs WHERE key = ?", (key,))
    return str(digest)


async def test_bad_outputs_run_again_alongside_new_work_before_the_run_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    manifest = write_csv(tmp_path / "jobs.csv", rows(("a", "one"), ("b", "two")))
    async with Emulator(FAST) as emulator:
        settings = settings_for(manifest, [emulator.url], max_inflight=1)
        assert (await run(settings)).exit_code == 0
        (settings.output_dir / "a.mp4").unlink()  # found by the first pass (no file)
        alter_keeping_size(settings.output_dir / "b.mp4")  # only the checksum pass sees it
        write_csv(manifest, rows(("a", "one"), ("b", "two"), ("c", "three")))
        gate = ChecksumGate(monkeypatch)

        summary = await run(settings)

        assert summary.exit_code == 0
        assert summary.requeued_outputs == 2
        # b's checksum was taken only once the new work was done and the slot was idle; a
        # run that ended there would have left b altered.
        assert [p.name for p in gate.hashed] == ["b.mp4"]
        assert len(emulator.executions) == 2 + 3, "a and b made again, c new"
    assert set(job_states(settings.db).values()) == {"succeeded"}
    for key in ("a", "b"):
        made = hashlib.sha256((settings.output_dir / f"{key}.mp4").read_bytes()).hexdigest()
        assert made == recorded_sha256(settings.db, key)


async def test_a_stop_cancels_the_output_check_and_the_next_run_checks_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    manifest = write_csv(tmp_path / "jobs.csv", rows(("a", "one"), ("b", "two")))
    async with Emulator(FAST) as emulator:
        settings = settings_for(manifest, [emulator.url], max_inflight=1)
        assert (await run(settings)).exit_code == 0
        alter_keeping_size(settings.output_dir / "b.mp4")
        made_before = len(emulator.executions)

        stopping = asyncio.Event()
        gate = ChecksumGate(monkeypatch)
        # Stop while the checksum pass is held; it is let go only once the run is over.
        gate.on_idle = stopping.set  # type: ignore[method-assign]
        stopped = await run(settings, stopping)
        gate.idle.set()
        assert stopped.stopped and stopped.exit_code == 130
        assert stopped.requeued_outputs == 0
        assert job_states(settings.db)["b"] == "succeeded", "unchecked, not yet requeued"

        monkeypatch.undo()
        resumed = await run(settings)
        assert resumed.exit_code == 0
        assert resumed.requeued_outputs == 1
        assert len(emulator.executions) == made_before + 1
    made = hashlib.sha256((settings.output_dir / "b.mp4").read_bytes()).hexdigest()
    assert made == recorded_sha256(settings.db, "b")


async def test_a_server_that_lost_its_input_images_gets_them_uploaded_again(
    tmp_path: Path,
) -> None:
    """The store and the lanes both remember that an image is on a server; when the server
    rejects a prompt for a missing input (restarted with its input folder cleaned), both
    forget it and the job's next attempt uploads it again."""
    make_image(tmp_path / "a.png", (64, 48))
    manifest = write_csv(tmp_path / "jobs.csv", rows(("a", "one")))
    async with Emulator(FAST) as emulator:
        settings = settings_for(manifest, [emulator.url])
        assert (await run(settings)).exit_code == 0
        inputs = emulator.data_dir / "input"
        uploaded = sorted(p.name for p in inputs.iterdir())
        assert uploaded
        for name in uploaded:
            (inputs / name).unlink()

        write_csv(manifest, rows(("a", "one"), ("b", "two"), ("c", "three"), ("d", "four")))
        assert (await run(settings)).exit_code == 0
        assert sorted(p.name for p in inputs.iterdir()) == uploaded
    assert set(job_states(settings.db).values()) == {"succeeded"}
    with sqlite3.connect(settings.db) as conn:
        [(retried,)] = conn.execute("SELECT count(*) FROM jobs WHERE attempts > 1")
    assert retried >= 1, "the first prompt with the lost image was rejected"
