"""Plain, immutable views of stored rows, handed out by the repository."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

from batch_runner.states import AttemptState, JobState


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: int
    key: str
    manifest: str
    manifest_stamp: str | None
    workflow_fingerprint: str | None


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    id: int
    url: str
    client_id: str


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: int
    key: str
    line: int
    spec: dict[str, Any]
    content_hash: str
    state: JobState
    attempts: int
    last_error: str | None
    error_kind: str | None
    resolved: dict[str, Any] | None
    output_path: str | None
    output_sha256: str | None
    output_size: int | None
    started_at: float | None
    finished_at: float | None
    changed_hash: str | None
    in_manifest: bool

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        return cls(
            id=row.id,
            key=row.key,
            line=row.line,
            spec=json.loads(row.spec),
            content_hash=row.content_hash,
            state=JobState(row.state),
            attempts=row.attempts,
            last_error=row.last_error,
            error_kind=row.error_kind,
            resolved=json.loads(row.resolved) if row.resolved else None,
            output_path=row.output_path,
            output_sha256=row.output_sha256,
            output_size=row.output_size,
            started_at=row.started_at,
            finished_at=row.finished_at,
            changed_hash=row.changed_hash,
            in_manifest=bool(row.in_manifest),
        )


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """A succeeded job's output file as recorded when it was downloaded."""

    job_id: int
    key: str
    path: str | None
    size: int | None
    sha256: str | None


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    id: int
    job_id: int
    number: int
    endpoint_id: int
    prompt_id: str
    state: AttemptState
    graph: dict[str, Any]
    outputs: list[dict[str, Any]] | None
    error: str | None
    created_at: float
    submitted_at: float | None
    started_at: float | None
    finished_at: float | None

    @classmethod
    def from_row(cls, row: Any) -> AttemptRecord:
        return cls(
            id=row.id,
            job_id=row.job_id,
            number=row.number,
            endpoint_id=row.endpoint_id,
            prompt_id=row.prompt_id,
            state=AttemptState(row.state),
            graph=json.loads(row.graph),
            outputs=json.loads(row.outputs) if row.outputs else None,
            error=row.error,
            created_at=row.created_at,
            submitted_at=row.submitted_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class NewJob(NamedTuple):
    """A manifest row as the store takes it in (a tuple: an ingest makes a million)."""

    key: str
    line: int
    #: the row's spec, or its JSON text when the caller encoded it already
    spec: dict[str, Any] | str
    content_hash: str
    state: JobState = JobState.PENDING
    error: str | None = None


@dataclass(frozen=True)
class IngestReport:
    added: int = 0
    unchanged: int = 0
    updated: int = 0
    #: keys of rows whose content changed after they started; left as they were unless asked
    changed: tuple[str, ...] = ()
    #: keys of rows that are no longer in the manifest; they are not run
    removed: tuple[str, ...] = ()
    restored: int = 0


@dataclass(frozen=True, slots=True)
class RunnerRecord:
    """One runner process registered on a shared run."""

    id: int
    name: str
    host: str
    pid: int
    heartbeat_at: float
    stopped_at: float | None

    @classmethod
    def from_row(cls, row: Any) -> RunnerRecord:
        return cls(row.id, row.name, row.host, row.pid, row.heartbeat_at, row.stopped_at)


@dataclass(frozen=True)
class Observations:
    """Timings that ended after a point in time, for the metrics histograms."""

    #: seconds from first claim to success, per job that succeeded
    job_durations: tuple[float, ...]
    #: seconds from the server accepting a prompt to starting it, per attempt that started
    queue_waits: tuple[float, ...]
    #: the newest end time seen: pass it back to get only newer timings next time
    until: float
