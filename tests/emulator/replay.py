"""Replaying a recorded ComfyUI trace against the emulator and comparing the answers.

Actions (HTTP requests, socket opens and closes, the restart notes of 12b) are replayed in
recorded order. Instead of recorded times, each action waits until every open socket has
received at least as many frames as its recorded counterpart had at that moment, so the
emulator is in the same state (for example: ten progress steps into a prompt before an
interrupt). Comparisons ignore ids, timestamps, paths and `number` offsets: status codes,
content types, JSON shapes (keys and value types, recursively) and the order of websocket
message types.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import io
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from PIL import Image

from batch_runner.emulator import Emulator
from tests.helpers import TRACES

WAIT = 10.0
JsonDict = dict[str, Any]


def load(name: str) -> JsonDict:
    data: JsonDict = json.loads((TRACES / f"{name}.json").read_text("utf-8"))
    return data


# ----- shapes -----------------------------------------------------------------------------


def shape_diff(
    recorded: Any, live: Any, where: str = "$", ids: dict[str, str] | None = None
) -> list[str]:
    """Differences in structure: keys and value types, recursively. Nulls match anything
    (the recording has nulls where values depend on the machine) and lists are compared
    element by element up to the shorter length (their lengths depend on timing)."""
    if recorded is None or live is None:
        return []
    if isinstance(recorded, bool) or isinstance(live, bool):
        return [] if type(recorded) is type(live) else [f"{where}: {recorded!r} vs {live!r}"]
    if isinstance(recorded, (int, float, str)):
        if type(recorded) is type(live):
            return []
        return [f"{where}: {type(recorded).__name__} vs {type(live).__name__}"]
    if isinstance(recorded, list):
        if not isinstance(live, list):
            return [f"{where}: list vs {type(live).__name__}"]
        diffs = []
        for index, (a, b) in enumerate(zip(recorded, live, strict=False)):
            diffs += shape_diff(a, b, f"{where}[{index}]")
        return diffs
    if not isinstance(live, dict):
        return [f"{where}: object vs {type(live).__name__}"]
    if ids is not None:
        # Keyed by prompt ids: compare the entries of prompts this replay submitted too.
        diffs = []
        for key, value in recorded.items():
            if ids.get(key, key) in live:
                diffs += shape_diff(value, live[ids.get(key, key)], f"{where}[{key}]")
        return diffs
    if set(recorded) != set(live):
        return [f"{where}: keys {sorted(recorded)} vs {sorted(live)}"]
    diffs = []
    for key, value in recorded.items():
        diffs += shape_diff(value, live[key], f"{where}.{key}")
    return diffs


def normalized_types(messages: list[str]) -> list[str]:
    """Message types with per-step runs collapsed: `progress` and binary previews are dropped
    and consecutive `progress_state` frames count once (step counts depend on timing).
    Broadcast `status` frames are compared by count only: where they fall between another
    prompt's messages depends on timing."""
    out: list[str] = []
    for kind in messages:
        if kind in ("progress", "status") or kind.startswith("binary"):
            continue
        if kind == "progress_state" and out and out[-1] == "progress_state":
            continue
        out.append(kind)
    return out


# ----- uploads ----------------------------------------------------------------------------


def upload_bytes(filename: str, info: JsonDict) -> bytes:
    """Content for a recorded upload: same sha prefix -> same bytes, sizes as recorded."""
    if info.get("content_type") == "text/plain":
        return b"this is not an image\n".ljust(int(info.get("len", 21)), b"x")
    seed = info.get("sha256_prefix") or f"{filename}:{info.get('len')}"
    digest = hashlib.sha256(str(seed).encode()).digest()
    width, height = info.get("size", (64, 48))
    picture = Image.new("RGB", (width, height), tuple(digest[:3]))
    picture.putpixel((0, 0), tuple(digest[3:6]))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


# ----- sockets ----------------------------------------------------------------------------


