"""Pre-built statements for the transitions every job makes.

Building a Core statement and computing its cache key costs several times what running it
costs; these are built once (values arrive as bound parameters), so SQLAlchemy finds their
compiled form at once. Still dialect-neutral Core: each dialect compiles them its own way.
"""

from __future__ import annotations

from functools import cache

from sqlalchemy import (
    Float,
    Insert,
    Integer,
    Select,
    Update,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)

from batch_runner.states import JobState
from batch_runner.store.models import attempts, job_events, jobs

#: One row of the audit trail; parameters: job_id, at, from_state, to_state, attempt_id, detail.
LOG_EVENT: Insert = insert(job_events)

#: The state of one job (p_id), row-locked on a shared database.
JOB_STATE: Select[tuple[str]] = (
    select(jobs.c.state).where(jobs.c.id == bindparam("p_id")).with_for_update()
)

#: Attempts made so far by one job (p_id).
JOB_ATTEMPTS: Select[tuple[int]] = select(jobs.c.attempts).where(jobs.c.id == bindparam("p_id"))

NEW_ATTEMPT: Insert = insert(attempts).returning(attempts)

_NOW = bindparam("p_now", type_=Float)
_LIMIT = bindparam("p_limit", type_=Integer)

#: Never-run jobs of the run (p_run); rows removed from the manifest are left out.
_PENDING = and_(
    jobs.c.run_id == bindparam("p_run"),
    jobs.c.state == JobState.PENDING.value,
    jobs.c.in_manifest.is_(True),
)
#: Jobs of the run (p_run) waiting to be retried, due or not.
_RETRY_WAITING = and_(
    jobs.c.run_id == bindparam("p_run"),
    jobs.c.state == JobState.RETRY_WAIT.value,
    jobs.c.in_manifest.is_(True),
)
#: ... and due by p_now.
_DUE = and_(_RETRY_WAITING, jobs.c.next_eligible_at <= _NOW)
_NOT_AVOIDED = or_(
    jobs.c.avoid_endpoint_id.is_(None), jobs.c.avoid_endpoint_id != bindparam("p_endpoint")
)

#: Claimable ids, in the order a claim takes them (p_run, p_now, p_endpoint, p_before, p_limit):
#: retries due that did not fail on this endpoint, then never-run jobs, then retries due that
#: failed here and that no other endpoint took within the grace period (due before p_before).
CLAIM_DUE: Select[tuple[int]] = (
    select(jobs.c.id)
    .where(_DUE, _NOT_AVOIDED)
    .order_by(jobs.c.next_eligible_at)
    .limit(_LIMIT)
    .with_for_update(skip_locked=True)
)
CLAIM_PENDING: Select[tuple[int]] = (
    select(jobs.c.id)
    .where(_PENDING)
    .order_by(jobs.c.id)
    .limit(_LIMIT)
    .with_for_update(skip_locked=True)
)
CLAIM_AVOIDED: Select[tuple[int]] = (
    select(jobs.c.id)
    .where(_DUE, ~_NOT_AVOIDED, jobs.c.next_eligible_at <= bindparam("p_before"))
    .order_by(jobs.c.next_eligible_at)
    .limit(_LIMIT)
    .with_for_update(skip_locked=True)
)

#: One never-run job of the run (p_run), if any.
ANY_PENDING: Select[tuple[int]] = select(jobs.c.id).where(_PENDING).limit(1)
#: When the run's (p_run) next retry is due; NULL when none waits.
NEXT_DUE: Select[tuple[float | None]] = select(func.min(jobs.c.next_eligible_at)).where(
    _RETRY_WAITING
)
#: Never-run jobs of the run (p_run), and its retries due (p_now), counted up to p_limit each.
COUNT_PENDING: Select[int] = select(func.count()).select_from(
    select(jobs.c.id).where(_PENDING).limit(_LIMIT).subquery()
)
COUNT_DUE: Select[int] = select(func.count()).select_from(
    select(jobs.c.id).where(_DUE).limit(_LIMIT).subquery()
)

#: Move one claimed job (p_id) from p_from to preparing for an endpoint; returns the row.
CLAIM: Update = (
    update(jobs)
    .where(jobs.c.id == bindparam("p_id"), jobs.c.state == bindparam("p_from"))
    .values(
        state=JobState.PREPARING.value,
        updated_at=_NOW,
        started_at=func.coalesce(jobs.c.started_at, _NOW),
        runner_id=bindparam("p_runner"),
        claimed_endpoint_id=bindparam("p_endpoint"),
    )
    .returning(*jobs.c)
)


@cache
def move_job(names: tuple[str, ...]) -> Update:
    """Move one job (p_id) from p_from to p_to at p_now, setting the columns ``names``
    (parameters p_<name>); no row changes when the job is not in p_from."""
    return (
        update(jobs)
        .where(jobs.c.id == bindparam("p_id"), jobs.c.state == bindparam("p_from"))
        .values(
            state=bindparam("p_to"),
            updated_at=bindparam("p_now"),
            **{name: bindparam(f"p_{name}") for name in names},
        )
    )


@cache
def set_attempt(allowed: tuple[str, ...], names: tuple[str, ...]) -> Update:
    """Move one attempt (p_id) in one of the ``allowed`` states to p_to, setting the columns
    ``names`` (parameters p_<name>)."""
    return (
        update(attempts)
        .where(attempts.c.id == bindparam("p_id"), attempts.c.state.in_(allowed))
        .values(state=bindparam("p_to"), **{name: bindparam(f"p_{name}") for name in names})
    )
