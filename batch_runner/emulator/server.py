"""HTTP routes and the websocket endpoint of the emulated ComfyUI server."""

from __future__ import annotations

import asyncio
import copy
import json
import mimetypes
import os
import platform
import sys
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from batch_runner.emulator import schemas
from batch_runner.emulator.config import EmulatorConfig
from batch_runner.emulator.executor import Executor, Task
from batch_runner.emulator.faults import Dice
from batch_runner.emulator.files import FOLDER_TYPES, Folders, UnsafePath, inside
from batch_runner.emulator.hub import Client, Hub
from batch_runner.emulator.validation import PromptRejected, validate

JsonDict = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SERVER_ERROR_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"
INDEX_HTML = (
    "<!doctype html><html><head><title>batch_runner ComfyUI emulator</title></head>"
    "<body>ComfyUI emulator (API only)</body></html>\n"
)
# Private routes for tests and benchmarks; faults never touch them.
PRIVATE_PREFIX = "/emulator/"


@dataclass
class State:
    config: EmulatorConfig
    folders: Folders
    hub: Hub
    executor: Executor
    dice: Dice


STATE = web.AppKey("emulator_state", State)


def _state(request: web.Request) -> State:
    return request.app[STATE]


def _empty(status: int = 200) -> web.Response:
    return web.Response(status=status)


async def _json_body(request: web.Request) -> Any:
    """The body as JSON; an absent or malformed body counts as no fields (admin routes)."""
    try:
        return await request.json()
    except json.JSONDecodeError:
        return {}


# ----- middleware ---------------------------------------------------------------------------


def _loopback(host: str | None) -> bool:
    return host in ("localhost", "127.0.0.1", "::1")


@web.middleware
async def origin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A browser Origin that differs from Host on a loopback server is refused (403)."""
    origin = request.headers.get("Origin")
    host = request.headers.get("Host")
    if origin and host:
        origin_netloc = urllib.parse.urlparse(origin).netloc.lower()
        host_split = urllib.parse.urlsplit("//" + host.lower())
        if _loopback(host_split.hostname) and origin_netloc != host.lower():
            return _empty(403)
    return await handler(request)


@web.middleware
async def token_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With ``require_token`` set, act as an authenticating reverse proxy in front of the
    server: anything without the right bearer token is refused with 401."""
    token = _state(request).config.require_token
    if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
        return _empty(401)
    return await handler(request)


@web.middleware
async def server_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unexpected exceptions answer the real server's plain-text 500."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.Response(status=404, content_type="application/octet-stream")
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        return web.Response(status=500, text=SERVER_ERROR_TEXT)


@web.middleware
async def injected_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = _state(request)
    faults = state.config.faults
    if request.path.startswith(PRIVATE_PREFIX):
        return await handler(request)
    if faults.latency_ms > 0:
        await asyncio.sleep(faults.latency_ms / 1000.0)
    if state.dice.roll("http", faults.http_5xx_rate):
        if state.dice.pick("http", (500, 503)) == 500:
            return web.Response(status=500, text=SERVER_ERROR_TEXT)
        return web.Response(status=503, text="503: Service Unavailable")
    response = await handler(request)
    if state.dice.roll("drop_response", faults.drop_response_rate) and request.transport:
        request.transport.abort()
    return response


# ----- prompt and queue -------------------------------------------------------------------


async def post_prompt(request: web.Request) -> web.Response:
    state = _state(request)
    executor = state.executor
    body = await request.json()
    number = executor.take_number(body)
    if "prompt" not in body:
        error = {
            "type": "no_prompt",
            "message": "No prompt provided",
            "details": "No prompt provided",
            "extra_info": {},
        }
        return web.json_response({"error": error, "node_errors": {}}, status=400)
    prompt = copy.deepcopy(body["prompt"])
    prompt_id = str(body["prompt_id"]) if "prompt_id" in body else str(uuid.uuid4())
    targets = body.get("partial_execution_targets")
    try:
        accepted = validate(prompt, state.config.model_files, _image_exists(state), targets)
    except PromptRejected as rejected:
        return web.json_response(rejected.body, status=400)
    extra_data = dict(body.get("extra_data") or {})
    if "client_id" in body:
        extra_data["client_id"] = body["client_id"]
    executor.submit(Task(number, prompt_id, prompt, extra_data, accepted.outputs))
    return web.json_response(
        {"prompt_id": prompt_id, "number": number, "node_errors": accepted.node_errors}
    )


def _image_exists(state: State) -> Callable[[str], bool]:
    def exists(name: str) -> bool:
        try:
            return state.folders.resolve_annotated(name).is_file()
        except UnsafePath:
            return False

    return exists


async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response(
        {"exec_info": {"queue_remaining": _state(request).executor.queue_remaining()}}
    )


async def get_queue(request: web.Request) -> web.Response:
    running, pending = _state(request).executor.queue_items()
    return web.json_response({"queue_running": running, "queue_pending": pending})


