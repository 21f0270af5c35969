"""What a ComfyUI failure means: readable summaries and the transient/permanent split."""

from __future__ import annotations

from typing import Any

from batch_runner.comfy.models import ExecutionErrorInfo
from batch_runner.errors import (
    ExecutionFailed,
    ExecutionTransient,
    PermanentError,
    TransientError,
    WorkflowRejected,
)

__all__ = [
    "PromptRejected",
    "UploadRejected",
    "classify_execution_error",
    "summarise_rejection",
]

#: One error line is cut here: details can list every model file on the server.
_MAX_ERROR_TEXT = 300

#: Exception types that say the GPU ran out of memory; another try (or endpoint) may pass.
_OOM_TYPES = frozenset(
    {"torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError", "OutOfMemoryError"}
)
_OOM_MESSAGES = ("out of memory", "cuda error", "allocation on device")


class PromptRejected(WorkflowRejected):
    """POST /prompt answered 400. ``body`` is the server's raw JSON answer (``{}`` if it was
    not JSON); ``error_type`` is ``error.type`` (e.g. ``prompt_outputs_failed_validation``)."""

    def __init__(self, message: str, *, endpoint: str, body: dict[str, Any]) -> None:
        super().__init__(message, endpoint=endpoint)
        self.body = body
        error = body.get("error")
        self.error_type: str = str(error.get("type", "")) if isinstance(error, dict) else ""
        node_errors = body.get("node_errors")
        self.node_errors: dict[str, Any] = node_errors if isinstance(node_errors, dict) else {}


class UploadRejected(WorkflowRejected):
    """POST /upload/image refused the image (4xx: bad name, too large); retrying cannot help."""


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 1] + "…"


def _describe(error: Any) -> str:
    """``unet_name: 'x' not in [...] (value_not_in_list)`` from one node_errors item."""
    if not isinstance(error, dict):
        return _cut(str(error))
    message = str(error.get("message") or "").strip()
    details = str(error.get("details") or "").strip()
    kind = str(error.get("type") or "").strip()
    extra = error.get("extra_info")
    name = str(extra.get("input_name") or "") if isinstance(extra, dict) else ""
    if name and details.startswith(name) and details != name:
        text = details  # already "input: what is wrong"
    else:
        parts = [p for p in (name, message, "" if details == name else details) if p]
        text = ": ".join(parts)
    return _cut(text or "invalid") + (f" ({kind})" if kind else "")


def summarise_rejection(body: Any) -> str:
    """One readable line for a 400 answer of POST /prompt.

    ``node 37 UNETLoader: unet_name: 'x' not in [...] (value_not_in_list); node 58 ...``, or
    the top-level error when no node is named (``Prompt has no outputs (prompt_no_outputs)``).
    """
    if not isinstance(body, dict):
        return "the server rejected the workflow"
    node_errors = body.get("node_errors")
    lines: list[str] = []
    if isinstance(node_errors, dict):
        for node_id, node in node_errors.items():
            if not isinstance(node, dict):
                continue
            errors = node.get("errors")
            described = [_describe(e) for e in errors] if isinstance(errors, list) else []
            label = f"node {node_id} {node.get('class_type') or '?'}"
            lines.append(f"{label}: {', '.join(described) or 'invalid'}")
    if lines:
        return "; ".join(lines)
    error = body.get("error")
    if isinstance(error, dict):
        message = str(error.get("message") or "").strip().rstrip(".")
        details = str(error.get("details") or "").strip()
        kind = str(error.get("type") or "").strip()
        text = ": ".join(p for p in (message, "" if details == message else details) if p)
        return _cut(text or "invalid workflow") + (f" ({kind})" if kind else "")
    if isinstance(error, str) and error:
        return _cut(error)
    return "the server rejected the workflow"


def classify_execution_error(info: ExecutionErrorInfo) -> type[TransientError | PermanentError]:
    """ExecutionTransient for out-of-memory kinds (may pass on retry or elsewhere), else
    ExecutionFailed (bad image, bad model file, bad value: it would fail the same way again)."""
    message = info.exception_message.lower()
    if info.exception_type in _OOM_TYPES or any(m in message for m in _OOM_MESSAGES):
        return ExecutionTransient
    return ExecutionFailed
