"""One invocation of ``batch-runner run``: validate, ingest, resume, schedule, summarise."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch_runner.config import RunSettings
from batch_runner.errors import (
    ConfigError,
    EndpointUnavailable,
    ManifestProblem,
)
from batch_runner.fleet import FleetMember, default_name, run_alongside
from batch_runner.heap import fix_mmap_threshold
from batch_runner.intake import Intake, SpecCheck
from batch_runner.jobflow import JobFlow
from batch_runner.lane import UPLOADS_REMEMBERED, Lane
from batch_runner.manifest import JobSpec, RowProblems, read_manifest, workflow_names
from batch_runner.output_check import OutputCheck
from batch_runner.planning import Planner
from batch_runner.preflight import usable_endpoints
from batch_runner.scheduler import Scheduler
from batch_runner.states import AttemptState, JobState
from batch_runner.store import IngestReport, Store
from batch_runner.workflow import WorkflowTemplate
from batch_runner.workflows import TemplateBook, as_book, default_template

log = logging.getLogger(__name__)

RUN_KEY = "default"

#: Watches a run while it works (the progress display); cancelled when the run ends.
Monitor = Callable[[Store, int, Sequence[Lane]], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class RunSummary:
    counts: dict[JobState, int]
    ingest: IngestReport
    stopped: bool
    requeued_outputs: int = 0
    skipped_rows: list[ManifestProblem] = field(default_factory=list)
    stop_reason: str | None = None

    @property
    def exit_code(self) -> int:
        if self.stopped:
            return 130
        unfinished = sum(
            n
            for state, n in self.counts.items()
            if state not in (JobState.SUCCEEDED, JobState.SKIPPED)
        )
        return 1 if unfinished else 0


def template_for(settings: RunSettings) -> WorkflowTemplate:
    """The built-in Wan2.2 template, or the user's workflow with its bindings (rows without
    a ``workflow`` column use it; see ``workflows.load_workflows`` for the rest)."""
    return default_template(settings)


def manifest_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def checked_rows(
    path: Path, templates: WorkflowTemplate | TemplateBook
) -> Iterator[JobSpec | RowProblems]:
    """The manifest's rows, each also checked against the workflow it will render into."""
    book = templates if isinstance(templates, TemplateBook) else TemplateBook(templates)
    check = SpecCheck(book)
    for item in read_manifest(path):
        if isinstance(item, JobSpec):
            issues = check(item)
            if issues:
                problems = [ManifestProblem(str(path), item.line, None, i) for i in issues]
                yield RowProblems(item.line, problems, item.job_id)
                continue
        yield item


def check_manifest(
    path: Path, template: WorkflowTemplate | TemplateBook
) -> tuple[int, list[ManifestProblem]]:
    """Read the whole manifest once; every problem is collected, nothing is sent."""
    good = 0
    problems: list[ManifestProblem] = []
    for item in checked_rows(path, template):
        if isinstance(item, RowProblems):
            problems.extend(item.problems)
        else:
            good += 1
    return good, problems


async def load_named_workflows(book: TemplateBook, manifest: Path) -> None:
    """Load every workflow the manifest's rows name, so checks and fingerprints cover them."""
    names = await asyncio.to_thread(workflow_names, manifest)
    await asyncio.to_thread(book.preload, names)


async def ingest(
    store: Store,
    run_id: int,
    settings: RunSettings,
    templates: WorkflowTemplate | TemplateBook,
    *,
    workflows_loaded: bool = False,
) -> tuple[IngestReport, list[ManifestProblem]]:
    """Validate and take in the manifest in one pass, unless it is unchanged since the last
    full ingest. With an invalid row (and no ``--skip-invalid``) nothing is kept and
    ``ManifestError`` lists every problem of the file."""
    template = as_book(templates, settings)
    run = await store.only_run()
    stamp = await asyncio.to_thread(manifest_stamp, settings.manifest)
    if not workflows_loaded:
        await load_named_workflows(template, settings.manifest)
    fingerprint = template.fingerprint()
    unchanged = (
        run is not None and run.manifest_stamp == stamp and run.workflow_fingerprint == fingerprint
    )
    if unchanged and not settings.rerun_changed:
        return IngestReport(), []
    rows = Intake(settings.manifest, template, settings.skip_invalid)
    report = await store.ingest(run_id, rows, rerun_changed=settings.rerun_changed)
    await store.set_run_stamps(run_id, manifest_stamp=stamp, workflow_fingerprint=fingerprint)
    return report, rows.problems


async def _join_fleet(
    store: Store, run_id: int, settings: RunSettings, stack: AsyncExitStack
) -> FleetMember | None:
    """On a shared database, register this runner; it deregisters when the run ends."""
    if not store.shared:
        if settings.runner_name is not None:
            raise ConfigError("--runner-name applies to a shared (PostgreSQL) --db only")
        return None
    name = settings.runner_name or default_name()
    member = await FleetMember.join(store, run_id, name, settings.takeover_after)
    stack.push_async_callback(member.leave)
    return member


