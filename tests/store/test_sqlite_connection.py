"""The SQLite connection layer: which commits wait for fsync, and reads beside the writer."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from batch_runner.errors import DatabaseLocked
from batch_runner.states import JobState
from batch_runner.store import NewJob, Store
from batch_runner.store.sqlite import FULL, NORMAL, SqliteConnection


async def test_only_recomputable_steps_commit_without_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    levels: list[int] = []
    commit = SqliteConnection.commit

    async def spying_commit(self: SqliteConnection) -> None:
        if self.sync.in_transaction():
            levels.append((await self.exec_driver_sql("PRAGMA synchronous")).scalar_one())
        await commit(self)

    async with Store.open(tmp_path / "run.sqlite") as store:
        run = await store.ensure_run("default", "m.csv")
        ep = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")
        await store.ingest(run.id, [NewJob("k0", 2, {}, "h0")])
        monkeypatch.setattr(SqliteConnection, "commit", spying_commit)
        [job] = await store.claim(run.id, ep.id)
        attempt = await store.begin_attempt(job.id, ep.id, {}, {})
        await store.attempt_queued(attempt.id)
        await store.attempt_running(job.id, attempt.id)
        await store.attempt_completed(job.id, attempt.id, [{"filename": "a.mp4"}])
        await store.job_succeeded(job.id, attempt.id, path="/o/k0.mp4", sha256="ab", size=3)
        await store.record_upload(ep.id, "cafe", "cafe.png")
    # claim, begin_attempt (write-ahead), queued, running, completed, succeeded, upload
    assert levels == [NORMAL, FULL, NORMAL, NORMAL, NORMAL, FULL, NORMAL]


async def test_reads_go_on_while_another_program_holds_the_write_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner.store import engine as engine_mod

    monkeypatch.setattr(engine_mod, "BUSY_TIMEOUT_MS", 20)
    monkeypatch.setattr("batch_runner.store.repository.LOCK_RETRIES", 1)
    path = tmp_path / "run.sqlite"
    async with Store.open(path) as store:
        run = await store.ensure_run("default", "m.csv")
        await store.ingest(run.id, [NewJob("k0", 2, {}, "h0")])
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(DatabaseLocked):
                await store.retry_failed(run.id)  # a write cannot start...
            # ...while every read still answers, from the last commit.
            assert (await store.counts(run.id))[JobState.PENDING] == 1
            assert await store.has_claimable(run.id) == (True, None)
            assert await store.finished_outputs(run.id, after_id=0, finished_before=1e12) == []
            assert (await store.only_run()) is not None
        finally:
            other.execute("ROLLBACK")
            other.close()


async def test_only_durable_commits_and_checkpoints_leave_the_loops_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner.store.sqlite import _Thread

    handed: list[str] = []
    run = _Thread.run

    async def counting(self: _Thread, fn: Any, *args: Any) -> Any:
        handed.append(getattr(fn, "__name__", repr(fn)))
        return await run(self, fn, *args)

    async with Store.open(tmp_path / "run.sqlite") as store:
        record = await store.ensure_run("default", "m.csv")
        ep = await store.ensure_endpoint(record.id, "http://127.0.0.1:1")
        await store.ingest(record.id, [NewJob("k0", 2, {}, "h0")])
        monkeypatch.setattr(_Thread, "run", counting)
        [job] = await store.claim(record.id, ep.id)
        await store.begin_attempt(job.id, ep.id, {}, {})
        # A free write lock is taken at once and the claim's commit only appends to the
        # log: only the write-ahead commit, which waits for fsync, went to the store's thread.
        assert handed == ["commit"]


async def test_the_log_is_checkpointed_on_the_store_thread_every_so_many_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner.store import sqlite as sqlite_mod
    from batch_runner.store.sqlite import _Thread

    monkeypatch.setattr(sqlite_mod, "CHECKPOINT_EVERY", 10)
    handed: list[str] = []
    run = _Thread.run

    async def counting(self: _Thread, fn: Any, *args: Any) -> Any:
        handed.append(getattr(fn, "__name__", repr(fn)))
        return await run(self, fn, *args)

    path = tmp_path / "run.sqlite"
    async with Store.open(path) as store:
        record = await store.ensure_run("default", "m.csv")
        ep = await store.ensure_endpoint(record.id, "http://127.0.0.1:1")
        monkeypatch.setattr(_Thread, "run", counting)
        # Recomputable commits alone: the 20th, overdue, checkpoints on the store's thread.
        for n in range(25):
            await store.record_upload(ep.id, f"{n:064x}", f"{n}.png")
        assert handed == ["_commit_and_checkpoint"]
        # Five more make ten since that checkpoint, still on the loop's thread...
        for n in range(25, 30):
            await store.record_upload(ep.id, f"{n:064x}", f"{n}.png")
        assert handed == ["_commit_and_checkpoint"]
        # ...and the next durable commit checkpoints with it; the one after does not.
        await store.set_run_stamps(record.id, manifest_stamp="1:2", workflow_fingerprint="f")
        await store.set_run_stamps(record.id, manifest_stamp="1:3", workflow_fingerprint="f")
        assert handed == ["_commit_and_checkpoint", "_commit_and_checkpoint", "commit"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM uploads").fetchone() == (30,)
