"""Websocket clients and message delivery.

Sockets are registered by clientId in one dict, exactly like the real server: a new socket
with the same clientId replaces the old registration (the old socket goes deaf), and any
socket that closes removes whatever registration its clientId has, which is the close race
that makes a newer socket deaf. Messages go through one queue so their order is kept.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from batch_runner.emulator.config import Faults
from batch_runner.emulator.faults import Dice


@dataclass(eq=False)
class Client:
    sid: str
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    deaf: bool = False
    wants_metadata: bool = False
    frames_sent: int = 0
    dropped: bool = False


@dataclass(frozen=True)
class Preview:
    """One sampler-step preview; `metadata` selects the type-4 or the type-1 copy."""

    node_id: str
    prompt_id: str
    size: int
    metadata: bool

    def render(self) -> bytes:
        # A JPEG start marker and padding: clients only ever need the length and framing.
        image = b"\xff\xd8\xff\xe0" + bytes(max(0, self.size - 4))
        if not self.metadata:
            return struct.pack(">II", 1, 1) + image
        info = json.dumps(
            {
                "node_id": self.node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": self.node_id,
                "parent_node_id": None,
                "real_node_id": self.node_id,
                "image_type": "image/jpeg",
            }
        ).encode()
        return struct.pack(">II", 4, len(info)) + info + image


Target = Client | str | None
Payload = str | Preview


@dataclass
class Hub:
    faults: Faults
    dice: Dice
    sockets: dict[str, Client] = field(default_factory=dict)
    # Open websocket connections, registered or not (a deaf socket still counts).
    connections: int = 0
    _queue: asyncio.Queue[tuple[Target, Payload]] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._publish(), name="emulator-ws-publisher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.drop_all()
        self._queue = asyncio.Queue()

    def register(self, client: Client) -> None:
        client.deaf = self.dice.roll("ws_deaf", self.faults.ws_deaf_rate)
        self.sockets[client.sid] = client

    def unregister(self, sid: str) -> None:
        # Unconditional on purpose: this is the real server's close race.
        self.sockets.pop(sid, None)

    def drop_all(self) -> None:
        for client in list(self.sockets.values()):
            self._drop(client)
        self.sockets.clear()

    def send(self, event: str, data: Any, target: Target) -> None:
        self._queue.put_nowait((target, json.dumps({"type": event, "data": data})))

    def preview(self, target: Target, preview: Preview) -> None:
        self._queue.put_nowait((target, preview))

    async def _publish(self) -> None:
        while True:
            target, payload = await self._queue.get()
            if isinstance(target, Client):
                clients = [target]
            elif target is None:
                clients = list(self.sockets.values())
            else:
                found = self.sockets.get(target)
                clients = [found] if found is not None else []
            for client in clients:
                await self._deliver(client, payload)

    async def _deliver(self, client: Client, payload: Payload) -> None:
        if client.dropped or client.ws.closed or (client.deaf and client.frames_sent > 0):
            return
        try:
            if isinstance(payload, Preview):
                if payload.metadata != client.wants_metadata:
                    return
                await client.ws.send_bytes(payload.render())
            else:
                await client.ws.send_str(payload)
        except (ConnectionError, RuntimeError):
            return
        client.frames_sent += 1
        limit = self.faults.ws_drop_after_frames
        if (limit is not None and client.frames_sent >= limit) or self.dice.roll(
            "ws", self.faults.ws_drop_rate
        ):
            self._drop(client)

    @staticmethod
    def _drop(client: Client) -> None:
        """Cut the connection without a close frame, as a dying server or network does."""
        client.dropped = True
        if client.transport is not None:
            client.transport.abort()
