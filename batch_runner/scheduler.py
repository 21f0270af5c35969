"""Lanes, capacity and the end of a run.

Each endpoint lane runs ``max_inflight`` slots. A slot claims one job at a time from the
store and carries it to a terminal or retry state, so a faster endpoint simply comes back
for work sooner (pull-based). With the default of two slots, one prompt runs on the GPU while
the next is already waiting in the server's queue, and the job after that is uploaded while
both are there.

At start-up every endpoint gets its first prompt before any gets a second: an idle GPU is the
cost, a second prompt in a queue only a buffer. Near the end, once the store has nothing left
to claim, a finished job no longer wakes every idle slot to ask it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from batch_runner import clock
from batch_runner.jobflow import JobFlow
from batch_runner.lane import Lane
from batch_runner.placement import Load, estimate_paces, takes_a_job
from batch_runner.store import AttemptRecord, JobRecord, Store

log = logging.getLogger(__name__)

IDLE_RECHECK_S = 5.0  # an idle slot re-reads the store at least this often
#: On a shared database other runners free capacity without telling us: look again sooner.
SHARED_RECHECK_S = 0.5
WS_READY_WAIT_S = 5.0
#: How long a lane's further slots wait, at start-up, for every lane to get its first prompt.
FIRST_ROUND_WAIT_S = 2.0
#: While more jobs than this wait per endpoint, a free slot takes one without weighing where
#: it would finish first: the end of the run, where that matters, is still far off.
PLENTY_PER_LANE = 32


@dataclass
class Scheduler:
    store: Store
    run_id: int
    lanes: Sequence[Lane]
    flow: JobFlow
    stopping: asyncio.Event
    grace: float = 3600.0
    busy: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Condition = field(default_factory=asyncio.Condition)
    _adopted: dict[int, deque[tuple[JobRecord, AttemptRecord]]] = field(default_factory=dict)
    #: on a shared database: this runner's id (claims are marked with it and capped per
    #: endpoint across runners, and the run ends only when no runner holds a job)
    runner_id: int | None = None
    #: attempts adopted from another runner: their messages went to that runner's socket
    _foreign: set[int] = field(default_factory=set)
    #: jobs known to be waiting: the last count, less the claims made since
    _waiting_hint: int = 0
    #: work next to the slots that may still make jobs claimable (the check of finished
    #: outputs): the run does not end while any of it is running
    _alongside: list[asyncio.Task[None]] = field(default_factory=list)
    #: lanes whose first prompt of the run is still on its way (see FIRST_ROUND_WAIT_S)
    _unstarted: set[int] = field(default_factory=set)
    _first_round_over: asyncio.Event = field(default_factory=asyncio.Event)
    #: the store said nothing is pending or waiting to retry, and nothing was requeued since
    _drained: bool = False

    def adopt(
        self, in_flight: Sequence[tuple[JobRecord, AttemptRecord]]
    ) -> list[tuple[JobRecord, AttemptRecord]]:
        """Hand attempts found in flight at start-up to the lanes of their endpoints.

        Returns those whose endpoint is not part of this run any more.
        """
        by_id = {lane.record.id: lane for lane in self.lanes}
        orphans = []
        for job, attempt in in_flight:
            if attempt.endpoint_id in by_id:
                self._adopted.setdefault(attempt.endpoint_id, deque()).append((job, attempt))
            else:
                orphans.append((job, attempt))
        return orphans

    async def adopt_more(self, taken_over: Sequence[tuple[JobRecord, AttemptRecord]]) -> None:
        """Hand attempts taken over from a stopped runner to the lanes, while running."""
        for _job, attempt in self.adopt(taken_over):
            log.warning("cannot follow prompt %s: its endpoint is not ours", attempt.prompt_id)
        self._foreign.update(attempt.id for _job, attempt in taken_over)
        await self.nudge()

    async def run(self, alongside: Sequence[Coroutine[Any, Any, None]] = ()) -> None:
        """Work until no job is left to claim and nothing is in flight, or until stopped.

        ``alongside`` runs next to the slots and may requeue jobs (calling :meth:`nudge`);
        the run ends only after it is done, and a stop cancels it.
        """
        for lane in self.lanes:
            lane.start_listening()
        if self.runner_id is None:
            # Counted once here rather than by every slot as it starts.
            plenty = PLENTY_PER_LANE * len(self.lanes)
            self._waiting_hint = await self.store.count_claimable(self.run_id, 2 * plenty)
        # A lane that resumes prompts in flight already has work on its GPU.
        self._unstarted = {
            lane.record.id
            for lane in self.lanes
            if lane.healthy and not self._adopted.get(lane.record.id)
        }
        starts = [asyncio.create_task(self._started_once_accepted(lane)) for lane in self.lanes]
        self._check_first_round()
        # First slots first: the order slots start in is the order they first claim.
        most = max((lane.settings.max_inflight for lane in self.lanes), default=0)
        slots = [
            asyncio.create_task(self._slot(lane, first=n == 0), name=f"{lane.name}:slot{n}")
            for n in range(most)
            for lane in self.lanes
            if n < lane.settings.max_inflight
        ]
        self._alongside = [asyncio.create_task(work, name="alongside") for work in alongside]
        watchdog = asyncio.create_task(self._on_stop(slots), name="stop-watch")
        try:
            # A slot or side task that fails is a bug: stop the run with it rather than limp
            # on. Slots cancelled at the end of the grace period are expected.
            waiting: set[asyncio.Task[None]] = {*slots, *self._alongside}
            while not all(slot.done() for slot in slots):
                finished, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                if finished - set(slots):
                    await self.nudge()  # idle slots may be waiting only for that to end
        finally:
            for task in [*slots, *starts, *self._alongside, watchdog]:
                task.cancel()
            await asyncio.gather(
                *slots, *starts, *self._alongside, watchdog, return_exceptions=True
            )

    async def _on_stop(self, slots: Sequence[asyncio.Task[None]]) -> None:
        """After a stop request: claim nothing more, say what we wait for, and cut the wait
        short after the grace period (the store then holds the in-flight state to resume)."""
        await self.stopping.wait()
        await self.nudge()
        waiting = [
            f"{watch.job_key} on {lane.name}"
            for lane in self.lanes
            for watch in lane.tracker.watches()
        ]
        if waiting:
            log.warning(
                "stopping: waiting up to %.0f s for %d prompt(s) in flight: %s",
                self.grace,
                len(waiting),
                ", ".join(waiting[:20]),
            )
        await asyncio.sleep(self.grace)
        log.warning("grace period over; leaving the rest in flight for the next run to adopt")
        for task in slots:
            task.cancel()

    async def nudge(self) -> None:
        """Wake every idle slot to look at the store again: work may have come back."""
        self._drained = False
        async with self._wake:
            self._wake.notify_all()

    async def _started_once_accepted(self, lane: Lane) -> None:
        await lane.accepted_one.wait()
        self._started(lane)

    def _started(self, lane: Lane) -> None:
        """``lane`` needs no head start any more: its first prompt is in, or it is not
        getting one now."""
        self._unstarted.discard(lane.record.id)
        self._check_first_round()

    def _check_first_round(self) -> None:
        if not self._unstarted:
            self._first_round_over.set()

    async def _slot(self, lane: Lane, *, first: bool = True) -> None:
        # One queue per endpoint, shared by its slots and filled while they run (takeover).
        adopted = self._adopted.setdefault(lane.record.id, deque())
        # Messages of a prompt can arrive within milliseconds of submitting it: give the
        # socket a moment to open first (reconciliation covers what it still misses). Not
        # for an endpoint that is down: it gets no work until it answers, and its slots
        # would only hold up the first round and the end of a short run.
        if lane.healthy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.ws_ready.wait(), WS_READY_WAIT_S)
        if not first:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_round_over.wait(), FIRST_ROUND_WAIT_S)
        while not self.done.is_set():
            if adopted:
                job, attempt = adopted.popleft()
                foreign = attempt.id in self._foreign
                await self._work(self.flow.resume(job, attempt, lane, foreign=foreign))
                continue
            if self.stopping.is_set():
                return
            if not lane.healthy:
                self._started(lane)
                await self._idle(IDLE_RECHECK_S)
                continue
            if not await self._worth_claiming(lane):
                self._started(lane)
                await self._idle(self._recheck_after(lane))
                continue
            # A retry waits a little for another endpoint, if there is one that works.
            others_up = any(other.healthy for other in self.lanes if other is not lane)
            grace = self.flow.settings.retry.elsewhere_grace if others_up else 0.0
            claimed = await self.store.claim(
                self.run_id,
                lane.record.id,
                avoid_grace=grace,
                runner_id=self.runner_id,
                capacity=lane.settings.max_inflight if self.runner_id is not None else None,
            )
            if claimed:
                self._waiting_hint -= len(claimed)
                await self._work(self.flow.run_claimed(claimed[0], lane))
                self._started(lane)  # if it ended before its prompt was accepted
                continue
            self._started(lane)
            claimable, next_due = await self.store.has_claimable(self.run_id)
            if claimable or next_due is not None:
                if self._drained:
                    # Work came back (a retry) while the others slept: let them see it too.
                    await self.nudge()
            elif self.runner_id is None:
                # Other runners requeue without telling us, so only a lone runner trusts this.
                self._drained = True
            if (
                not claimable
                and next_due is None
                and self.busy == 0
                and not self._any_adopted()
                and all(task.done() for task in self._alongside)
                and not await self._held_elsewhere()
            ):
                self.done.set()
                await self.nudge()
                return
            wait = IDLE_RECHECK_S if self.runner_id is None else SHARED_RECHECK_S
            if next_due is not None:
                wait = min(wait, max(0.05, next_due - clock.now().timestamp()))
            await self._idle(wait)

    async def _worth_claiming(self, lane: Lane) -> bool:
        """Whether ``lane`` should take a job now. Always, unless few jobs are left: then
        only when it would finish one of them before the other endpoints (see placement).

        On a shared database other runners' work is not seen here, so every lane takes.
        """
        if self.runner_id is not None:
            return True
        plenty = PLENTY_PER_LANE * len(self.lanes)
        if self._waiting_hint >= plenty:
            return True
        # Counted to twice the threshold, so a long run counts once per `plenty` claims.
        waiting = await self.store.count_claimable(self.run_id, 2 * plenty)
        self._waiting_hint = waiting
        if waiting == 0 or waiting >= plenty:
            # With nothing waiting, the claim finds out whether the run is over.
            return True
        healthy = [other for other in self.lanes if other.healthy]
        paces = estimate_paces([other.tracker.pace for other in healthy])
        mine = Load(0.0, 0.0)
        others = []
        for other, pace in zip(healthy, paces, strict=True):
            load = Load(other.held_work(pace), pace)
            if other is lane:
                mine = load
            else:
                others.append(load)
        return takes_a_job(mine, others, waiting)

    def _recheck_after(self, lane: Lane) -> float:
        """How long a slot that left the last jobs to faster endpoints waits before weighing
        again (a finished job wakes it sooner), so a stalled endpoint cannot hold them."""
        pace = lane.tracker.pace or IDLE_RECHECK_S
        return min(IDLE_RECHECK_S, max(0.05, pace / 4))

    async def _work(self, job_coro: object) -> None:
        self.busy += 1
        try:
            await job_coro  # type: ignore[misc]
        finally:
            self.busy -= 1
            # The slot that ran it looks at the store next; the others need waking only while
            # there may be work for them.
            if not self._drained:
                await self.nudge()

    async def _idle(self, seconds: float) -> None:
        async with self._wake:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), seconds)

    def _any_adopted(self) -> bool:
        return any(self._adopted.values())

    async def _held_elsewhere(self) -> bool:
        """Another runner still holds jobs: stay, to take them over should it stop."""
        if self.runner_id is None:
            return False
        return await self.store.held_elsewhere(self.run_id, self.runner_id) > 0
