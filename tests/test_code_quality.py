"""The lint and type gates run with the tests, so CI enforces them on every change."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "."], ["ruff", "format", "--check", "batch_runner"], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_gate_passes(command: list[str], tmp_path: Path) -> None:
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed (it comes with the test extra)")
    if command[0] == "mypy":
        command = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
