"""ComfyClient against real loopback servers that answer like the recorded ComfyUI."""

from __future__ import annotations

import asyncio
import json
import mimetypes
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses

from batch_runner.comfy import (
    ComfyClient,
    Endpoint,
    Limits,
    Outcome,
    OutputFile,
    PromptRejected,
    PromptState,
    UploadRejected,
)
from batch_runner.comfy.client import IMAGE_TYPES
from batch_runner.comfy.config import DEFAULT_LIMITS
from batch_runner.errors import (
    EndpointUnavailable,
    NotComfyUI,
    OutputRejected,
    PromptLost,
    ServerError,
    WorkflowRejected,
)
from tests.helpers import TRACES

TOKEN = "tok-3f9c1e77-secret"
PLAIN_500 = "500 Internal Server Error\n\nServer got itself in trouble"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _trace(name: str) -> dict[str, Any]:
    return json.loads((TRACES / name).read_text())  # type: ignore[no-any-return]


def _recorded(trace: str, method: str, path: str, status: int) -> Any:
    for event in _trace(trace)["events"]:
        if (
            event.get("kind") == "http"
            and event["request"]["method"] == method
            and event["request"]["path"] == path
            and event["response"]["status"] == status
        ):
            return event["response"]["json"]
    raise LookupError(f"{method} {path} {status} not in {trace}")


