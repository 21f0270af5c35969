"""Every fault knob has an effect, and the same seed gives the same faults."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp
import pytest

from batch_runner.emulator import CRASH_EXIT_STATUS, Emulator, EmulatorConfig, Faults
from tests.emulator.conftest import (
    connect,
    history,
    new_id,
    simple_workflow,
    submit,
    upload,
    wan_workflow,
)


def config(**faults: object) -> EmulatorConfig:
    return EmulatorConfig(step_ms=1.0, faults=Faults(**faults))  # type: ignore[arg-type]


async def statuses(faults: dict[str, object], count: int = 30) -> list[int]:
    out = []
    async with Emulator(config(**faults)) as emulator, aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.get(emulator.url + "/queue") as response:
                out.append(response.status)
                if response.status == 500:
                    assert await response.text() == (
                        "500 Internal Server Error\n\nServer got itself in trouble"
                    )
    return out


async def test_http_5xx_rate_answers_some_requests_with_500_or_503() -> None:
    first = await statuses({"seed": 3, "http_5xx_rate": 0.5})
    assert {200, 500, 503} == set(first)
    assert await statuses({"seed": 3, "http_5xx_rate": 0.5}) == first
    assert await statuses({"seed": 4, "http_5xx_rate": 0.5}) != first


async def test_drop_response_rate_handles_the_request_but_loses_the_answer() -> None:
    async with Emulator(config(drop_response_rate=1.0)) as emulator:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                await upload(session, emulator.url)
        async with aiohttp.ClientSession() as session:
            observer = await connect(session, emulator.url)
            prompt_id = new_id()
            body = {"prompt": simple_workflow(), "prompt_id": prompt_id}
            with pytest.raises(aiohttp.ClientError):
                async with session.post(emulator.url + "/prompt", json=body) as response:
                    await response.read()
            # The upload and the submission landed although their answers never arrived:
            # connect status, then queued, taken and finished.
            await observer.wait_count("status", 4)
            await observer.close()
    assert emulator.executions[prompt_id] == 1


async def test_drop_response_rate_is_seeded() -> None:
    async def outcomes(seed: int) -> list[bool]:
        out = []
        async with Emulator(config(seed=seed, drop_response_rate=0.5)) as emulator:
            for _ in range(12):
                async with aiohttp.ClientSession() as session:
                    try:
                        async with session.get(emulator.url + "/prompt") as response:
                            await response.read()
                            out.append(True)
                    except aiohttp.ClientError:
                        out.append(False)
        return out

    first = await outcomes(5)
    assert True in first and False in first
    assert await outcomes(5) == first


async def test_latency_ms_delays_every_answer(session: aiohttp.ClientSession) -> None:
    async with Emulator(config(latency_ms=150)) as emulator:
        started = time.monotonic()
        async with session.get(emulator.url + "/system_stats") as response:
            assert response.status == 200
        assert time.monotonic() - started >= 0.15


async def test_ws_drop_after_frames_cuts_each_socket_without_close_frame(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(config(ws_drop_after_frames=3)) as emulator:
        await upload(session, emulator.url)
        client_id = new_id()
        socket = await connect(session, emulator.url, client_id)
        await submit(session, emulator.url, simple_workflow(), client_id)
        async with asyncio.timeout(10):
            await socket.closed.wait()
        assert len(socket.messages) == 3
        assert socket.ws.close_code != 1000
        # A new socket gets its own budget.
        again = await connect(session, emulator.url, client_id)
        await again.close()


async def test_ws_drop_rate_drops_at_seeded_frames(session: aiohttp.ClientSession) -> None:
    async def frames_before_drop(seed: int) -> list[int]:
        counts = []
        async with Emulator(config(seed=seed, ws_drop_rate=0.3)) as emulator:
            await upload(session, emulator.url)
            for index in range(3):
                client_id = new_id()
                socket = await connect(session, emulator.url, client_id)
                await submit(session, emulator.url, simple_workflow(frames=index + 2), client_id)
                async with asyncio.timeout(10):
                    await socket.closed.wait()
                counts.append(len(socket.messages))
        return counts

    first = await frames_before_drop(11)
    assert await frames_before_drop(11) == first
    assert all(count < 30 for count in first)


async def test_ws_deaf_rate_leaves_some_sockets_silent(session: aiohttp.ClientSession) -> None:
    async def deaf_sockets(seed: int) -> list[int]:
        async with Emulator(config(seed=seed, ws_deaf_rate=0.5)) as emulator:
            await upload(session, emulator.url)
            sockets = [await connect(session, emulator.url, new_id()) for _ in range(6)]
            await submit(session, emulator.url, simple_workflow(), None)
            # Connect status + queued + taken + finished reach every socket that can hear.
            waits = [asyncio.create_task(s.wait_count("status", 4)) for s in sockets]
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            hearing = sockets[waits.index(done.pop())]
            # Messages go out in order, so once one more broadcast reaches a hearing socket,
            # every socket has been offered everything before it.
            async with session.post(emulator.url + "/queue", json={"clear": True}):
                pass
            await hearing.wait_count("status", 5)
            # A deaf socket got its connect status and nothing after it.
            deaf = [index for index, socket in enumerate(sockets) if len(socket.messages) == 1]
            for socket in sockets:
                await socket.close()
            return deaf

    first = await deaf_sockets(2)
    assert 0 < len(first) < 6
    assert await deaf_sockets(2) == first


async def test_execution_error_rate_fails_at_the_sampler_with_oom(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(config(execution_error_rate=1.0)) as emulator:
        await upload(session, emulator.url)
        client_id = new_id()
        socket = await connect(session, emulator.url, client_id)
        prompt_id = await submit(session, emulator.url, wan_workflow(), client_id)
        error = (await socket.wait("execution_error", prompt_id=prompt_id))["data"]
        await socket.wait("executing", node=None)
        entry = await history(session, emulator.url, prompt_id)
        await socket.close()
    assert error["node_id"] == "57"
    assert error["node_type"] == "KSamplerAdvanced"
    assert error["exception_type"] == "torch.OutOfMemoryError"
    assert error["exception_message"].startswith("CUDA out of memory.")
    assert error["exception_message"].endswith("\n")
    assert error["executed"] == ["39", "62", "38", "7", "6", "63", "37", "54"]
    assert entry["status"]["status_str"] == "error"
    assert [kind for kind, _ in entry["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_error",
    ]


async def test_execution_error_rate_is_seeded(session: aiohttp.ClientSession) -> None:
    async def pattern(seed: int) -> list[str]:
        out = []
        async with Emulator(config(seed=seed, execution_error_rate=0.5)) as emulator:
            await upload(session, emulator.url)
            client_id = new_id()
            socket = await connect(session, emulator.url, client_id)
            for amount in range(2, 10):
                prompt_id = await submit(
                    session, emulator.url, simple_workflow(frames=amount), client_id
                )
                await socket.wait("executing", node=None, prompt_id=prompt_id)
                out.append(
                    (await history(session, emulator.url, prompt_id))["status"]["status_str"]
                )
            await socket.close()
        return out

    first = await pattern(9)
    assert {"success", "error"} == set(first)
    assert await pattern(9) == first


async def test_truncate_view_rate_cuts_downloads_short(session: aiohttp.ClientSession) -> None:
    async def outcomes(seed: int) -> list[bool]:
        out = []
        async with Emulator(config(seed=seed, truncate_view_rate=0.5)) as emulator:
            await upload(session, emulator.url, "big.png", big_png())
            params = {"filename": "big.png", "type": "input"}
            for _ in range(10):
                async with aiohttp.ClientSession() as fresh:
                    try:
                        async with fresh.get(emulator.url + "/view", params=params) as response:
                            announced = int(response.headers["Content-Length"])
                            assert len(await response.read()) == announced
                            out.append(True)
                    except aiohttp.ClientPayloadError:
                        out.append(False)
        return out

    first = await outcomes(1)
    assert True in first and False in first
    assert await outcomes(1) == first


def big_png() -> bytes:
    import io
    import os

    from PIL import Image

    picture = Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


async def test_crash_after_prompts_stops_the_server_until_restart(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(config(crash_after_prompts=2)) as emulator:
        await upload(session, emulator.url)
        client_id = new_id()
        socket = await connect(session, emulator.url, client_id)
        first = await submit(session, emulator.url, simple_workflow(frames=2), client_id)
        second = await submit(session, emulator.url, simple_workflow(frames=3), client_id)
        async with asyncio.timeout(10):
            await socket.closed.wait()
        assert socket.ws.close_code != 1000
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(emulator.url + "/queue"):
                pass
        await emulator.restart()
        async with session.get(emulator.url + "/history") as response:
            assert await response.json() == {}
        assert emulator.executions == {first: 1, second: 1}


async def test_crash_after_prompts_ends_a_standalone_process() -> None:
    settings = {"step_ms": 1, "faults": {"crash_after_prompts": 1}}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batch_runner.emulator",
        "--config",
        json.dumps(settings),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            url = (await process.stdout.readline()).decode().strip()
        async with aiohttp.ClientSession() as session:
            await upload(session, url)
            await submit(session, url, simple_workflow(), None)
        async with asyncio.timeout(20):
            assert await process.wait() == CRASH_EXIT_STATUS
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_preview_frames_follow_the_socket_capability(session: aiohttp.ClientSession) -> None:
    async with Emulator(config(preview_frames=True, preview_bytes=5000)) as emulator:
        await upload(session, emulator.url)
        plain_id, meta_id = new_id(), new_id()
        plain = await connect(session, emulator.url, plain_id)
        meta = await connect(session, emulator.url, meta_id)
        await meta.ws.send_json(
            {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
        )
        await meta.wait("feature_flags")
        for seed, client_id, socket in ((1, plain_id, plain), (2, meta_id, meta)):
            # A new noise seed re-runs both samplers instead of serving the cache.
            graph = wan_workflow()
            graph["57"]["inputs"]["noise_seed"] = seed
            prompt_id = await submit(session, emulator.url, graph, client_id)
            await socket.wait("executing", node=None, prompt_id=prompt_id)
        await plain.close()
        await meta.close()
    assert len(plain.binary) == len(meta.binary) == 20
    assert {frame[:8] for frame in plain.binary} == {b"\x00\x00\x00\x01\x00\x00\x00\x01"}
    assert all(len(frame) == 8 + 5000 for frame in plain.binary)
    assert {frame[:4] for frame in meta.binary} == {b"\x00\x00\x00\x04"}
    info_length = int.from_bytes(meta.binary[0][4:8], "big")
    info = json.loads(meta.binary[0][8 : 8 + info_length])
    assert info["node_id"] == "57" and info["image_type"] == "image/jpeg"
