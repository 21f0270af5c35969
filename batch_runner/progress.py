"""Progress while a run works: a live bar on a terminal, a plain line now and then elsewhere.

It is a view of the store's counts, so a resumed run shows the right totals at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from batch_runner.lane import Lane
from batch_runner.states import JobState
from batch_runner.store import Store

log = logging.getLogger("batch_runner")

PLAIN_INTERVAL_S = 30.0
LIVE_INTERVAL_S = 0.5

_FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED)


def describe(counts: dict[JobState, int]) -> str:
    running = sum(counts[s] for s in (JobState.SUBMITTED, JobState.RUNNING, JobState.FETCHING))
    return (
        f"{counts[JobState.SUCCEEDED]} done, {counts[JobState.FAILED]} failed, "
        f"{running} in flight, {counts[JobState.PENDING] + counts[JobState.RETRY_WAIT]} waiting"
    )


async def report_progress(
    store: Store, run_id: int, lanes: Sequence[Lane], console: Console, *, live: bool
) -> None:
    """Run until cancelled."""
    if not live:
        while True:
            await asyncio.sleep(PLAIN_INTERVAL_S)
            log.info("progress: %s", describe(await store.counts(run_id)))
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("videos", total=None, detail="")
        while True:
            counts = await store.counts(run_id)
            lanes_up = sum(1 for lane in lanes if lane.healthy)
            bar.update(
                task,
                total=sum(counts.values()),
                completed=sum(counts[s] for s in _FINISHED),
                detail=f"{describe(counts)} · {lanes_up}/{len(lanes)} endpoints up",
            )
            await asyncio.sleep(LIVE_INTERVAL_S)
