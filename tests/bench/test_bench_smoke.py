"""Each benchmark's --quick mode runs from the command line and prints its figures.

Slow (minutes): run with ``pytest -m slow tests/bench``. Targets are not checked here (a
missed target exits 3, a crash 1); figures belong in bench/README.md, not in tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (REPO / "bench").glob("p[0-9]_*.py"))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_runs(script: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{script}", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert result.returncode in (0, 3), result.stdout + result.stderr
    assert "machine:" in result.stdout, result.stdout
