"""The client, stream and downloader end to end against the committed ComfyUI emulator."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch_runner.comfy import ComfyClient, Endpoint, EventStream, Outcome, PromptState
from batch_runner.comfy import events as ev
from batch_runner.emulator import Emulator, EmulatorConfig, Faults
from batch_runner.errors import DownloadIncomplete, EndpointUnavailable
from batch_runner.outputs import download, verify_video
from tests.helpers import TRACES

FAST = EmulatorConfig(step_ms=1.0, video_max_side=64)
STEP = 10.0


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def workflow(image: str) -> dict[str, Any]:
    """Workflow #1 of the traces (17 frames → MP4), reading our uploaded image."""
    graph: dict[str, Any] = json.loads((TRACES / "01_success_model_free.json").read_text())[
        "workflow"
    ]
    graph["1"]["inputs"]["image"] = image
    return graph


async def until(items: AsyncIterator[Any], predicate: Any) -> list[Any]:
    seen = []
    while True:
        item = await asyncio.wait_for(anext(items), STEP)
        seen.append(item)
        if predicate(item):
            return seen


async def test_one_prompt_end_to_end(tmp_path: Path) -> None:
    async with Emulator(FAST) as emulator:
        endpoint = Endpoint(emulator.url)
        stream = EventStream(endpoint, "client-e2e", backoff_initial=0.01)
        items = stream.events()
        async with ComfyClient(endpoint) as client:
            try:
                assert await anext(items) == ev.Connected()  # connect before submitting
                name = await client.upload_image(png(), "input.png")
                await client.submit(workflow(name), prompt_id="job-1-a1", client_id="client-e2e")
                seen = await until(items, lambda e: isinstance(e, ev.Executing) and not e.node)
                kinds = [type(e) for e in seen if getattr(e, "prompt_id", None) == "job-1-a1"]
                assert ev.ExecutionStart in kinds and ev.Executed in kinds
                assert kinds[-2:] == [ev.ExecutionSuccess, ev.Executing]

                location = await client.locate("job-1-a1")
                assert location.state is PromptState.FINISHED and location.entry is not None
                assert location.entry.outcome is Outcome.SUCCESS
                [video] = [f for f in location.entry.outputs if f.animated]
                got = await download(client, video, tmp_path / "job-1.mp4", base_dir=tmp_path)
                info = await asyncio.to_thread(verify_video, got.path, 17)
                assert info.frames == 17 and info.codec == "h264"
                assert (await client.locate("never-sent")).state is PromptState.UNKNOWN
            finally:
                await stream.aclose()
                await items.aclose()


async def test_truncated_view_from_the_emulator(tmp_path: Path) -> None:
    config = EmulatorConfig(step_ms=1.0, video_max_side=64, faults=Faults(truncate_view_rate=1.0))
    async with Emulator(config) as emulator, ComfyClient(Endpoint(emulator.url)) as client:
        stream = EventStream(client.endpoint, "client-t", backoff_initial=0.01)
        items = stream.events()
        try:
            assert await anext(items) == ev.Connected()
            name = await client.upload_image(png(), "input.png")
            await client.submit(workflow(name), prompt_id="p-trunc", client_id="client-t")
            await until(items, lambda e: isinstance(e, ev.Executing) and not e.node)
        finally:
            await stream.aclose()
            await items.aclose()
        entry = await client.history("p-trunc")
        assert entry is not None
        with pytest.raises(DownloadIncomplete):
            await download(client, entry.outputs[0], tmp_path / "job.mp4", base_dir=tmp_path)
        assert list(tmp_path.iterdir()) == []


async def test_restart_loses_the_prompt_and_the_stream_comes_back() -> None:
    async with Emulator(FAST) as emulator:
        endpoint = Endpoint(emulator.url)
        stream = EventStream(endpoint, "client-r", backoff_initial=0.01, backoff_max=0.05)
        items = stream.events()
        try:
            async with ComfyClient(endpoint) as client:
                assert await anext(items) == ev.Connected()
                name = await client.upload_image(png(), "input.png")
                await client.submit(workflow(name), prompt_id="p-r", client_id="client-r")
                await until(items, lambda e: isinstance(e, ev.Executing) and not e.node)
                await emulator.crash()
                with pytest.raises(EndpointUnavailable):
                    await client.queue()
                await emulator.restart()
                await until(items, lambda e: isinstance(e, ev.Connected))
                assert (await client.locate("p-r")).state is PromptState.UNKNOWN
        finally:
            await stream.aclose()
            await items.aclose()
