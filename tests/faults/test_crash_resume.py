"""Kill the runner at crash points across a whole run; every resume must converge exactly once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.faults.harness import Tally, check, emulator, executions, make_batch, one_trial, run_cli

JOBS = 3


def _crash_loop(tmp_path: Path, kind: str, points: range) -> Tally:
    tally = Tally()
    with emulator(tmp_path, ["--step-ms", "2", "--video-max-side", "32"]) as url:
        for n in points:
            workdir = tmp_path / f"{kind}{n:03d}"
            workdir.mkdir()
            make_batch(workdir, JOBS)
            first = run_cli(workdir, url, crash_at=f"{kind}:{n}")
            if first == 0:
                break  # n is past the run's last crash point: the loop has covered it all
            log = workdir / "last.log"
            assert first == -9, f"{kind}:{n} exited {first}: {log.read_text()[-3000:]}"
            assert run_cli(workdir, url) == 0, f"resume after {kind}:{n}: {log.read_text()[-3000:]}"
            tally.trials += 1
            check(workdir, JOBS, executions(url), tally)
    return tally


@pytest.mark.parametrize(
    ("kind", "points"), [("commit", range(3, 400, 7)), ("http", range(2, 60, 2))]
)
def test_kill_at_sampled_crash_points(tmp_path: Path, kind: str, points: range) -> None:
    tally = _crash_loop(tmp_path, kind, points)
    assert tally.trials >= 3
    assert tally.clean, (tally.line(), tally.notes)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kind", ["commit", "http"])
def test_kill_at_every_crash_point(tmp_path: Path, kind: str) -> None:
    tally = _crash_loop(tmp_path, kind, range(1, 1000))
    assert tally.clean, (tally.line(), tally.notes)


def test_random_fault_trials(tmp_path: Path) -> None:
    import random

    rng = random.Random(20261125)
    tally = Tally()
    for n in range(2):
        result = one_trial(tmp_path / f"t{n}", rng)
        tally.trials += result.trials
        tally.lost += result.lost
        tally.duplicated += result.duplicated
        tally.corrupt += result.corrupt
        tally.unfinished += result.unfinished
        tally.notes += result.notes
    assert tally.clean, (tally.line(), tally.notes)


def test_harness_reports_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        ["python", "-m", "tests.faults.harness", "--trials", "1", "--budget", "60"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.stdout.strip().startswith("trials=1 lost=0 duplicated=0 corrupt=0 unfinished=0")
