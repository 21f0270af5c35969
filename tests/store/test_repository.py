"""The repository against a real SQLite file: guarded transitions, claims, ingest, locking."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batch_runner.errors import RunLocked, TransitionRejected
from batch_runner.states import AttemptState, JobState
from batch_runner.store import NewJob, Store


def rows(n: int, *, changed: dict[str, str] | None = None) -> list[NewJob]:
    changed = changed or {}
    return [
        NewJob(f"k{i}", i + 2, {"prompt": f"p{i}"}, changed.get(f"k{i}", f"h{i}")) for i in range(n)
    ]


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """The same repository tests on both dialects (the PostgreSQL one needs a server)."""
    where = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    async with Store.open(where or tmp_path / "run.sqlite") as s:
        yield s


async def test_happy_path_is_logged_in_order(store: Store) -> None:
    run = await store.ensure_run("default", "m.csv")
    ep = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")
    await store.ingest(run.id, rows(1))
    [job] = await store.claim(run.id, ep.id)
    attempt = await store.begin_attempt(job.id, ep.id, {"1": {}}, {"seed": 5})
    await store.attempt_queued(attempt.id)
    assert await store.attempt_running(job.id, attempt.id)
    assert not await store.attempt_running(job.id, attempt.id), "a repeat must be a no-op"
    assert await store.attempt_completed(job.id, attempt.id, [{"filename": "a.mp4"}])
    assert not await store.attempt_completed(job.id, attempt.id, [{"filename": "a.mp4"}])
    await store.job_succeeded(job.id, attempt.id, path="/o/k0.mp4", sha256="ab", size=3)

    done = await store.job(job.id)
    assert done.state is JobState.SUCCEEDED
    assert done.resolved == {"seed": 5}
    assert done.attempts == 1
    async with store._reading() as conn:
        result = await conn.exec_driver_sql("SELECT to_state FROM job_events ORDER BY id")
        trail = [r[0] for r in result]
    assert trail == ["preparing", "submitted", "running", "fetching", "succeeded"]


async def test_transition_from_wrong_state_is_rejected(store: Store) -> None:
    run = await store.ensure_run("default", "m.csv")
    await store.ingest(run.id, rows(1))
    [job_id] = [j.id async for j in _all_pending(store, run.id)]
    with pytest.raises(TransitionRejected):
        await store.job_succeeded(job_id, 999, path="x", sha256="y", size=1)
    assert (await store.job(job_id)).state is JobState.PENDING


async def _all_pending(store: Store, run_id: int) -> AsyncIterator[object]:
    ep = await store.ensure_endpoint(run_id, "http://127.0.0.1:9")
    for job in await store.claim(run_id, ep.id, limit=100):
        await store.release(job.id, "test")
        yield job


async def test_retry_prefers_another_endpoint(store: Store) -> None:
    run = await store.ensure_run("default", "m.csv")
    a = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")
    b = await store.ensure_endpoint(run.id, "http://127.0.0.1:2")
    await store.ingest(run.id, rows(1))
    [job] = await store.claim(run.id, a.id)
    attempt = await store.begin_attempt(job.id, a.id, {}, {})
    state = await store.attempt_failed(
        job.id,
        attempt.id,
        error="oom",
        kind="ExecutionTransient",
        retry_at=0.0,
        endpoint_id=a.id,
    )
    assert state is JobState.RETRY_WAIT
    await store.ingest(run.id, rows(2))  # a fresh pending job k1 appears
    [first] = await store.claim(run.id, a.id)
    assert first.key == "k1", "endpoint a should take new work before the job it just failed"
    [second] = await store.claim(run.id, b.id)
    assert second.key == "k0"


async def test_exhausted_attempts_fail_the_job(store: Store) -> None:
    run = await store.ensure_run("default", "m.csv")
    ep = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")
    await store.ingest(run.id, rows(1))
    [job] = await store.claim(run.id, ep.id)
    attempt = await store.begin_attempt(job.id, ep.id, {}, {})
    state = await store.attempt_failed(
        job.id, attempt.id, error="bad", kind="WorkflowRejected", retry_at=None
    )
    assert state is JobState.FAILED
    assert await store.retry_failed(run.id) == 1
    assert (await store.job(job.id)).state is JobState.PENDING


async def test_ingest_reports_changed_and_removed_rows(store: Store) -> None:
    run = await store.ensure_run("default", "m.csv")
    ep = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")
    first = await store.ingest(run.id, rows(3))
    assert first.added == 3
    [job] = await store.claim(run.id, ep.id)
    attempt = await store.begin_attempt(job.id, ep.id, {}, {})
    await store.attempt_failed(job.id, attempt.id, error="x", kind="k", retry_at=None)

    # k0 ran and changed, k1 never ran and changed, k2 was removed, k3 is new.
    again = await store.ingest(
        run.id, [*rows(2, changed={"k0": "new0", "k1": "new1"}), NewJob("k3", 9, {}, "h3")]
    )
    assert again.added == 1
    assert again.changed == ("k0",)
    assert again.updated == 1
    assert again.removed == ("k2",)
    counts = await store.counts(run.id)
    assert counts[JobState.PENDING] == 2 and counts[JobState.FAILED] == 1
    assert (await store.job(job.id)).changed_hash == "new0"

    rerun = await store.ingest(
        run.id, rows(2, changed={"k0": "new0", "k1": "new1"}), rerun_changed=True
    )
    assert rerun.updated == 1 and rerun.removed == ("k3",)
    assert (await store.job(job.id)).state is JobState.PENDING


async def test_second_runner_is_refused(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "run.sqlite"):
        with pytest.raises(RunLocked, match="in use by another batch-runner"):
            async with Store.open(tmp_path / "run.sqlite"):
                pass
        # Readers do not take the runner lock.
        async with Store.open(tmp_path / "run.sqlite", exclusive=False):
            pass


async def test_a_runner_reaching_the_database_through_a_symlink_is_refused(
    tmp_path: Path,
) -> None:
    (tmp_path / "disk").mkdir()
    (tmp_path / "here").mkdir()
    real = tmp_path / "disk" / "run.sqlite"
    (tmp_path / "here" / "run.sqlite").symlink_to(real)
    async with Store.open(real):
        with pytest.raises(RunLocked, match="in use by another batch-runner"):
            async with Store.open(tmp_path / "here" / "run.sqlite"):
                pass


async def test_attempt_states_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    async with Store.open(path) as s:
        run = await s.ensure_run("default", "m.csv")
        ep = await s.ensure_endpoint(run.id, "http://127.0.0.1:1")
        await s.ingest(run.id, rows(2))
        [job] = await s.claim(run.id, ep.id)
        attempt = await s.begin_attempt(job.id, ep.id, {"g": 1}, {})
        client_id = ep.client_id
    async with Store.open(path) as s:
        run = await s.ensure_run("default", "m.csv")
        assert (await s.ensure_endpoint(run.id, "http://127.0.0.1:1")).client_id == client_id
        [(j, a)] = await s.in_flight(run.id)
        assert (j.key, a.prompt_id, a.state) == ("k0", attempt.prompt_id, AttemptState.INTENT)
        assert a.graph == {"g": 1}


async def test_a_lock_held_elsewhere_gives_a_typed_error_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner.errors import DatabaseLocked
    from batch_runner.store import engine as engine_mod

    monkeypatch.setattr(engine_mod, "BUSY_TIMEOUT_MS", 50)
    path = tmp_path / "run.sqlite"
    async with Store.open(path) as store:
        run = await store.ensure_run("default", "m.csv")
        await store.ingest(run.id, rows(1))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another program takes the write lock and keeps it
        with pytest.raises(DatabaseLocked, match="locked by another program"):
            await store.retry_failed(run.id)
        other.execute("ROLLBACK")
        other.close()
        ep = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")
        [job] = await store.claim(run.id, ep.id)
        assert job.state is JobState.PREPARING


async def test_a_briefly_held_lock_is_waited_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from batch_runner.store import engine as engine_mod

    monkeypatch.setattr(engine_mod, "BUSY_TIMEOUT_MS", 50)
    path = tmp_path / "run.sqlite"
    async with Store.open(path) as store:
        run = await store.ensure_run("default", "m.csv")
        await store.ingest(run.id, rows(1))
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.15, lambda: other.execute("ROLLBACK"))
        release.start()
        ep = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")
        release.join()
        other.close()
        [job] = await store.claim(run.id, ep.id)
        assert job.key == "k0"


async def _succeed(store: Store, run_id: int, endpoint_id: int, n: int) -> list[int]:
    done = []
    for job in await store.claim(run_id, endpoint_id, limit=n):
        attempt = await store.begin_attempt(job.id, endpoint_id, {"1": {}}, {})
        assert await store.attempt_completed(job.id, attempt.id, [])
        path = f"/o/{job.key}.mp4"
        await store.job_succeeded(job.id, attempt.id, path=path, sha256=job.key, size=job.line)
        done.append(job.id)
    return done


async def test_finished_outputs_come_in_pages_and_leave_out_this_runs_own(store: Store) -> None:
    run = await store.ensure_run("default", "m.csv")
    ep = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")
    await store.ingest(run.id, rows(8))
    earlier = await _succeed(store, run.id, ep.id, 5)
    cut = time.time()
    await _succeed(store, run.id, ep.id, 2)  # finished after the cut: left out

    pages, after = [], 0
    while page := await store.finished_outputs(
        run.id, after_id=after, finished_before=cut, limit=2
    ):
        pages.append(page)
        after = page[-1].job_id
    assert [len(p) for p in pages] == [2, 2, 1]
    outputs = [o for p in pages for o in p]
    assert [o.job_id for o in outputs] == earlier
    first = outputs[0]
    assert (first.path, first.sha256, first.size) == (f"/o/{first.key}.mp4", first.key, 2)


async def test_endpoints_are_recorded_together_in_the_order_asked(store: Store) -> None:
    run = await store.ensure_run("default", "m.csv")
    first = await store.ensure_endpoint(run.id, "http://127.0.0.1:2")
    urls = ["http://127.0.0.1:3", "http://127.0.0.1:2", "http://127.0.0.1:1"]
    records = await store.ensure_endpoints(run.id, urls)
    assert [r.url for r in records] == urls
    assert records[1] == first, "a known endpoint keeps its id and client id"
    assert len({r.id for r in records}) == 3 and len({r.client_id for r in records}) == 3
    assert await store.ensure_endpoints(run.id, urls) == records
    assert sorted(await store.endpoints_of(run.id), key=lambda r: r.id) == sorted(
        records, key=lambda r: r.id
    )


async def test_recorded_uploads_are_all_of_them_or_none(store: Store) -> None:
    run = await store.ensure_run("default", "m.csv")
    few, many, none = await store.ensure_endpoints(
        run.id, ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
    )
    await store.record_upload(few.id, "aa", "a.png")
    await store.record_upload(few.id, "bb", "sub/b.png")
    for n in range(4):
        await store.record_upload(many.id, f"{n:02x}", f"{n}.png")
    found = await store.recorded_uploads([few.id, many.id, none.id], at_most=3)
    assert found == {few.id: {"aa": "a.png", "bb": "sub/b.png"}, many.id: None, none.id: {}}