async def _serve_metrics(
    store: Store,
    run_id: int,
    lanes: Sequence[Lane],
    runner_id: int | None,
    settings: RunSettings,
    stack: AsyncExitStack,
) -> asyncio.Task[None] | None:
    """With --metrics-port: serve the metrics and keep them fresh (the task) until the end."""
    if settings.metrics_port is None:
        return None
    from batch_runner.metrics import RunMetrics

    metrics = RunMetrics(store, run_id, lanes, runner_id)
    await metrics.refresh()
    metrics.start(settings.metrics_port)
    stack.push_async_callback(metrics.close)
    return asyncio.create_task(metrics.keep_fresh(), name="metrics")


async def _close_all(lanes: Sequence[Lane]) -> None:
    await asyncio.gather(*(lane.close() for lane in lanes))


async def _wind_down(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` if it is still running and wait for it; its outcome was either used
    already or is moot (the run failed before it was needed)."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def run_batch(
    settings: RunSettings,
    templates: WorkflowTemplate | TemplateBook,
    stopping: asyncio.Event,
    monitor: Monitor | None = None,
) -> RunSummary:
    # Before the ingest frees its big batches, which would raise glibc's threshold.
    fix_mmap_threshold()
    template = as_book(templates, settings)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        await load_named_workflows(template, settings.manifest)
        # The endpoints are checked while the database opens and the manifest is taken in.
        preflight = asyncio.create_task(
            usable_endpoints(settings.endpoints, template), name="preflight"
        )
        stack.push_async_callback(_wind_down, preflight)
        store = await stack.enter_async_context(Store.open(settings.db))
        run = await store.ensure_run(RUN_KEY, str(settings.manifest))
        report, skipped = await ingest(store, run.id, settings, template, workflows_loaded=True)
        if report.changed:
            log.warning(
                "%d row(s) changed since they ran and keep their earlier result "
                "(--rerun-changed runs them again): %s",
                len(report.changed),
                ", ".join(report.changed[:10]),
            )
        if report.removed:
            log.warning(
                "%d row(s) are no longer in the manifest and will not run: %s",
                len(report.removed),
                ", ".join(report.removed[:10]),
            )
        member = await _join_fleet(store, run.id, settings, stack)
        runner_id = member.id if member is not None else None
        await store.release_all_preparing(run.id, runner_id)

        lanes: list[Lane] = []
        # Endpoints that answer but cannot run the workflow are left out before any job starts.
        usable = await preflight
        records = await store.ensure_endpoints(run.id, [ep.url for ep, _ in usable])
        # Closed together at the end: each waits for its socket's closing handshake.
        stack.push_async_callback(_close_all, lanes)
        for (ep, _), record in zip(usable, records, strict=True):
            if member is not None:
                record = member.endpoint_view(record)
            lane = Lane(ep, record, endpoint_timeout=settings.timeouts.endpoint)
            # The socket opens while the rest of the start-up runs.
            lane.start_listening()
            lanes.append(lane)
        if not store.shared:
            # A new image is then uploaded without asking the store whether it was before.
            recorded = await store.recorded_uploads(
                [lane.record.id for lane in lanes], UPLOADS_REMEMBERED
            )
            for lane in lanes:
                names = recorded[lane.record.id]
                if names is not None:
                    lane.knows_uploads(names)
        # One the preflight could not reach starts down: its lane probes it in the background
        # and it joins when it answers, so a hung server holds up no other endpoint's work.
        for lane, (_, seen) in zip(lanes, usable, strict=True):
            if not seen.reachable:
                lane.mark_down(EndpointUnavailable(seen.error or "no answer", endpoint=lane.name))
        flow = JobFlow(store, settings, Planner(template), stopping)
        scheduler = Scheduler(
            store, run.id, lanes, flow, stopping, settings.timeouts.grace, runner_id=runner_id
        )
        for job, attempt in scheduler.adopt(await store.in_flight(run.id, runner_id)):
            # Its endpoint is not in this run's list, so nobody can ask it about the prompt.
            reason = "its endpoint is not part of this run any more; submitting it again"
            log.warning("job %s: %s", job.key, reason)
            await store.attempt_failed(
                job.id,
                attempt.id,
                error=reason,
                kind="EndpointRemoved",
                retry_at=time.time(),
                attempt_state=AttemptState.ABANDONED,
            )
        watcher = asyncio.create_task(monitor(store, run.id, lanes)) if monitor else None
        metrics = await _serve_metrics(store, run.id, lanes, runner_id, settings, stack)
        check = OutputCheck(store, run.id, scheduler.nudge)
        try:
            if member is None:
                # Outputs of earlier runs are checked next to the new work, not before it.
                await scheduler.run(alongside=[check.run()])
            else:
                # On a shared run the files may sit on another machine's disk: each runner
                # checks only what it downloads.
                endpoint_ids = [lane.record.id for lane in lanes]
                await scheduler.adopt_more(await member.take_over(endpoint_ids))
                await run_alongside(
                    scheduler.run(), member.keep_alive(endpoint_ids, scheduler.adopt_more)
                )
        finally:
            for task in (watcher, metrics):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        counts = await store.counts(run.id)
    with contextlib.suppress(OSError):  # only when empty: downloads in flight keep it
        (settings.output_dir / ".incoming").rmdir()
    return RunSummary(counts, report, stopping.is_set(), check.requeued, skipped, flow.stop_reason)
