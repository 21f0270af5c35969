"""HTTP calls to one ComfyUI endpoint, mapped onto batch_runner's error tree.

Every answer is read with a size cap and checked against the shape PROTOCOL.md documents;
anything else is a :class:`ServerError` naming what was wrong. Connection failures and
timeouts are :class:`EndpointUnavailable`. The bearer token travels only in the session's
default headers: it never appears in a URL, a message or a ``repr``.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import posixpath
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import quote

import aiohttp
from yarl import URL

from batch_runner import crashpoints
from batch_runner.comfy.config import DEFAULT_LIMITS, Endpoint, Limits
from batch_runner.comfy.failures import (
    PromptRejected,
    UploadRejected,
    classify_execution_error,
    summarise_rejection,
)
from batch_runner.comfy.models import (
    ExecutionErrorInfo,
    HistoryEntry,
    Outcome,
    OutputFile,
    PromptLocation,
    PromptState,
    ProtocolViolation,
    QueueSnapshot,
    parse_history_entry,
    parse_queue,
)
from batch_runner.errors import (
    AccessDenied,
    EndpointUnavailable,
    NotComfyUI,
    OutputRejected,
    PromptLost,
    ServerError,
)

__all__ = [
    "ComfyClient",
    "Endpoint",
    "ExecutionErrorInfo",
    "HistoryEntry",
    "Limits",
    "Outcome",
    "OutputFile",
    "PromptLocation",
    "PromptState",
    "QueueSnapshot",
    "classify_execution_error",
]

log = logging.getLogger(__name__)

#: How much of an unexpected (non-JSON, error) body is quoted in an error message.
_QUOTED_BODY_CHARS = 200
_CHUNK = 64 * 1024
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


class ComfyClient:
    """HTTP client for one endpoint; one ``aiohttp.ClientSession`` for its whole life.

    Use as ``async with ComfyClient(endpoint) as client:`` or call :meth:`aclose`. The session
    is created on first use, so the client may be constructed outside a running loop.
    """

    def __init__(self, endpoint: Endpoint, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self.endpoint = endpoint
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None
        self._json_timeout = aiohttp.ClientTimeout(
            total=limits.request_timeout,
            connect=limits.connect_timeout,
            sock_connect=limits.connect_timeout,
        )
        # Uploads and downloads may be large: bound each read, not the whole transfer.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=limits.connect_timeout,
            sock_connect=limits.connect_timeout,
            sock_read=limits.request_timeout,
        )

    def __repr__(self) -> str:
        return f"ComfyClient({self.endpoint!r})"

    async def __aenter__(self) -> ComfyClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session; the client can be used again afterwards (a new session opens)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # ---------------------------------------------------------------- endpoints

    async def system_stats(self) -> dict[str, Any]:
        """``GET /system_stats``; answers as soon as the server listens: the health probe.

        401/403 raise :class:`AccessDenied`: ComfyUI has no authentication of its own, so that
        is a proxy in front of it refusing the token (or its absence). :class:`NotComfyUI`
        when something else answers at the URL."""
        status, body = await self._request("GET", "/system_stats")
        if status in (401, 403):
            raise AccessDenied(
                f"{self.endpoint.name} answered {status}: the token was "
                + ("refused" if self.endpoint.token else "missing"),
                endpoint=self.endpoint.name,
            )
        # Every ComfyUI serves /system_stats from the moment it listens, so a client error or
        # a 200 that is not a JSON object means the URL points at something else. A 5xx or
        # 429 (a proxy whose ComfyUI is down or busy) stays a ServerError: it may pass.
        if 400 <= status < 500 and status != 429:
            self._not_comfyui(f"/system_stats answered {status} with {_described(body)}")
        if status != 200:
            return self._dict(self._decode(status, body, "/system_stats"), "/system_stats")
        try:
            stats = json.loads(body)
        except (ValueError, RecursionError):
            stats = None
        if not isinstance(stats, dict):
            self._not_comfyui(f"/system_stats answered {_described(body)}, not a JSON object")
        return stats

    async def upload_image(self, data: bytes, filename: str) -> str:
        """Upload to the input folder without ``overwrite`` and return the ``LoadImage``
        reference: ``name`` or ``subfolder/name`` exactly as the server stored it (it may be
        ``x (1).png``, or an existing file with identical bytes; PROTOCOL §2.1)."""
        if not filename or "/" in filename or "\\" in filename or filename.startswith(".."):
            raise UploadRejected(
                f"cannot upload {filename!r}: the name must be a plain file name",
                endpoint=self.endpoint.name,
            )
        form = aiohttp.FormData()
        form.add_field("image", data, filename=filename, content_type=_image_type(filename))
        form.add_field("type", "input")
        status, body = await self._request(
            "POST", "/upload/image", data=form, timeouts=self._stream_timeout
        )
        if status in (400, 403, 413):
            raise UploadRejected(
                f"{self.endpoint.name} refused upload {filename!r} ({status}): "
                f"{_quote(body) or 'no reason given'}",
                endpoint=self.endpoint.name,
            )
        answer = self._dict(self._decode(status, body, "/upload/image"), "/upload/image")
        name = self._field(answer, "name", str, "/upload/image")
        subfolder = self._field(answer, "subfolder", str, "/upload/image", default="")
        if not name:
            self._violation("/upload/image", "name is empty")
        return f"{subfolder}/{name}" if subfolder else name

    async def submit(self, graph: dict[str, Any], *, prompt_id: str, client_id: str) -> int | float:
        """``POST /prompt`` under our own ``prompt_id``; returns the queue ``number``.

        400 raises :class:`PromptRejected` (a WorkflowRejected) whose message summarises
        every node error in one line and whose ``body`` keeps the raw answer.
        """
        payload = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
        status, body = await self._request("POST", "/prompt", json=payload)
        if status == 400:
            try:
                raw = json.loads(body)
            except ValueError:
                raw = None
            raise PromptRejected(
                f"{self.endpoint.name} rejected the workflow: "
                + (summarise_rejection(raw) if isinstance(raw, dict) else _quote(body)),
                endpoint=self.endpoint.name,
                body=raw if isinstance(raw, dict) else {},
            )
        answer = self._dict(self._decode(status, body, "/prompt"), "POST /prompt")
        number = self._field(answer, "number", int | float, "POST /prompt")
        returned = self._field(answer, "prompt_id", str, "POST /prompt")
        if returned != prompt_id:
            # A server that ignores client-chosen ids would run prompts we cannot track:
            # take the stray one back and refuse to work with it.
            await self._withdraw(returned)
            raise ServerError(
                f"{self.endpoint.name} does not honour client-chosen prompt ids "
                f"(sent {prompt_id}, got {returned}); a newer ComfyUI is needed",
                endpoint=self.endpoint.name,
            )
        return number  # type: ignore[no-any-return]

    async def queue(self) -> QueueSnapshot:
        """``GET /queue``: running and pending prompt ids, pending in run order."""
        answer = await self._get_json("/queue")
        try:
            return parse_queue(answer)
        except ProtocolViolation as exc:
            self._violation("/queue", str(exc), exc)

    async def history(self, prompt_id: str) -> HistoryEntry | None:
        """``GET /history/{id}``: the finished entry, or None (``{}``: pending, running or
        unknown; PROTOCOL §12.6, use :meth:`locate` to tell them apart)."""
        path = "/history/" + quote(prompt_id, safe="")
        answer = self._dict(await self._get_json(path), "/history/{id}")
        if not answer:
            return None
        if prompt_id not in answer:
            self._violation("/history/{id}", f"the answer does not contain {prompt_id!r}")
        try:
            return parse_history_entry(prompt_id, answer[prompt_id])
        except ProtocolViolation as exc:
            self._violation("/history/{id}", str(exc), exc)

    async def locate(self, prompt_id: str) -> PromptLocation:
        """Where a prompt stands: ``/queue`` first, ``/history/{id}`` second.

        In this order a prompt that finishes between the two calls is still found in history
        (the server moves it in one locked step); the other order could report it unknown.
        """
        snapshot = await self.queue()
        if prompt_id in snapshot.running:
            return PromptLocation(PromptState.RUNNING)
        if prompt_id in snapshot.pending:
            return PromptLocation(PromptState.PENDING)
        entry = await self.history(prompt_id)
        if entry is not None:
            return PromptLocation(PromptState.FINISHED, entry)
        return PromptLocation(PromptState.UNKNOWN)

    async def delete_pending(self, prompt_ids: Sequence[str]) -> None:
        """``POST /queue {"delete": [...]}``: drop pending prompts; running ones and unknown
        ids are unaffected. A deleted prompt never gets a history entry."""
        if prompt_ids:
            await self._post_empty("/queue", {"delete": list(prompt_ids)})

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt ``prompt_id`` if it is the running prompt; otherwise nothing happens.
        The global form (no id) is never sent: it would stop whatever runs."""
        if not prompt_id:
            raise ValueError("interrupt needs a prompt_id; an empty one interrupts everything")
        await self._post_empty("/interrupt", {"prompt_id": prompt_id})

    async def object_info(self, class_type: str | None = None) -> dict[str, Any]:
        """``GET /object_info[/{class}]``: node schemas (``{}`` for an unknown class)."""
        path = "/object_info" + ("" if class_type is None else "/" + quote(class_type, safe=""))
        return self._dict(await self._get_json(path), "/object_info")

    async def models(self, folder: str) -> list[str] | None:
        """``GET /models/{folder}``: file names in a model folder; None if no such folder."""
        path = "/models/" + quote(folder, safe="")
        status, body = await self._request("GET", path)
        if status == 404:
            return None
        answer = self._decode(status, body, "/models/{folder}")
        if not isinstance(answer, list) or not all(isinstance(n, str) for n in answer):
            self._violation("/models/{folder}", "the answer is not a list of file names")
        return answer

    @asynccontextmanager
    async def open_view(self, file: OutputFile) -> AsyncIterator[aiohttp.ClientResponse]:
        """``GET /view`` for ``file``: yields the 200 response to stream the body from.

        404 raises :class:`PromptLost` (the server no longer has the file; running the prompt
        again is the cure), 400/403 :class:`OutputRejected` (the server calls the name
        unsafe), 5xx :class:`ServerError`. Errors while reading the body are the caller's.
        """
        params = {"filename": file.filename, "subfolder": file.subfolder, "type": file.type}
        try:
            response = await self._ensure_session().get(
                self._url("/view"),
                params=params,
                timeout=self._stream_timeout,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._transport_error("/view", exc)
        crashpoints.reached("http")
        try:
            if response.status != 200:
                await self._view_refused(response, file)
            yield response
        except BaseException:
            response.close()  # the body may be half read: do not reuse the connection
            raise
        response.release()

    # ---------------------------------------------------------------- plumbing

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self.endpoint.auth_headers(),
                timeout=self._json_timeout,
                # LAN servers: no proxies or netrc from the environment.
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def _url(self, path: str) -> URL:
        # Paths are built already percent-encoded (ids may contain "/" → %2F, PROTOCOL §2.7).
        return URL(self.endpoint.url + path, encoded=True)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        timeouts: aiohttp.ClientTimeout | None = None,
    ) -> tuple[int, bytes]:
        """Send one request; return (status, body read up to the JSON cap). 5xx → ServerError."""
        try:
            # ComfyUI never redirects; following one could carry the token to another host.
            async with self._ensure_session().request(
                method,
                self._url(path),
                json=json,
                data=data,
                timeout=timeouts or self._json_timeout,
                allow_redirects=False,
            ) as response:
                body = await self._read_capped(response, path)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._transport_error(path, exc)
        crashpoints.reached("http")
        if status >= 500:
            raise ServerError(
                f"{self.endpoint.name} answered {status} to {method} {_route(path)}: "
                f"{_quote(body) or 'empty body'}",
                endpoint=self.endpoint.name,
            )
        return status, body

    async def _read_capped(self, response: aiohttp.ClientResponse, path: str) -> bytes:
        cap = self.limits.max_json_bytes
        if response.content_length is not None and response.content_length > cap:
            self._violation(path, f"the answer is {response.content_length} bytes (cap {cap})")
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > cap:
                self._violation(path, f"the answer exceeds {cap} bytes")
        return bytes(body)

    async def _get_json(self, path: str) -> Any:
        status, body = await self._request("GET", path)
        return self._decode(status, body, path)

    def _decode(self, status: int, body: bytes, path: str) -> Any:
        if status != 200:
            self._violation(path, f"unexpected status {status}: {_quote(body) or 'empty body'}")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            self._violation(path, f"the answer is not JSON: {_quote(body) or 'empty body'}", exc)

    async def _post_empty(self, path: str, payload: dict[str, Any]) -> None:
        status, body = await self._request("POST", path, json=payload)
        if status != 200:
            self._violation(path, f"unexpected status {status}: {_quote(body) or 'empty body'}")

    async def _withdraw(self, prompt_id: str) -> None:
        try:
            await self.delete_pending([prompt_id])
            await self.interrupt(prompt_id)
        except (EndpointUnavailable, ServerError) as exc:
            log.warning(
                "%s: could not withdraw stray prompt %s: %s", self.endpoint.name, prompt_id, exc
            )

    async def _view_refused(self, response: aiohttp.ClientResponse, file: OutputFile) -> NoReturn:
        status, name = response.status, self.endpoint.name
        where = f"{file.subfolder}/{file.filename}" if file.subfolder else file.filename
        if status == 404:
            raise PromptLost(f"{name} no longer has output {where!r} (404)", endpoint=name)
        if status in (400, 403):
            raise OutputRejected(f"{name} refused to serve {where!r} ({status})", endpoint=name)
        if status >= 500:
            raise ServerError(f"{name} answered {status} for output {where!r}", endpoint=name)
        self._violation("/view", f"unexpected status {status} for {where!r}")

    def _transport_error(self, path: str, exc: BaseException) -> NoReturn:
        name = self.endpoint.name
        if isinstance(exc, aiohttp.ClientConnectionError | TimeoutError):
            what = "timed out" if isinstance(exc, TimeoutError) else "connection failed"
            detail = str(exc) or type(exc).__name__
            raise EndpointUnavailable(
                f"{name}: {what} on {_route(path)} ({detail})", endpoint=name
            ) from exc
        # Broken payloads, malformed HTTP and the like: the server spoke, but not properly.
        raise ServerError(
            f"{name}: bad HTTP answer on {_route(path)} ({type(exc).__name__}: {exc})",
            endpoint=name,
        ) from exc

    def _not_comfyui(self, what: str) -> NoReturn:
        raise NotComfyUI(
            f"{self.endpoint.name} does not answer as ComfyUI ({what}); check the port and path",
            endpoint=self.endpoint.name,
        )

    def _violation(self, path: str, what: str, cause: BaseException | None = None) -> NoReturn:
        raise ServerError(
            f"{self.endpoint.name}: unexpected answer from {_route(path)}: {what}",
            endpoint=self.endpoint.name,
        ) from cause

    def _dict(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self._violation(path, f"expected a JSON object, got {type(value).__name__}")
        return value

    def _field(
        self, answer: dict[str, Any], key: str, kind: Any, path: str, *, default: Any = ...
    ) -> Any:
        value = answer.get(key, default)
        if value is ... or isinstance(value, bool) or not isinstance(value, kind):
            self._violation(path, f"{key!r} is missing or has the wrong type")
        return value


def _image_type(filename: str) -> str:
    """The upload's content type. Common image types come from a table: the first
    ``mimetypes`` lookup reads the system's type files, milliseconds on the first upload."""
    known = IMAGE_TYPES.get(posixpath.splitext(filename)[1].lower())
    if known is not None:
        return known
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def _route(path: str) -> str:
    """The route without ids, for messages (``/history/abc`` → ``/history/{id}``)."""
    for prefix in ("/history/", "/models/", "/object_info/"):
        if path.startswith(prefix):
            return prefix + "…"
    return path


def _described(body: bytes) -> str:
    """A body in a few words: another server's web page is not worth quoting."""
    if not body.strip():
        return "an empty body"
    if body.lstrip()[:1] == b"<":
        return "a web page"
    return repr(_quote(body))


def _quote(body: bytes) -> str:
    text = " ".join(body[: _QUOTED_BODY_CHARS * 4].decode("utf-8", "replace").split())
    return text[:_QUOTED_BODY_CHARS] + ("…" if len(text) > _QUOTED_BODY_CHARS else "")
