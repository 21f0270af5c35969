"""One ComfyUI endpoint as the scheduler sees it: its connection, its socket, its health.

A lane owns the endpoint's single HTTP session and single websocket for the whole run, feeds
the websocket's events to its :class:`PromptTracker`, reconciles in-flight prompts after every
(re)connect, and probes the endpoint with backoff while it is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

from batch_runner import clock
from batch_runner.comfy import events as ev
from batch_runner.comfy.client import ComfyClient
from batch_runner.comfy.config import Endpoint
from batch_runner.comfy.models import PromptLocation
from batch_runner.comfy.stream import EventStream
from batch_runner.config import EndpointSettings
from batch_runner.errors import EndpointError, EndpointUnavailable, ServerError
from batch_runner.store import EndpointRecord
from batch_runner.tracking import PromptTracker, PromptWatch

log = logging.getLogger(__name__)

PROBE_MAX_DELAY_S = 30.0
#: Calls in a row that end in server errors (each after its own retries) before the endpoint
#: gets no new work for a while: a server or proxy answering 5xx to everything would
#: otherwise use up every job's attempts within seconds. The same for jobs in a row whose
#: video could not be downloaded (each after its own tries): each such job ran on the GPU
#: for nothing, and is run again.
SERVER_ERRORS_TO_REST = 3
#: How long it then rests before it is probed; doubled for each rest in a row, up to the max.
SERVER_ERROR_REST_S = 15.0
SERVER_ERROR_REST_MAX_S = 300.0

T = TypeVar("T")

#: Uploaded images a lane remembers without asking the store (sha256 → server name).
UPLOADS_REMEMBERED = 4096


class EndpointGone(EndpointUnavailable):
    """The endpoint stayed unreachable longer than the endpoint timeout."""


class Lane:
    def __init__(
        self,
        settings: EndpointSettings,
        record: EndpointRecord,
        *,
        endpoint_timeout: float,
        client: ComfyClient | None = None,
        stream: EventStream | None = None,
    ) -> None:
        self.settings = settings
        self.record = record
        self.name = settings.name
        endpoint = Endpoint(url=settings.url, token=settings.token, name=settings.name)
        self.client = client or ComfyClient(endpoint)
        self.stream = stream or EventStream(endpoint, record.client_id)
        self.tracker = PromptTracker()
        self.endpoint_timeout = endpoint_timeout
        self.up = asyncio.Event()
        self.up.set()
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.done_count = 0
        #: claimed jobs being prepared (uploaded, rendered); their prompts will queue here
        self.preparing = 0
        self.ws_connected = False
        #: websocket connections lost during the run (exported as a metric)
        self.ws_disconnects = 0
        self.ws_ready = asyncio.Event()
        #: set once the endpoint accepted a prompt of this run
        self.accepted_one = asyncio.Event()
        self._probe: asyncio.Task[None] | None = None
        #: calls in a row that ended in server errors, jobs in a row whose video could not be
        #: downloaded, and rests in a row they caused
        self._server_errors = 0
        self._failed_downloads = 0
        self._rests = 0
        self._listening = False
        self._upload_locks: dict[str, asyncio.Lock] = {}
        self._uploaded: OrderedDict[str, str] = OrderedDict()
        #: every upload the store knows of for this endpoint is in ``_uploaded``
        self._all_uploads_known = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def client_id(self) -> str:
        return self.record.client_id

    @property
    def healthy(self) -> bool:
        return self.up.is_set()

    @contextmanager
    def preparing_one(self) -> Iterator[None]:
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1

    def held_work(self, pace: float) -> float:
        """Seconds of GPU time this endpoint owes the run: the prompts submitted here and not
        finished, and the jobs being prepared for it, at ``pace`` seconds each."""
        return self.tracker.held_work(pace, clock.monotonic()) + self.preparing * pace

    # ---------------------------------------------------------------- life cycle

    def start_listening(self) -> None:
        """Read the websocket (:meth:`listen`) from now until :meth:`close`; once only."""
        if not self._listening:
            self._listening = True
            self._spawn(self.listen(), "ws")

    async def listen(self) -> None:
        """Read the websocket for the whole run; reconcile every watch after each connect.

        An unexpected error is logged and the stream reopened: prompts stay covered by
        reconciliation meanwhile, and an unattended run should not end over it.
        """
        while True:
            try:
                await self._read_events()
                return
            except Exception:
                log.exception("%s: event stream failed; reopening it", self.name)
                self.ws_connected = False
                await asyncio.sleep(1.0)

    async def _read_events(self) -> None:
        async for event in self.stream.events():
            if isinstance(event, ev.Connected):
                self.ws_connected = True
                self.ws_ready.set()
                self._spawn(self.reconcile_all(), "reconcile")
            elif isinstance(event, ev.Disconnected):
                self.ws_connected = False
                self.ws_disconnects += 1
                log.info("%s: websocket lost (%s); will reconnect", self.name, event.reason)
            else:
                self.tracker.handle(event)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._listening = False
        await self.stream.aclose()
        await self.client.aclose()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- health

    def mark_down(self, error: BaseException, *, rest: float = 0.0) -> None:
        """Stop sending new work here and probe until the endpoint answers again, the first
        time after ``rest`` seconds."""
        self.last_error = str(error)
        if not self.up.is_set():
            return
        if rest:
            log.warning("%s: %s; no new work for %.0f s, then probing", self.name, error, rest)
        else:
            log.warning("%s: unreachable (%s); probing with backoff", self.name, error)
        self.up.clear()
        self.down_since = clock.monotonic()
        self._probe = asyncio.ensure_future(self._probe_until_up(max(0.5, rest)))

    def _server_error(self, error: ServerError) -> None:
        """A call ended in a server error; rest the endpoint after several in a row."""
        self._server_errors += 1
        if self._server_errors >= SERVER_ERRORS_TO_REST:
            self._server_errors = 0
            self._rest(f"{SERVER_ERRORS_TO_REST} calls in a row ended in server errors", error)

    def download_failed(self, error: EndpointError) -> None:
        """A job's video could not be downloaded; rest the endpoint after several in a row."""
        self._failed_downloads += 1
        if self._failed_downloads >= SERVER_ERRORS_TO_REST:
            self._failed_downloads = 0
            self._rest(f"the videos of {SERVER_ERRORS_TO_REST} jobs in a row broke off", error)

    def download_succeeded(self) -> None:
        self._failed_downloads = self._rests = 0

    def _rest(self, why: str, error: EndpointError) -> None:
        rest = min(SERVER_ERROR_REST_MAX_S, SERVER_ERROR_REST_S * 2**self._rests)
        self._rests += 1
        self.mark_down(EndpointError(f"{why} (the last: {error})"), rest=rest)

    async def _probe_until_up(self, delay: float) -> None:
        while True:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            try:
                await self.client.system_stats()
            except EndpointError:
                delay = min(PROBE_MAX_DELAY_S, delay * 2)
                continue
            log.info("%s: reachable again; rejoining", self.name)
            self.down_since = None
            self.up.set()
            await self.stream.reconnect()
            return

    async def call(
        self, action: Callable[[], Awaitable[T]], *, wait: bool = True, tries: int = 3
    ) -> T:
        """Run ``action`` against the endpoint.

        A server error is retried a few times with backoff. An unreachable endpoint is marked
        down; with ``wait`` the call then waits for it to come back, up to the endpoint
        timeout counted from when it went down (then :class:`EndpointGone`), without ``wait``
        it raises at once so the caller can move the work elsewhere.
        """
        failures = 0
        while True:
            if not self.up.is_set():
                if not wait:
                    raise EndpointUnavailable(f"{self.name} is down", endpoint=self.name)
                await self._wait_up()
            try:
                answer = await action()
            except EndpointUnavailable as exc:
                self.mark_down(exc)
                if not wait:
                    raise
            except ServerError as exc:
                failures += 1
                if failures >= tries:
                    self._server_error(exc)
                    raise
                await asyncio.sleep(0.2 * 2**failures * random.uniform(0.5, 1.5))
            else:
                self._server_errors = self._rests = 0
                return answer

    async def _wait_up(self) -> None:
        since = self.down_since or clock.monotonic()
        remaining = self.endpoint_timeout - (clock.monotonic() - since)
        try:
            await asyncio.wait_for(self.up.wait(), timeout=max(0.0, remaining))
        except TimeoutError:
            raise EndpointGone(
                f"{self.name} has been unreachable for over {self.endpoint_timeout:.0f} s",
                endpoint=self.name,
            ) from None

    # ---------------------------------------------------------------- prompts

    async def locate(self, prompt_id: str) -> PromptLocation:
        return await self.call(lambda: self.client.locate(prompt_id))

    async def reconcile(self, watch: PromptWatch, *, after_silence: bool = False) -> None:
        """Ask the server where one prompt stands (/queue first, then /history)."""
        location = await self.locate(watch.prompt_id)
        missed_end = self.tracker.reconciled(
            watch, location.entry, running=location.running, pending=location.pending
        )
        # A running prompt that sent nothing for a whole silence period, or an end the socket
        # never reported, means the socket went deaf (PROTOCOL §8.6): open a fresh one.
        if after_silence and (missed_end or location.running):
            log.info("%s: socket seems deaf; reconnecting", self.name)
            await self.stream.reconnect()

    async def reconcile_all(self) -> None:
        for watch in self.tracker.watches():
            if not watch.accepted or watch.finished:
                continue
            try:
                await self.reconcile(watch)
            except EndpointError as exc:
                log.info("%s: reconcile of %s failed: %s", self.name, watch.prompt_id, exc)
                return

    def forget_uploads(self) -> None:
        """The server lost its input images: upload each one again when a job needs it."""
        self._uploaded.clear()

    def knows_uploads(self, recorded: Mapping[str, str]) -> None:
        """Start from every upload the store recorded for this endpoint (sha256 → name): an
        image not among them is uploaded without asking the store first. Only for a store
        no other runner writes to."""
        self._uploaded = OrderedDict(recorded)
        self._all_uploads_known = len(self._uploaded) <= UPLOADS_REMEMBERED

    async def upload(
        self,
        *,
        read: Callable[[], Awaitable[bytes]],
        sha256: str,
        filename: str,
        known: Callable[[], Awaitable[str | None]],
        remember: Callable[[str], Awaitable[None]],
    ) -> str:
        """Upload an image once per endpoint (content-addressed), returning the server's name."""
        name = self._uploaded.get(sha256)
        if name is not None:
            # Jobs sharing an image (the usual case) do not ask the store each time.
            self._uploaded.move_to_end(sha256)
            return name
        # One upload per image even when several jobs of this endpoint need it at once.
        lock = self._upload_locks.setdefault(sha256, asyncio.Lock())
        try:
            async with lock:
                name = None if self._all_uploads_known else await known()
                if name is None:
                    data = await read()
                    name = await self.call(
                        lambda: self.client.upload_image(data, filename), wait=False
                    )
                    await remember(name)
                self._uploaded[sha256] = name
                if len(self._uploaded) > UPLOADS_REMEMBERED:
                    self._uploaded.popitem(last=False)
                    self._all_uploads_known = False
                return name
        finally:
            if not lock.locked():
                self._upload_locks.pop(sha256, None)
