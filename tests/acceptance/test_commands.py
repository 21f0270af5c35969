"""status, retry, export, cancel, validate and the safety of tokens, from the command line."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import signal
import socket
import sqlite3
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from batch_runner.cli import main
from batch_runner.comfy.client import ComfyClient
from batch_runner.comfy.config import Endpoint
from batch_runner.workflow import card_graph
from tests.acceptance.conftest import cli, count_state, start_cli, wait_for
from tests.helpers import make_image, write_csv

COMMANDS = {
    "run",
    "status",
    "retry",
    "export",
    "validate",
    "emulate",
    "cancel",
    "workflow",
    "report",
}


def test_every_command_has_help() -> None:
    assert set(main.commands) == COMMANDS
    runner = CliRunner()
    assert runner.invoke(main, ["--help"]).exit_code == 0
    for name in COMMANDS:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Usage:" in result.output
    for sub in ("convert", "show"):
        assert runner.invoke(main, ["workflow", sub, "--help"]).exit_code == 0, sub


def _batch(tmp_path: Path, n: int, **extra: object) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    rows = [
        {"id": f"j{i}", "image": "a.png", "prompt": f"p{i}", "frames": 5, **extra} for i in range(n)
    ]
    write_csv(tmp_path / "jobs.csv", rows)


def test_failures_are_listed_retried_and_exported(tmp_path: Path) -> None:
    _batch(tmp_path, 2)
    emu = start_cli(
        "emulate",
        "--port",
        "0",
        "--step-ms",
        "1",
        "--video-max-side",
        "32",
        "--execution-error-rate",
        "1",
        cwd=tmp_path,
    )
    try:
        assert emu.stdout is not None
        url = emu.stdout.readline().strip().rsplit(" ", 1)[-1]
        result = cli("run", "jobs.csv", "--endpoint", url, "--max-attempts", "2", cwd=tmp_path)
        assert result.returncode == 1, result.stderr
    finally:
        emu.terminate()
        emu.wait(timeout=10)

    status = cli("status", "jobs.csv", cwd=tmp_path)
    assert status.returncode == 0
    assert "failed" in status.stdout and "out of memory" in status.stdout.lower()

    exported = cli("export", "jobs.csv", cwd=tmp_path)
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [r["state"] for r in rows] == ["failed", "failed"]
    assert all("OutOfMemoryError" in r["last_error"] and r["attempts"] == "2" for r in rows)

    jsonl = cli("export", "jobs.csv", "-o", "results.jsonl", cwd=tmp_path)
    assert jsonl.returncode == 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["job_id"] for line in lines] == ["j0", "j1"]

    retried = cli("retry", "jobs.csv", cwd=tmp_path)
    assert retried.returncode == 0 and "2 failed" in retried.stdout
    assert count_state(tmp_path / "jobs.csv.batch.sqlite", "pending") == 2


def test_formula_cells_are_neutralised_in_csv_export(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    write_csv(
        tmp_path / "jobs.csv",
        [{"id": "x", "image": "a.png", "prompt": '=HYPERLINK("http://e.invalid","x")'}],
    )
    assert cli("run", "jobs.csv", "--emulate", "1", "--skip-invalid", cwd=tmp_path).returncode in (
        0,
        1,
    )
    exported = cli("export", "jobs.csv", cwd=tmp_path).stdout
    [row] = list(csv.DictReader(io.StringIO(exported)))
    assert row["prompt"].startswith("'=")


def test_token_never_reaches_database_logs_or_exports(tmp_path: Path, emulator_url: str) -> None:
    token = "planted-token-7f3a9c"
    _batch(tmp_path, 2)
    result = cli(
        "--debug", "run", "jobs.csv", "--endpoint", emulator_url, "--token", token, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    status = cli("status", "jobs.csv", cwd=tmp_path)
    exported = cli("export", "jobs.csv", cwd=tmp_path)
    for text in (result.stdout, result.stderr, status.stdout, exported.stdout):
        assert token not in text
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert token.encode() not in file.read_bytes(), file


def test_second_runner_on_the_same_database_is_refused(tmp_path: Path, emulator_url: str) -> None:
    _batch(tmp_path, 6)
    first = start_cli("run", "jobs.csv", "--endpoint", emulator_url, cwd=tmp_path)
    db = tmp_path / "jobs.csv.batch.sqlite"
    try:
        wait_for(
            lambda: (
                count_state(db, "pending") + count_state(db, "succeeded") > 0
                and count_state(db, "succeeded") < 6
            ),
            "the first run to start",
        )
        second = cli("run", "jobs.csv", "--endpoint", emulator_url, cwd=tmp_path)
        assert second.returncode == 2
        assert "in use by another batch-runner" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)


def test_cancel_withdraws_only_this_runs_prompts(tmp_path: Path) -> None:
    _batch(tmp_path, 4)
    emu = start_cli(
        "emulate", "--port", "0", "--step-ms", "400", "--video-max-side", "32", cwd=tmp_path
    )
    assert emu.stdout is not None
    url = emu.stdout.readline().strip().rsplit(" ", 1)[-1]
    try:
        foreign = _submit_foreign_prompt(url, tmp_path / "a.png")
        db = tmp_path / "jobs.csv.batch.sqlite"
        run = start_cli("run", "jobs.csv", "--endpoint", url, cwd=tmp_path)
        wait_for(
            lambda: count_state(db, "running") >= 1 and count_state(db, "submitted") >= 1,
            "one prompt running and one queued",
        )
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)

        result = cli("cancel", "jobs.csv", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert count_state(db, "cancelled") == 4
        queue = _get(url, "/queue")
        ours = {row[1] for row in queue["queue_running"] + queue["queue_pending"]}
        with sqlite3.connect(db) as conn:
            mine = {r[0] for r in conn.execute("SELECT prompt_id FROM attempts")}
        assert not ours & mine, "this run's prompts must be gone from the server"
        assert foreign in ours | set(_get(url, "/history")), "another user's prompt is kept"
    finally:
        emu.terminate()
        emu.wait(timeout=10)


def _get(url: str, path: str) -> dict[str, list[list[object]]]:
    with urllib.request.urlopen(url + path, timeout=10) as answer:
        data: dict[str, list[list[object]]] = json.loads(answer.read())
        return data


def _submit_foreign_prompt(url: str, image: Path) -> str:
    """Someone else's prompt, queued on the same server before our run starts."""

    async def submit() -> str:
        async with ComfyClient(Endpoint(url)) as client:
            graph = card_graph()
            graph["62"]["inputs"]["image"] = await client.upload_image(image.read_bytes(), "o.png")
            await client.submit(graph, prompt_id="foreign-user-prompt", client_id="someone-else")
        return "foreign-user-prompt"

    return asyncio.run(submit())


