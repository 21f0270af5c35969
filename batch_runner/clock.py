"""The one source of time: every module asks here, so tests can patch a single place."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now() -> datetime:
    """Wall-clock time, timezone-aware UTC; stored in the database and shown to users."""
    return datetime.now(UTC)


def monotonic() -> float:
    """Seconds on a clock that never jumps; for timeouts, backoff and durations."""
    return time.monotonic()
