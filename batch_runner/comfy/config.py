"""Where an endpoint is and how far we trust it: frozen value objects, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from batch_runner.errors import ConfigError

__all__ = ["DEFAULT_LIMITS", "Endpoint", "Limits"]


@dataclass(frozen=True)
class Endpoint:
    """One ComfyUI server.

    ``url`` is normalised to ``scheme://host:port[/prefix]`` without a trailing slash; a bare
    ``host:port`` means ``http://``. ``token`` is sent as ``Authorization: Bearer`` on HTTP and
    on the websocket upgrade and is kept out of ``repr``/``str`` and every error message.

        Endpoint("http://gpu1:8188/", token="s3cret")
        # Endpoint(url='http://gpu1:8188', name='gpu1:8188')
    """

    url: str
    token: str | None = field(default=None, repr=False)
    name: str = ""

    def __post_init__(self) -> None:
        url = self.url.strip()
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"endpoint URL must be http(s)://host:port, got {self.url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigError(
                f"endpoint URL must not carry a query, fragment or credentials: {parts.netloc}"
            )
        # Frozen dataclass: normalise in place once, at construction.
        object.__setattr__(self, "url", f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}")
        if not self.name:
            object.__setattr__(self, "name", parts.netloc)

    @property
    def ws_url(self) -> str:
        """The websocket base URL (``ws://`` or ``wss://``), without ``/ws`` or a query."""
        scheme, rest = self.url.split("://", 1)
        return ("wss" if scheme == "https" else "ws") + "://" + rest

    def auth_headers(self) -> dict[str, str]:
        """The bearer header when a token is set; empty otherwise."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@dataclass(frozen=True)
class Limits:
    """Timeouts (seconds) and size caps for one endpoint; the defaults suit a LAN GPU box.

    ``max_ws_message_bytes``: a bigger websocket frame (oversized binary previews) makes the
    library close the connection with 1009; the stream then reconnects.
    ``ws_ping_interval``/``ws_ping_timeout``: keepalive, so a silently stalled connection is
    noticed; a running prompt can legitimately be silent for long, a dead link cannot.
    """

    connect_timeout: float = 10.0
    request_timeout: float = 60.0
    max_json_bytes: int = 16 * 2**20
    max_download_bytes: int = 4 * 2**30
    max_ws_message_bytes: int = 8 * 2**20
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 30.0


DEFAULT_LIMITS = Limits()
