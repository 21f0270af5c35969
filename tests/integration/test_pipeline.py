"""The real runner against emulated ComfyUI servers over real sockets."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from batch_runner import export
from batch_runner.emulator import Emulator, EmulatorConfig, Faults
from batch_runner.runner import RunSummary, run_batch, template_for
from batch_runner.states import JobState
from batch_runner.store import Store
from tests.helpers import decoded_frames, make_image, settings_for, write_csv, write_jsonl

FAST = EmulatorConfig(step_ms=1.0, video_max_side=64)


async def start(stack: AsyncExitStack, *configs: EmulatorConfig) -> list[Emulator]:
    return [await stack.enter_async_context(Emulator(c)) for c in configs]


async def run(settings: object) -> RunSummary:
    from batch_runner.config import RunSettings

    assert isinstance(settings, RunSettings)
    return await run_batch(settings, template_for(settings), asyncio.Event())


async def exported(db: Path) -> list[dict[str, str]]:
    async with Store.open(db, exclusive=False) as store:
        run_record = await store.only_run()
        assert run_record is not None
        buffer = io.StringIO()
        await export.write_csv(store, run_record.id, buffer)
    return list(csv.DictReader(io.StringIO(buffer.getvalue())))


def mixed_manifest(tmp_path: Path) -> Path:
    land = make_image(tmp_path / "img" / "land.png", (320, 240))
    portrait = make_image(tmp_path / "img" / "portrait.png", (240, 320), "red")
    square = make_image(tmp_path / "img" / "square.png", (256, 256), "green")
    rows = [
        {"id": "a1", "image": "img/land.png", "prompt": "waves", "frames": 17},
        {"id": "a2", "image": "img/portrait.png", "prompt": "wind", "frames": 9, "seed": 42},
        {"id": "a3", "image": "img/square.png", "prompt": "spin", "frames": 5, "preset": "480p"},
        {"id": "a4", "image": str(land), "prompt": "waves again", "frames": 13, "output": "hero"},
        {"id": "a5", "image": "img/portrait.png", "prompt": "rain", "frames": 9},
        {"id": "a6", "image": "img/square.png", "prompt": "zoom", "frames": 5, "steps": 8},
    ]
    assert portrait.exists() and square.exists()
    return write_csv(tmp_path / "jobs.csv", rows)


async def test_mixed_manifest_completes_with_verified_videos(tmp_path: Path) -> None:
    manifest = mixed_manifest(tmp_path)
    async with AsyncExitStack() as stack:
        emulators = await start(stack, FAST, FAST)
        settings = settings_for(manifest, [e.url for e in emulators])
        summary = await run(settings)
    assert summary.exit_code == 0
    assert summary.counts[JobState.SUCCEEDED] == 6

    rows = {r["job_id"]: r for r in await exported(settings.db)}
    assert set(rows) == {"a1", "a2", "a3", "a4", "a5", "a6"}
    expected_frames = {"a1": 17, "a2": 9, "a3": 5, "a4": 13, "a5": 9, "a6": 5}
    for job_id, row in rows.items():
        path = Path(row["output_path"])
        assert path.parent == settings.output_dir
        assert path.name == ("hero.mp4" if job_id == "a4" else f"{job_id}.mp4")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["output_sha256"]
        assert decoded_frames(path)[0] == expected_frames[job_id]
        assert int(row["frames"]) == expected_frames[job_id]
        assert int(row["width"]) % 16 == 0 and int(row["height"]) % 16 == 0
        assert row["prompt_id"] and row["endpoint"] in {e.url for e in emulators}
        assert row["state"] == "succeeded" and row["attempts"] == "1"
    # The landscape input keeps its 4:3 aspect at the 720p area; the portrait one turns it round.
    w, h = int(rows["a1"]["width"]), int(rows["a1"]["height"])
    assert abs(w / h - 4 / 3) < 0.03 and abs(w * h / (1280 * 704) - 1) < 0.05
    assert int(rows["a2"]["width"]) < int(rows["a2"]["height"])
    assert rows["a2"]["seed"] == "42"
    # Every prompt ran exactly once across both servers.
    runs = [n for e in emulators for n in e.executions.values()]
    assert sorted(runs) == [1] * 6
    assert not list((settings.output_dir / ".incoming").glob("*"))


async def test_rerun_of_a_finished_batch_sends_nothing(tmp_path: Path) -> None:
    manifest = mixed_manifest(tmp_path)
    async with AsyncExitStack() as stack:
        [emulator] = await start(stack, FAST)
        settings = settings_for(manifest, [emulator.url])
        assert (await run(settings)).exit_code == 0
        before = dict(emulator.executions)
        again = await run(settings)
        assert again.exit_code == 0
        assert dict(emulator.executions) == before


async def test_deleted_output_is_made_again(tmp_path: Path) -> None:
    manifest = mixed_manifest(tmp_path)
    async with AsyncExitStack() as stack:
        [emulator] = await start(stack, FAST)
        settings = settings_for(manifest, [emulator.url])
        await run(settings)
        (settings.output_dir / "a1.mp4").unlink()
        tampered = settings.output_dir / "a2.mp4"
        tampered.write_bytes(tampered.read_bytes()[:100])
        summary = await run(settings)
    assert summary.requeued_outputs == 2
    assert summary.exit_code == 0
    assert decoded_frames(settings.output_dir / "a1.mp4")[0] == 17
    assert decoded_frames(tampered)[0] == 9


async def test_custom_workflow_with_bindings(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (96, 64))
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 17}},
        "3": {"class_type": "CreateVideo", "inputs": {"images": ["2", 0], "fps": 16}},
        "4": {
            "class_type": "SaveVideo",
            "inputs": {
                "video": ["3", 0],
                "filename_prefix": "video/custom",
                "format": "auto",
                "codec": "auto",
            },
        },
    }
    workflow = tmp_path / "graph.json"
    workflow.write_text(json.dumps(graph))
    manifest = write_jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"id": "c1", "image": "a.png", "prompt": "unused", "frames": 9},
            {"id": "c2", "image": "a.png", "prompt": "unused", "frames": 5, "fps": 8},
        ],
    )
    async with AsyncExitStack() as stack:
        [emulator] = await start(stack, FAST)
        settings = settings_for(
            manifest,
            [emulator.url],
            workflow=workflow,
            bindings={"frames": "2.amount", "fps": "3.fps"},
        )
        summary = await run(settings)
    assert summary.exit_code == 0, summary
    assert decoded_frames(settings.output_dir / "c1.mp4")[0] == 9
    assert decoded_frames(settings.output_dir / "c2.mp4")[0] == 5


async def test_capacity_respected_and_faster_endpoint_does_more(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (64, 64))
    rows = [
        {"id": f"j{i:02d}", "image": "a.png", "prompt": f"p{i}", "frames": 5} for i in range(16)
    ]
    manifest = write_csv(tmp_path / "jobs.csv", rows)
    slow = EmulatorConfig(step_ms=10.0, speed=1.0, video_max_side=32)
    fast = EmulatorConfig(step_ms=10.0, speed=5.0, video_max_side=32)
    async with AsyncExitStack() as stack:
        emulators = await start(stack, slow, fast)
        settings = settings_for(manifest, [e.url for e in emulators], max_inflight=2)
        assert (await run(settings)).exit_code == 0
    rows_out = await exported(settings.db)
    per_endpoint = {e.url: 0 for e in emulators}
    for row in rows_out:
        per_endpoint[row["endpoint"]] += 1
    assert per_endpoint[emulators[1].url] > per_endpoint[emulators[0].url]
    # At no moment did one endpoint hold more than max_inflight of our prompts.
    for url in per_endpoint:
        spans = sorted(
            (float(r["submitted_at"]), float(r["finished_at"]))
            for r in rows_out
            if r["endpoint"] == url
        )
        for start_at, _ in spans:
            overlapping = sum(1 for s, f in spans if s <= start_at < f)
            assert overlapping <= 2


async def test_websocket_drops_are_recovered_without_resubmission(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    rows = [{"id": f"w{i}", "image": "a.png", "prompt": f"p{i}", "frames": 5} for i in range(5)]
    manifest = write_csv(tmp_path / "jobs.csv", rows)
    flaky = EmulatorConfig(step_ms=5.0, video_max_side=32, faults=Faults(ws_drop_after_frames=7))
    async with AsyncExitStack() as stack:
        [emulator] = await start(stack, flaky)
        settings = settings_for(manifest, [emulator.url], silence=1.0)
        summary = await run(settings)
    assert summary.exit_code == 0
    assert sorted(emulator.executions.values()) == [1] * 5


async def test_cached_run_still_gets_its_own_output_file(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    same = {"image": "a.png", "prompt": "same", "seed": 7, "frames": 5}
    manifest = write_csv(tmp_path / "jobs.csv", [{"id": "first", **same}, {"id": "twin", **same}])
    async with AsyncExitStack() as stack:
        [emulator] = await start(stack, FAST)
        settings = settings_for(manifest, [emulator.url], max_inflight=1)
        assert (await run(settings)).exit_code == 0
    first, twin = settings.output_dir / "first.mp4", settings.output_dir / "twin.mp4"
    # The second prompt was served from the server's cache and named the first one's file.
    assert first.read_bytes() == twin.read_bytes()
    assert decoded_frames(twin)[0] == 5


async def test_a_success_the_socket_reported_whole_is_not_looked_up_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner.comfy.client import ComfyClient

    looked_up: list[str] = []
    history = ComfyClient.history

    async def counting(self: ComfyClient, prompt_id: str) -> object:
        looked_up.append(prompt_id)
        return await history(self, prompt_id)

    monkeypatch.setattr(ComfyClient, "history", counting)
    manifest = mixed_manifest(tmp_path)
    async with AsyncExitStack() as stack:
        [emulator] = await start(stack, FAST)
        settings = settings_for(manifest, [emulator.url])
        summary = await run(settings)
    assert summary.counts[JobState.SUCCEEDED] == 6
    # The socket said success and named the video: GET /history would only repeat it.
    assert looked_up == []


async def test_every_endpoint_gets_a_prompt_before_any_gets_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner.comfy.client import ComfyClient

    submitted_to: list[str] = []
    submit = ComfyClient.submit

    async def recording(
        self: ComfyClient, graph: dict[str, object], *, prompt_id: str, client_id: str
    ) -> int | float:
        submitted_to.append(self.endpoint.url)
        return await submit(self, graph, prompt_id=prompt_id, client_id=client_id)

    monkeypatch.setattr(ComfyClient, "submit", recording)
    rows = []
    for i in range(12):
        # An image each, so that no job waits for another's upload.
        make_image(tmp_path / f"{i}.png", (64, 48), f"#{i * 20:02x}0000")
        rows.append({"id": f"f{i}", "image": f"{i}.png", "prompt": f"p{i}", "frames": 5})
    manifest = write_csv(tmp_path / "jobs.csv", rows)
    config = EmulatorConfig(step_ms=5.0, video_max_side=32)
    async with AsyncExitStack() as stack:
        emulators = await start(stack, *[config] * 4)
        settings = settings_for(manifest, [e.url for e in emulators], max_inflight=2)
        assert (await run(settings)).exit_code == 0
    assert len(submitted_to) == 12
    assert sorted(submitted_to[:4]) == sorted(e.url for e in emulators)


async def test_idle_slots_are_not_woken_to_find_nothing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner import scheduler

    # Only a finished job may wake a slot here, not its periodic look at the store.
    monkeypatch.setattr(scheduler, "IDLE_RECHECK_S", 60.0)
    answers: list[tuple[bool, float | None]] = []
    has_claimable = Store.has_claimable

    async def counting(self: Store, run_id: int) -> tuple[bool, float | None]:
        answers.append(await has_claimable(self, run_id))
        return answers[-1]

    monkeypatch.setattr(Store, "has_claimable", counting)
    make_image(tmp_path / "a.png", (64, 48))
    rows = [{"id": f"n{i}", "image": "a.png", "prompt": f"p{i}", "frames": 5} for i in range(16)]
    manifest = write_csv(tmp_path / "jobs.csv", rows)
    slots = 8
    async with AsyncExitStack() as stack:
        # One GPU with many slots: at the end its queued prompts finish one at a time.
        [emulator] = await start(stack, EmulatorConfig(step_ms=2.0, video_max_side=32))
        settings = settings_for(manifest, [emulator.url], max_inflight=slots)
        assert (await run(settings)).exit_code == 0
    # Each slot learns once that nothing is left; waking every idle slot at each job that
    # finishes after that would ask about slots² / 2 times.
    assert 0 < answers.count((False, None)) <= slots + 2
