"""Typed values of ComfyUI's HTTP answers and the pure functions that build them.

Parsers raise :class:`ProtocolViolation` naming what was wrong; the client turns that into
:class:`~batch_runner.errors.ServerError`, the websocket parser into "ignore this message".
Unknown keys are ignored everywhere, so entries written by other clients or node packs parse.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "ExecutionErrorInfo",
    "HistoryEntry",
    "Outcome",
    "OutputFile",
    "PromptLocation",
    "PromptState",
    "ProtocolViolation",
    "QueueSnapshot",
    "parse_error_info",
    "parse_history_entry",
    "parse_outputs",
    "parse_queue",
]

#: Output keys that list files. SaveVideo uses ``images`` + ``animated`` (PROTOCOL §2.8);
#: other node packs use ``videos``/``gifs``, which are animated by definition.
_FILE_KEYS = ("images", "videos", "gifs")


class ProtocolViolation(ValueError):
    """An answer or message does not have the shape the protocol says it has."""


@dataclass(frozen=True)
class OutputFile:
    """One file a node reported; download it with ``/view?filename&subfolder&type``."""

    filename: str
    subfolder: str
    type: str
    node_id: str
    animated: bool

    def to_json(self) -> dict[str, Any]:
        """A plain dict; ``OutputFile(**d)`` rebuilds it."""
        return asdict(self)


class Outcome(enum.Enum):
    """How a finished prompt ended."""

    SUCCESS = "success"
    ERROR = "error"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class ExecutionErrorInfo:
    """The essentials of an ``execution_error`` (websocket message or history status)."""

    node_id: str
    node_type: str
    exception_type: str
    exception_message: str


@dataclass(frozen=True)
class HistoryEntry:
    """A finished prompt as ``/history/{id}`` reports it."""

    prompt_id: str
    outcome: Outcome
    outputs: tuple[OutputFile, ...]
    error: ExecutionErrorInfo | None = None


@dataclass(frozen=True)
class QueueSnapshot:
    """Prompt ids in ``/queue``; ``pending`` sorted by ``number`` (= run order)."""

    running: tuple[str, ...]
    pending: tuple[str, ...]


class PromptState(enum.Enum):
    """Where a prompt stands on one server (PROTOCOL §8 table)."""

    RUNNING = "running"
    PENDING = "pending"
    FINISHED = "finished"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class PromptLocation:
    """Answer of :meth:`ComfyClient.locate`; ``entry`` is set exactly when FINISHED."""

    state: PromptState
    entry: HistoryEntry | None = None

    @property
    def running(self) -> bool:
        return self.state is PromptState.RUNNING

    @property
    def pending(self) -> bool:
        return self.state is PromptState.PENDING

    @property
    def finished(self) -> bool:
        return self.state is PromptState.FINISHED

    @property
    def unknown(self) -> bool:
        """Never accepted, deleted, evicted or lost in a restart: safe to submit again."""
        return self.state is PromptState.UNKNOWN


def _expect(value: Any, kind: Any, what: str) -> Any:
    # bool is an int subclass; a JSON true is never a valid number or id here.
    if isinstance(value, bool) and kind is not bool:
        raise ProtocolViolation(f"{what} is a boolean")
    if not isinstance(value, kind):
        raise ProtocolViolation(f"{what} is {type(value).__name__}, not the expected type")
    return value


def parse_outputs(outputs: Any) -> tuple[OutputFile, ...]:
    """Files listed in an ``outputs`` map (history) or an ``executed`` message's ``output``.

    ``outputs`` is ``{node_id: {"images": [...], "animated": [...], ...}}``; keys that do not
    list files (``text``, ``audio``, ...) are skipped.
    """
    _expect(outputs, dict, "outputs")
    files: list[OutputFile] = []
    for node_id, node_output in outputs.items():
        files.extend(parse_node_output(str(node_id), node_output))
    return tuple(files)


def parse_node_output(node_id: str, node_output: Any) -> tuple[OutputFile, ...]:
    """Files of one node's UI output (``{"images": [...], "animated": [true]}``)."""
    _expect(node_output, dict, f"output of node {node_id}")
    animated_flags = node_output.get("animated")
    if not isinstance(animated_flags, list):
        animated_flags = []
    files: list[OutputFile] = []
    for key in _FILE_KEYS:
        items = node_output.get(key)
        if items is None:
            continue
        _expect(items, list, f"outputs[{node_id}].{key}")
        for index, item in enumerate(items):
            where = f"outputs[{node_id}].{key}[{index}]"
            _expect(item, dict, where)
            animated = key != "images" or (
                index < len(animated_flags) and animated_flags[index] is True
            )
            files.append(
                OutputFile(
                    filename=_expect(item.get("filename"), str, f"{where}.filename"),
                    subfolder=_expect(item.get("subfolder", ""), str, f"{where}.subfolder"),
                    type=_expect(item.get("type", "output"), str, f"{where}.type"),
                    node_id=node_id,
                    animated=animated,
                )
            )
    return tuple(files)


