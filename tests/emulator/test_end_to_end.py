"""A plain client (aiohttp for HTTP, `websockets` for /ws) runs the Wan2.2 graph end to end."""

from __future__ import annotations

import io
import json
import time
import uuid

import aiohttp
import av
from websockets.asyncio.client import connect

from batch_runner.emulator import Emulator, EmulatorConfig
from tests.emulator.conftest import png, upload, wan_workflow


async def test_model_card_style_client_downloads_a_decodable_mp4() -> None:
    step_ms = 10.0
    async with (
        Emulator(EmulatorConfig(step_ms=step_ms)) as emulator,
        aiohttp.ClientSession() as http,
    ):
        await upload(http, emulator.url, "start.png", png(1280, 720))
        client_id = uuid.uuid4().hex
        ws_url = emulator.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        async with connect(ws_url, proxy=None, max_size=None) as ws:
            started = time.monotonic()
            body = {"prompt": wan_workflow("start.png"), "client_id": client_id}
            async with http.post(emulator.url + "/prompt", json=body) as response:
                prompt_id = (await response.json())["prompt_id"]
            progress = []
            async for frame in ws:
                if isinstance(frame, bytes):
                    continue
                message = json.loads(frame)
                data = message["data"]
                if message["type"] == "progress":
                    progress.append((data["node"], data["value"], data["max"]))
                if message["type"] == "executing" and data.get("node") is None:
                    assert data["prompt_id"] == prompt_id
                    break
            elapsed = time.monotonic() - started
        async with http.get(f"{emulator.url}/history/{prompt_id}") as response:
            entry = (await response.json())[prompt_id]
        # SaveVideo reports under `images`, not `videos` or `gifs`.
        (output,) = entry["outputs"]["61"]["images"]
        params = {k: output[k] for k in ("filename", "subfolder", "type")}
        async with http.get(emulator.url + "/view", params=params) as response:
            assert response.headers["Content-Type"] == "video/mp4"
            data = await response.read()

    assert progress == [("57", i, 10) for i in range(1, 11)] + [("58", i, 10) for i in range(1, 11)]
    # 20 sampler steps of step_ms each, plus a small overhead (video encoding included).
    assert 20 * step_ms / 1000 <= elapsed < 20 * step_ms / 1000 + 2.0
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = len(list(container.decode(video=0)))
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert max(stream.width, stream.height) <= 128
        assert stream.width % 2 == 0 and stream.height % 2 == 0
        assert stream.average_rate == 16
    assert frames == 81
