"""A server that lies: hostile file names, endless bodies, foreign history, garbage answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from batch_runner.comfy.config import Limits
from batch_runner.runner import run_batch, template_for
from batch_runner.states import JobState
from tests.helpers import make_image, settings_for, write_csv

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Hostile:
    """Just enough of ComfyUI to take a prompt and then misbehave when asked for results."""

    def __init__(self, outputs: list[dict[str, str]], view: Handler) -> None:
        self.outputs = outputs
        self.view = view
        self.prompts: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/system_stats", self.ok({"system": {}, "devices": []}))
        app.router.add_post("/upload/image", self.upload)
        app.router.add_post("/prompt", self.prompt)
        app.router.add_get("/queue", self.ok({"queue_running": [], "queue_pending": []}))
        app.router.add_get("/history/{pid}", self.history)
        app.router.add_get("/view", self.view)
        app.router.add_get("/ws", self.ws)
        return app

    @staticmethod
    def ok(body: object) -> Handler:
        async def handler(_request: web.Request) -> web.Response:
            return web.json_response(body)

        return handler

    async def upload(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"name": "in.png", "subfolder": "", "type": "input"})

    async def prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.prompts.append(body["prompt_id"])
        return web.json_response({"prompt_id": body["prompt_id"], "number": 1, "node_errors": {}})

    async def history(self, request: web.Request) -> web.Response:
        pid = request.match_info["pid"]
        entry = {
            "prompt": [1, pid, {}, {}, ["61"]],
            "outputs": {"61": {"images": self.outputs, "animated": [True]}},
            "status": {"status_str": "success", "completed": True, "messages": []},
        }
        # A second entry for a prompt nobody sent must be ignored, not trusted.
        return web.json_response({pid: entry, "never-sent": entry})

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_json({"type": "status", "data": {"status": {}, "sid": "x"}})
        async for _ in socket:
            pass
        return socket


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Hostile], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(server: Hostile) -> str:
        runner = web.AppRunner(server.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def _run(tmp_path: Path, url: str) -> tuple[JobState, str]:
    make_image(tmp_path / "a.png", (64, 48))
    manifest = write_csv(tmp_path / "jobs.csv", [{"id": "j", "image": "a.png", "prompt": "p"}])
    settings = settings_for(manifest, [url], max_attempts=1, silence=0.2)
    summary = await run_batch(settings, template_for(settings), asyncio.Event())
    import sqlite3

    with sqlite3.connect(settings.db) as conn:
        [(state, error)] = conn.execute("SELECT state, last_error FROM jobs")
    assert not list(tmp_path.parent.glob("*.mp4")), "nothing may be written outside"
    assert summary.counts[JobState(state)] == 1
    return JobState(state), error or ""


async def _mp4(_request: web.Request) -> web.Response:
    return web.Response(body=b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)


@pytest.mark.parametrize(
    "name", ["../../escape.mp4", "/etc/cron.d/evil.mp4", "..", "evil.sh", "a\x00b.mp4"]
)
async def test_hostile_output_names_never_escape_the_output_folder(
    tmp_path: Path, serve: Callable[[Hostile], Awaitable[str]], name: str
) -> None:
    server = Hostile([{"filename": name, "subfolder": "../..", "type": "output"}], _mp4)
    state, error = await _run(tmp_path, await serve(server))
    assert state is JobState.FAILED
    assert error
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".mp4", ".sh")]
    assert all(tmp_path / "out" in p.parents for p in written)


async def test_endless_view_body_is_cut_off(
    tmp_path: Path, serve: Callable[[Hostile], Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    import batch_runner.lane as lane_module
    from batch_runner.comfy.client import ComfyClient

    small = Limits(max_download_bytes=256 * 1024)
    monkeypatch.setattr(lane_module, "ComfyClient", functools.partial(ComfyClient, limits=small))

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(10_000):  # 640 MB if nobody stops reading
            await response.write(b"\x00" * 65536)
        return response

    server = Hostile([{"filename": "v.mp4", "subfolder": "", "type": "output"}], endless)
    state, error = await _run(tmp_path, await serve(server))
    assert state is JobState.FAILED
    assert "limit" in error
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


async def test_garbage_history_is_a_clear_failure(
    tmp_path: Path, serve: Callable[[Hostile], Awaitable[str]]
) -> None:
    server = Hostile([{"filename": 5, "subfolder": None}], _mp4)  # type: ignore[dict-item]
    state, error = await _run(tmp_path, await serve(server))
    assert state is JobState.FAILED
    assert json.dumps(error)  # a readable message, not a crash
