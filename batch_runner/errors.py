"""Every error batch_runner raises on purpose, in one tree.

    BatchRunnerError
    ├── InputError                  the user's input is wrong; nothing was sent (exit code 2)
    │   ├── ConfigError             a flag, environment variable or config file value
    │   ├── ManifestError           one or more manifest rows (carries every problem found)
    │   └── WorkflowError           a workflow file, binding or template parameter
    ├── StoreError                  the run database
    │   ├── RunLocked               another runner is using this database
    │   ├── RunnerSuperseded        another runner presumed this one dead and took its jobs
    │   ├── DatabaseLocked          another program held the database's write lock too long
    │   ├── TransitionRejected      a state change whose precondition no longer holds
    │   └── SchemaError             the database was made by a newer batch_runner
    └── EndpointError               talking to one ComfyUI endpoint
        ├── AccessDenied            401/403 from the endpoint (a proxy refusing the token)
        ├── NotComfyUI              the URL answers HTTP, but not as ComfyUI's API
        ├── TransientError          worth retrying, preferably elsewhere
        │   ├── EndpointUnavailable connection refused/reset, DNS, timeout
        │   ├── ServerError         HTTP 5xx or an answer that is not what the protocol says
        │   ├── DownloadIncomplete  the body ended early or did not match its length
        │   ├── ExecutionTransient  execution_error of a kind that may pass (out of memory)
        │   └── PromptLost          the server no longer knows a prompt we submitted
        └── PermanentError          retrying the same job cannot help
            ├── WorkflowRejected    POST /prompt answered 400 with node_errors
            ├── ExecutionFailed     execution_error of a deterministic kind
            ├── ExecutionInterrupted the prompt was interrupted on the server
            └── OutputRejected      the output is unusable (unsafe name, too big, not a video)

The scheduler's retry policy is an ``isinstance`` check on TransientError/PermanentError.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AccessDenied",
    "BatchRunnerError",
    "ConfigError",
    "DatabaseLocked",
    "DownloadIncomplete",
    "EndpointError",
    "EndpointUnavailable",
    "ExecutionFailed",
    "ExecutionInterrupted",
    "ExecutionTransient",
    "InputError",
    "ManifestError",
    "ManifestProblem",
    "NotComfyUI",
    "OutputRejected",
    "PermanentError",
    "PromptLost",
    "RunLocked",
    "RunnerSuperseded",
    "SchemaError",
    "ServerError",
    "StoreError",
    "TransientError",
    "TransitionRejected",
    "WorkflowError",
    "WorkflowRejected",
]


class BatchRunnerError(Exception):
    """Base of every error batch_runner raises on purpose."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or type(self).__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class InputError(BatchRunnerError):
    """The input is not usable; fix it and run the same command again."""


class ConfigError(InputError):
    """A flag, environment variable or config file value is invalid."""


@dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong with one manifest cell (or row, when column is None)."""

    file: str
    line: int
    column: str | None
    reason: str

    def __str__(self) -> str:
        # Line 0 means the file as a whole (missing, empty, wrong kind).
        where = f"{self.file}:{self.line}" if self.line else self.file
        if self.column and self.line:
            where += f":{self.column}"
        return f"{where}: {self.reason}"


class ManifestError(InputError):
    """The manifest has problems; every one found is listed."""

    def __init__(self, problems: list[ManifestProblem]) -> None:
        self.problems = problems
        count = len(problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the manifest"
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))


class WorkflowError(InputError):
    """The workflow, a binding or a template parameter is invalid."""


class StoreError(BatchRunnerError):
    """The run database could not do what was asked."""


class RunLocked(StoreError):
    """Another batch-runner process is using this run database."""


class RunnerSuperseded(StoreError):
    """Another runner presumed this one dead and took over its jobs."""


class DatabaseLocked(StoreError):
    """Another program kept the run database locked for too long."""


class TransitionRejected(StoreError):
    """A state change was refused because the row is no longer in an allowed state."""


class SchemaError(StoreError):
    """The run database's schema is not one this version understands."""


class EndpointError(BatchRunnerError):
    """Something went wrong talking to a ComfyUI endpoint."""

    def __init__(self, message: str | None = None, *, endpoint: str | None = None) -> None:
        self.endpoint = endpoint
        super().__init__(message)


class AccessDenied(EndpointError):
    """The endpoint, or a proxy in front of it, refused our token (HTTP 401 or 403)."""


class NotComfyUI(EndpointError):
    """The URL answers HTTP, but its health probe is not ComfyUI's: a 4xx status (other than
    401, 403 and 429), or a 200 that is not a JSON object. A wrong port, path or host."""


class TransientError(EndpointError):
    """A failure that may pass; the job is retried with backoff, preferably elsewhere."""


class EndpointUnavailable(TransientError):
    """The endpoint could not be reached or did not answer in time."""


class ServerError(TransientError):
    """The endpoint answered with a server error or with something the protocol does not allow."""


class DownloadIncomplete(TransientError):
    """An output download ended early."""


class ExecutionTransient(TransientError):
    """The prompt failed on the server for a reason that may pass (e.g. out of GPU memory)."""


class PromptLost(TransientError):
    """The endpoint no longer knows a prompt that was submitted to it (restarted or cleared)."""


class PermanentError(EndpointError):
    """A failure that retrying the same job cannot fix."""


class WorkflowRejected(PermanentError):
    """The endpoint refused the workflow (HTTP 400 with node errors)."""


class ExecutionFailed(PermanentError):
    """The prompt failed on the server in a way that will repeat."""


class ExecutionInterrupted(PermanentError):
    """The prompt was interrupted on the server."""


class OutputRejected(PermanentError):
    """The endpoint's output cannot be accepted (unsafe name, too large or not a valid video)."""
