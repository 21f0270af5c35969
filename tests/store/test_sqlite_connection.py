"""The SQLite connection layer: which commits wait for fsync, and reads beside the writer."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from batch_runner.errors import DatabaseLocked
from batch_runner.states import JobState
from batch_runner.store import NewJob, Store
from batch_runner.store.sqlite import FULL, NORMAL, SqliteConnection


async def test_only_durable_steps_wait_for_an_fsync_of_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner.store import sqlite as sqlite_mod

    steps: list[str] = []
    commit, fsync = SqliteConnection.commit, sqlite_mod.fsync_path

    async def noted_commit(self: SqliteConnection) -> None:
        if self.sync.in_transaction():
            level = (await self.exec_driver_sql("PRAGMA synchronous")).scalar_one()
            steps.append("commit" if level == NORMAL else f"commit at level {level}")
        await commit(self)

    def noted_fsync(path: str) -> None:
        steps.append(f"fsync {Path(path).name}")
        fsync(path)

    path = tmp_path / "run.sqlite"
    async with Store.open(path) as store:
        run = await store.ensure_run("default", "m.csv")
        ep = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")
        await store.ingest(run.id, [NewJob("k0", 2, {}, "h0")])
        monkeypatch.setattr(SqliteConnection, "commit", noted_commit)
        monkeypatch.setattr(sqlite_mod, "fsync_path", noted_fsync)
        [job] = await store.claim(run.id, ep.id)
        attempt = await store.begin_attempt(job.id, ep.id, {}, {})
        steps.append("write-ahead record returned")
        await store.attempt_queued(attempt.id)
        await store.attempt_running(job.id, attempt.id)
        await store.attempt_completed(job.id, attempt.id, [{"filename": "a.mp4"}])
        await store.job_succeeded(job.id, attempt.id, path="/o/k0.mp4", sha256="ab", size=3)
        steps.append("success returned")
        await store.record_upload(ep.id, "cafe", "cafe.png")
    log = "fsync run.sqlite-wal"
    assert steps == [
        "commit",  # claim
        "commit",  # begin_attempt: the write-ahead record...
        log,  # ...is on disk before it returns
        "write-ahead record returned",
        "commit",  # queued
        "commit",  # running
        "commit",  # completed
        "commit",  # succeeded...
        log,
        "success returned",
        "commit",  # an upload's name
    ]


async def test_durable_commits_made_while_an_fsync_runs_share_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first durable commit's fsync is held until seven more durable commits have been
    made; all seven are then made durable by one more fsync, not seven."""
    from batch_runner.store import sqlite as sqlite_mod

    fsyncs: list[str] = []
    all_committed = threading.Event()
    commits = 0
    commit, fsync = SqliteConnection.commit, sqlite_mod.fsync_path

    async def counted_commit(self: SqliteConnection) -> None:
        nonlocal commits
        await commit(self)
        commits += 1
        if commits == 8:
            all_committed.set()

    def held_fsync(path: str) -> None:
        fsyncs.append(path)
        if len(fsyncs) == 1:
            assert all_committed.wait(timeout=30)
        fsync(path)

    path = tmp_path / "run.sqlite"
    async with Store.open(path) as store:
        run = await store.ensure_run("default", "m.csv")
        monkeypatch.setattr(SqliteConnection, "commit", counted_commit)
        monkeypatch.setattr(sqlite_mod, "fsync_path", held_fsync)
        await asyncio.gather(
            *(
                store.set_run_stamps(run.id, manifest_stamp=f"1:{n}", workflow_fingerprint="f")
                for n in range(8)
            )
        )
        assert len(fsyncs) == 2
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT manifest_stamp FROM runs").fetchone() == ("1:7",)


