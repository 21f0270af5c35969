"""Finished outputs of earlier runs, checked alongside the new work.

A resumed run must not trust a video that was deleted or altered since it was recorded, but
hashing every finished file before submitting anything would keep the GPUs waiting for
minutes on a big run. So the check runs next to the scheduler, in two passes over the
succeeded jobs, read from the store a page at a time: first the cheap one (the file exists
and has its recorded size), then the sha256 of every file. A job whose file fails either is
requeued at once and the scheduler is nudged, so it runs in the same run; the scheduler does
not end the run before the check is done.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from batch_runner import clock
from batch_runner.errors import TransitionRejected
from batch_runner.outputs import sha256_file
from batch_runner.store import OutputRecord, Store

log = logging.getLogger(__name__)

#: Jobs read per store transaction: short enough that claims never wait long for the lock.
PAGE = 1000
#: Requeued jobs named one by one in the log; the rest are only counted.
NAMED = 20


@dataclass
class OutputCheck:
    store: Store
    run_id: int
    #: called after each requeue, so idle slots claim the job at once
    on_requeue: Callable[[], Awaitable[None]]
    requeued: int = 0
    #: asks the worker thread to stop after its current file (a task cancel cannot reach it)
    _halt: threading.Event = field(default_factory=threading.Event)

    async def run(self) -> None:
        # Files this run downloads are verified as they land: only earlier ones are checked.
        since = clock.now().timestamp()
        for full in (False, True):
            after_id = 0
            while page := await self.store.finished_outputs(
                self.run_id, after_id=after_id, finished_before=since, limit=PAGE
            ):
                try:
                    problems = await asyncio.to_thread(_problems, page, full, self._halt)
                except asyncio.CancelledError:
                    self._halt.set()
                    raise
                for output, reason in problems:
                    await self._requeue(output, reason)
                after_id = page[-1].job_id
        if self.requeued > NAMED:
            log.warning(
                "%d finished outputs were missing or altered; they run again", self.requeued
            )

    async def _requeue(self, output: OutputRecord, reason: str) -> None:
        try:
            await self.store.requeue_missing_output(output.job_id, reason)
        except TransitionRejected:
            return  # no longer succeeded: nothing of this file is relied on
        self.requeued += 1
        if self.requeued <= NAMED:
            log.warning("job %s: %s; it will run again", output.key, reason)
        await self.on_requeue()


def _problems(
    page: Sequence[OutputRecord], full: bool, halt: threading.Event
) -> list[tuple[OutputRecord, str]]:
    """The outputs of ``page`` that fail the check, with why (blocking: run in a thread)."""
    found = []
    for output in page:
        if halt.is_set():
            break
        reason = _problem(output, full)
        if reason is not None:
            found.append((output, reason))
    return found


def _problem(output: OutputRecord, full: bool) -> str | None:
    path = output.path
    try:
        info = os.stat(path) if path else None
    except OSError:
        info = None
    if path is None or info is None or not stat.S_ISREG(info.st_mode):
        return f"output file {path} is missing"
    if output.size is not None and info.st_size != output.size:
        return f"output file {path} is not its recorded size ({output.size} bytes)"
    if full and output.sha256:
        try:
            digest = sha256_file(Path(path))
        except OSError:
            return f"output file {path} is missing"
        if digest != output.sha256:
            return f"output file {path} does not match its recorded checksum"
    return None
