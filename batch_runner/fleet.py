"""One runner among several on a shared (PostgreSQL) run: registration, heartbeat, takeover.

Each runner registers under a name and refreshes its heartbeat. A runner whose heartbeat is
older than the takeover delay, or that stopped, is presumed gone: another runner releases the
jobs it was preparing (nothing was sent) and adopts its in-flight attempts by prompt_id. The
endpoint still runs those prompts; the write-ahead rule (prompt_id committed before the POST)
means the adopter can always find them in /queue or /history, or knows it may send them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from batch_runner import clock
from batch_runner.errors import RunLocked, RunnerSuperseded
from batch_runner.store import AttemptRecord, EndpointRecord, JobRecord, Store
from batch_runner.store.records import RunnerRecord

log = logging.getLogger(__name__)

DEFAULT_TAKEOVER_AFTER_S = 60.0
#: Heartbeats per takeover delay: a few missed beats (a slow database) are not a death.
BEATS_PER_TAKEOVER = 6

Adopt = Callable[[Sequence[tuple[JobRecord, AttemptRecord]]], Awaitable[None]]


def default_name() -> str:
    """The host name: the same machine restarting its runner resumes that runner's jobs."""
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class FleetMember:
    store: Store
    run_id: int
    runner: RunnerRecord
    takeover_after: float

    @classmethod
    async def join(cls, store: Store, run_id: int, name: str, takeover_after: float) -> FleetMember:
        """Register as ``name``; refuse if a live runner already works under that name."""
        host, pid = socket.gethostname(), os.getpid()
        previous = await store.runner_named(run_id, name)
        if previous is not None and previous.stopped_at is None:
            age = clock.now().timestamp() - previous.heartbeat_at
            same_host = previous.host == host
            if (same_host and _alive(previous.pid) and previous.pid != pid) or (
                not same_host and age < takeover_after
            ):
                raise RunLocked(
                    f"runner {name!r} is already working this run (pid {previous.pid} on "
                    f"{previous.host}, heartbeat {age:.0f} s ago); give each runner its own "
                    "--runner-name"
                )
        runner = await store.register_runner(run_id, name, host, pid)
        log.info("joined the run as runner %r", name)
        return cls(store, run_id, runner, takeover_after)

    @property
    def id(self) -> int:
        return self.runner.id

    def endpoint_view(self, record: EndpointRecord) -> EndpointRecord:
        """This runner's websocket identity on a shared endpoint.

        Two sockets under one clientId silence each other (PROTOCOL §8.5), so each runner
        derives its own, stable across its restarts so it re-attaches to its own prompts.
        """
        client_id = uuid.uuid5(uuid.UUID(hex=record.client_id), self.runner.name).hex
        return EndpointRecord(record.id, record.url, client_id)

    async def take_over(self, endpoint_ids: Iterable[int]) -> list[tuple[JobRecord, AttemptRecord]]:
        stale_before = clock.now().timestamp() - self.takeover_after
        adopted = await self.store.take_over(self.run_id, self.id, endpoint_ids, stale_before)
        if adopted:
            log.warning(
                "took over %d in-flight job(s) of stopped runner(s): %s",
                len(adopted),
                ", ".join(job.key for job, _ in adopted[:10]),
            )
        return adopted

    async def keep_alive(self, endpoint_ids: Sequence[int], adopt: Adopt) -> None:
        """Beat, and adopt what stopped runners left, until cancelled.

        Raises RunnerSuperseded when another runner has taken this one's jobs (it was paused
        or cut off for longer than the takeover delay): its prompts are no longer its own.
        """
        interval = self.takeover_after / BEATS_PER_TAKEOVER
        while True:
            await asyncio.sleep(interval)
            if not await self.store.heartbeat(self.id):
                raise RunnerSuperseded(
                    f"runner {self.runner.name!r} missed its heartbeats and another runner took "
                    "over its jobs; run it again to rejoin"
                )
            adopted = await self.take_over(endpoint_ids)
            if adopted:
                await adopt(adopted)

    async def leave(self) -> None:
        await self.store.runner_stopped(self.id)


async def run_alongside(main: Awaitable[None], companion: Awaitable[None]) -> None:
    """Run ``main`` to its end while ``companion`` runs beside it; if the companion fails,
    ``main`` is cancelled and the companion's error is raised."""
    main_task = asyncio.ensure_future(main)
    side = asyncio.ensure_future(companion)
    try:
        await asyncio.wait({main_task, side}, return_when=asyncio.FIRST_COMPLETED)
        if side.done() and not side.cancelled() and side.exception() is not None:
            main_task.cancel()
            await asyncio.gather(main_task, return_exceptions=True)
            side.result()
        await main_task
    finally:
        for task in (main_task, side):
            task.cancel()
        await asyncio.gather(main_task, side, return_exceptions=True)
