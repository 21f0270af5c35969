"""The command line end to end: the README demo, bad input, kill -9 and Ctrl-C then resume."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from tests.acceptance.conftest import cli, count_state, emulator_stats, start_cli, wait_for
from tests.helpers import decoded_frames, make_image, write_csv

REPO = Path(__file__).resolve().parents[2]


def test_readme_example_batch_runs_end_to_end(tmp_path: Path) -> None:
    shutil.copy(REPO / "jobs.example.csv", tmp_path)
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    result = cli("run", "jobs.example.csv", "--emulate", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    videos = sorted((tmp_path / "outputs" / "jobs.example").glob("*.mp4"))
    rows = (tmp_path / "jobs.example.csv").read_text().strip().splitlines()[1:]
    assert len(videos) == len(rows)
    assert all(decoded_frames(v)[0] > 1 for v in videos)
    again = cli("run", "jobs.example.csv", "--emulate", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"{len(rows)} done" in again.stdout


def test_bad_manifest_exits_2_with_every_problem_and_no_traceback(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png", (64, 64))
    (tmp_path / "dir.png").mkdir()
    write_csv(
        tmp_path / "bad.csv",
        [
            {"id": "a", "image": "ok.png", "prompt": "fine", "frames": "17"},
            {"id": "b", "image": "missing.png", "prompt": "x", "frames": "16"},
            {"id": "a", "image": "dir.png", "prompt": "", "frames": "abc"},
        ],
    )
    result = cli("run", "bad.csv", "--emulate", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    err = " ".join(result.stderr.split())
    for where in (
        "bad.csv:3:image",
        "bad.csv:3:frames",
        "bad.csv:4:id",
        "bad.csv:4:image",
        "bad.csv:4:prompt",
        "bad.csv:4:frames",
    ):
        assert where in err, where
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.mp4"))


def test_no_endpoint_is_a_usage_error(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png", (64, 64))
    write_csv(tmp_path / "j.csv", [{"image": "ok.png", "prompt": "p"}])
    result = cli("run", "j.csv", cwd=tmp_path)
    assert result.returncode == 2
    assert "--endpoint" in result.stderr and "Traceback" not in result.stderr


def _manifest(tmp_path: Path, n: int) -> Path:
    make_image(tmp_path / "a.png", (64, 48))
    rows = [{"id": f"k{i:02d}", "image": "a.png", "prompt": f"p{i}", "frames": 5} for i in range(n)]
    return write_csv(tmp_path / "jobs.csv", rows)


def test_killed_run_resumes_without_running_anything_twice(
    tmp_path: Path, emulator_url: str
) -> None:
    _manifest(tmp_path, 8)
    db = tmp_path / "jobs.csv.batch.sqlite"
    proc = start_cli("run", "jobs.csv", "--endpoint", emulator_url, cwd=tmp_path)
    wait_for(lambda: count_state(db, "succeeded") >= 2, "two finished jobs")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    result = cli("run", "jobs.csv", "--endpoint", emulator_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert count_state(db, "succeeded") == 8
    executions = emulator_stats(emulator_url)["executions"]
    assert isinstance(executions, dict)
    assert len(executions) == 8 and set(executions.values()) == {1}
    for i in range(8):
        assert decoded_frames(tmp_path / "outputs" / "jobs" / f"k{i:02d}.mp4")[0] == 5


def test_first_interrupt_finishes_in_flight_work_and_exits_130(
    tmp_path: Path, emulator_url: str
) -> None:
    _manifest(tmp_path, 8)
    db = tmp_path / "jobs.csv.batch.sqlite"
    proc = start_cli("run", "jobs.csv", "--endpoint", emulator_url, cwd=tmp_path)
    wait_for(lambda: count_state(db, "succeeded") >= 1, "a finished job")
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    for state in ("preparing", "submitted", "running", "fetching"):
        assert count_state(db, state) == 0, state
    done_before = count_state(db, "succeeded")
    assert done_before < 8

    result = cli("run", "jobs.csv", "--endpoint", emulator_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    executions = emulator_stats(emulator_url)["executions"]
    assert isinstance(executions, dict)
    assert len(executions) == 8 and set(executions.values()) == {1}
