"""What the websocket and reconciliation have told us about each prompt of one endpoint.

Pure bookkeeping, no I/O: the lane feeds it events and reconciliation results, and the job
coroutines wait on their :class:`PromptWatch`. Repeated and out-of-order messages are no-ops:
an outcome, once set, never changes.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from batch_runner import clock
from batch_runner.comfy import events as ev
from batch_runner.comfy.models import HistoryEntry, Outcome, OutputFile

#: Terminal messages for prompts nobody watches yet (resume before adoption) are kept, this many.
MAX_ORPHANS = 1024
#: Weight of the newest run time in an endpoint's pace (a moving average that follows a GPU
#: getting slower or faster within a few jobs, and is not thrown by one odd job).
PACE_WEIGHT = 0.3


@dataclass
class PromptWatch:
    """One submitted prompt that a job coroutine is waiting for."""

    prompt_id: str
    job_key: str
    #: the server confirmed it has the prompt (POST answered, or found in /queue or /history)
    accepted: bool = False
    started: bool = False
    #: when the server started running it (``clock.monotonic``), if the socket said so
    started_at: float | None = None
    #: the job coroutine has stored that the prompt started
    recorded_running: bool = False
    node: str | None = None
    step: tuple[int, int] | None = None
    last_heard: float = field(default_factory=clock.monotonic)
    #: output files announced by `executed` messages, in case history is gone when we ask
    outputs: list[OutputFile] = field(default_factory=list)
    #: the socket told us the prompt ended (success, error or interrupt)
    ended: ev.Event | None = None
    #: reconciliation found the finished entry in /history
    entry: HistoryEntry | None = None
    lost: bool = False
    #: seconds between /queue and /history look-ups when no message can come (taken over)
    poll: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.ended is not None or self.entry is not None or self.lost

    def touch(self) -> None:
        self.last_heard = clock.monotonic()
        self.changed.set()


class PromptTracker:
    """Routes one endpoint's websocket events to the watches of the prompts we submitted."""

    def __init__(self) -> None:
        self._watches: dict[str, PromptWatch] = {}
        self._orphans: OrderedDict[str, ev.Event] = OrderedDict()
        self._running: str | None = None
        #: seconds a prompt runs on this endpoint, averaged over those that succeeded
        self.pace: float | None = None

    def watch(self, prompt_id: str, job_key: str) -> PromptWatch:
        """Start watching a prompt; call before submitting (messages can beat the answer)."""
        watch = self._watches.get(prompt_id)
        if watch is None:
            watch = PromptWatch(prompt_id, job_key)
            self._watches[prompt_id] = watch
            orphan = self._orphans.pop(prompt_id, None)
            if orphan is not None:
                self.handle(orphan)
        return watch

    def forget(self, prompt_id: str) -> None:
        self._watches.pop(prompt_id, None)

    def watches(self) -> list[PromptWatch]:
        return list(self._watches.values())

    @property
    def running_prompt(self) -> str | None:
        return self._running

    def held_work(self, pace: float, now: float) -> float:
        """Seconds of GPU time left in the prompts submitted here and not finished, at
        ``pace`` seconds per prompt."""
        total = 0.0
        for watch in self._watches.values():
            if watch.finished:
                continue
            if watch.started_at is not None:
                total += max(pace - (now - watch.started_at), 0.0)
            else:
                total += pace
        return total

    def handle(self, event: ev.Event) -> None:
        prompt_id = getattr(event, "prompt_id", None)
        if prompt_id is None:
            # The reconnect hint `executing {node}` names no prompt; /queue tells which one.
            return
        watch = self._watches.get(prompt_id)
        if watch is None:
            if isinstance(event, ev.ExecutionSuccess | ev.ExecutionError | ev.ExecutionInterrupted):
                self._orphans[prompt_id] = event
                while len(self._orphans) > MAX_ORPHANS:
                    self._orphans.popitem(last=False)
            return
        if watch.finished:
            return
        if isinstance(event, ev.ExecutionStart):
            watch.started = True
            watch.started_at = clock.monotonic()
            self._running = prompt_id
        elif isinstance(event, ev.Executing):
            watch.started = True
            if event.node is None:
                if self._running == prompt_id:
                    self._running = None
            else:
                watch.node, watch.step = event.node, None
        elif isinstance(event, ev.Progress):
            watch.started = True
            watch.step = (event.value, event.max)
        elif isinstance(event, ev.Executed):
            watch.outputs.extend(f for f in event.outputs if f not in watch.outputs)
        elif isinstance(event, ev.ExecutionSuccess | ev.ExecutionError | ev.ExecutionInterrupted):
            self._ended(watch, event)
        watch.touch()

    def _ended(
        self,
        watch: PromptWatch,
        event: ev.ExecutionSuccess | ev.ExecutionError | ev.ExecutionInterrupted,
    ) -> None:
        watch.ended = event
        if self._running == watch.prompt_id:
            self._running = None
        if isinstance(event, ev.ExecutionSuccess) and watch.started_at is not None:
            seconds = clock.monotonic() - watch.started_at
            self.pace = (
                seconds if self.pace is None else self.pace + PACE_WEIGHT * (seconds - self.pace)
            )

    def reconciled(
        self, watch: PromptWatch, entry: HistoryEntry | None, *, running: bool, pending: bool
    ) -> bool:
        """Apply what /queue and /history said about ``watch``'s prompt.

        Returns True when history shows an end the socket never told us about, which means
        the socket missed it (disconnected or deaf) and should be reopened.
        """
        if watch.finished:
            return False
        if entry is not None:
            watch.entry = entry
            watch.touch()
            return True
        if running:
            watch.started = True
            self._running = watch.prompt_id
            watch.touch()
        elif pending:
            watch.touch()
        else:
            watch.lost = True
            watch.touch()
        return False


def outcome_of(watch: PromptWatch) -> Outcome | None:
    """Success, error or interrupted, from whichever source settled the prompt first."""
    if watch.entry is not None:
        return watch.entry.outcome
    if isinstance(watch.ended, ev.ExecutionSuccess):
        return Outcome.SUCCESS
    if isinstance(watch.ended, ev.ExecutionError):
        return Outcome.ERROR
    if isinstance(watch.ended, ev.ExecutionInterrupted):
        return Outcome.INTERRUPTED
    return None