async def post_queue(request: web.Request) -> web.Response:
    executor = _state(request).executor
    body = await _json_body(request)
    if body.get("clear"):
        executor.clear()
    if "delete" in body:
        executor.delete(body["delete"])
    return _empty()


async def post_interrupt(request: web.Request) -> web.Response:
    body = await _json_body(request)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    _state(request).executor.interrupt(None if prompt_id is None else str(prompt_id))
    return _empty()


async def get_history(request: web.Request) -> web.Response:
    query = request.rel_url.query
    max_items = int(query["max_items"]) if "max_items" in query else None
    offset = int(query.get("offset", -1))
    return web.json_response(_state(request).executor.history_slice(max_items, offset))


async def get_history_entry(request: web.Request) -> web.Response:
    prompt_id = request.match_info["prompt_id"]
    entry = _state(request).executor.history.get(prompt_id)
    return web.json_response({} if entry is None else {prompt_id: entry})


async def post_history(request: web.Request) -> web.Response:
    history = _state(request).executor.history
    body = await _json_body(request)
    if body.get("clear"):
        history.clear()
    for prompt_id in body.get("delete", ()):
        history.pop(prompt_id, None)
    return _empty()


async def post_free(request: web.Request) -> web.Response:
    body = await _json_body(request)
    _state(request).executor.free(bool(body.get("free_memory")))
    return _empty()


# ----- files ------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


async def post_upload_image(request: web.Request) -> web.Response:
    state = _state(request)
    limit = state.config.max_upload_size
    if not request.content_type.startswith("multipart/"):
        return _empty(400)
    fields: dict[str, str] = {}
    image: tuple[str | None, bytes] | None = None
    total = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            chunks = bytearray()
            while chunk := await part.read_chunk():
                total += len(chunk)
                if total > limit:
                    raise _TooLarge
                chunks.extend(chunk)
            if part.name == "image" and part.filename is not None:
                image = (part.filename, bytes(chunks))
            elif part.filename is None and part.name:
                fields[part.name] = chunks.decode("utf-8", "replace")
    except _TooLarge:
        await request.content.read()
        return web.Response(status=413, text=f"Maximum request body size {limit} exceeded.")
    if image is None:
        return _empty(400)
    filename, data = image
    kind = fields.get("type", "input") or "input"
    if kind not in FOLDER_TYPES or not filename:
        raise ValueError(f"bad upload type {kind!r} or file name {filename!r}")
    subfolder = fields.get("subfolder", "")
    overwrite = fields.get("overwrite") in ("true", "1")
    try:
        name = state.folders.store_upload(data, filename, subfolder, kind, overwrite)
    except UnsafePath:
        return _empty(400)
    return web.json_response({"name": name, "subfolder": subfolder, "type": kind})