@dataclass
class LiveSocket:
    name: str
    recorded: JsonDict
    ws: aiohttp.ClientWebSocketResponse | None = None
    frames: list[tuple[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None
    closed: bool = False

    def recorded_before(self, t: float) -> int:
        return sum(1 for frame in self.recorded["messages"] if frame["t"] < t)

    def recorded_types(self) -> list[str]:
        return [
            frame["msg"]["type"] if "msg" in frame else f"binary{frame['event_type_u32be']}"
            for frame in self.recorded["messages"]
        ]

    def live_types(self) -> list[str]:
        return [kind for kind, _ in self.frames]

    async def read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                parsed = json.loads(message.data)
                self.frames.append((parsed["type"], parsed["data"]))
            elif message.type == aiohttp.WSMsgType.BINARY:
                self.frames.append((f"binary{int.from_bytes(message.data[:4], 'big')}", None))
            self.arrived.set()
        self.closed = True
        self.arrived.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.frames) < count and not self.closed:
                self.arrived.clear()
                await self.arrived.wait()


# ----- replay -----------------------------------------------------------------------------


@dataclass
class Action:
    t: float
    kind: str
    event: JsonDict | None = None
    socket: str | None = None


def actions(trace: JsonDict) -> list[Action]:
    found = [Action(e["t"], "event", event=e) for e in trace.get("events", [])]
    for name, socket in trace.get("websockets", {}).items():
        found.append(Action(socket["opened_at"], "open", socket=name))
        if "Exception" not in str(socket.get("close_reason")):
            found.append(Action(socket["closed_at"], "close", socket=name))
    return sorted(found, key=lambda action: action.t)


def submitted_prompts(trace: JsonDict) -> Iterator[tuple[JsonDict, JsonDict]]:
    for event in trace.get("events", []):
        request = event.get("request", {})
        if event.get("kind") == "http" and request.get("path", "").endswith("/prompt"):
            body = request.get("json")
            if request["method"] == "POST" and isinstance(body, dict):
                yield body, event["response"]


@dataclass
class Mismatch:
    what: str
    details: list[str]


class Replayer:
    def __init__(
        self,
        emulator: Emulator,
        session: aiohttp.ClientSession,
        trace: JsonDict,
        skip: frozenset[str] = frozenset(),
    ):
        self.skip = skip
        self.emulator = emulator
        self.session = session
        self.trace = trace
        self.sockets = {
            name: LiveSocket(name, recorded)
            for name, recorded in trace.get("websockets", {}).items()
        }
        self.ids: dict[str, str] = {}
        self.mismatches: list[Mismatch] = []
        self.responses: dict[str, tuple[int, Any]] = {}

    # -- preparation: files and cache state the recording server already had --

    async def prepare(self) -> None:
        uploaded = {
            (e["request"].get("multipart_files") or {}).get("image", {}).get("filename")
            for e in self.trace.get("events", [])
            if e.get("kind") == "http"
        }
        needed: set[str] = set()
        for body, response in submitted_prompts(self.trace):
            if response["status"] != 200:
                continue
            for node in (body.get("prompt") or {}).values():
                if isinstance(node, dict) and node.get("class_type") == "LoadImage":
                    needed.add(str(node["inputs"]["image"]))
        for event in self.trace.get("events", []):
            query = event.get("request", {}).get("query", {})
            if query.get("type") == "input" and event.get("response", {}).get("status") == 200:
                needed.add(query["filename"])
        for name in sorted(needed - uploaded):
            if "/" not in name and "[" not in name:
                await self._upload(name, upload_bytes(name, {}), {"overwrite": "true"})
        await self._warm_cache()

    async def _upload(self, name: str, data: bytes, fields: dict[str, str]) -> None:
        form = aiohttp.FormData()
        for key, value in fields.items():
            form.add_field(key, value)
        form.add_field("image", data, filename=name, content_type="image/png")
        async with self.session.post(self.emulator.url + "/upload/image", data=form) as r:
            assert r.status == 200, await r.text()

    def _recorded_cached(self, prompt_id: str) -> list[str] | None:
        for socket in self.trace.get("websockets", {}).values():
            for frame in socket["messages"]:
                msg = frame.get("msg", {})
                data = msg.get("data") or {}
                if msg.get("type") == "execution_cached" and data.get("prompt_id") == prompt_id:
                    return list(data["nodes"])
        for event in self.trace.get("events", []):
            body = event.get("response", {}).get("json")
            if isinstance(body, dict) and isinstance(body.get(prompt_id), dict):
                for kind, data in body[prompt_id]["status"]["messages"]:
                    if kind == "execution_cached":
                        return list(data["nodes"])
        return None

    async def _warm_cache(self) -> None:
        """Run a variant of the first prompt that leaves exactly its recorded cached nodes
        in the node cache (the recording server had run similar graphs before)."""
        first = next(((b, r) for b, r in submitted_prompts(self.trace) if r["status"] == 200), None)
        if first is None:
            return
        body, response = first
        cached = set(self._recorded_cached(response["json"]["prompt_id"]) or ())
        if not cached:
            return
        prompt = copy.deepcopy(body["prompt"])
        uploads = {
            (e["request"].get("multipart_files") or {}).get("image", {}).get("filename"): e
            for e in self.trace.get("events", [])
            if e.get("kind") == "http" and e["request"].get("multipart_files")
        }
        for node_id, node in prompt.items():
            inputs = node["inputs"]
            if node["class_type"] == "LoadImage":
                event = uploads.get(inputs["image"])
                if node_id in cached and event is not None:
                    info = event["request"]["multipart_files"]["image"]
                    await self._upload(
                        inputs["image"], upload_bytes(inputs["image"], info), {"overwrite": "true"}
                    )
                elif node_id not in cached:
                    inputs["image"] = "warm_up.png"
                    await self._upload(
                        "warm_up.png", upload_bytes("warm_up", {}), {"overwrite": "true"}
                    )
            elif node_id not in cached:
                if "filename_prefix" in inputs:
                    inputs["filename_prefix"] = "warm_up/x"
                else:
                    for key, value in inputs.items():
                        if isinstance(value, int | float) and not isinstance(value, bool):
                            inputs[key] = value + 1
                            break
        async with self.session.post(self.emulator.url + "/prompt", json={"prompt": prompt}) as r:
            assert r.status == 200, await r.text()
            prompt_id = (await r.json())["prompt_id"]
        await self._poll_history(prompt_id)

    async def _poll_history(self, prompt_id: str) -> Any:
        url = self.emulator.url + "/history/" + urllib.parse.quote(prompt_id, safe="")
        async with asyncio.timeout(WAIT):
            while True:
                async with self.session.get(url) as r:
                    body = await r.json()
                if body:
                    return body
                await asyncio.sleep(0.005)

    # -- the replay itself --

    async def run(self) -> None:
        await self.prepare()
        for action in actions(self.trace):
            await self._sync(action.t)
            if action.kind == "open":
                await self._open(self.sockets[action.socket or ""])
            elif action.kind == "close":
                await self._close(self.sockets[action.socket or ""])
            elif action.event is not None and action.event.get("label") in self.skip:
                continue
            elif action.event is not None and action.event.get("kind") == "http":
                await self._http(action.event)
            elif action.event is not None and action.event.get("kind") == "note":
                await self._note(action.event)
        for socket in self.sockets.values():
            if socket.ws is not None and not socket.closed:
                with contextlib.suppress(TimeoutError):
                    await socket.wait_for(len(socket.recorded["messages"]))
        await self.close_all()

    async def close_all(self) -> None:
        for socket in self.sockets.values():
            if socket.ws is not None:
                await socket.ws.close()
            if socket.reader is not None:
                await socket.reader

    async def _sync(self, t: float) -> None:
        for socket in self.sockets.values():
            if socket.ws is not None and not socket.closed:
                await socket.wait_for(socket.recorded_before(t))

    async def _open(self, socket: LiveSocket) -> None:
        parts = urllib.parse.urlsplit(socket.recorded["url"])
        url = self.emulator.url.replace("http", "ws", 1) + parts.path
        if parts.query:
            url += "?" + parts.query
        socket.ws = await self.session.ws_connect(url, max_msg_size=0)
        socket.reader = asyncio.create_task(socket.read())
        for sent in socket.recorded.get("sent_by_client", []):
            await socket.ws.send_json(sent["data"])
        await socket.wait_for(1)

    async def _close(self, socket: LiveSocket) -> None:
        if socket.ws is None:
            return
        await socket.ws.close()
        if socket.reader is not None:
            await socket.reader
        # The server forgets the socket's clientId when its handler ends; wait for that.
        async with asyncio.timeout(WAIT):
            while True:
                async with self.session.get(self.emulator.url + "/emulator/stats") as r:
                    open_now = (await r.json())["websockets"]
                if open_now <= sum(
                    1 for s in self.sockets.values() if s.ws is not None and not s.ws.closed
                ):
                    return
                await asyncio.sleep(0.002)

    async def _note(self, event: JsonDict) -> None:
        text = event.get("text", "")
        if text.startswith("sent SIGTERM"):
            await self.emulator.crash()
        elif text.startswith("GET /queue while server is down"):
            try:
                async with self.session.get(self.emulator.url + "/queue"):
                    self.mismatches.append(Mismatch("server down", ["HTTP answered"]))
            except aiohttp.ClientConnectionError:
                pass
        elif text.startswith("server restarted"):
            await self.emulator.restart()

    def _map_ids(self, text: str) -> str:
        for recorded, live in self.ids.items():
            text = text.replace(recorded, live)
        return text

    async def _http(self, event: JsonDict) -> None:
        request, recorded = event["request"], event["response"]
        label = event.get("label", request["path"])
        path = self._map_ids(request["path"]).replace(" ", "%20").replace("é", "%C3%A9")
        url = self.emulator.url + path
        query = {k: self._map_ids(str(v)) for k, v in (request.get("query") or {}).items()}
        kwargs: JsonDict = {"params": query, "headers": dict(request.get("headers") or {})}
        if "json" in request:
            kwargs["data"] = self._map_ids(json.dumps(request["json"]))
            kwargs["headers"].setdefault("Content-Type", "application/json")
        elif "raw_body" in request:
            kwargs["data"] = request["raw_body"]
        elif request.get("multipart_files") or request.get("form"):
            kwargs["data"] = self._form(request, recorded)
        if "Origin" in kwargs["headers"] or "Host" in kwargs["headers"]:
            kwargs["headers"]["Host"] = urllib.parse.urlsplit(self.emulator.url).netloc
        poll = self._polls(event)
        async with asyncio.timeout(WAIT):
            while True:
                status, body, headers = await self._send(request["method"], url, kwargs)
                if not poll or body:
                    break
                await asyncio.sleep(0.005)
        self.responses[label] = (status, body)
        self._compare(label, event, status, body, headers)
        if status == 200 and request["path"].endswith("/prompt") and request["method"] == "POST":
            recorded_id = recorded.get("json", {}).get("prompt_id")
            if isinstance(recorded_id, str) and isinstance(body, dict):
                self.ids.setdefault(recorded_id, body["prompt_id"])

    def _learn_filenames(self, recorded: Any, live: Any) -> None:
        """Output counters depend on files the recording server already had; map names."""
        if isinstance(recorded, dict) and isinstance(live, dict):
            if isinstance(recorded.get("filename"), str) and isinstance(live.get("filename"), str):
                self.ids.setdefault(recorded["filename"], live["filename"])
            for key, value in recorded.items():
                target = live.get(self.ids.get(key, key))
                if target is not None:
                    self._learn_filenames(value, target)
        elif isinstance(recorded, list) and isinstance(live, list):
            for a, b in zip(recorded, live, strict=False):
                self._learn_filenames(a, b)

    def _polls(self, event: JsonDict) -> bool:
        """A history read whose recording found the entry: keep reading until it is there."""
        recorded = event["response"].get("json")
        path = event["request"]["path"]
        return (
            path.startswith(("/history/", "/api/history/"))
            and bool(recorded)
            and recorded != "<omitted>"
        )

    def _form(self, request: JsonDict, recorded: JsonDict) -> aiohttp.FormData:
        files = dict(request.get("multipart_files") or {})
        stored = recorded.get("json")
        if not files and isinstance(stored, dict) and "name" in stored:
            # Some recordings kept only the form fields of a successful upload.
            files["image"] = {"filename": stored["name"]}
        if not files:
            return aiohttp.FormData(request.get("form") or {})
        # Unquoted, so names with '/', spaces or accents reach the server as typed.
        form = aiohttp.FormData(quote_fields=False)
        for key, value in (request.get("form") or {}).items():
            form.add_field(key, value)
        limit = self.emulator.config.max_upload_size
        for field_name, info in files.items():
            name = info["filename"]
            if int(info.get("len", 0)) > 104_857_600:
                data = bytes(limit + 1024)
            else:
                data = upload_bytes(name, info)
            form.add_field(
                field_name,
                io.BytesIO(data),
                filename=name,
                content_type=info.get("content_type", "image/png"),
            )
        return form

    async def _send(self, method: str, url: str, kwargs: JsonDict) -> tuple[int, Any, Any]:
        async with self.session.request(method, url, **kwargs) as r:
            raw = await r.read()
            body: Any = raw
            if r.content_type == "application/json":
                body = json.loads(raw)
            elif r.content_type.startswith("text/"):
                body = raw.decode()
            return r.status, body, r.headers

    def _compare(self, label: str, event: JsonDict, status: int, body: Any, headers: Any) -> None:
        recorded = event["response"]
        diffs: list[str] = []
        if status != recorded["status"]:
            diffs.append(f"status {recorded['status']} vs {status}")
        wanted_type = (recorded.get("headers") or {}).get("Content-Type")
        if (
            wanted_type
            and wanted_type != "text/html"
            and headers.get("Content-Type") != wanted_type
        ):
            diffs.append(f"Content-Type {wanted_type} vs {headers.get('Content-Type')}")
        wants_disposition = "Content-Disposition" in (recorded.get("headers") or {})
        if wants_disposition and "Content-Disposition" not in headers:
            diffs.append("no Content-Disposition")
        if "json" in recorded and recorded["json"] != "<omitted>" and not diffs:
            timing = any(word in label for word in ("poll", "while running", "during run"))
            path = event["request"]["path"]
            history_map = path.rstrip("/").endswith("/history") or path.startswith(
                ("/history/", "/api/history/")
            )
            if not (timing and (not recorded["json"] or not body)):
                diffs += shape_diff(recorded["json"], body, ids=self.ids if history_map else None)
                self._learn_filenames(recorded["json"], body)
        if "text" in recorded and recorded["text"] and wanted_type != "text/html" and not diffs:
            expected = recorded["text"]
            if expected.startswith("Maximum request body size"):
                expected = (
                    f"Maximum request body size {self.emulator.config.max_upload_size} exceeded."
                )
            if body != expected:
                diffs.append(f"text {expected!r} vs {body!r}")
        if diffs:
            self.mismatches.append(Mismatch(f"HTTP {label}", diffs))

    def compare_sockets(self) -> None:
        for socket in self.sockets.values():
            recorded = normalized_types(socket.recorded_types())
            live = normalized_types(socket.live_types())
            if recorded != live:
                self.mismatches.append(
                    Mismatch(f"ws {socket.name} types", [f"{recorded}", f"{live}"])
                )
            statuses = [data for kind, data in socket.frames if kind == "status"]
            recorded_statuses = [
                f["msg"]["data"]
                for f in socket.recorded["messages"]
                if f.get("msg", {}).get("type") == "status"
            ]
            if len(statuses) != len(recorded_statuses):
                self.mismatches.append(Mismatch(f"ws {socket.name} status count", []))
            first_of: dict[str, Any] = {}
            for kind, data in socket.frames:
                first_of.setdefault(kind, data)
            for frame in socket.recorded["messages"]:
                msg = frame.get("msg")
                if msg and msg["type"] in first_of:
                    diffs = shape_diff(msg["data"], first_of.pop(msg["type"]))
                    if diffs:
                        self.mismatches.append(
                            Mismatch(f"ws {socket.name} {msg['type']} shape", diffs)
                        )
