"""Fixtures and small clients for the emulator tests."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from PIL import Image

from batch_runner.emulator import Emulator, EmulatorConfig
from tests.emulator import replay

WAIT = 10.0


def png(width: int = 96, height: int = 64, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def wan_workflow(image: str = "start.png") -> dict[str, Any]:
    graph: dict[str, Any] = copy.deepcopy(replay.load("05_wan22_placeholder_models")["workflow"])
    graph["62"]["inputs"]["image"] = image
    return graph


def simple_workflow(image: str = "start.png", frames: int = 5, prefix: str = "video/t") -> Any:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": frames}},
        "3": {"class_type": "CreateVideo", "inputs": {"images": ["2", 0], "fps": 16}},
        "4": {
            "class_type": "SaveVideo",
            "inputs": {
                "video": ["3", 0],
                "filename_prefix": prefix,
                "format": "auto",
                "codec": "auto",
            },
        },
    }


async def upload(
    session: aiohttp.ClientSession, url: str, name: str = "start.png", data: bytes | None = None
) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("image", data or png(), filename=name, content_type="image/png")
    form.add_field("overwrite", "true")
    async with session.post(url + "/upload/image", data=form) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


@dataclass
class Socket:
    """A websocket that keeps every message and lets tests wait for one."""

    ws: aiohttp.ClientWebSocketResponse
    messages: list[dict[str, Any]] = field(default_factory=list)
    binary: list[bytes] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                self.messages.append(json.loads(message.data))
            elif message.type == aiohttp.WSMsgType.BINARY:
                self.binary.append(message.data)
            self.arrived.set()
        self.closed.set()
        self.arrived.set()

    async def wait(self, kind: str, **match: Any) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            seen = 0
            while True:
                for message in self.messages[seen:]:
                    data = message["data"]
                    if message["type"] == kind and all(data.get(k) == v for k, v in match.items()):
                        return message
                seen = len(self.messages)
                if self.closed.is_set():
                    raise ConnectionError("socket closed")
                self.arrived.clear()
                await self.arrived.wait()

    async def wait_count(self, kind: str, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while sum(1 for m in self.messages if m["type"] == kind) < count:
                if self.closed.is_set():
                    raise ConnectionError("socket closed")
                self.arrived.clear()
                await self.arrived.wait()

    def of(self, prompt_id: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["data"].get("prompt_id") == prompt_id]

    async def close(self) -> None:
        await self.ws.close()
        if self.task is not None:
            await self.task


async def connect(session: aiohttp.ClientSession, url: str, client_id: str | None = None) -> Socket:
    target = url.replace("http", "ws", 1) + "/ws"
    if client_id is not None:
        target += f"?clientId={client_id}"
    socket = Socket(await session.ws_connect(target, max_msg_size=0))
    socket.task = asyncio.create_task(socket._read())
    await socket.wait("status")
    return socket


async def submit(
    session: aiohttp.ClientSession, url: str, workflow: Any, client_id: str | None, **extra: Any
) -> str:
    body = {"prompt": workflow, **extra}
    if client_id is not None:
        body["client_id"] = client_id
    async with session.post(url + "/prompt", json=body) as response:
        assert response.status == 200, await response.text()
        prompt_id: str = (await response.json())["prompt_id"]
        return prompt_id


async def history(session: aiohttp.ClientSession, url: str, prompt_id: str) -> dict[str, Any]:
    async with session.get(f"{url}/history/{prompt_id}") as response:
        body: dict[str, dict[str, Any]] = await response.json()
        return body.get(prompt_id, {})


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator(EmulatorConfig(step_ms=1.0)) as running:
        yield running


def new_id() -> str:
    return uuid.uuid4().hex
