"""The check of finished outputs on its own: both passes, across page boundaries."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from batch_runner import output_check
from batch_runner.output_check import OutputCheck
from batch_runner.store import NewJob, Store


async def test_missing_resized_and_altered_files_are_requeued_across_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(output_check, "PAGE", 2)
    db = tmp_path / "run.sqlite"
    async with Store.open(db) as store:
        run = await store.ensure_run("default", "m.csv")
        await store.ingest(run.id, [NewJob(f"k{i}", i, {}, f"h{i}") for i in range(6)])
    with sqlite3.connect(db) as conn:
        for key in [f"k{i}" for i in range(6)]:
            video = tmp_path / f"{key}.mp4"
            video.write_bytes(key.encode() * 150)
            conn.execute(
                "UPDATE jobs SET state = 'succeeded', attempts = 1, output_path = ?,"
                " output_sha256 = ?, output_size = ?, finished_at = 1.0 WHERE key = ?",
                (str(video), hashlib.sha256(video.read_bytes()).hexdigest(), 300, key),
            )
    (tmp_path / "k1.mp4").unlink()
    (tmp_path / "k2.mp4").write_bytes(b"short")
    (tmp_path / "k4.mp4").write_bytes(b"K4" * 150)  # same size, other bytes
    (tmp_path / "k5.mp4").unlink()
    (tmp_path / "k5.mp4").mkdir()  # not a file

    nudges = []

    async def nudge() -> None:
        nudges.append(1)

    async with Store.open(db) as store:
        check = OutputCheck(store, run.id, nudge)
        await check.run()
    with sqlite3.connect(db) as conn:
        states = dict(conn.execute("SELECT key, state FROM jobs"))
    assert check.requeued == len(nudges) == 4
    assert states == {
        "k0": "succeeded",
        "k1": "pending",
        "k2": "pending",
        "k3": "succeeded",
        "k4": "pending",
        "k5": "pending",
    }
