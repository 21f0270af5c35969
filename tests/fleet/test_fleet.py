"""Runners sharing one PostgreSQL run: claims, capacity, takeover after SIGKILL, restart."""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.acceptance.conftest import start_cli, wait_for
from tests.fleet.conftest import executions, manifest, query
from tests.pgserver import free_port

_started: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_runner_left_behind() -> Iterator[None]:
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def runner(
    tmp_path: Path, db: str, name: str, urls: list[str], *extra: str
) -> subprocess.Popen[str]:
    endpoints = [arg for url in urls for arg in ("--endpoint", url)]
    proc = start_cli(
        "run", "jobs.csv", "--db", db, "--runner-name", name, *endpoints, *extra, cwd=tmp_path
    )
    _started.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, str]:
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
        raise AssertionError(f"runner did not finish in {timeout} s:\n{err[-4000:]}") from None
    return proc.returncode, err


def assert_each_job_ran_once(db: str, urls: list[str], n: int) -> None:
    states = query(db, "SELECT state, count(*) FROM jobs GROUP BY state")
    assert {r[0]: r[1] for r in states} == {"succeeded": n}
    ran = executions(urls)
    assert set(ran.values()) == {1}, "a prompt ran twice"
    prompts_per_job = query(
        db,
        "SELECT j.key, array_agg(a.prompt_id) FROM jobs j JOIN attempts a ON a.job_id = j.id "
        "GROUP BY j.key",
    )
    for key, prompt_ids in prompts_per_job:
        assert sum(1 for p in prompt_ids if p in ran) == 1, f"{key} ran more than once"


def test_three_runners_share_three_endpoints_and_run_each_job_once(
    tmp_path: Path, pg_url: str, emulators: Callable[..., list[str]]
) -> None:
    # The runner that just finished a job claims the next one at once, while the others look
    # every SHARED_RECHECK_S, so a runner that holds every endpoint tends to keep them. Each
    # runner here uses two of the three endpoints, and each endpoint is shared by two
    # runners: whoever starts first holds two endpoints at most, and the third is free for
    # one of the others.
    manifest(tmp_path, 48)
    urls = emulators(3, step_ms=20)
    procs = [
        runner(tmp_path, pg_url, f"r{i}", [urls[i], urls[(i + 1) % 3]], "--max-inflight", "1")
        for i in range(3)
    ]
    for proc in procs:
        code, err = finish(proc)
        assert code == 0, err
    assert_each_job_ran_once(pg_url, urls, 48)
    workers = query(pg_url, "SELECT runner_id, count(*) FROM jobs GROUP BY runner_id")
    assert len(workers) >= 2, "SKIP LOCKED claims should spread the jobs over the runners"
    stopped = query(pg_url, "SELECT name FROM runners WHERE stopped_at IS NOT NULL")
    assert sorted(r[0] for r in stopped) == ["r0", "r1", "r2"]
    # --max-inflight 1 is each endpoint's capacity across all runners, not per runner: on
    # every endpoint a prompt was written only after the previous one had finished.
    spans = query(
        pg_url,
        "SELECT endpoint_id, created_at, finished_at FROM attempts "
        "ORDER BY endpoint_id, created_at",
    )
    for before, after in itertools.pairwise(spans):
        if before[0] == after[0]:
            assert after[1] >= before[2], f"two prompts at once on endpoint {after[0]}"


def held_in_flight(db: str, name: str) -> list[str]:
    import asyncpg

    try:
        rows = query(
            db,
            "SELECT j.key FROM jobs j JOIN runners r ON r.id = j.runner_id "
            "WHERE r.name = $1 AND j.state IN ('submitted', 'running')",
            name,
        )
    except asyncpg.UndefinedTableError:
        return []  # the first runner has not created the schema yet
    return [r[0] for r in rows]


