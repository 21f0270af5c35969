"""Several `batch-runner run` processes on one PostgreSQL run, against emulator processes."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.acceptance.conftest import emulator_stats, start_cli
from tests.helpers import make_image, write_csv


def query(url: str, sql: str, *args: Any) -> list[Any]:
    """Rows of one query on the run database (asyncpg, outside any runner)."""
    import asyncpg

    parsed = make_url(url)

    async def fetch() -> list[Any]:
        conn = await asyncpg.connect(
            host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database
        )
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(fetch())


def manifest(tmp_path: Path, n: int) -> Path:
    make_image(tmp_path / "a.png", (64, 48))
    rows = [{"id": f"k{i:02d}", "image": "a.png", "prompt": f"p{i}", "frames": 5} for i in range(n)]
    return write_csv(tmp_path / "jobs.csv", rows)


def executions(urls: list[str]) -> dict[str, int]:
    """prompt_id → how many times it ran, over every emulator."""
    total: dict[str, int] = {}
    for url in urls:
        stats = emulator_stats(url)["executions"]
        assert isinstance(stats, dict)
        for prompt_id, n in stats.items():
            total[prompt_id] = total.get(prompt_id, 0) + int(n)
    return total


@pytest.fixture
def emulators(tmp_path: Path) -> Iterator[Callable[..., list[str]]]:
    """Start N `batch-runner emulate` processes; all are stopped after the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(n: int, step_ms: float = 15) -> list[str]:
        urls = []
        for _ in range(n):
            proc = start_cli(
                "emulate",
                "--port",
                "0",
                "--step-ms",
                str(step_ms),
                "--video-max-side",
                "32",
                cwd=tmp_path,
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "listening on" in line, line
            urls.append(line.strip().rsplit(" ", 1)[-1])
        return urls

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
