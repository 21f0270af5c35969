"""The job repository: one named method per state change, each a guarded compare-and-set.

Nothing outside this module writes SQL. Every job transition is checked against
``batch_runner.states.TRANSITIONS`` inside the same transaction that applies it, and is
appended to ``job_events`` so a run can be audited afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, column, func, or_, select, table, update
from sqlalchemy.exc import OperationalError

from batch_runner import clock, crashpoints
from batch_runner.errors import DatabaseLocked, TransitionRejected
from batch_runner.states import (
    ACTIVE,
    ATTEMPT_OPEN,
    IN_FLIGHT,
    TERMINAL,
    AttemptState,
    JobState,
)
from batch_runner.store import dialect, statements
from batch_runner.store import engine as engine_mod
from batch_runner.store.connection import Backend, Conn, Reader, open_backend
from batch_runner.store.location import Database, database
from batch_runner.store.models import (
    attempts,
    endpoints,
    jobs,
    runners,
    runs,
    uploads,
)
from batch_runner.store.records import (
    AttemptRecord,
    EndpointRecord,
    IngestReport,
    JobRecord,
    NewJob,
    Observations,
    OutputRecord,
    RunnerRecord,
    RunRecord,
)

INGEST_BATCH = 2000
#: Rows per INSERT of a run's first ingest: large, as each executemany has a fixed cost.
INGEST_FRESH_BATCH = 20_000
#: Rows read between two chances for an INSERT in flight to go on.
_INGEST_YIELD_ROWS = 500
LOCK_RETRIES = 5
# Keys seen by the ingest in progress (a per-connection temp table) to find removed rows.
_INGEST_TABLE = table("ingest_keys", column("key"))
_INGEST_KEYS: Select[tuple[Any]] = select(_INGEST_TABLE.c.key)


def _now() -> float:
    return clock.now().timestamp()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


#: The columns a new job is inserted with, in the order of ``_new_job_values``.
_NEW_JOB_COLUMNS = (
    "run_id",
    "key",
    "line",
    "spec",
    "content_hash",
    "in_manifest",
    "state",
    "attempts",
    "last_error",
    "error_kind",
    "created_at",
    "updated_at",
)


def _spec_text(job: NewJob) -> str:
    return job.spec if isinstance(job.spec, str) else _dumps(job.spec)


#: Per state, the ``state`` and ``error_kind`` columns of a new job in it: looked up once
#: here, as an enum member's ``value`` costs more than building the rest of the row.
_NEW_JOB_STATES: dict[JobState, tuple[str, str | None]] = {
    state: (state.value, "invalid" if state is JobState.SKIPPED else None) for state in JobState
}


def _new_job_values(run_id: int, job: NewJob, now: float) -> tuple[Any, ...]:
    key, line, spec, content_hash, state, error = job
    state_text, kind = _NEW_JOB_STATES[state]
    if not isinstance(spec, str):
        spec = _dumps(spec)
    return (run_id, key, line, spec, content_hash, True, state_text, 0, error, kind, now, now)


def _batches(rows: Iterable[NewJob], size: int) -> Iterator[list[NewJob]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


@dataclass(frozen=True)
class Failure:
    key: str
    line: int
    state: JobState
    error_kind: str | None
    error: str | None
    attempts: int


class Store:
    """A run database. Open it with ``async with Store.open(path_or_url) as store``."""

    def __init__(self, backend: Backend, db: Database) -> None:
        self._backend = backend
        self.db = db
        #: the SQLite file, or None on a database server
        self.path = db.path
        # One connection, one transaction at a time: the lock queues concurrent callers.
        self._lock = asyncio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(
        cls, location: Path | str | Database, *, exclusive: bool = True
    ) -> AsyncIterator[Store]:
        """Open (creating and migrating as needed) the database at ``location``: an SQLite
        file path or a PostgreSQL URL.

        ``exclusive`` takes SQLite's single-runner lock; read-only commands such as ``status``
        and ``export`` open without it. A PostgreSQL database is shared by design: runners
        coordinate through row locks and their registrations, not a lock file.
        """
        db = database(location)
        path = db.path
        if path is None or not exclusive:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            async with cls._opened(db) as store:
                yield store
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with engine_mod.runner_lock(path):
            async with cls._opened(db) as store:
                yield store

    @classmethod
    @asynccontextmanager
    async def _opened(cls, db: Database) -> AsyncIterator[Store]:
        backend = open_backend(db)
        try:
            await backend.migrate()
            yield cls(backend, db)
        finally:
            await backend.dispose()

    @property
    def shared(self) -> bool:
        """Whether other runners may be working this database at the same time."""
        return self.db.shared

    @asynccontextmanager
    async def _tx(self, *, durable: bool = True) -> AsyncIterator[Conn]:
        """One write transaction. Taking SQLite's write lock is the only step that can meet
        another program's lock (in WAL mode a begun transaction commits without waiting), so
        that step alone is retried, with backoff, before giving up with a typed error.

        A ``durable`` commit has reached the disk when it returns (SQLite: the log is
        fsynced after the commit, outside the lock, so that durable commits made meanwhile
        share one fsync): the write-ahead rule relies on that before POST /prompt and after a
        video is fsynced. The others (a claim, "queued", "running", "completed", an upload's
        name, a release) survive the process being killed, and a power cut can undo them
        only back to the last durable commit, because an fsync of the log covers everything
        written to it before. Losing one of them is harmless: a resume recomputes it (a
        claimed job is released, a prompt and its outputs are looked up on its server by
        prompt_id, an image is uploaded again).
        """
        async with self._lock, self._backend.writer(durable=durable) as conn:
            for attempt in range(1, LOCK_RETRIES + 1):
                try:
                    await conn.begin()
                    break
                except OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise
                    await conn.rollback()
                    if attempt == LOCK_RETRIES:
                        raise DatabaseLocked(
                            f"{self.db} stayed locked by another program for "
                            f"{LOCK_RETRIES} × {engine_mod.BUSY_TIMEOUT_MS / 1000:g} s; "
                            "close whatever holds it and run the same command again"
                        ) from exc
                    await asyncio.sleep(0.1 * attempt)
            try:
                yield conn
            except BaseException:
                await conn.rollback()
                raise
            await conn.commit()
        if durable:
            await self._backend.flush()
        crashpoints.reached("commit")

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[Reader]:
        """Reads outside any write: they see the last commit and never take the write lock."""
        async with self._backend.reader() as conn:
            yield conn

    @asynccontextmanager
    async def _reading_quick(self) -> AsyncIterator[Reader]:
        """For reads of a few rows through an index only: on SQLite they run on the loop's
        thread, where a slow one would stall every endpoint's traffic."""
        async with self._backend.quick_reader() as conn:
            yield conn

    # ---------------------------------------------------------------- runs and endpoints

    async def ensure_run(self, key: str, manifest: str) -> RunRecord:
        now = _now()
        async with self._tx() as conn:
            row = (await conn.execute(select(runs).where(runs.c.key == key))).first()
            if row is None:
                await conn.execute(
                    dialect.insert_ignoring_duplicates(conn, runs).values(
                        key=key, manifest=manifest, created_at=now, updated_at=now
                    )
                )
                row = (await conn.execute(select(runs).where(runs.c.key == key))).one()
            return RunRecord(
                row.id, row.key, row.manifest, row.manifest_stamp, row.workflow_fingerprint
            )

    async def only_run(self) -> RunRecord | None:
        """The run of a database made by ``run`` (one run per database)."""
        async with self._reading() as conn:
            rows = (await conn.execute(select(runs).order_by(runs.c.id))).all()
        if not rows:
            return None
        row = rows[-1]
        return RunRecord(
            row.id, row.key, row.manifest, row.manifest_stamp, row.workflow_fingerprint
        )

    async def set_run_stamps(
        self, run_id: int, *, manifest_stamp: str | None, workflow_fingerprint: str | None
    ) -> None:
        async with self._tx() as conn:
            await conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(
                    manifest_stamp=manifest_stamp,
                    workflow_fingerprint=workflow_fingerprint,
                    updated_at=_now(),
                )
            )

    async def ensure_endpoint(self, run_id: int, url: str) -> EndpointRecord:
        return (await self.ensure_endpoints(run_id, [url]))[0]

    async def ensure_endpoints(self, run_id: int, urls: Sequence[str]) -> list[EndpointRecord]:
        """The run's record of each endpoint, in ``urls``' order; new ones get a client id.

        One transaction for all and not a durable one: a run starts with one commit here
        instead of a disk sync per endpoint. A record lost to a power cut is made again
        with a new client id, which only names the websocket connection.
        """
        async with self._tx(durable=False) as conn:
            where = and_(endpoints.c.run_id == run_id, endpoints.c.url.in_(urls))
            known = {r.url: r for r in await conn.execute(select(endpoints).where(where))}
            missing = [u for u in dict.fromkeys(urls) if u not in known]
            if missing:
                await conn.execute(
                    dialect.insert_ignoring_duplicates(conn, endpoints),
                    [{"run_id": run_id, "url": u, "client_id": uuid.uuid4().hex} for u in missing],
                )
                known = {r.url: r for r in await conn.execute(select(endpoints).where(where))}
            return [EndpointRecord(known[u].id, known[u].url, known[u].client_id) for u in urls]

    async def endpoints_of(self, run_id: int) -> list[EndpointRecord]:
        async with self._reading() as conn:
            rows = await conn.execute(select(endpoints).where(endpoints.c.run_id == run_id))
            return [EndpointRecord(r.id, r.url, r.client_id) for r in rows]

    # ---------------------------------------------------------------- ingest

    async def ingest(
        self, run_id: int, rows: Iterable[NewJob], *, rerun_changed: bool = False
    ) -> IngestReport:
        """Take in manifest rows in one transaction; report new, changed and removed rows.

        Nothing is kept unless every row was taken: an exception from ``rows`` (a manifest
        found invalid once read to the end, say) rolls the whole ingest back.

        A row whose content changed is updated in place while it has never been attempted.
        Once it has run, its old result stands and the change is reported, unless
        ``rerun_changed`` sends it back to pending with the new content.
        """
        added = unchanged = updated = restored = 0
        changed: list[str] = []
        removed: tuple[str, ...] = ()
        async with self._tx() as conn:
            await dialect.lock_ingest(conn, run_id)
            # A run's first ingest has nothing to compare with and nothing to remove: its
            # rows go straight in, without the per-batch lookups.
            fresh = (
                await conn.execute(select(jobs.c.id).where(jobs.c.run_id == run_id).limit(1))
            ).first() is None
            if fresh:
                added = await self._ingest_fresh(conn, run_id, rows)
            else:
                await conn.exec_driver_sql(
                    "CREATE TEMP TABLE IF NOT EXISTS ingest_keys (key TEXT PRIMARY KEY)"
                )
                await conn.exec_driver_sql("DELETE FROM ingest_keys")
                for batch in _batches(rows, INGEST_BATCH):
                    a, u, up, r, ch = await self._ingest_batch(conn, run_id, batch, rerun_changed)
                    added, unchanged, updated, restored = (
                        added + a,
                        unchanged + u,
                        updated + up,
                        restored + r,
                    )
                    changed.extend(ch)
                    await asyncio.sleep(0)
                removed_rows = await conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.run_id == run_id,
                        jobs.c.in_manifest.is_(True),
                        jobs.c.key.not_in(_INGEST_KEYS),
                    )
                    .values(in_manifest=False, updated_at=_now())
                    .returning(jobs.c.key)
                )
                removed = tuple(sorted(r.key for r in removed_rows))
                await conn.exec_driver_sql("DELETE FROM ingest_keys")
        return IngestReport(
            added=added,
            unchanged=unchanged,
            updated=updated,
            changed=tuple(changed),
            removed=removed,
            restored=restored,
        )

    async def _ingest_fresh(self, conn: Conn, run_id: int, rows: Iterable[NewJob]) -> int:
        """Insert every row of a run that has none yet; return how many.

        Each INSERT runs on the driver's side (aiosqlite's thread, the PostgreSQL server)
        while the next batch is read, so reading and storing overlap.
        """
        sql = dialect.insert_sql(conn, jobs, _NEW_JOB_COLUMNS)
        now = _now()
        added = 0
        batch: list[tuple[Any, ...]] = []
        inserting: asyncio.Task[Any] | None = None
        try:
            # Read in steps, so that the per-row work is one call in a comprehension.
            for step in _batches(rows, min(_INGEST_YIELD_ROWS, INGEST_FRESH_BATCH)):
                batch += [_new_job_values(run_id, job, now) for job in step]
                if len(batch) >= INGEST_FRESH_BATCH:
                    if inserting is not None:
                        await inserting
                    inserting = asyncio.create_task(conn.exec_driver_sql(sql, batch))
                    added += len(batch)
                    batch = []
                else:
                    # The INSERT in flight takes a step (each is a hop between threads).
                    await asyncio.sleep(0)
            if inserting is not None:
                await inserting
            if batch:
                await conn.exec_driver_sql(sql, batch)
                added += len(batch)
        finally:
            if inserting is not None and not inserting.done():
                # Leaving early (a row raised): the connection is idle before the rollback.
                await asyncio.gather(inserting, return_exceptions=True)
        return added

    async def _ingest_batch(
        self, conn: Conn, run_id: int, batch: Sequence[NewJob], rerun_changed: bool
    ) -> tuple[int, int, int, int, list[str]]:
        now = _now()
        keys = [j.key for j in batch]
        await conn.execute(
            dialect.insert_ignoring_duplicates(conn, _INGEST_TABLE), [{"key": k} for k in keys]
        )
        existing = {
            r.key: r
            for r in await conn.execute(
                select(
                    jobs.c.id,
                    jobs.c.key,
                    jobs.c.content_hash,
                    jobs.c.state,
                    jobs.c.attempts,
                    jobs.c.in_manifest,
                    jobs.c.changed_hash,
                ).where(jobs.c.run_id == run_id, jobs.c.key.in_(keys))
            )
        }
        new_rows: list[tuple[Any, ...]] = []
        unchanged = updated = restored = 0
        changed: list[str] = []
        for job in batch:
            old = existing.get(job.key)
            if old is None:
                new_rows.append(_new_job_values(run_id, job, now))
                continue
            if not old.in_manifest:
                restored += 1
                await conn.execute(
                    update(jobs).where(jobs.c.id == old.id).values(in_manifest=True, updated_at=now)
                )
            if old.content_hash == job.content_hash:
                unchanged += 1
                if old.changed_hash is not None:
                    await conn.execute(
                        update(jobs).where(jobs.c.id == old.id).values(changed_hash=None)
                    )
                continue
            never_ran = old.attempts == 0 and JobState(old.state) in (
                JobState.PENDING,
                JobState.SKIPPED,
            )
            if never_ran or (rerun_changed and JobState(old.state) in TERMINAL):
                updated += 1
                await self._reset_to_spec(conn, old.id, JobState(old.state), job, now)
            else:
                changed.append(job.key)
                await conn.execute(
                    update(jobs)
                    .where(jobs.c.id == old.id)
                    .values(changed_hash=job.content_hash, line=job.line)
                )
        if new_rows:
            await conn.exec_driver_sql(dialect.insert_sql(conn, jobs, _NEW_JOB_COLUMNS), new_rows)
        return len(new_rows), unchanged, updated, restored, changed

    async def _reset_to_spec(
        self, conn: Conn, job_id: int, old_state: JobState, job: NewJob, now: float
    ) -> None:
        await conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(
                spec=_spec_text(job),
                content_hash=job.content_hash,
                changed_hash=None,
                line=job.line,
                state=job.state.value,
                attempts=0,
                next_eligible_at=None,
                avoid_endpoint_id=None,
                last_error=job.error,
                error_kind=None,
                resolved=None,
                output_path=None,
                output_sha256=None,
                output_size=None,
                started_at=None,
                finished_at=None,
                updated_at=now,
            )
        )
        if old_state is not job.state:
            await self._log(conn, job_id, old_state, job.state, None, "manifest row changed")

    # ---------------------------------------------------------------- guarded transitions

    async def _log(
        self,
        conn: Conn,
        job_id: int,
        from_state: JobState | None,
        to_state: JobState,
        attempt_id: int | None,
        detail: str | None,
    ) -> None:
        await conn.execute(
            statements.LOG_EVENT,
            {
                "job_id": job_id,
                "at": _now(),
                "from_state": from_state.value if from_state is not None else None,
                "to_state": to_state.value,
                "attempt_id": attempt_id,
                "detail": detail,
            },
        )

    async def _move(
        self,
        conn: Conn,
        job_id: int,
        to: JobState,
        *,
        allowed: Iterable[JobState],
        attempt_id: int | None = None,
        detail: str | None = None,
        **values: Any,
    ) -> JobState:
        sources = tuple(allowed)
        if len(sources) == 1:
            from_state = sources[0]
        else:
            # FOR UPDATE: on a shared database another runner cannot change the row between
            # this check and the update below (SQLite's single writer needs no row lock).
            current = (await conn.execute(statements.JOB_STATE, {"p_id": job_id})).scalar()
            if current not in {s.value for s in sources}:
                raise _rejected(job_id, current, to)
            from_state = JobState(current)
        if not await self._try_move(conn, job_id, from_state, to, attempt_id, detail, values):
            current = (await conn.execute(statements.JOB_STATE, {"p_id": job_id})).scalar()
            raise _rejected(job_id, current, to)
        return from_state

    async def _try_move(
        self,
        conn: Conn,
        job_id: int,
        from_state: JobState,
        to: JobState,
        attempt_id: int | None,
        detail: str | None,
        values: Mapping[str, Any],
    ) -> bool:
        """Move the job if it is in ``from_state``, and log it; False if it was not. The
        check is the update's own condition, so on a shared database the row lock the update
        takes makes check and change one step."""
        result = await conn.execute(
            statements.move_job(tuple(sorted(values))),
            {
                "p_id": job_id,
                "p_from": from_state.value,
                "p_to": to.value,
                "p_now": _now(),
                **{f"p_{name}": value for name, value in values.items()},
            },
        )
        if result.rowcount != 1:
            return False
        await self._log(conn, job_id, from_state, to, attempt_id, detail)
        return True

    async def _set_attempt(
        self,
        conn: Conn,
        attempt_id: int,
        to: AttemptState,
        *,
        allowed: Iterable[AttemptState],
        **values: Any,
    ) -> bool:
        result = await conn.execute(
            statements.set_attempt(tuple(sorted(s.value for s in allowed)), tuple(sorted(values))),
            {
                "p_id": attempt_id,
                "p_to": to.value,
                **{f"p_{name}": value for name, value in values.items()},
            },
        )
        return result.rowcount == 1

    async def claim(
        self,
        run_id: int,
        endpoint_id: int,
        limit: int = 1,
        *,
        avoid_grace: float = 0.0,
        runner_id: int | None = None,
        capacity: int | None = None,
    ) -> list[JobRecord]:
        """Take up to ``limit`` claimable jobs for one endpoint (pending or due for retry).

        A job that last failed on this endpoint is taken here only when nothing else is left
        and no other endpoint took it within ``avoid_grace`` seconds of it becoming due, so a
        retry lands elsewhere when it can.

        On a shared database, rows other runners are claiming are skipped (SKIP LOCKED), the
        jobs are marked as held by ``runner_id``, and ``capacity`` caps the jobs of this
        endpoint that are preparing or on its GPU across all runners.
        """
        now = _now()
        async with self._tx(durable=False) as conn:
            if capacity is not None:
                limit = min(limit, capacity - await self._endpoint_load(conn, endpoint_id))
                if limit <= 0:
                    return []
            params = {
                "p_run": run_id,
                "p_now": now,
                "p_endpoint": endpoint_id,
                "p_before": now - avoid_grace,
            }
            picked: list[tuple[int, JobState]] = []
            for query, source in (
                (statements.CLAIM_DUE, JobState.RETRY_WAIT),
                (statements.CLAIM_PENDING, JobState.PENDING),
                (statements.CLAIM_AVOIDED, JobState.RETRY_WAIT),
            ):
                if len(picked) >= limit:
                    break
                found = await conn.execute(query, {**params, "p_limit": limit - len(picked)})
                picked += [(job_id, source) for job_id in found.scalars()]
            claimed = []
            for job_id, source in picked:
                row = (
                    await conn.execute(
                        statements.CLAIM,
                        {
                            "p_id": job_id,
                            "p_from": source.value,
                            "p_now": now,
                            "p_runner": runner_id,
                            "p_endpoint": endpoint_id,
                        },
                    )
                ).first()
                if row is None:  # selected in this transaction, so only a bug gets here
                    raise _rejected(job_id, None, JobState.PREPARING)
                await self._log(
                    conn, job_id, source, JobState.PREPARING, None, f"endpoint {endpoint_id}"
                )
                claimed.append(JobRecord.from_row(row))
            return claimed

    async def _endpoint_load(self, conn: Conn, endpoint_id: int) -> int:
        """Jobs being prepared for or run on one endpoint, by any runner. The endpoint's row
        lock makes concurrent claims for it take turns, so the count cannot go stale."""
        await conn.execute(
            select(endpoints.c.id).where(endpoints.c.id == endpoint_id).with_for_update()
        )
        busy = [JobState.PREPARING.value, JobState.SUBMITTED.value, JobState.RUNNING.value]
        return int(
            (
                await conn.execute(
                    select(func.count()).where(
                        jobs.c.claimed_endpoint_id == endpoint_id, jobs.c.state.in_(busy)
                    )
                )
            ).scalar_one()
        )

    async def has_claimable(self, run_id: int) -> tuple[bool, float | None]:
        """Whether any job can still be claimed now, and when the next retry becomes due."""
        now = _now()
        async with self._reading_quick() as conn:
            pending = (await conn.execute(statements.ANY_PENDING, {"p_run": run_id})).first()
            next_due = (await conn.execute(statements.NEXT_DUE, {"p_run": run_id})).scalar()
        if pending is not None:
            return True, None
        if next_due is not None:
            return next_due <= now, next_due
        return False, None

    async def count_claimable(self, run_id: int, at_most: int) -> int:
        """How many jobs could be claimed now (pending, or due for retry), counted only up to
        ``at_most`` so the answer costs little however long the run is."""
        params = {"p_run": run_id, "p_now": _now()}
        total = 0
        async with self._reading_quick() as conn:
            for counted in (statements.COUNT_PENDING, statements.COUNT_DUE):
                if total >= at_most:
                    break
                found = await conn.execute(counted, {**params, "p_limit": at_most - total})
                total += found.scalar_one()
        return total

    async def release(self, job_id: int, reason: str) -> None:
        """Give a claimed job back untouched (the run is stopping before it was submitted)."""
        async with self._tx(durable=False) as conn:
            await self._move(
                conn, job_id, JobState.PENDING, allowed=(JobState.PREPARING,), detail=reason
            )

    async def release_all_preparing(self, run_id: int, runner_id: int | None = None) -> int:
        """After a crash, jobs caught while preparing go back to pending (nothing was sent).

        On a shared database only ``runner_id``'s own: other runners are preparing theirs.
        """
        async with self._tx() as conn:
            mine = (
                jobs.c.runner_id == runner_id if runner_id is not None else jobs.c.id.is_not(None)
            )
            return await self._move_all(
                conn,
                run_id,
                (JobState.PREPARING,),
                JobState.PENDING,
                detail="resumed: was preparing when the runner stopped",
                where=mine,
            )

    async def _move_all(
        self,
        conn: Conn,
        run_id: int,
        sources: Iterable[JobState],
        to: JobState,
        *,
        detail: str,
        where: ColumnElement[bool] | None = None,
        **values: Any,
    ) -> int:
        """Move every job of the run that is in one of ``sources`` (and matches ``where``)."""
        allowed = tuple(sources)
        query = select(jobs.c.id).where(
            jobs.c.run_id == run_id, jobs.c.state.in_([s.value for s in allowed])
        )
        if where is not None:
            query = query.where(where)
        ids = (await conn.execute(query)).scalars().all()
        for job_id in ids:
            await self._move(conn, job_id, to, allowed=allowed, detail=detail, **values)
        return len(ids)

    async def begin_attempt(
        self,
        job_id: int,
        endpoint_id: int,
        graph: Mapping[str, Any],
        resolved: Mapping[str, Any],
    ) -> AttemptRecord:
        """Write-ahead: commit the attempt and its prompt_id before anything is sent."""
        now = _now()
        prompt_id = str(uuid.uuid4())
        async with self._tx() as conn:
            number = (
                await conn.execute(statements.JOB_ATTEMPTS, {"p_id": job_id})
            ).scalar_one() + 1
            result = await conn.execute(
                statements.NEW_ATTEMPT,
                {
                    "job_id": job_id,
                    "number": number,
                    "endpoint_id": endpoint_id,
                    "prompt_id": prompt_id,
                    "state": AttemptState.INTENT.value,
                    "graph": _dumps(dict(graph)),
                    "created_at": now,
                },
            )
            attempt = AttemptRecord.from_row(result.one())
            await self._move(
                conn,
                job_id,
                JobState.SUBMITTED,
                allowed=(JobState.PREPARING,),
                attempt_id=attempt.id,
                detail=f"prompt {prompt_id}",
                attempts=number,
                resolved=_dumps(dict(resolved)),
                last_error=None,
                error_kind=None,
            )
            return attempt

    async def attempt_queued(self, attempt_id: int) -> None:
        async with self._tx(durable=False) as conn:
            await self._set_attempt(
                conn,
                attempt_id,
                AttemptState.QUEUED,
                allowed=(AttemptState.INTENT,),
                submitted_at=_now(),
            )

    async def attempt_running(self, job_id: int, attempt_id: int) -> bool:
        """The server started the prompt. Repeats and late arrivals are no-ops (False)."""
        async with self._tx(durable=False) as conn:
            moved = await self._set_attempt(
                conn,
                attempt_id,
                AttemptState.RUNNING,
                allowed=(AttemptState.INTENT, AttemptState.QUEUED),
                started_at=_now(),
            )
            if not moved:
                return False
            # The job moves on only from submitted: after a later step, this changes nothing.
            await self._try_move(
                conn, job_id, JobState.SUBMITTED, JobState.RUNNING, attempt_id, None, {}
            )
            return True

    async def attempt_completed(
        self, job_id: int, attempt_id: int, outputs: Sequence[Mapping[str, Any]]
    ) -> bool:
        """The server finished the prompt successfully; the job moves on to fetching.

        Not durable: should a power cut undo it, the resumed attempt finds the prompt in the
        server's history by its prompt_id, outputs included, and fetches them then.
        """
        async with self._tx(durable=False) as conn:
            moved = await self._set_attempt(
                conn,
                attempt_id,
                AttemptState.COMPLETED,
                allowed=(AttemptState.INTENT, AttemptState.QUEUED, AttemptState.RUNNING),
                finished_at=_now(),
                outputs=_dumps([dict(o) for o in outputs]),
            )
            if not moved:
                return False
            await self._move(
                conn,
                job_id,
                JobState.FETCHING,
                allowed=(JobState.SUBMITTED, JobState.RUNNING),
                attempt_id=attempt_id,
            )
            return True

    async def job_succeeded(
        self, job_id: int, attempt_id: int, *, path: str, sha256: str, size: int
    ) -> None:
        async with self._tx() as conn:
            await self._set_attempt(
                conn, attempt_id, AttemptState.SUCCEEDED, allowed=(AttemptState.COMPLETED,)
            )
            await self._move(
                conn,
                job_id,
                JobState.SUCCEEDED,
                allowed=(JobState.FETCHING,),
                attempt_id=attempt_id,
                output_path=path,
                output_sha256=sha256,
                output_size=size,
                finished_at=_now(),
                next_eligible_at=None,
            )

    async def attempt_failed(
        self,
        job_id: int,
        attempt_id: int,
        *,
        error: str,
        kind: str,
        retry_at: float | None,
        attempt_state: AttemptState = AttemptState.FAILED,
        endpoint_id: int | None = None,
    ) -> JobState:
        """End an attempt with an error: the job waits for a retry (``retry_at``) or fails."""
        async with self._tx() as conn:
            await self._set_attempt(
                conn,
                attempt_id,
                attempt_state,
                allowed=ATTEMPT_OPEN,
                error=error,
                error_kind=kind,
                finished_at=_now(),
            )
            return await self._fail(
                conn, job_id, IN_FLIGHT, error, kind, retry_at, endpoint_id, attempt_id
            )

    async def preparation_failed(
        self,
        job_id: int,
        *,
        error: str,
        kind: str,
        retry_at: float | None,
        endpoint_id: int | None = None,
        count_attempt: bool = True,
    ) -> JobState:
        """A claimed job could not be prepared (upload, render); nothing reached the GPU.

        It counts as an attempt, so a job whose upload keeps failing still runs out of tries,
        unless the endpoint itself was unreachable (``count_attempt=False``).
        """
        async with self._tx() as conn:
            if count_attempt:
                await conn.execute(
                    update(jobs).where(jobs.c.id == job_id).values(attempts=jobs.c.attempts + 1)
                )
            return await self._fail(
                conn, job_id, (JobState.PREPARING,), error, kind, retry_at, endpoint_id, None
            )

    async def _fail(
        self,
        conn: Conn,
        job_id: int,
        allowed: Iterable[JobState],
        error: str,
        kind: str,
        retry_at: float | None,
        endpoint_id: int | None,
        attempt_id: int | None,
    ) -> JobState:
        target = JobState.RETRY_WAIT if retry_at is not None else JobState.FAILED
        await self._move(
            conn,
            job_id,
            target,
            allowed=allowed,
            attempt_id=attempt_id,
            detail=error,
            last_error=error,
            error_kind=kind,
            next_eligible_at=retry_at,
            avoid_endpoint_id=endpoint_id,
            finished_at=_now() if target is JobState.FAILED else None,
        )
        return target

    async def requeue_missing_output(self, job_id: int, reason: str) -> None:
        """A succeeded job's file is gone or differs from its checksum: run it again."""
        async with self._tx() as conn:
            await self._move(
                conn,
                job_id,
                JobState.PENDING,
                allowed=(JobState.SUCCEEDED,),
                detail=reason,
                attempts=0,
                output_path=None,
                output_sha256=None,
                output_size=None,
                finished_at=None,
                last_error=reason,
                error_kind="output_missing",
            )

    async def retry_failed(self, run_id: int) -> int:
        """Send every failed or cancelled job back to pending with a fresh attempt budget."""
        async with self._tx() as conn:
            return await self._move_all(
                conn,
                run_id,
                (JobState.FAILED, JobState.CANCELLED),
                JobState.PENDING,
                detail="retry requested",
                attempts=0,
                next_eligible_at=None,
                avoid_endpoint_id=None,
                finished_at=None,
            )

    async def cancel_all(self, run_id: int, reason: str) -> int:
        """Cancel every job that has not finished; their open attempts are abandoned."""
        async with self._tx() as conn:
            rows = (
                await conn.execute(
                    select(jobs.c.id).where(
                        jobs.c.run_id == run_id,
                        jobs.c.state.not_in([s.value for s in TERMINAL]),
                    )
                )
            ).all()
            for (job_id,) in rows:
                await conn.execute(
                    update(attempts)
                    .where(
                        attempts.c.job_id == job_id,
                        attempts.c.state.in_([s.value for s in ATTEMPT_OPEN]),
                    )
                    .values(
                        state=AttemptState.ABANDONED.value,
                        error=reason,
                        error_kind="cancelled",
                        finished_at=_now(),
                    )
                )
                await self._move(
                    conn,
                    job_id,
                    JobState.CANCELLED,
                    allowed=frozenset(JobState) - TERMINAL,
                    detail=reason,
                    last_error=reason,
                    error_kind="cancelled",
                    finished_at=_now(),
                )
            return len(rows)

    # ---------------------------------------------------------------- uploads

    async def upload_name(self, endpoint_id: int, sha256: str) -> str | None:
        async with self._reading_quick() as conn:
            return (
                await conn.execute(
                    select(uploads.c.name).where(
                        uploads.c.endpoint_id == endpoint_id, uploads.c.sha256 == sha256
                    )
                )
            ).scalar()

    async def recorded_uploads(
        self, endpoint_ids: Sequence[int], at_most: int
    ) -> dict[int, dict[str, str] | None]:
        """Every upload recorded for each endpoint (sha256 → server name), or None for an
        endpoint with more than ``at_most`` of them."""
        async with self._reading() as conn:
            counted = await conn.execute(
                select(uploads.c.endpoint_id, func.count())
                .where(uploads.c.endpoint_id.in_(endpoint_ids))
                .group_by(uploads.c.endpoint_id)
            )
            counts = {endpoint_id: n for endpoint_id, n in counted}
            wanted = [e for e, n in counts.items() if n <= at_most]
            names: dict[int, dict[str, str]] = {e: {} for e in endpoint_ids}
            if wanted:
                rows = await conn.execute(
                    select(uploads.c.endpoint_id, uploads.c.sha256, uploads.c.name).where(
                        uploads.c.endpoint_id.in_(wanted)
                    )
                )
                for endpoint_id, sha256, name in rows:
                    names[endpoint_id][sha256] = name
        return {e: None if counts.get(e, 0) > at_most else names[e] for e in endpoint_ids}

    async def record_upload(self, endpoint_id: int, sha256: str, name: str) -> None:
        async with self._tx(durable=False) as conn:
            await conn.execute(
                dialect.upsert(
                    conn,
                    uploads,
                    ("endpoint_id", "sha256"),
                    endpoint_id=endpoint_id,
                    sha256=sha256,
                    name=name,
                )
            )

    async def forget_uploads(self, endpoint_id: int) -> None:
        """The endpoint lost its input files (or we cannot trust them): upload again."""
        async with self._tx() as conn:
            await conn.execute(uploads.delete().where(uploads.c.endpoint_id == endpoint_id))

    # ---------------------------------------------------------------- reads

    async def job(self, job_id: int) -> JobRecord:
        async with self._reading_quick() as conn:
            return JobRecord.from_row(
                (await conn.execute(select(jobs).where(jobs.c.id == job_id))).one()
            )

    async def in_flight(
        self, run_id: int, runner_id: int | None = None
    ) -> list[tuple[JobRecord, AttemptRecord]]:
        """Jobs that may have a prompt on a server, each with its newest attempt (on a shared
        database, those held by ``runner_id``)."""
        async with self._reading() as conn:
            mine = (
                jobs.c.runner_id == runner_id if runner_id is not None else jobs.c.id.is_not(None)
            )
            rows = (
                await conn.execute(
                    select(jobs).where(
                        jobs.c.run_id == run_id,
                        jobs.c.state.in_([s.value for s in IN_FLIGHT]),
                        mine,
                    )
                )
            ).all()
            return [(JobRecord.from_row(row), await _latest_attempt(conn, row.id)) for row in rows]

    async def finished_outputs(
        self, run_id: int, *, after_id: int, finished_before: float, limit: int = 1000
    ) -> list[OutputRecord]:
        """One page, by job id, of the manifest's succeeded jobs finished before
        ``finished_before`` (a run may hold a million: callers page so no transaction is
        long)."""
        async with self._reading() as conn:
            rows = (
                await conn.execute(
                    select(
                        jobs.c.id,
                        jobs.c.key,
                        jobs.c.output_path,
                        jobs.c.output_size,
                        jobs.c.output_sha256,
                    )
                    .where(
                        jobs.c.run_id == run_id,
                        jobs.c.state == JobState.SUCCEEDED.value,
                        jobs.c.id > after_id,
                        jobs.c.in_manifest.is_(True),
                        or_(
                            jobs.c.finished_at.is_(None),
                            jobs.c.finished_at < finished_before,
                        ),
                    )
                    .order_by(jobs.c.id)
                    .limit(limit)
                )
            ).all()
        return [
            OutputRecord(r.id, r.key, r.output_path, r.output_size, r.output_sha256) for r in rows
        ]

    async def counts(self, run_id: int) -> dict[JobState, int]:
        async with self._reading() as conn:
            rows = await conn.execute(
                select(jobs.c.state, func.count())
                .where(jobs.c.run_id == run_id, jobs.c.in_manifest.is_(True))
                .group_by(jobs.c.state)
            )
            counts = {state: 0 for state in JobState}
            for state, n in rows:
                counts[JobState(state)] = n
            return counts

    async def endpoint_counts(self, run_id: int) -> dict[str, dict[str, int]]:
        """Per endpoint URL: attempts by state."""
        async with self._reading() as conn:
            rows = await conn.execute(
                select(endpoints.c.url, attempts.c.state, func.count())
                .select_from(attempts.join(endpoints, attempts.c.endpoint_id == endpoints.c.id))
                .where(endpoints.c.run_id == run_id)
                .group_by(endpoints.c.url, attempts.c.state)
            )
            result: dict[str, dict[str, int]] = {}
            for url, state, n in rows:
                result.setdefault(url, {})[state] = n
            return result

    async def failures(self, run_id: int, limit: int = 50) -> list[Failure]:
        async with self._reading() as conn:
            rows = await conn.execute(
                select(jobs)
                .where(
                    jobs.c.run_id == run_id,
                    jobs.c.state.in_(
                        [JobState.FAILED.value, JobState.SKIPPED.value, JobState.RETRY_WAIT.value]
                    ),
                )
                .order_by(jobs.c.line)
                .limit(limit)
            )
            return [
                Failure(r.key, r.line, JobState(r.state), r.error_kind, r.last_error, r.attempts)
                for r in rows
            ]

    async def recent_failures(self, run_id: int, limit: int = 5) -> list[Failure]:
        """The latest failed or retry-waiting jobs, newest first (the live display)."""
        async with self._reading() as conn:
            rows = await conn.execute(
                select(jobs)
                .where(
                    jobs.c.run_id == run_id,
                    jobs.c.state.in_([JobState.FAILED.value, JobState.RETRY_WAIT.value]),
                )
                .order_by(jobs.c.updated_at.desc(), jobs.c.id.desc())
                .limit(limit)
            )
            return [
                Failure(r.key, r.line, JobState(r.state), r.error_kind, r.last_error, r.attempts)
                for r in rows
            ]

    async def speeds(self, run_id: int, since: float) -> dict[str, tuple[int, float, float]]:
        """Per endpoint URL: how many videos were made whose prompt finished at or after
        ``since``, the earliest start and the latest finish among them; throughput and ETA
        are computed from these."""
        start = func.min(func.coalesce(attempts.c.started_at, attempts.c.submitted_at))
        async with self._reading() as conn:
            rows = await conn.execute(
                select(endpoints.c.url, func.count(), start, func.max(attempts.c.finished_at))
                .select_from(attempts.join(endpoints, attempts.c.endpoint_id == endpoints.c.id))
                .where(
                    endpoints.c.run_id == run_id,
                    attempts.c.state == AttemptState.SUCCEEDED.value,
                    attempts.c.finished_at >= since,
                )
                .group_by(endpoints.c.url)
            )
            return {
                url: (n, float(first), float(last))
                for url, n, first, last in rows
                if first is not None and last is not None
            }

    async def export_rows(self, run_id: int) -> AsyncIterator[dict[str, Any]]:
        """Every job with its last attempt's endpoint and prompt id, in manifest order."""
        last_line, last_id = -1, 0
        while True:
            async with self._reading() as conn:
                latest = (
                    select(attempts.c.job_id, func.max(attempts.c.number).label("number"))
                    .group_by(attempts.c.job_id)
                    .subquery()
                )
                rows = (
                    await conn.execute(
                        select(
                            jobs,
                            attempts.c.prompt_id,
                            attempts.c.submitted_at,
                            attempts.c.started_at.label("attempt_started_at"),
                            attempts.c.finished_at.label("attempt_finished_at"),
                            endpoints.c.url.label("endpoint"),
                        )
                        .select_from(
                            jobs.outerjoin(latest, latest.c.job_id == jobs.c.id)
                            .outerjoin(
                                attempts,
                                and_(
                                    attempts.c.job_id == jobs.c.id,
                                    attempts.c.number == latest.c.number,
                                ),
                            )
                            .outerjoin(endpoints, endpoints.c.id == attempts.c.endpoint_id)
                        )
                        .where(
                            jobs.c.run_id == run_id,
                            jobs.c.in_manifest.is_(True),
                            or_(
                                jobs.c.line > last_line,
                                and_(jobs.c.line == last_line, jobs.c.id > last_id),
                            ),
                        )
                        .order_by(jobs.c.line, jobs.c.id)
                        .limit(1000)
                    )
                ).all()
            if not rows:
                return
            for row in rows:
                yield dict(row._mapping)
            last_line, last_id = rows[-1].line, rows[-1].id

    # ---------------------------------------------------------------- runners (shared database)

    async def runner_named(self, run_id: int, name: str) -> RunnerRecord | None:
        async with self._reading() as conn:
            row = (
                await conn.execute(
                    select(runners).where(runners.c.run_id == run_id, runners.c.name == name)
                )
            ).first()
            return RunnerRecord.from_row(row) if row is not None else None

    async def register_runner(self, run_id: int, name: str, host: str, pid: int) -> RunnerRecord:
        """Register (or re-register, after a restart) a runner under its name."""
        now = _now()
        async with self._tx() as conn:
            await conn.execute(
                dialect.upsert(
                    conn,
                    runners,
                    ("run_id", "name"),
                    run_id=run_id,
                    name=name,
                    host=host,
                    pid=pid,
                    started_at=now,
                    heartbeat_at=now,
                    stopped_at=None,
                )
            )
            row = (
                await conn.execute(
                    select(runners).where(runners.c.run_id == run_id, runners.c.name == name)
                )
            ).one()
            return RunnerRecord.from_row(row)

    async def heartbeat(self, runner_id: int) -> bool:
        """Say this runner is alive. False: another runner has taken over its jobs."""
        async with self._tx() as conn:
            result = await conn.execute(
                update(runners)
                .where(runners.c.id == runner_id, runners.c.stopped_at.is_(None))
                .values(heartbeat_at=_now())
                .returning(runners.c.id)
            )
            return result.first() is not None

    async def runner_stopped(self, runner_id: int) -> None:
        """A clean exit: other runners may adopt what it left in flight without waiting."""
        async with self._tx() as conn:
            await conn.execute(
                update(runners)
                .where(runners.c.id == runner_id, runners.c.stopped_at.is_(None))
                .values(stopped_at=_now())
            )

    async def take_over(
        self, run_id: int, runner_id: int, endpoint_ids: Iterable[int], stale_before: float
    ) -> list[tuple[JobRecord, AttemptRecord]]:
        """Adopt the jobs of runners that stopped, or whose heartbeat is older than
        ``stale_before``: their preparing jobs go back to pending (nothing was sent), and their
        in-flight jobs on ``endpoint_ids`` become this runner's, returned with their newest
        attempt so the caller re-attaches to the prompts by prompt_id."""
        now = _now()
        reachable = set(endpoint_ids)
        async with self._tx() as conn:
            gone = {
                r.id: r.name
                for r in await conn.execute(
                    select(runners.c.id, runners.c.name).where(
                        runners.c.run_id == run_id,
                        runners.c.id != runner_id,
                        or_(
                            runners.c.heartbeat_at < stale_before, runners.c.stopped_at.is_not(None)
                        ),
                    )
                )
            }
            if not gone:
                return []
            # A runner that was only paused finds this on its next heartbeat and stops.
            await conn.execute(
                update(runners)
                .where(runners.c.id.in_(list(gone)), runners.c.stopped_at.is_(None))
                .values(stopped_at=now)
            )
            held = (
                await conn.execute(
                    select(jobs)
                    .where(
                        jobs.c.run_id == run_id,
                        jobs.c.runner_id.in_(list(gone)),
                        jobs.c.state.in_([JobState.PREPARING.value, *(s.value for s in IN_FLIGHT)]),
                    )
                    .with_for_update(skip_locked=True)
                )
            ).all()
            adopted = []
            for row in held:
                previous = gone[row.runner_id]
                if row.state == JobState.PREPARING.value:
                    await self._move(
                        conn,
                        row.id,
                        JobState.PENDING,
                        allowed=(JobState.PREPARING,),
                        detail=f"released: runner {previous} stopped while preparing it",
                        runner_id=None,
                    )
                    continue
                attempt = await _latest_attempt(conn, row.id)
                if attempt.endpoint_id not in reachable:
                    continue  # left for a runner that has this endpoint
                await conn.execute(
                    update(jobs).where(jobs.c.id == row.id).values(runner_id=runner_id)
                )
                state = JobState(row.state)
                await self._log(
                    conn, row.id, state, state, attempt.id, f"taken over from runner {previous}"
                )
                adopted.append((JobRecord.from_row(row), attempt))
            return adopted

    async def held_elsewhere(self, run_id: int, runner_id: int) -> int:
        """Active jobs of this run held by other runners (alive, or not yet taken over)."""
        async with self._reading() as conn:
            return int(
                (
                    await conn.execute(
                        select(func.count()).where(
                            jobs.c.run_id == run_id,
                            jobs.c.state.in_([s.value for s in ACTIVE]),
                            or_(jobs.c.runner_id.is_(None), jobs.c.runner_id != runner_id),
                        )
                    )
                ).scalar_one()
            )

    # ---------------------------------------------------------------- metrics

    async def observations(
        self, run_id: int, since: float, runner_id: int | None = None
    ) -> Observations:
        """Job durations and queue waits that ended after ``since`` (on a shared database,
        of ``runner_id``'s jobs, so runners' histograms add up without double counting)."""
        mine = jobs.c.runner_id == runner_id if runner_id is not None else jobs.c.id.is_not(None)
        async with self._reading() as conn:
            done = (
                await conn.execute(
                    select(jobs.c.started_at, jobs.c.finished_at).where(
                        jobs.c.run_id == run_id,
                        jobs.c.state == JobState.SUCCEEDED.value,
                        jobs.c.finished_at > since,
                        jobs.c.started_at.is_not(None),
                        mine,
                    )
                )
            ).all()
            started = (
                await conn.execute(
                    select(attempts.c.submitted_at, attempts.c.started_at)
                    .select_from(attempts.join(jobs, attempts.c.job_id == jobs.c.id))
                    .where(
                        jobs.c.run_id == run_id,
                        attempts.c.started_at > since,
                        attempts.c.submitted_at.is_not(None),
                        mine,
                    )
                )
            ).all()
        until = max([since, *(r.finished_at for r in done), *(r.started_at for r in started)])
        return Observations(
            job_durations=tuple(r.finished_at - r.started_at for r in done),
            queue_waits=tuple(max(0.0, r.started_at - r.submitted_at) for r in started),
            until=until,
        )

    async def failure_reasons(self, run_id: int) -> dict[str, int]:
        """Attempts that ended in an error, by its kind (every runner's)."""
        ended = [AttemptState.FAILED.value, AttemptState.LOST.value, AttemptState.ABANDONED.value]
        async with self._reading() as conn:
            rows = await conn.execute(
                select(attempts.c.error_kind, func.count())
                .select_from(attempts.join(jobs, attempts.c.job_id == jobs.c.id))
                .where(jobs.c.run_id == run_id, attempts.c.state.in_(ended))
                .group_by(attempts.c.error_kind)
            )
            return {kind or "unknown": n for kind, n in rows}


async def _latest_attempt(conn: Reader, job_id: int) -> AttemptRecord:
    row = (
        await conn.execute(
            select(attempts)
            .where(attempts.c.job_id == job_id)
            .order_by(attempts.c.number.desc())
            .limit(1)
        )
    ).one()
    return AttemptRecord.from_row(row)


def _rejected(job_id: int, current: str | None, to: JobState) -> TransitionRejected:
    return TransitionRejected(
        f"job {job_id}: cannot move from {current or 'missing'} to {to.value}"
    )
