"""Job and attempt states, and the only transitions allowed between them.

The life cycle (DESIGN.md §3)::

    pending ─▶ preparing ─▶ submitted ─▶ running ─▶ fetching ─▶ succeeded
       ▲           │             │           │           │
       └──── retry_wait ◀────────┴───────────┴───────────┘   (transient error)
                   └───────────────────────────────────────▶ failed
    any non-final state ─▶ cancelled

``skipped`` marks a manifest row left out by ``--skip-invalid``.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    PENDING = "pending"  #: waiting to be claimed by an endpoint lane
    PREPARING = "preparing"  #: claimed; uploading the image and rendering the graph
    SUBMITTED = "submitted"  #: attempt and prompt_id committed; POST /prompt sent or due
    RUNNING = "running"  #: the server reported it started the prompt
    FETCHING = "fetching"  #: finished on the server; downloading and verifying the output
    RETRY_WAIT = "retry_wait"  #: a transient failure; eligible again after ``next_eligible_at``
    SUCCEEDED = "succeeded"  #: output file written, verified and checksummed
    FAILED = "failed"  #: a permanent error, or attempts exhausted
    CANCELLED = "cancelled"  #: the user cancelled it
    SKIPPED = "skipped"  #: invalid manifest row left out with --skip-invalid


TERMINAL: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED}
)
#: States in which an attempt may exist on a server and must be reconciled on resume.
IN_FLIGHT: frozenset[JobState] = frozenset(
    {JobState.SUBMITTED, JobState.RUNNING, JobState.FETCHING}
)
#: States in which a runner is working on the job (held by that runner on a shared database).
ACTIVE: frozenset[JobState] = frozenset({JobState.PREPARING, *IN_FLIGHT})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.PREPARING, JobState.CANCELLED, JobState.SKIPPED}),
    JobState.PREPARING: frozenset(
        {
            JobState.SUBMITTED,
            JobState.RETRY_WAIT,
            JobState.FAILED,
            JobState.PENDING,
            JobState.CANCELLED,
        }
    ),
    JobState.SUBMITTED: frozenset(
        {
            JobState.RUNNING,
            JobState.FETCHING,
            JobState.RETRY_WAIT,
            JobState.FAILED,
            JobState.CANCELLED,
        }
    ),
    JobState.RUNNING: frozenset(
        {JobState.FETCHING, JobState.RETRY_WAIT, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.FETCHING: frozenset(
        {JobState.SUCCEEDED, JobState.RETRY_WAIT, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.RETRY_WAIT: frozenset({JobState.PREPARING, JobState.FAILED, JobState.CANCELLED}),
    # `retry` sends failed jobs back; `resume` re-fetches a succeeded job whose file is gone.
    JobState.FAILED: frozenset({JobState.PENDING}),
    JobState.CANCELLED: frozenset({JobState.PENDING}),
    JobState.SUCCEEDED: frozenset({JobState.PENDING}),
    JobState.SKIPPED: frozenset({JobState.PENDING}),
}


class AttemptState(StrEnum):
    INTENT = "intent"  #: committed before POST /prompt; the server may or may not have it
    QUEUED = "queued"  #: the server accepted the prompt
    RUNNING = "running"  #: the server started it
    COMPLETED = "completed"  #: the server reports execution_success
    SUCCEEDED = "succeeded"  #: the output was downloaded and verified
    FAILED = "failed"  #: ended with an error (see ``error`` and ``error_kind``)
    LOST = "lost"  #: the server does not know the prompt any more
    ABANDONED = "abandoned"  #: given up on (cancelled, or superseded after an endpoint timeout)


ATTEMPT_OPEN: frozenset[AttemptState] = frozenset(
    {AttemptState.INTENT, AttemptState.QUEUED, AttemptState.RUNNING, AttemptState.COMPLETED}
)