async def test_without_a_write_ahead_log_a_durable_commit_is_a_full_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner.store import sqlite as sqlite_mod

    init = SqliteConnection.__init__
    levels: list[int] = []
    commit = SqliteConnection.commit

    def in_rollback_journal_mode(self: SqliteConnection, sync: Any, thread: Any) -> None:
        raw = sync.connection.dbapi_connection
        raw.execute("PRAGMA journal_mode=DELETE")
        init(self, sync, thread)

    async def noted_commit(self: SqliteConnection) -> None:
        if self.sync.in_transaction():
            levels.append((await self.exec_driver_sql("PRAGMA synchronous")).scalar_one())
        await commit(self)

    def no_fsync(path: str) -> None:
        raise AssertionError(f"{path} synced on its own")

    monkeypatch.setattr(SqliteConnection, "__init__", in_rollback_journal_mode)
    monkeypatch.setattr(SqliteConnection, "commit", noted_commit)
    monkeypatch.setattr(sqlite_mod, "fsync_path", no_fsync)
    async with Store.open(tmp_path / "run.sqlite") as store:
        run = await store.ensure_run("default", "m.csv")
        await store.ensure_endpoints(run.id, ["http://127.0.0.1:1"])
    assert levels == [FULL, NORMAL]


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
        # A free write lock is taken at once and every commit only appends to the log: only
        # the write-ahead commit's fsync went to the store's thread.
        assert handed == ["fsync_path"]


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
        # Every tenth commit checkpoints on the store's thread; the others stay on the loop's.
        for n in range(25):
            await store.record_upload(ep.id, f"{n:064x}", f"{n}.png")
        assert handed == ["_commit_and_checkpoint"] * 2
        for n in range(25, 30):
            await store.record_upload(ep.id, f"{n:064x}", f"{n}.png")
        assert handed == ["_commit_and_checkpoint"] * 3
        # A durable commit adds only the fsync of the log.
        await store.set_run_stamps(record.id, manifest_stamp="1:2", workflow_fingerprint="f")
        assert handed == ["_commit_and_checkpoint"] * 3 + ["fsync_path"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM uploads").fetchone() == (30,)


async def test_quick_reads_stay_on_the_loops_thread_and_hold_no_snapshot(tmp_path: Path) -> None:
    from sqlalchemy import event

    from batch_runner.store.sqlite import SqliteBackend

    threads: list[int] = []

    def note_thread(*_args: Any) -> None:
        threads.append(threading.get_ident())

    path = tmp_path / "run.sqlite"
    async with Store.open(path) as store:
        backend = store._backend
        assert isinstance(backend, SqliteBackend)
        event.listen(backend.quick_engine, "before_cursor_execute", note_thread)
        run = await store.ensure_run("default", "m.csv")
        await store.ingest(run.id, [NewJob("k0", 2, {}, "h0")])
        assert await store.has_claimable(run.id) == (True, None)
        assert await store.count_claimable(run.id, 10) == 1
        ep = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")
        await store.claim(run.id, ep.id)
        assert await store.has_claimable(run.id) == (False, None), "sees the last commit"
        assert threads and set(threads) == {threading.get_ident()}
        # No read is left open: a full checkpoint copies the whole log and empties it.
        with contextlib.closing(sqlite3.connect(path)) as other:
            assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0)


async def test_a_database_reached_through_a_symlink_syncs_the_log_beside_its_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner.store import sqlite as sqlite_mod

    synced: list[str] = []
    fsync = sqlite_mod.fsync_path

    def noted_fsync(path: str) -> None:
        synced.append(path)
        fsync(path)

    (tmp_path / "disk").mkdir()
    (tmp_path / "here").mkdir()
    real = tmp_path / "disk" / "run.sqlite"
    (tmp_path / "here" / "run.sqlite").symlink_to(real)
    monkeypatch.setattr(sqlite_mod, "fsync_path", noted_fsync)
    async with Store.open(tmp_path / "here" / "run.sqlite") as store:
        run = await store.ensure_run("default", "m.csv")
        await store.set_run_stamps(run.id, manifest_stamp="1:2", workflow_fingerprint="f")
    assert synced and set(synced) == {f"{real}-wal"}
    with sqlite3.connect(real) as conn:
        assert conn.execute("SELECT manifest_stamp FROM runs").fetchone() == ("1:2",)
