"""The live display's data from a real run: sampler steps from the websocket, speeds and
failures from the store."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from batch_runner.dashboard import LaneView, Snapshot
from batch_runner.emulator import Emulator, EmulatorConfig
from batch_runner.lane import Lane
from batch_runner.progress import snapshot
from batch_runner.runner import run_batch, template_for
from batch_runner.store import Store
from tests.helpers import make_image, settings_for, write_csv


async def test_snapshots_follow_the_run(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    rows = [{"id": f"j{i}", "image": "a.png", "prompt": "p", "frames": 5} for i in range(3)]
    rows.append({"id": "bad", "image": "a.png", "prompt": "p", "frames": 5,
                 "node.37.unet_name": "gone.safetensors"})  # fmt: skip
    manifest = write_csv(tmp_path / "jobs.csv", rows)
    seen: list[LaneView] = []
    last: list[Snapshot] = []

    async def monitor(store: Store, run_id: int, lanes: Sequence[Lane]) -> None:
        while True:  # sample as often as the loop allows; the run cancels us
            snap = await snapshot(store, run_id, lanes)
            seen.extend(lane for lane in snap.lanes if lane.step is not None)
            await asyncio.sleep(0.005)

    async with Emulator(EmulatorConfig(step_ms=25.0, video_max_side=32)) as emulator:
        settings = settings_for(manifest, [emulator.url], max_inflight=1)
        summary = await run_batch(settings, template_for(settings), asyncio.Event(), monitor)
        async with Store.open(settings.db, exclusive=False) as store:
            run = await store.only_run()
            assert run is not None
            last.append(await snapshot(store, run.id))
    assert summary.exit_code == 1
    # Each sampler reports steps 1..10 of 10 (two experts split 20 steps).
    assert seen and all(v.job in {"j0", "j1", "j2"} and v.step and v.step[1] == 10 for v in seen)
    assert {v.node for v in seen} <= {"57", "58"}
    final = last[0]
    assert final.finished == 4 and final.eta == 0
    assert final.rates[emulator.url] > 0, "speed observed from the finished videos"
    assert [f.key for f in final.failures] == ["bad"]
    assert "gone.safetensors" in (final.failures[0].error or "")