def test_validate_reports_problems_and_counts_good_rows(tmp_path: Path) -> None:
    _batch(tmp_path, 3)
    good = cli("validate", "jobs.csv", cwd=tmp_path)
    assert good.returncode == 0 and "3 valid row" in good.stdout
    write_csv(tmp_path / "bad.csv", [{"image": "a.png", "prompt": "x", "frames": 8}])
    bad = cli("validate", "bad.csv", cwd=tmp_path)
    assert bad.returncode == 2
    assert "bad.csv:2:frames" in " ".join(bad.stderr.split())


def test_validate_checks_every_endpoint_and_tables_what_is_missing_where(
    tmp_path: Path, emulator_url: str
) -> None:
    _batch(tmp_path, 2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ready = cli("validate", "jobs.csv", "--endpoint", emulator_url, cwd=tmp_path)
    assert ready.returncode == 0, ready.stderr
    assert "1 of 1 endpoint(s) can run this workflow" in ready.stdout

    partly = cli("validate", "jobs.csv", "-e", emulator_url, "-e", down, cwd=tmp_path)
    assert partly.returncode == 1
    assert "unreachable" in partly.stdout and "1 of 2 endpoint(s)" in partly.stdout

    graph = card_graph()
    graph["90"] = {"class_type": "FancyFrameInterpolator", "inputs": {"images": ["8", 0]}}
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    lacking = cli(
        "validate", "jobs.csv", "--workflow", "graph.json", "-e", emulator_url, cwd=tmp_path
    )
    assert lacking.returncode == 2
    out = " ".join(lacking.stdout.split())
    assert "what is missing where" in out and "FancyFrameInterpolator" in out
    assert "no endpoint can run this workflow" in " ".join(lacking.stderr.split())
    assert "Traceback" not in lacking.stderr


def test_unreachable_endpoint_is_one_plain_message_and_exit_2(tmp_path: Path) -> None:
    _batch(tmp_path, 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = cli("run", "jobs.csv", "--endpoint", down, cwd=tmp_path)
    assert result.returncode == 2
    text = " ".join(result.stderr.split())
    assert f"{down}: unreachable" in text
    assert "check the URLs and that ComfyUI is running there" in text
    assert "Traceback" not in result.stderr


def test_unwritable_output_path_is_a_plain_message(tmp_path: Path) -> None:
    _batch(tmp_path, 1)
    assert cli("run", "jobs.csv", "--emulate", "1", cwd=tmp_path).returncode == 0
    result = cli("export", "jobs.csv", "-o", "no/such/dir/out.csv", cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot use no/such/dir/out.csv: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    _batch(tmp_path, 2)
    result = cli("--json-logs", "run", "jobs.csv", "--emulate", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    bad = cli("--json-logs", "run", "missing.csv", "--emulate", "1", cwd=tmp_path)
    assert bad.returncode == 2
    write_csv(tmp_path / "bad.csv", [{"image": "a.png", "prompt": "x", "frames": 8}])
    invalid = cli("--json-logs", "run", "bad.csv", "--emulate", "1", cwd=tmp_path)
    assert invalid.returncode == 2
    logged = [json.loads(line) for line in invalid.stderr.splitlines()]
    (error,) = [e for e in logged if e["level"] == "error"]
    assert "bad.csv:2:frames" in error["message"]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_status_watch_follows_a_run_until_interrupted(tmp_path: Path, stop: signal.Signals) -> None:
    _batch(tmp_path, 2)
    assert cli("run", "jobs.csv", "--emulate", "1", cwd=tmp_path).returncode == 0
    watcher = start_cli("status", "jobs.csv", "--watch", "--interval", "0.1", cwd=tmp_path)
    assert watcher.stdout is not None
    lines = [watcher.stdout.readline() for _ in range(2)]
    watcher.send_signal(stop)
    assert watcher.wait(timeout=30) == 0
    assert all(line.startswith("2 done, 0 failed, 0 running, 0 pending") for line in lines)


def test_error_text_is_shown_literally_not_as_markup(tmp_path: Path) -> None:
    _batch(tmp_path, 1)
    (tmp_path / "br.csv").write_text("image,prompt,frames\na.png,x,[red]boom[/red]\n")
    result = cli("validate", "br.csv", cwd=tmp_path)
    assert result.returncode == 2
    assert "'[red]boom[/red]' is not a whole number" in result.stderr
