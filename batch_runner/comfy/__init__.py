"""ComfyUI client: HTTP calls, the websocket event stream, typed events and errors.

Public API:

- :class:`Endpoint`, :class:`Limits` — frozen configuration (``config``);
- :class:`ComfyClient` — ``system_stats``, ``upload_image``, ``submit``, ``queue``,
  ``history``, ``locate``, ``delete_pending``, ``interrupt``, ``object_info``, ``models``,
  ``open_view``, ``aclose`` (``client``);
- :class:`EventStream` — one reconnecting websocket per endpoint: ``events()``,
  ``reconnect()``, ``aclose()`` (``stream``);
- events (``events``): ``Status``, ``ExecutionStart``, ``ExecutionCached``, ``Executing``,
  ``Progress``, ``Executed``, ``ExecutionSuccess``, ``ExecutionError``,
  ``ExecutionInterrupted`` (the ``Event`` union), ``Connected``, ``Disconnected``, and
  ``parse_message``;
- values (``models``): ``OutputFile``, ``HistoryEntry``, ``Outcome``,
  ``ExecutionErrorInfo``, ``QueueSnapshot``, ``PromptLocation``, ``PromptState``;
- failures (``failures``): ``PromptRejected`` and ``UploadRejected`` (both
  WorkflowRejected), ``classify_execution_error``, ``summarise_rejection``.

Errors raised are those of :mod:`batch_runner.errors`: EndpointUnavailable (connection,
timeout), ServerError (5xx or an answer the protocol does not allow), WorkflowRejected
(400 on submit/upload), PromptLost (/view 404), OutputRejected (/view 400/403).
"""

from batch_runner.comfy.client import ComfyClient
from batch_runner.comfy.config import Endpoint, Limits
from batch_runner.comfy.events import (
    Connected,
    Disconnected,
    Event,
    Executed,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    Progress,
    Status,
    StreamItem,
    parse_message,
)
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
    QueueSnapshot,
)
from batch_runner.comfy.stream import EventStream

__all__ = [
    "ComfyClient",
    "Connected",
    "Disconnected",
    "Endpoint",
    "Event",
    "EventStream",
    "Executed",
    "Executing",
    "ExecutionCached",
    "ExecutionError",
    "ExecutionErrorInfo",
    "ExecutionInterrupted",
    "ExecutionStart",
    "ExecutionSuccess",
    "HistoryEntry",
    "Limits",
    "Outcome",
    "OutputFile",
    "Progress",
    "PromptLocation",
    "PromptRejected",
    "PromptState",
    "QueueSnapshot",
    "Status",
    "StreamItem",
    "UploadRejected",
    "classify_execution_error",
    "parse_message",
    "summarise_rejection",
]
