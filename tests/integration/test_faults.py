"""Misbehaving servers: the runner finishes every job once, whatever the endpoint does."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from batch_runner.config import RunSettings
from batch_runner.emulator import Emulator, EmulatorConfig, Faults
from batch_runner.runner import RunSummary, run_batch, template_for
from batch_runner.states import JobState
from tests.helpers import decoded_frames, make_image, settings_for, write_csv


async def run(settings: RunSettings) -> RunSummary:
    return await run_batch(settings, template_for(settings), asyncio.Event())


def batch(tmp_path: Path, n: int, **extra: object) -> Path:
    make_image(tmp_path / "a.png", (64, 48))
    rows = [
        {"id": f"f{i}", "image": "a.png", "prompt": f"p{i}", "frames": 5, **extra} for i in range(n)
    ]
    return write_csv(tmp_path / "jobs.csv", rows)


def attempts(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT j.key, a.state, e.url FROM attempts a JOIN jobs j ON j.id = a.job_id "
            "JOIN endpoints e ON e.id = a.endpoint_id ORDER BY a.id"
        ).fetchall()


async def wait_until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def config(**faults: object) -> EmulatorConfig:
    return EmulatorConfig(step_ms=3.0, video_max_side=32, faults=Faults(seed=11, **faults))  # type: ignore[arg-type]


async def test_lost_http_answers_never_duplicate_a_prompt(tmp_path: Path) -> None:
    manifest = batch(tmp_path, 6)
    async with Emulator(config(drop_response_rate=0.2)) as emulator:
        settings = settings_for(manifest, [emulator.url], max_attempts=10)
        summary = await run(settings)
    assert summary.counts[JobState.SUCCEEDED] == 6
    assert set(emulator.executions.values()) == {1}
    # A prompt whose POST answer was lost is adopted, not submitted again.
    assert len(emulator.executions) == len(attempts(settings.db))


async def test_deaf_sockets_are_noticed_by_reconciliation(tmp_path: Path) -> None:
    manifest = batch(tmp_path, 3)
    async with Emulator(config(ws_deaf_rate=1.0)) as emulator:
        settings = settings_for(manifest, [emulator.url], silence=0.3)
        summary = await run(settings)
    assert summary.exit_code == 0
    assert sorted(emulator.executions.values()) == [1, 1, 1]


async def test_oversized_preview_frames_reconnect_and_complete(tmp_path: Path) -> None:
    manifest = batch(tmp_path, 2, steps=4)
    big = config(preview_frames=True, preview_bytes=9 * 2**20)
    async with Emulator(big) as emulator:
        settings = settings_for(manifest, [emulator.url], silence=0.5)
        summary = await run(settings)
    assert summary.exit_code == 0
    assert sorted(emulator.executions.values()) == [1, 1]
    assert len(attempts(settings.db)) == 2, "no job may be resubmitted"


async def test_restarted_server_prompts_are_resubmitted_once(tmp_path: Path) -> None:
    manifest = batch(tmp_path, 4)
    # The server dies after every second prompt and comes back with an empty queue/history.
    async with Emulator(config(crash_after_prompts=2)) as emulator:
        settings = settings_for(
            manifest, [emulator.url], max_inflight=2, endpoint_timeout=60, max_attempts=6
        )
        task = asyncio.create_task(run(settings))
        for _ in range(10):
            await wait_until(lambda: task.done() or not emulator.running)
            if task.done():
                break
            await emulator.restart(forget=True)
        summary = await task
    assert summary.counts[JobState.SUCCEEDED] == 4
    rows = attempts(settings.db)
    assert [state for _, state, _ in rows].count("lost") >= 1
    assert set(emulator.executions.values()) == {1}
    for i in range(4):
        assert decoded_frames(settings.output_dir / f"f{i}.mp4")[0] == 5


async def test_unreachable_endpoint_hands_its_work_to_the_others(tmp_path: Path) -> None:
    manifest = batch(tmp_path, 6)
    async with AsyncExitStack() as stack:
        dying = await stack.enter_async_context(Emulator(config(crash_after_prompts=1)))
        healthy = await stack.enter_async_context(Emulator(config()))
        settings = settings_for(
            manifest, [dying.url, healthy.url], endpoint_timeout=1.0, max_attempts=5
        )
        summary = await run(settings)
    assert summary.counts[JobState.SUCCEEDED] == 6
    rows = attempts(settings.db)
    succeeded_on = {url for _, state, url in rows if state == "succeeded"}
    assert healthy.url in succeeded_on
    # Prompts stranded on the dead server were given up only after the endpoint timeout.
    assert any(state == "abandoned" and url == dying.url for _, state, url in rows)
    assert all(n == 1 for n in healthy.executions.values())


async def test_out_of_memory_is_retried_on_another_endpoint(tmp_path: Path) -> None:
    manifest = batch(tmp_path, 4)
    async with AsyncExitStack() as stack:
        oom = await stack.enter_async_context(Emulator(config(execution_error_rate=1.0)))
        fine = await stack.enter_async_context(Emulator(config()))
        settings = settings_for(manifest, [oom.url, fine.url], max_attempts=4)
        summary = await run(settings)
    assert summary.exit_code == 0
    rows = attempts(settings.db)
    assert all(url == fine.url for _, state, url in rows if state == "succeeded")


async def test_missing_model_fails_at_once_with_the_server_message(tmp_path: Path) -> None:
    # Preflight checks the workflow's own files; a row can still name one the server lacks.
    manifest = batch(tmp_path, 2, **{"node.37.unet_name": "gone.safetensors"})
    async with Emulator(config()) as emulator:
        settings = settings_for(manifest, [emulator.url], max_attempts=3)
        summary = await run(settings)
    assert summary.exit_code == 1
    assert summary.counts[JobState.FAILED] == 2
    with sqlite3.connect(settings.db) as conn:
        errors = [r[0] for r in conn.execute("SELECT last_error FROM jobs")]
        tries = [r[0] for r in conn.execute("SELECT attempts FROM jobs")]
    assert tries == [1, 1], "a rejected workflow is not retried"
    assert all("gone.safetensors" in e for e in errors)
    assert emulator.executions == {}


async def test_disk_full_stops_the_run_resumably_with_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from batch_runner import outputs

    manifest = batch(tmp_path, 4)
    real_stream_to = outputs._stream_to
    calls = 0

    async def fill_disk(response, part, limit, filename, endpoint):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 2:  # the second download meets a full disk half-way
            part.write_bytes(b"half a video")
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_stream_to(response, part, limit, filename, endpoint)

    async with Emulator(config()) as emulator:
        settings = settings_for(manifest, [emulator.url], max_inflight=1)
        monkeypatch.setattr(outputs, "_stream_to", fill_disk)
        stopped = await run(settings)
        assert stopped.exit_code == 130
        assert stopped.stop_reason is not None and "No space left" in stopped.stop_reason
        assert stopped.counts[JobState.FETCHING] == 1
        assert not list(settings.output_dir.rglob("*.part"))
        assert len(list(settings.output_dir.glob("*.mp4"))) == 1

        monkeypatch.setattr(outputs, "_stream_to", real_stream_to)
        resumed = await run(settings)
    assert resumed.exit_code == 0
    assert set(emulator.executions.values()) == {1} and len(emulator.executions) == 4


async def test_prompt_interrupted_on_the_server_fails_its_job_without_retry(
    tmp_path: Path,
) -> None:
    import aiohttp

    manifest = batch(tmp_path, 2)
    async with Emulator(EmulatorConfig(step_ms=40.0, video_max_side=32)) as emulator:
        settings = settings_for(manifest, [emulator.url], max_inflight=1)
        task = asyncio.create_task(run(settings))
        await wait_until(lambda: "running" in job_states(settings.db))
        async with aiohttp.ClientSession() as http:  # someone at the server presses Cancel
            await http.post(f"{emulator.url}/interrupt", json={})
        summary = await task
    assert summary.counts[JobState.FAILED] == 1 and summary.counts[JobState.SUCCEEDED] == 1
    with sqlite3.connect(settings.db) as conn:
        [(error, tries)] = conn.execute(
            "SELECT last_error, attempts FROM jobs WHERE state = 'failed'"
        )
    assert "interrupted" in error and tries == 1


def job_states(db: Path) -> list[str]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as conn:
            return [r[0] for r in conn.execute("SELECT state FROM jobs")]
    except sqlite3.OperationalError:
        return []


@pytest.fixture
def rested(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set when a lane is rested (given no new work for a while); slots do not wait for a
    websocket the broken servers below refuse."""
    from batch_runner import scheduler
    from batch_runner.lane import Lane

    monkeypatch.setattr(scheduler, "WS_READY_WAIT_S", 0.1)
    event = asyncio.Event()
    mark_down = Lane.mark_down

    def noting(lane: Lane, error: BaseException, *, rest: float = 0.0) -> None:
        mark_down(lane, error, rest=rest)
        if rest:
            event.set()

    monkeypatch.setattr(Lane, "mark_down", noting)
    return event