def test_a_killed_runners_prompts_are_adopted_and_not_run_again(
    tmp_path: Path, pg_url: str, emulators: Callable[..., list[str]]
) -> None:
    manifest(tmp_path, 12)
    urls = emulators(3, step_ms=60)
    opts = ("--max-inflight", "1", "--takeover-after", "2")
    victim = runner(tmp_path, pg_url, "r0", urls, *opts)
    wait_for(lambda: bool(held_in_flight(pg_url, "r0")), "r0 to have a prompt on a GPU")
    others = [runner(tmp_path, pg_url, f"r{i}", urls, *opts) for i in (1, 2)]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    orphaned = held_in_flight(pg_url, "r0")
    assert orphaned, "the kill should leave a prompt in flight"

    for proc in others:
        code, err = finish(proc)
        assert code == 0, err
    assert_each_job_ran_once(pg_url, urls, 12)
    adopted = query(
        pg_url,
        "SELECT j.key, (SELECT count(*) FROM attempts a WHERE a.job_id = j.id) FROM jobs j "
        "JOIN job_events e ON e.job_id = j.id WHERE e.detail = 'taken over from runner r0'",
    )
    assert sorted(r[0] for r in adopted) == sorted(orphaned)
    assert {r[1] for r in adopted} == {1}, "an adopted prompt was followed, not submitted anew"


def test_a_runner_restarted_under_its_name_resumes_its_own_prompts(
    tmp_path: Path, pg_url: str, emulators: Callable[..., list[str]]
) -> None:
    manifest(tmp_path, 6)
    urls = emulators(1, step_ms=30)
    first = runner(tmp_path, pg_url, "solo", urls)
    wait_for(lambda: bool(held_in_flight(pg_url, "solo")), "a prompt in flight")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)

    # Long before any takeover delay: the dead process on this host is recognised as gone.
    again = runner(tmp_path, pg_url, "solo", urls)
    code, err = finish(again)
    assert code == 0, err
    assert_each_job_ran_once(pg_url, urls, 6)
    assert query(pg_url, "SELECT count(*) FROM runners")[0][0] == 1


def test_a_second_live_runner_under_the_same_name_is_refused(
    tmp_path: Path, pg_url: str, emulators: Callable[..., list[str]]
) -> None:
    manifest(tmp_path, 4)
    urls = emulators(1, step_ms=30)
    first = runner(tmp_path, pg_url, "same", urls)
    wait_for(lambda: bool(held_in_flight(pg_url, "same")), "the first runner at work")
    second = runner(tmp_path, pg_url, "same", urls)
    code, err = finish(second)
    assert code == 2
    assert "already working this run" in err and "--runner-name" in err
    code, err = finish(first)
    assert code == 0, err


def test_metrics_are_scraped_during_a_run(
    tmp_path: Path, pg_url: str, emulators: Callable[..., list[str]]
) -> None:
    manifest(tmp_path, 6)
    urls = emulators(1, step_ms=30)
    port = free_port()
    proc = runner(tmp_path, pg_url, "m", urls, "--metrics-port", str(port))
    scraped: list[str] = []

    def scrape() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                scraped.append(answer.read().decode())
        except OSError:
            return False
        finished = re.search(r"batch_runner_job_duration_seconds_count (\d+)", scraped[-1])
        # The metrics refresh every few seconds, so any count from two on will do.
        return finished is not None and int(finished.group(1)) >= 2

    wait_for(scrape, "metrics showing at least two jobs finished by this runner")
    text = scraped[-1]
    count = re.search(r"batch_runner_job_duration_seconds_count (\d+)", text)
    assert count is not None
    code, err = finish(proc)
    assert code == 0, err
    succeeded = re.search(r'batch_runner_jobs\{state="succeeded"\} (\d+)', text)
    assert succeeded is not None and int(succeeded.group(1)) >= 2
    assert f'batch_runner_endpoint_done{{endpoint="{urls[0]}"}}' in text
    assert f'batch_runner_job_duration_seconds_bucket{{le="+Inf"}} {count.group(1)}' in text
    assert "batch_runner_queue_wait_seconds_count" in text
    assert "batch_runner_websocket_reconnects_total" in text
