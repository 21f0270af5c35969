"""Which endpoint should take one of the last jobs of a run: pure arithmetic, no I/O.

While plenty of jobs wait, every endpoint with a free slot takes one (the scheduler is
pull-based, so a faster GPU simply comes back sooner). Near the end of a run that is wrong
on GPUs of different speeds: a last job queued behind a slow GPU finishes long after a fast
one has gone idle, and the makespan is that job's. So when few jobs are left, each goes in
turn to the endpoint that would finish it first (greedy earliest finish time), and a slot
takes a job only when its endpoint is among those chosen.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """An endpoint's work as far as the scheduler can tell, in seconds from now."""

    #: until the prompts it holds (running, queued on the server, being prepared) are done
    busy_for: float
    #: GPU time one job takes there (measured; an estimate until jobs have finished)
    pace: float


def takes_a_job(asking: Load, others: Sequence[Load], waiting: int) -> bool:
    """Whether the asking endpoint finishes one of ``waiting`` jobs first when each job goes,
    in turn, to the endpoint that would finish it earliest. A tie goes to the asking
    endpoint: a GPU never idles over a draw."""
    if waiting <= 0:
        return False
    mine = asking.busy_for + asking.pace
    finishes = [(o.busy_for + o.pace, n) for n, o in enumerate(others)]
    heapq.heapify(finishes)
    for _ in range(waiting):
        if not finishes or mine <= finishes[0][0]:
            return True
        finish, n = finishes[0]
        heapq.heapreplace(finishes, (finish + others[n].pace, n))
    return False


def estimate_paces(measured: Sequence[float | None]) -> list[float]:
    """Every endpoint's pace, an endpoint not yet measured taking the mean of those that are
    (with nothing measured, all are equal and only the work they hold tells them apart)."""
    known = [p for p in measured if p is not None]
    default = sum(known) / len(known) if known else 1.0
    return [default if p is None else p for p in measured]
