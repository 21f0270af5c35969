"""EventStream against a loopback websocket server: reconnects, limits, keepalive, secrets."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from batch_runner.comfy import events as ev
from batch_runner.comfy.config import DEFAULT_LIMITS, Endpoint, Limits
from batch_runner.comfy.events import parse_message
from batch_runner.comfy.stream import EventStream
from tests.helpers import TRACES

TOKEN = "tok-ws-5d1e-secret"
STEP = 5.0  # upper bound for any single expected item; normally milliseconds

Script = Callable[[web.WebSocketResponse, web.Request], Awaitable[None]]


def status(sid: str | None = None, remaining: int = 0) -> dict[str, Any]:
    data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": remaining}}}
    if sid is not None:
        data["sid"] = sid
    return {"type": "status", "data": data}


class WsServer:
    """A /ws endpoint that runs one script per connection and logs opens and closes."""

    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.log: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.client_ids: list[str] = []
        self.stop = asyncio.Event()
        self.server: TestServer | None = None
        self.autoping = True

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        number = len(self.headers) + 1
        self.headers.append(dict(request.headers))
        self.client_ids.append(request.query.get("clientId", ""))
        script = self.scripts.pop(0) if self.scripts else greet_then_idle
        ws = web.WebSocketResponse(autoping=script is not stall)
        await ws.prepare(request)
        self.log.append(f"open {number}")
        try:
            await script(ws, request)
            if not ws.closed and script is not stall:
                async for _ in ws:  # until the client closes
                    pass
        finally:
            self.log.append(f"closed {number}")
        return ws

    def endpoint(self) -> Endpoint:
        assert self.server is not None
        return Endpoint(str(self.server.make_url("")), token=TOKEN)


async def greet_then_idle(ws: web.WebSocketResponse, request: web.Request) -> None:
    await ws.send_json(status(request.query["clientId"]))


async def stall(ws: web.WebSocketResponse, request: web.Request) -> None:
    """Greet, then neither read nor answer pings: a silently dead link."""
    await ws.send_json(status(request.query["clientId"]))
    server: WsServer = request.app[SERVER]
    await server.stop.wait()


SERVER = web.AppKey("server", WsServer)


@pytest.fixture
async def ws_server() -> AsyncIterator[WsServer]:
    server = WsServer()
    app = web.Application()
    app[SERVER] = server
    app.router.add_get("/ws", server.handler)
    server.server = TestServer(app, host="127.0.0.1")
    await server.server.start_server()
    yield server
    server.stop.set()
    await server.server.close()


@pytest.fixture
async def streams() -> AsyncIterator[Callable[..., tuple[EventStream, AsyncIterator[Any]]]]:
    made: list[tuple[EventStream, Any]] = []

    def make(endpoint: Endpoint, limits: Limits = DEFAULT_LIMITS) -> tuple[EventStream, Any]:
        stream = EventStream(endpoint, "client-1", limits, backoff_initial=0.01, backoff_max=0.05)
        items = stream.events()
        made.append((stream, items))
        return stream, items

    yield make
    for stream, items in made:
        await stream.aclose()
        await items.aclose()


async def next_item(items: AsyncIterator[Any]) -> Any:
    return await asyncio.wait_for(anext(items), STEP)


async def test_connects_with_client_id_and_bearer_and_no_origin(
    ws_server: WsServer, streams: Any
) -> None:
    stream, items = streams(ws_server.endpoint())
    assert await next_item(items) == ev.Connected()
    assert await next_item(items) == ev.Status(0, "client-1")
    assert stream.connected
    headers = ws_server.headers[0]
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Origin" not in headers
    assert ws_server.client_ids == ["client-1"]
    assert TOKEN not in repr(stream) and TOKEN not in stream.url


async def test_binary_frames_are_dropped(ws_server: WsServer, streams: Any) -> None:
    async def previews(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.send_bytes(b"\x00\x00\x00\x01\x00\x00\x00\x01" + b"\xff\xd8" * 1000)
        await ws.send_json(status("client-1"))
        await ws.send_bytes(b"\x00\x00\x00\x04junk")
        await ws.send_json({"type": "executing", "data": {"node": "57"}})

    ws_server.scripts.append(previews)
    _, items = streams(ws_server.endpoint())
    assert [await next_item(items) for _ in range(3)] == [
        ev.Connected(),
        ev.Status(0, "client-1"),
        ev.Executing(None, "57"),
    ]


async def test_replays_a_recorded_socket_with_binary_previews(
    ws_server: WsServer, streams: Any
) -> None:
    socket_trace = json.loads((TRACES / "14c_wan22_previews_binary.json").read_text())
    frames = socket_trace["websockets"]["legacy_client"]["messages"]

    async def replay(ws: web.WebSocketResponse, request: web.Request) -> None:
        for frame in frames:
            if frame["frame"] == "text":
                await ws.send_str(json.dumps(frame["msg"]))
            else:
                await ws.send_bytes(bytes.fromhex(frame["first16_hex"]).ljust(frame["len"], b"\0"))
        await ws.close()

    ws_server.scripts.append(replay)
    _, items = streams(ws_server.endpoint())
    expected = [
        e for f in frames if f["frame"] == "text" if (e := parse_message(json.dumps(f["msg"])))
    ]
    assert await next_item(items) == ev.Connected()
    got = [await next_item(items) for _ in expected]
    assert got == expected
    assert isinstance(got[-1], ev.Executing) and got[-1].node is None
    assert isinstance(await next_item(items), ev.Disconnected)  # the clean close


async def test_reconnects_after_a_clean_close(ws_server: WsServer, streams: Any) -> None:
    async def close_cleanly(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.close()

    ws_server.scripts.append(close_cleanly)
    _, items = streams(ws_server.endpoint())
    assert await next_item(items) == ev.Connected()
    lost = await next_item(items)
    assert isinstance(lost, ev.Disconnected) and "1000" in lost.reason
    assert await next_item(items) == ev.Connected()
    assert await next_item(items) == ev.Status(0, "client-1")
    assert ws_server.log[:3] == ["open 1", "closed 1", "open 2"]


async def test_reconnects_after_the_server_drops_the_connection(
    ws_server: WsServer, streams: Any
) -> None:
    async def drop(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.send_json(status("client-1", remaining=3))
        assert request.transport is not None
        request.transport.close()  # no close frame, as when ComfyUI is killed

    ws_server.scripts.append(drop)
    _, items = streams(ws_server.endpoint())
    assert await next_item(items) == ev.Connected()
    assert await next_item(items) == ev.Status(3, "client-1")
    lost = await next_item(items)
    assert isinstance(lost, ev.Disconnected) and "without a close frame" in lost.reason
    assert await next_item(items) == ev.Connected()


async def test_oversized_frame_closes_with_1009_and_reconnects(
    ws_server: WsServer, streams: Any
) -> None:
    async def oversized(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.send_bytes(b"\x00\x00\x00\x01" + b"x" * 4096)

    ws_server.scripts.append(oversized)
    _, items = streams(ws_server.endpoint(), Limits(max_ws_message_bytes=1024))
    assert await next_item(items) == ev.Connected()
    lost = await next_item(items)
    assert isinstance(lost, ev.Disconnected) and "1009" in lost.reason
    assert await next_item(items) == ev.Connected()


async def test_a_stalled_link_is_detected_by_keepalive(ws_server: WsServer, streams: Any) -> None:
    ws_server.scripts.append(stall)
    limits = Limits(ws_ping_interval=0.05, ws_ping_timeout=0.1, connect_timeout=0.5)
    _, items = streams(ws_server.endpoint(), limits)
    assert await next_item(items) == ev.Connected()
    assert await next_item(items) == ev.Status(0, "client-1")
    lost = await next_item(items)
    assert isinstance(lost, ev.Disconnected) and "keepalive" in lost.reason
    assert await next_item(items) == ev.Connected()


async def test_forced_reconnect_closes_the_old_socket_before_opening_the_new(
    ws_server: WsServer, streams: Any
) -> None:
    stream, items = streams(ws_server.endpoint())
    assert await next_item(items) == ev.Connected()
    assert await next_item(items) == ev.Status(0, "client-1")
    await stream.reconnect()
    assert await next_item(items) == ev.Disconnected("reconnect requested")
    assert await next_item(items) == ev.Connected()
    assert await next_item(items) == ev.Status(0, "client-1")
    # PROTOCOL §8.6: the new socket must not exist while the old one is still open.
    assert ws_server.log == ["open 1", "closed 1", "open 2"]


async def test_connect_failures_are_retried_until_the_server_appears(streams: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stream, items = streams(Endpoint(f"127.0.0.1:{port}"))
    first = asyncio.ensure_future(anext(items))
    done, _ = await asyncio.wait({first}, timeout=0.2)
    assert not done  # retrying silently: no Disconnected for failed attempts
    server = WsServer()
    app = web.Application()
    app.router.add_get("/ws", server.handler)
    test_server = TestServer(app, host="127.0.0.1", port=port)
    await test_server.start_server()
    try:
        assert await asyncio.wait_for(first, STEP) == ev.Connected()
        assert await next_item(items) == ev.Status(0, "client-1")
    finally:
        await stream.aclose()  # before the server, whose shutdown waits for open sockets
        await test_server.close()


async def test_aclose_ends_the_iteration_and_closes_the_socket(
    ws_server: WsServer, streams: Any
) -> None:
    stream, items = streams(ws_server.endpoint())
    assert await next_item(items) == ev.Connected()
    assert await next_item(items) == ev.Status(0, "client-1")
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await next_item(items)
    assert ws_server.log == ["open 1", "closed 1"]
    assert not stream.connected and stream.closed


async def test_only_one_iteration_at_a_time(ws_server: WsServer, streams: Any) -> None:
    stream, items = streams(ws_server.endpoint())
    assert await next_item(items) == ev.Connected()
    second = stream.events()
    with pytest.raises(RuntimeError, match="already"):
        await anext(second)
