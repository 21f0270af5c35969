"""The one websocket per endpoint, reconnected forever, as a stream of typed events.

Rules from PROTOCOL §8 and §12 that shape this module:

- nothing is replayed after a reconnect, so :class:`~batch_runner.comfy.events.Connected` is
  yielded after every connect and the consumer reconciles over HTTP then;
- two sockets with one clientId make one of them deaf (§8.5, §8.6), so the old socket is
  closed completely (closing handshake and TCP close) before a new one is opened;
- a deaf or stalled socket looks idle; keepalive pings catch dead links, :meth:`reconnect`
  lets the consumer replace a socket that reconciliation showed to be deaf.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from batch_runner import clock
from batch_runner.comfy.config import DEFAULT_LIMITS, Endpoint, Limits
from batch_runner.comfy.events import Connected, Disconnected, StreamItem, parse_message

__all__ = ["EventStream"]

log = logging.getLogger(__name__)


class EventStream:
    """Websocket events of one endpoint for the whole run.

    ``async for item in stream.events()`` yields :class:`Connected` after each successful
    (re)connect, parsed events while connected, and :class:`Disconnected` when an open
    connection is lost; failed connection attempts are retried silently with exponential
    backoff and full jitter (``backoff_initial`` doubling up to ``backoff_max``), reset once a
    connection has stayed up for ``stable_after`` seconds. Binary frames are dropped; a frame
    over ``limits.max_ws_message_bytes`` closes the connection (1009) and a reconnect follows.
    :meth:`aclose` ends the iteration.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        client_id: str,
        limits: Limits = DEFAULT_LIMITS,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self.limits = limits
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self._ws: ClientConnection | None = None
        self._closed = False
        self._iterating = False
        self._reconnect_requested = False
        #: Set to cut a backoff sleep short (reconnect requested or stream closing).
        self._wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"EventStream({self.endpoint!r}, client_id={self.client_id!r})"

    @property
    def url(self) -> str:
        """``ws(s)://host:port/ws?clientId=...``"""
        return f"{self.endpoint.ws_url}/ws?clientId={quote(self.client_id, safe='')}"

    @property
    def connected(self) -> bool:
        """A socket is open right now (it may still be deaf; only reconciliation can tell)."""
        return self._ws is not None

    @property
    def closed(self) -> bool:
        """:meth:`aclose` was called."""
        return self._closed

    async def events(self) -> AsyncGenerator[StreamItem, None]:
        """The event stream (see the class doc). Only one iteration may run at a time."""
        if self._iterating:
            raise RuntimeError("EventStream.events() is already being iterated")
        self._iterating = True
        failures = 0
        try:
            while not self._stopping():
                ws = await self._open(quiet=failures > 0)
                if ws is None:
                    await self._backoff(failures)
                    failures += 1
                    continue
                opened = clock.monotonic()
                yield Connected()
                reason = ""
                try:
                    async for message in ws:
                        if isinstance(message, str):
                            event = parse_message(message)
                            if event is not None:
                                yield event
                except ConnectionClosed as exc:
                    reason = _describe_close(exc)
                finally:
                    # Complete the close before any new socket opens (PROTOCOL §8.6).
                    self._ws = None
                    await ws.close()
                if self._stopping():
                    return
                requested, self._reconnect_requested = self._reconnect_requested, False
                if requested:
                    reason = "reconnect requested"
                    failures = 0
                elif not reason:
                    reason = _close_reason(ws)
                log.info("%s: websocket closed: %s", self.endpoint.name, reason)
                yield Disconnected(reason)
                if requested:
                    continue
                if clock.monotonic() - opened >= self.stable_after:
                    failures = 0
                await self._backoff(failures)
                failures += 1
        finally:
            self._iterating = False
            ws, self._ws = self._ws, None
            if ws is not None:
                await ws.close()

    async def reconnect(self) -> None:
        """Replace the socket now: close the current one (fully) so that ``events()`` yields
        Disconnected and opens a fresh one without backoff. Harmless while disconnected."""
        self._reconnect_requested = True
        self._wake.set()
        ws = self._ws
        if ws is not None:
            await ws.close()

    async def aclose(self) -> None:
        """End ``events()`` and close the socket."""
        self._closed = True
        self._wake.set()
        ws = self._ws
        if ws is not None:
            await ws.close()

    def _stopping(self) -> bool:
        # A call, not an attribute test: mypy would keep the narrowed value across awaits.
        return self._closed

    async def _open(self, *, quiet: bool) -> ClientConnection | None:
        limits = self.limits
        try:
            ws = await connect(
                self.url,
                additional_headers=self.endpoint.auth_headers(),
                proxy=None,
                compression=None,
                open_timeout=limits.connect_timeout,
                close_timeout=limits.connect_timeout,
                ping_interval=limits.ws_ping_interval,
                ping_timeout=limits.ws_ping_timeout,
                max_size=limits.max_ws_message_bytes,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            # Once per streak of failures; the retries that follow are routine.
            level = logging.DEBUG if quiet else logging.WARNING
            log.log(level, "%s: websocket connect failed: %s", self.endpoint.name, exc)
            return None
        if self._closed:
            await ws.close()
            return None
        self._reconnect_requested = False
        self._ws = ws
        return ws

    async def _backoff(self, failures: int) -> None:
        if self._closed:
            return
        if self._reconnect_requested:
            self._reconnect_requested = False
            return
        # The exponent is capped: after days of retries 2**failures would overflow a float.
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(failures, 30))
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=random.uniform(0, ceiling))
        self._reconnect_requested = False


def _describe_close(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "connection lost without a close frame"
    return f"closed with {frame.code} {frame.reason}".strip()


def _close_reason(ws: ClientConnection) -> str:
    code = ws.close_code
    if code is None:
        return "closed"
    return f"closed by the server with {code} {ws.close_reason or ''}".strip()