def parse_error_info(data: Mapping[str, Any]) -> ExecutionErrorInfo:
    """Essentials of an ``execution_error`` payload; absent fields become empty strings."""

    def text(key: str) -> str:
        value = data.get(key)
        if value is None:
            return ""
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
        raise ProtocolViolation(f"execution_error.{key} is {type(value).__name__}")

    return ExecutionErrorInfo(
        node_id=text("node_id"),
        node_type=text("node_type"),
        exception_type=text("exception_type"),
        exception_message=text("exception_message"),
    )


def parse_history_entry(prompt_id: str, entry: Any) -> HistoryEntry:
    """One value of a ``/history`` answer.

    The outcome comes from the last ``execution_error``/``execution_interrupted`` message in
    ``status.messages`` (both have ``status_str "error"``), else from ``status_str``.
    """
    _expect(entry, dict, f"history entry {prompt_id}")
    status = _expect(entry.get("status"), dict, f"history[{prompt_id}].status")
    status_str = _expect(status.get("status_str"), str, f"history[{prompt_id}].status_str")
    messages = _expect(status.get("messages", []), list, f"history[{prompt_id}].messages")
    outputs = parse_outputs(entry.get("outputs", {}))
    for message in reversed(messages):
        if not (isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict)):
            raise ProtocolViolation(f"history[{prompt_id}] has a malformed status message")
        kind, data = message
        if kind == "execution_error":
            return HistoryEntry(prompt_id, Outcome.ERROR, outputs, parse_error_info(data))
        if kind == "execution_interrupted":
            return HistoryEntry(prompt_id, Outcome.INTERRUPTED, outputs)
    if status_str == "success":
        return HistoryEntry(prompt_id, Outcome.SUCCESS, outputs)
    # Failed without saying why (an unusual server or node pack): an error with no details.
    return HistoryEntry(prompt_id, Outcome.ERROR, outputs)


def parse_queue(answer: Any) -> QueueSnapshot:
    """``{"queue_running": [item...], "queue_pending": [item...]}``, item =
    ``[number, prompt_id, graph, extra_data, outputs]``. Pending is sorted by number because
    the server returns its heap array as stored (PROTOCOL §2.4)."""
    _expect(answer, dict, "/queue answer")
    lists: dict[str, list[tuple[float, str]]] = {}
    for key in ("queue_running", "queue_pending"):
        items = _expect(answer.get(key), list, key)
        parsed: list[tuple[float, str]] = []
        for index, item in enumerate(items):
            if not isinstance(item, list) or len(item) < 2:
                raise ProtocolViolation(f"{key}[{index}] is not a [number, prompt_id, ...] list")
            number = _expect(item[0], int | float, f"{key}[{index}] number")
            prompt_id = _expect(item[1], str, f"{key}[{index}] prompt_id")
            parsed.append((float(number), prompt_id))
        lists[key] = parsed
    return QueueSnapshot(
        running=tuple(pid for _, pid in lists["queue_running"]),
        pending=tuple(pid for _, pid in sorted(lists["queue_pending"], key=lambda p: p[0])),
    )
