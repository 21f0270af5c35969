"""Progress while a run works: a live dashboard on a terminal, a plain line now and then
elsewhere (logs, CI, nohup).

It is a view of the store and of the lanes, so a resumed run shows the right totals at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from rich.console import Console
from rich.live import Live

from batch_runner import clock
from batch_runner.dashboard import SPEED_WINDOW_S, LaneView, Snapshot, rates, render, summary_line
from batch_runner.lane import Lane
from batch_runner.states import JobState
from batch_runner.store import Store

log = logging.getLogger("batch_runner")

#: A plain line this often: frequent enough to see a run move in a log, rare enough that a
#: night's log stays readable (about a thousand lines for a week-long run).
PLAIN_INTERVAL_S = 30.0
#: The live view re-reads the store this often (three indexed queries)...
LIVE_INTERVAL_S = 1.0
#: ...or less often on a run so big that reading takes longer than this share of the time:
#: the store answers one caller at a time, and the scheduler's claims come first.
LIVE_STORE_SHARE = 0.05
RECENT_FAILURES = 5


def describe(counts: dict[JobState, int]) -> str:
    running = sum(counts[s] for s in (JobState.SUBMITTED, JobState.RUNNING, JobState.FETCHING))
    return (
        f"{counts[JobState.SUCCEEDED]} done, {counts[JobState.FAILED]} failed, "
        f"{running} in flight, {counts[JobState.PENDING] + counts[JobState.RETRY_WAIT]} waiting"
    )


def live_pause(took: float) -> float:
    """Seconds to wait before the next live snapshot, after one that took ``took``."""
    return max(LIVE_INTERVAL_S, took / LIVE_STORE_SHARE)


def lane_view(lane: Lane) -> LaneView:
    """The lane's health and the prompt its GPU is on, from the websocket's progress."""
    open_watches = [w for w in lane.tracker.watches() if not w.finished]
    running = next((w for w in open_watches if w.started), None)
    return LaneView(
        url=lane.settings.url,
        name=lane.name,
        healthy=lane.healthy,
        job=running.job_key if running else None,
        node=running.node if running else None,
        step=running.step if running else None,
        queued=sum(1 for w in open_watches if not w.started),
        done=lane.done_count,
        last_error=lane.last_error,
    )


async def snapshot(store: Store, run_id: int, lanes: Sequence[Lane] = ()) -> Snapshot:
    """Counts, speeds and recent failures from the store; the rest from the lanes."""
    now = clock.now().timestamp()
    return Snapshot(
        counts=await store.counts(run_id),
        rates=rates(await store.speeds(run_id, now - SPEED_WINDOW_S)),
        lanes=[lane_view(lane) for lane in lanes],
        failures=await store.recent_failures(run_id, RECENT_FAILURES),
    )


async def report_progress(
    store: Store, run_id: int, lanes: Sequence[Lane], console: Console, *, live: bool
) -> None:
    """Run until cancelled."""
    if not live:
        while True:
            await asyncio.sleep(PLAIN_INTERVAL_S)
            log.info("progress: %s", summary_line(await snapshot(store, run_id, lanes)))
    with Live(console=console, auto_refresh=False, transient=False) as view:
        try:
            while True:
                asked = clock.monotonic()
                snap = await snapshot(store, run_id, lanes)
                took = clock.monotonic() - asked
                view.update(render(snap), refresh=True)
                await asyncio.sleep(live_pause(took))
        except asyncio.CancelledError:
            # The run is over: leave its final numbers on the screen, not the last tick's.
            view.update(render(await snapshot(store, run_id, lanes)), refresh=True)
            raise
