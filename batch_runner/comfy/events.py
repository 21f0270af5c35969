"""Typed websocket events and the pure parser that makes them from text frames.

``parse_message`` never raises: a frame that is not JSON, not an object, of a type we do not
use (``progress_state``, ``feature_flags``, anything new) or malformed gives ``None``.
``Connected``/``Disconnected`` are not ComfyUI messages; :class:`EventStream` yields them
around every connection so the consumer knows when to reconcile.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batch_runner.comfy.models import (
    ExecutionErrorInfo,
    OutputFile,
    ProtocolViolation,
    parse_error_info,
    parse_node_output,
)

__all__ = [
    "Connected",
    "Disconnected",
    "Event",
    "Executed",
    "Executing",
    "ExecutionCached",
    "ExecutionError",
    "ExecutionInterrupted",
    "ExecutionStart",
    "ExecutionSuccess",
    "Progress",
    "Status",
    "StreamItem",
    "parse_message",
]


@dataclass(frozen=True)
class Status:
    """Queue size broadcast; ``sid`` is set only on the message sent right after connecting."""

    queue_remaining: int
    sid: str | None = None


@dataclass(frozen=True)
class ExecutionStart:
    prompt_id: str


@dataclass(frozen=True)
class ExecutionCached:
    """Nodes served from cache (possibly all of them: a cached run reports an older file)."""

    prompt_id: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Executing:
    """A node is about to run. ``node is None``: the prompt ended (after its outcome message).
    ``prompt_id is None``: the hint sent on reconnect; ask ``/queue`` which prompt it is."""

    prompt_id: str | None
    node: str | None


@dataclass(frozen=True)
class Progress:
    prompt_id: str
    node: str
    value: int
    max: int


@dataclass(frozen=True)
class Executed:
    """A node with UI output finished (also replayed for a cached output node)."""

    prompt_id: str
    node: str
    outputs: tuple[OutputFile, ...]


@dataclass(frozen=True)
class ExecutionSuccess:
    prompt_id: str


@dataclass(frozen=True)
class ExecutionError:
    prompt_id: str
    info: ExecutionErrorInfo


@dataclass(frozen=True)
class ExecutionInterrupted:
    prompt_id: str
    node_id: str | None
    node_type: str | None


@dataclass(frozen=True)
class Connected:
    """The websocket is (again) open; messages sent while it was closed are lost: reconcile."""


@dataclass(frozen=True)
class Disconnected:
    """An open websocket was lost (or closed on request); a reconnect follows."""

    reason: str


Event = (
    Status
    | ExecutionStart
    | ExecutionCached
    | Executing
    | Progress
    | Executed
    | ExecutionSuccess
    | ExecutionError
    | ExecutionInterrupted
)
StreamItem = Event | Connected | Disconnected

#: Large, cumulative and redundant with ``progress``/``executing`` (PROTOCOL §12.17): recognised
#: from the frame's start so it is not decoded at all. ComfyUI writes ``type`` first.
_SKIPPED_PREFIXES = ('{"type": "progress_state"', '{"type":"progress_state"')


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ProtocolViolation(f"{key} is missing or not a string")


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    return None if data.get(key) is None else _str(data, key)


def _int(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolViolation(f"{key} is missing or not a number")
    return int(value)


def _status(data: dict[str, Any]) -> Status:
    status = data.get("status")
    exec_info = status.get("exec_info") if isinstance(status, dict) else None
    if not isinstance(exec_info, dict):
        raise ProtocolViolation("status.exec_info is missing")
    return Status(_int(exec_info, "queue_remaining"), _opt_str(data, "sid"))


def _cached(data: dict[str, Any]) -> ExecutionCached:
    nodes = data.get("nodes")
    if not isinstance(nodes, list):
        raise ProtocolViolation("nodes is not a list")
    return ExecutionCached(_str(data, "prompt_id"), tuple(str(n) for n in nodes))


def _executing(data: dict[str, Any]) -> Executing:
    return Executing(_opt_str(data, "prompt_id"), _opt_str(data, "node"))


def _progress(data: dict[str, Any]) -> Progress:
    return Progress(
        _str(data, "prompt_id"), _str(data, "node"), _int(data, "value"), _int(data, "max")
    )


def _executed(data: dict[str, Any]) -> Executed:
    node = _str(data, "node")
    return Executed(_str(data, "prompt_id"), node, parse_node_output(node, data.get("output")))


def _interrupted(data: dict[str, Any]) -> ExecutionInterrupted:
    return ExecutionInterrupted(
        _str(data, "prompt_id"), _opt_str(data, "node_id"), _opt_str(data, "node_type")
    )


_PARSERS: dict[str, Callable[[dict[str, Any]], Event]] = {
    "status": _status,
    "execution_start": lambda d: ExecutionStart(_str(d, "prompt_id")),
    "execution_cached": _cached,
    "executing": _executing,
    "progress": _progress,
    "executed": _executed,
    "execution_success": lambda d: ExecutionSuccess(_str(d, "prompt_id")),
    "execution_error": lambda d: ExecutionError(_str(d, "prompt_id"), parse_error_info(d)),
    "execution_interrupted": _interrupted,
}


def parse_message(text: str) -> Event | None:
    """The event in one text frame ``{"type": ..., "data": {...}}``, or None (see module doc)."""
    if text.startswith(_SKIPPED_PREFIXES):
        return None
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: hostile deep nesting
        return None
    if not isinstance(message, dict):
        return None
    kind = message.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    data = message.get("data")
    if parser is None or not isinstance(data, dict):
        return None
    try:
        return parser(data)
    except ProtocolViolation:
        return None