async def get_view(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    query = request.rel_url.query
    if "filename" not in query:
        return _empty(404)
    filename = query["filename"]
    kind = query.get("type", "output")
    if filename.endswith((" [input]", " [output]", " [temp]")):
        filename, _, annotated = filename.rpartition(" [")
        kind = annotated[:-1]
    if not filename or filename.startswith("/") or ".." in filename:
        return _empty(400)
    if kind not in FOLDER_TYPES:
        return _empty(400)
    base = state.folders.dir(kind)
    folder = base
    if "subfolder" in query:
        folder = base / query["subfolder"]
        if not inside(base, folder):
            return _empty(403)
    path = folder / os.path.basename(filename)
    if not path.is_file():
        return _empty(404)
    data = await asyncio.to_thread(path.read_bytes)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = {"Content-Disposition": f'filename="{path.name}"'}
    if state.dice.roll("view", state.config.faults.truncate_view_rate):
        return await _truncated(request, data, content_type, headers)
    return web.Response(body=data, content_type=content_type, headers=headers)


async def _truncated(
    request: web.Request, data: bytes, content_type: str, headers: dict[str, str]
) -> web.StreamResponse:
    """Announce the full length, send part of the body, then cut the connection."""
    response = web.StreamResponse(headers=headers)
    response.content_type = content_type
    response.content_length = len(data)
    await response.prepare(request)
    cut = max(0, min(len(data) - 1, len(data) // 2))
    await response.write(data[:cut])
    if request.transport is not None:
        request.transport.abort()
    return response


# ----- server information -----------------------------------------------------------------


async def get_object_info(request: web.Request) -> web.Response:
    state = _state(request)
    models, input_dir = state.config.model_files, state.folders.dir("input")
    return web.json_response(
        {
            name: schemas.published(name, models, input_dir)
            for name in sorted(schemas.known_classes())
        }
    )


async def get_object_info_class(request: web.Request) -> web.Response:
    state = _state(request)
    name = request.match_info["node_class"]
    if name not in schemas.known_classes():
        return web.json_response({})
    info = schemas.published(name, state.config.model_files, state.folders.dir("input"))
    return web.json_response({name: info})


async def get_models(request: web.Request) -> web.Response:
    return web.json_response(schemas.folder_listing(_state(request).config.model_files))


async def get_models_folder(request: web.Request) -> web.Response:
    models = _state(request).config.model_files
    folder = request.match_info["folder"]
    if folder not in schemas.folder_listing(models):
        return _empty(404)
    return web.json_response(list(models.get(folder, ())))


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


async def get_system_stats(request: web.Request) -> web.Response:
    ram_total, ram_free = _memory()
    vram_total = 85_017_493_504
    return web.json_response(
        {
            "system": {
                "os": os.name,
                "ram_total": ram_total,
                "ram_free": ram_free,
                "comfyui_version": "0.3.64",
                "required_frontend_version": "1.27.10",
                "installed_templates_version": None,
                "required_templates_version": "0.1.95",
                "python_version": sys.version,
                "pytorch_version": "emulated",
                "embedded_python": False,
                "argv": ["batch_runner.emulator", platform.node()],
            },
            "devices": [
                {
                    "name": "cuda:0 ComfyUI emulator : cudaMallocAsync",
                    "type": "cuda",
                    "index": 0,
                    "vram_total": vram_total,
                    "vram_free": vram_total,
                    "torch_vram_total": 0,
                    "torch_vram_free": 0,
                }
            ],
        }
    )


async def get_features(request: web.Request) -> web.Response:
    return web.json_response(_features(_state(request)))


def _features(state: State) -> JsonDict:
    return {"supports_preview_metadata": True, "max_upload_size": state.config.max_upload_size}


async def get_embeddings(request: web.Request) -> web.Response:
    return web.json_response([])


async def get_index(request: web.Request) -> web.Response:
    return web.Response(
        text=INDEX_HTML, content_type="text/html", headers={"Cache-Control": "no-cache"}
    )


async def get_stats(request: web.Request) -> web.Response:
    state = _state(request)
    executor = state.executor
    return web.json_response(
        {
            "executions": dict(executor.executions),
            "switch_gaps_ms": list(executor.switch_gaps_ms),
            "websockets": state.hub.connections,
        }
    )


# ----- websocket --------------------------------------------------------------------------


async def websocket(request: web.Request) -> web.WebSocketResponse:
    state = _state(request)
    hub, executor = state.hub, state.executor
    sid = request.rel_url.query.get("clientId") or uuid.uuid4().hex
    transport = request.transport
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    client = Client(sid, ws, transport)
    hub.register(client)
    hub.connections += 1
    try:
        hub.send("status", {**executor.status(), "sid": sid}, client)
        running = executor.running
        if running is not None and running.client_id == sid and executor.current_node is not None:
            hub.send("executing", {"node": executor.current_node}, client)
        first = True
        async for message in ws:
            if first and message.type == web.WSMsgType.TEXT:
                _handshake(state, client, message.data)
            first = False
    finally:
        hub.unregister(sid)
        hub.connections -= 1
    return ws


def _handshake(state: State, client: Client, text: str) -> None:
    """Answer a first `feature_flags` frame; any other client frame is ignored."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(message, dict) and message.get("type") == "feature_flags":
        data = message.get("data")
        client.wants_metadata = isinstance(data, dict) and bool(
            data.get("supports_preview_metadata")
        )
        state.hub.send("feature_flags", _features(state), client)


# ----- application ------------------------------------------------------------------------

_ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/prompt", post_prompt),
    ("GET", "/prompt", get_prompt),
    ("GET", "/queue", get_queue),
    ("POST", "/queue", post_queue),
    ("POST", "/interrupt", post_interrupt),
    ("GET", "/history", get_history),
    ("GET", "/history/{prompt_id}", get_history_entry),
    ("POST", "/history", post_history),
    ("POST", "/free", post_free),
    ("POST", "/upload/image", post_upload_image),
    ("GET", "/view", get_view),
    ("GET", "/object_info", get_object_info),
    ("GET", "/object_info/{node_class}", get_object_info_class),
    ("GET", "/models", get_models),
    ("GET", "/models/{folder}", get_models_folder),
    ("GET", "/system_stats", get_system_stats),
    ("GET", "/features", get_features),
    ("GET", "/embeddings", get_embeddings),
    ("GET", "/ws", websocket),
]


def build_app(state: State) -> web.Application:
    app = web.Application(
        middlewares=[origin_guard, token_guard, server_errors, injected_faults],
        client_max_size=state.config.max_upload_size,
    )
    app[STATE] = state
    for method, path, handler in _ROUTES:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/api" + path, handler)
    app.router.add_get("/", get_index)
    app.router.add_get("/api/", get_index)
    app.router.add_get(PRIVATE_PREFIX + "stats", get_stats)
    return app