async def run_until_rested(settings: RunSettings, rested: asyncio.Event) -> RunSummary:
    """Run until the endpoint is rested (or the run ends by itself), then stop it."""
    stopping = asyncio.Event()
    running = asyncio.create_task(run_batch(settings, template_for(settings), stopping))
    resting = asyncio.create_task(rested.wait())
    await asyncio.wait([running, resting], return_when=asyncio.FIRST_COMPLETED)
    stopping.set()
    resting.cancel()
    return await running


async def test_an_endpoint_answering_only_server_errors_rests_instead_of_failing_every_job(
    tmp_path: Path, rested: asyncio.Event
) -> None:
    """A server (or a proxy before a ComfyUI that is down) answering 5xx to everything gets
    no new work for a while after a few failed calls in a row, so the jobs keep their
    attempts for when it recovers instead of failing within seconds."""
    from batch_runner.lane import SERVER_ERRORS_TO_REST

    manifest = batch(tmp_path, 8)
    async with Emulator(config(http_5xx_rate=1.0)) as broken:
        # A prompt still on the rested server is given up after a second, not waited for.
        settings = settings_for(manifest, [broken.url], max_attempts=3, endpoint_timeout=1.0)
        summary = await run_until_rested(settings, rested)
    assert rested.is_set(), "the endpoint was never rested"
    assert summary.counts.get(JobState.FAILED, 0) == 0
    waiting = summary.counts.get(JobState.PENDING, 0) + summary.counts.get(JobState.RETRY_WAIT, 0)
    assert waiting == 8
    with sqlite3.connect(settings.db) as conn:
        (used,) = conn.execute("SELECT sum(attempts) FROM jobs").fetchone()
    # The calls that made it rest, and at most one more per slot busy at that moment.
    assert used <= SERVER_ERRORS_TO_REST + 1


async def test_an_endpoint_whose_videos_always_break_off_rests_instead_of_rerunning_every_job(
    tmp_path: Path, rested: asyncio.Event
) -> None:
    """Each job whose download fails ran on the GPU for nothing and runs again; after a few
    in a row the endpoint rests instead of running every job max_attempts times."""
    from batch_runner.lane import SERVER_ERRORS_TO_REST

    manifest = batch(tmp_path, 8)
    async with Emulator(config(truncate_view_rate=1.0)) as broken:
        # A prompt still on the rested server is given up after a second, not waited for.
        settings = settings_for(manifest, [broken.url], max_attempts=3, endpoint_timeout=1.0)
        summary = await run_until_rested(settings, rested)
        ran = sum(broken.executions.values())
    assert rested.is_set(), "the endpoint was never rested"
    assert summary.counts.get(JobState.FAILED, 0) == 0
    # The jobs that made it rest, and at most one more per slot busy at that moment.
    assert ran <= SERVER_ERRORS_TO_REST + 1
