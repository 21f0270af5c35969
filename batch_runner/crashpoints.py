"""A test hook that kills the process at its n-th crash point, to prove a run always resumes.

Off unless ``BATCH_RUNNER_CRASH_AT`` is set, e.g. ``commit:12`` (right after the 12th
committed database transaction) or ``http:5`` (right after the 5th HTTP answer from an
endpoint, before anything is done with it). The process then kills itself with SIGKILL, the
way a power cut or the OOM killer would, so nothing gets to clean up.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

ENV = "BATCH_RUNNER_CRASH_AT"


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    kind, _, number = spec.partition(":")
    return kind, int(number)


_target = _parse(os.environ.get(ENV))
_counts: dict[str, int] = {}
_paused: ContextVar[bool] = ContextVar("crashpoints_paused", default=False)


@contextmanager
def paused() -> Iterator[None]:
    """Read-only work before a run changes anything (the preflight) counts no crash points:
    a kill there is a kill before the run, so the sampled points stay on the run itself.
    Tasks started inside inherit the pause."""
    token = _paused.set(True)
    try:
        yield
    finally:
        _paused.reset(token)


def reached(kind: str) -> None:
    """Count one crash point of ``kind``; die here if it is the chosen one."""
    if _target is None or _target[0] != kind or _paused.get():
        return
    _counts[kind] = _counts.get(kind, 0) + 1
    if _counts[kind] == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
