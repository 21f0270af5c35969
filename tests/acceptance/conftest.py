"""Acceptance tests run the installed command line as users do, in subprocesses."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "batch_runner"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def start_cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait until ``condition`` holds, checking often; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def count_state(db: Path, state: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM jobs WHERE state=?", (state,)).fetchone()
            return int(row[0])
    except sqlite3.OperationalError:
        return 0


def emulator_stats(url: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{url}/emulator/stats", timeout=10) as answer:
        data: dict[str, object] = json.loads(answer.read())
        return data


@pytest.fixture
def emulator_url(tmp_path: Path) -> Iterator[str]:
    """A standalone `batch-runner emulate` process on a free loopback port."""
    proc = start_cli(
        "emulate", "--port", "0", "--step-ms", "15", "--video-max-side", "32", cwd=tmp_path
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        detail = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"emulator did not start: {line!r} {detail}")
    url = line.strip().rsplit(" ", 1)[-1]
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