class Recorder:
    """Every request the server saw: method, raw path, headers, body."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Multipart bodies are left for the handler's request.post() (a stream read once).
        multipart = request.content_type.startswith("multipart/")
        body = await request.read() if request.body_exists and not multipart else b""
        self.requests.append((request.method, request.raw_path, dict(request.headers), body))
        return await handler(request)

    def paths(self) -> list[str]:
        return [f"{method} {path}" for method, path, _, _ in self.requests]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[dict[tuple[str, str], Handler]], Awaitable[Any]]]:
    """Start a loopback server from {(method, route): handler}; returns (client, recorder)."""
    servers: list[TestServer] = []
    clients: list[ComfyClient] = []

    async def start(
        routes: dict[tuple[str, str], Handler], *, limits: Limits = DEFAULT_LIMITS
    ) -> tuple[ComfyClient, Recorder]:
        recorder = Recorder()
        app = web.Application(middlewares=[recorder.middleware])
        for (method, route), handler in routes.items():
            app.router.add_route(method, route, handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        client = ComfyClient(Endpoint(str(server.make_url("")), token=TOKEN), limits=limits)
        clients.append(client)
        return client, recorder

    yield start
    for client in clients:
        await client.aclose()
    for server in servers:
        await server.close()


def answer(payload: Any = None, *, status: int = 200, text: str | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if text is not None:
            return web.Response(status=status, text=text)
        return web.json_response(payload, status=status)

    return handler


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------- submit


async def test_submit_sends_our_ids_and_returns_number(serve: Any) -> None:
    async def prompt(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"prompt_id": body["prompt_id"], "number": 7, "node_errors": {}})

    client, recorder = await serve({("POST", "/prompt"): prompt})
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}}}
    number = await client.submit(graph, prompt_id="p-1", client_id="c-1")
    assert number == 7
    _, _, headers, body = recorder.requests[0]
    assert json.loads(body) == {"prompt": graph, "client_id": "c-1", "prompt_id": "p-1"}
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Origin" not in headers


async def test_submit_400_is_rejected_with_one_line_summary(serve: Any) -> None:
    body = _recorded("05_wan22_placeholder_models.json", "POST", "/prompt", 400)
    client, _ = await serve({("POST", "/prompt"): answer(body, status=400)})
    with pytest.raises(PromptRejected) as caught:
        await client.submit({}, prompt_id="p", client_id="c")
    error = caught.value
    assert isinstance(error, WorkflowRejected)
    assert error.endpoint == client.endpoint.name
    assert "node 37 UNETLoader: unet_name: 'wan2.2_i2v_high_noise_14B_fp16" in str(error)
    assert "(value_not_in_list)" in str(error)
    assert error.body == body
    assert error.error_type == "prompt_outputs_failed_validation"
    assert set(error.node_errors) == {"37"}


async def test_submit_400_that_is_not_json_is_still_a_rejection(serve: Any) -> None:
    client, _ = await serve({("POST", "/prompt"): answer(status=400, text="bad request")})
    with pytest.raises(PromptRejected, match="bad request"):
        await client.submit({}, prompt_id="p", client_id="c")


async def test_submit_plain_text_500_is_a_server_error(serve: Any) -> None:
    client, _ = await serve({("POST", "/prompt"): answer(status=500, text=PLAIN_500)})
    with pytest.raises(ServerError, match="answered 500 to POST /prompt: 500 Internal"):
        await client.submit({}, prompt_id="p", client_id="c")


async def test_connection_refused_is_endpoint_unavailable() -> None:
    endpoint = Endpoint(f"127.0.0.1:{_free_port()}", token=TOKEN)
    async with ComfyClient(endpoint) as client:
        with pytest.raises(EndpointUnavailable) as caught:
            await client.submit({}, prompt_id="p", client_id="c")
    assert caught.value.endpoint == endpoint.name
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectionError)
    assert TOKEN not in str(caught.value) and TOKEN not in repr(caught.value)


async def test_request_timeout_is_endpoint_unavailable(serve: Any) -> None:
    release = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    client, _ = await serve({("GET", "/queue"): stuck}, limits=Limits(request_timeout=0.2))
    try:
        with pytest.raises(EndpointUnavailable, match="timed out on /queue"):
            await client.queue()
    finally:
        release.set()


async def test_submit_refuses_a_server_that_renames_the_prompt(serve: Any) -> None:
    async def prompt(request: web.Request) -> web.Response:
        return web.json_response({"prompt_id": "server-made", "number": 1, "node_errors": {}})

    client, recorder = await serve(
        {
            ("POST", "/prompt"): prompt,
            ("POST", "/queue"): answer(text=""),
            ("POST", "/interrupt"): answer(text=""),
        }
    )
    with pytest.raises(ServerError, match="client-chosen prompt ids"):
        await client.submit({}, prompt_id="ours", client_id="c")
    bodies = [json.loads(body) for _, _, _, body in recorder.requests[1:]]
    assert bodies == [{"delete": ["server-made"]}, {"prompt_id": "server-made"}]


# ------------------------------------------------------------------------- locate


def _queue(running: list[str], pending: list[str]) -> dict[str, Any]:
    return {
        "queue_running": [[0, pid, {}, {"client_id": "c"}, ["4"]] for pid in running],
        "queue_pending": [
            [i + 1, pid, {}, {"client_id": "c"}, ["4"]] for i, pid in enumerate(pending)
        ],
    }


@pytest.mark.parametrize(
    ("running", "pending", "history", "state", "calls"),
    [
        (["p"], [], {}, PromptState.RUNNING, ["GET /queue"]),
        (["other"], ["x", "p"], {}, PromptState.PENDING, ["GET /queue"]),
        ([], [], None, PromptState.FINISHED, ["GET /queue", "GET /history/p"]),
        (["other"], [], {}, PromptState.UNKNOWN, ["GET /queue", "GET /history/p"]),
    ],
)
async def test_locate_asks_queue_first_then_history(
    serve: Any,
    running: list[str],
    pending: list[str],
    history: dict[str, Any] | None,
    state: PromptState,
    calls: list[str],
) -> None:
    trace = _trace("01_success_model_free.json")
    recorded = _recorded("01_success_model_free.json", "GET", f"/history/{trace['prompt_id']}", 200)
    finished = {"p": recorded[trace["prompt_id"]]}
    client, recorder = await serve(
        {
            ("GET", "/queue"): answer(_queue(running, pending)),
            ("GET", "/history/{id}"): answer(finished if history is None else history),
        }
    )
    location = await client.locate("p")
    assert location.state is state
    assert recorder.paths() == calls
    if state is PromptState.FINISHED:
        assert location.finished and location.entry is not None
        assert location.entry.outcome is Outcome.SUCCESS
        assert location.entry.outputs[0].filename == "test_00001_.mp4"
    else:
        assert location.entry is None


async def test_history_percent_encodes_the_prompt_id(serve: Any) -> None:
    seen: list[str] = []

    async def history(request: web.Request) -> web.Response:
        seen.append(request.match_info["id"])
        return web.json_response({})

    client, recorder = await serve({("GET", "/history/{id}"): history})
    assert await client.history("a/b c?é") is None
    assert seen == ["a/b c?é"]
    assert recorder.requests[0][1] == "/history/a%2Fb%20c%3F%C3%A9"


@pytest.mark.parametrize(
    "trace", ["05_wan22_placeholder_models.json", "06_interrupt_and_cancel.json"]
)
async def test_history_of_recorded_failures(serve: Any, trace: str) -> None:
    entries: dict[str, Any] = {}
    for event in _trace(trace)["events"]:
        if event.get("kind") == "http" and event["request"]["path"].startswith("/history/"):
            entries.update(event["response"]["json"])

    async def history(request: web.Request) -> web.Response:
        prompt_id = request.match_info["id"]
        return web.json_response({prompt_id: entries[prompt_id]})

    client, _ = await serve({("GET", "/history/{id}"): history})
    kinds = {"execution_error": Outcome.ERROR, "execution_interrupted": Outcome.INTERRUPTED}
    for prompt_id, raw in entries.items():
        entry = await client.history(prompt_id)
        assert entry is not None and entry.prompt_id == prompt_id
        last = raw["status"]["messages"][-1][0]
        assert entry.outcome is kinds.get(last, Outcome.SUCCESS)
    assert any(e["status"]["status_str"] == "error" for e in entries.values())


# ------------------------------------------------------------------------- upload


@pytest.mark.parametrize(
    ("reply", "reference"),
    [
        ({"name": "x (1).png", "subfolder": "", "type": "input"}, "x (1).png"),
        ({"name": "x.png", "subfolder": "batch/a", "type": "input"}, "batch/a/x.png"),
        (
            {"name": "Bild mit Ümlaut (2).png", "subfolder": "", "type": "input"},
            "Bild mit Ümlaut (2).png",
        ),
    ],
)
async def test_upload_returns_the_name_the_server_chose(
    serve: Any, reply: dict[str, str], reference: str
) -> None:
    fields: dict[str, Any] = {}

    async def upload(request: web.Request) -> web.Response:
        form = await request.post()
        for key, value in form.items():
            if isinstance(value, web.FileField):
                fields[key] = (value.filename, value.file.read())
            else:
                fields[key] = value
        return web.json_response(reply)

    client, _ = await serve({("POST", "/upload/image"): upload})
    assert await client.upload_image(b"\x89PNG-bytes", "x.png") == reference
    assert fields["image"] == ("x.png", b"\x89PNG-bytes")
    assert fields["type"] == "input"
    assert "overwrite" not in fields


@pytest.mark.parametrize(
    ("filename", "expected"),
    [("a.png", "image/png"), ("b.JPG", "image/jpeg"), ("c.webp", "image/webp"), ("d", None)],
)
async def test_upload_names_the_image_type(serve: Any, filename: str, expected: str | None) -> None:
    seen: list[str] = []

    async def upload(request: web.Request) -> web.Response:
        image = (await request.post())["image"]
        assert isinstance(image, web.FileField)
        seen.append(image.content_type)
        return web.json_response({"name": filename, "subfolder": "", "type": "input"})

    client, _ = await serve({("POST", "/upload/image"): upload})
    await client.upload_image(b"bytes", filename)
    assert seen == [expected or "application/octet-stream"]


def test_image_type_table_agrees_with_mimetypes() -> None:
    for suffix, content_type in IMAGE_TYPES.items():
        assert mimetypes.guess_type(f"x{suffix}")[0] == content_type


async def test_upload_refusals(serve: Any) -> None:
    text = "Maximum request body size 104857600 exceeded."
    client, recorder = await serve({("POST", "/upload/image"): answer(status=413, text=text)})
    with pytest.raises(UploadRejected, match="413"):
        await client.upload_image(b"x" * 10, "big.png")
    with pytest.raises(UploadRejected, match="plain file name"):
        await client.upload_image(b"x", "../escape.png")
    assert len(recorder.requests) == 1


# ------------------------------------------------------------------------- small endpoints


async def test_queue_admin_and_info_endpoints(serve: Any) -> None:
    models = _recorded("09_endpoint_shapes.json", "GET", "/models/vae", 200)
    client, recorder = await serve(
        {
            ("POST", "/queue"): answer(text=""),
            ("POST", "/interrupt"): answer(text=""),
            ("GET", "/models/vae"): answer(models),
            ("GET", "/models/{folder}"): answer(status=404, text=""),
            ("GET", "/object_info/{cls}"): answer({}),
            ("GET", "/system_stats"): answer(
                _recorded("09_endpoint_shapes.json", "GET", "/system_stats", 200)
            ),
        }
    )
    await client.delete_pending(["a", "b"])
    await client.delete_pending([])  # nothing to do: no request
    await client.interrupt("a")
    with pytest.raises(ValueError, match="interrupts everything"):
        await client.interrupt("")
    assert await client.models("vae") == ["wan_2.1_vae.safetensors"]
    assert await client.models("nosuchfolder") is None
    assert await client.object_info("NoSuchNode") == {}
    stats = await client.system_stats()
    assert stats["system"]["comfyui_version"] == "0.3.64"
    bodies = [json.loads(body) for method, _, _, body in recorder.requests if method == "POST"]
    assert bodies == [{"delete": ["a", "b"]}, {"prompt_id": "a"}]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (answer(status=404, text="<!DOCTYPE HTML><title>Error response</title>"), NotComfyUI),
        (answer(status=405, text="Method Not Allowed"), NotComfyUI),
        (answer(text="<!doctype html><div id=app></div>"), NotComfyUI),  # a web app's page
        (answer(["not", "an", "object"]), NotComfyUI),
        (answer(status=502, text="Bad Gateway"), ServerError),  # a proxy, ComfyUI down
        (answer(status=503, text=""), ServerError),
        (answer(status=429, text="slow down"), ServerError),
    ],
)
async def test_a_health_probe_tells_another_server_from_a_failing_one(
    serve: Any, reply: Handler, expected: type[Exception]
) -> None:
    client, _ = await serve({("GET", "/system_stats"): reply})
    with pytest.raises(expected) as raised:
        await client.system_stats()
    assert type(raised.value) is expected
    if expected is NotComfyUI:
        assert "does not answer as ComfyUI" in str(raised.value)


# ------------------------------------------------------------------------- hostile servers


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (answer(text="<html>hi</html>"), "not JSON: <html>hi</html>"),
        (answer({"queue_running": "x", "queue_pending": []}), "queue_running"),
        (answer([1, 2]), "/queue answer is list"),
        (answer({"queue_running": [[True, "p"]], "queue_pending": []}), "boolean"),
        (answer({"x": "y" * 5000}), "5009 bytes"),
        (answer(status=404, text=""), "unexpected status 404"),
    ],
)
async def test_hostile_queue_answers_are_server_errors(
    serve: Any, reply: Handler, match: str
) -> None:
    client, _ = await serve({("GET", "/queue"): reply}, limits=Limits(max_json_bytes=4096))
    with pytest.raises(ServerError, match=match):
        await client.queue()


async def test_redirects_are_not_followed(serve: Any) -> None:
    followed: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        followed.append(request.headers.get("Authorization", ""))
        return web.json_response({"queue_running": [], "queue_pending": []})

    client, _ = await serve({("GET", "/queue"): redirect, ("GET", "/elsewhere"): elsewhere})
    with pytest.raises(ServerError, match="unexpected status 302"):
        await client.queue()
    assert followed == []


async def test_huge_chunked_answer_is_cut_off(serve: Any) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"[" * 1024)
        return response

    client, _ = await serve({("GET", "/queue"): endless}, limits=Limits(max_json_bytes=8192))
    with pytest.raises(ServerError, match="exceeds 8192 bytes"):
        await client.queue()


@pytest.mark.parametrize(
    ("history", "match"),
    [
        ({"someone-else": {}}, "does not contain 'p'"),
        ({"p": {"outputs": {}}}, "status"),
        (
            {"p": {"status": {"status_str": "success"}, "outputs": {"4": {"images": [{}]}}}},
            "filename",
        ),
    ],
)
async def test_hostile_history_answers_are_server_errors(
    serve: Any, history: Any, match: str
) -> None:
    client, _ = await serve({("GET", "/history/{id}"): answer(history)})
    with pytest.raises(ServerError, match=match) as caught:
        await client.history("p")
    assert not isinstance(caught.value.__cause__, KeyError | TypeError)


@pytest.mark.parametrize(
    "reply",
    [
        {"prompt_id": "p"},
        {"prompt_id": "p", "number": "1"},
        {"prompt_id": "p", "number": True},
        {"number": 1},
    ],
)
async def test_hostile_submit_answers_are_server_errors(serve: Any, reply: Any) -> None:
    client, _ = await serve({("POST", "/prompt"): answer(reply)})
    with pytest.raises(ServerError):
        await client.submit({}, prompt_id="p", client_id="c")


async def test_hostile_upload_and_models_answers(serve: Any) -> None:
    client, _ = await serve(
        {
            ("POST", "/upload/image"): answer({"name": 5}),
            ("GET", "/models/{folder}"): answer({"not": "a list"}),
        }
    )
    with pytest.raises(ServerError, match="'name'"):
        await client.upload_image(b"x", "x.png")
    with pytest.raises(ServerError, match="list of file names"):
        await client.models("vae")


# ------------------------------------------------------------------------- view


async def test_open_view_streams_and_maps_refusals(serve: Any) -> None:
    async def view(request: web.Request) -> web.Response:
        name = request.query["filename"]
        status = {"ok.mp4": 200, "gone.mp4": 404, "bad.mp4": 403, "boom.mp4": 500}[name]
        return web.Response(status=status, body=b"video" if status == 200 else b"")

    client, recorder = await serve({("GET", "/view"): view})

    def file(name: str) -> OutputFile:
        return OutputFile(name, "video", "output", "61", True)

    async with client.open_view(file("ok.mp4")) as response:
        assert await response.read() == b"video"
    assert "subfolder=video" in recorder.requests[0][1] and "type=output" in recorder.requests[0][1]
    for name, error in [
        ("gone.mp4", PromptLost),
        ("bad.mp4", OutputRejected),
        ("boom.mp4", ServerError),
    ]:
        with pytest.raises(error):
            async with client.open_view(file(name)):
                pass


# ------------------------------------------------------------------------- secrets


def test_token_never_printed() -> None:
    endpoint = Endpoint("http://gpu1:8188/", token=TOKEN)
    client = ComfyClient(endpoint)
    assert endpoint.url == "http://gpu1:8188" and endpoint.name == "gpu1:8188"
    for text in (repr(endpoint), str(endpoint), repr(client), str(client)):
        assert TOKEN not in text


# ------------------------------------------------------------------------- narrow error paths


async def test_server_disconnect_is_endpoint_unavailable() -> None:
    async with ComfyClient(Endpoint("http://gpu1:8188", token=TOKEN)) as client:
        with aioresponses() as mocked:
            mocked.get("http://gpu1:8188/queue", exception=aiohttp.ServerDisconnectedError())
            with pytest.raises(EndpointUnavailable, match="connection failed"):
                await client.queue()


async def test_broken_payload_is_a_server_error() -> None:
    async with ComfyClient(Endpoint("http://gpu1:8188")) as client:
        with aioresponses() as mocked:
            mocked.get("http://gpu1:8188/system_stats", exception=aiohttp.ClientPayloadError("cut"))
            with pytest.raises(ServerError, match="bad HTTP answer") as caught:
                await client.system_stats()
    assert isinstance(caught.value.__cause__, aiohttp.ClientPayloadError)
