"""What the live display shows, as plain values and rich renderables; no I/O.

A :class:`Snapshot` is taken from the store (counts, per-endpoint speed, recent failures) and
from the lanes (health, the prompt running now and its sampler step). Throughput is the sum
of each endpoint's observed speed, so an ETA follows the GPUs actually working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from batch_runner.states import JobState
from batch_runner.store.repository import Failure

#: Speeds are measured over the videos finished in this trailing window.
SPEED_WINDOW_S = 600.0

_RUNNING = (JobState.PREPARING, JobState.SUBMITTED, JobState.RUNNING, JobState.FETCHING)
_WAITING = (JobState.PENDING, JobState.RETRY_WAIT)


@dataclass(frozen=True)
class LaneView:
    """One endpoint as the display shows it."""

    url: str
    name: str
    healthy: bool
    job: str | None = None
    node: str | None = None
    step: tuple[int, int] | None = None
    #: prompts submitted there that have not started yet
    queued: int = 0
    done: int = 0
    last_error: str | None = None


def rates(speeds: Mapping[str, tuple[int, float, float]]) -> dict[str, float]:
    """Videos per second per endpoint from ``Store.speeds``: the videos finished in the
    window over the time from the first one's start to the last one's end (a GPU makes one
    after another, so this is its working speed, however many prompts wait in its queue)."""
    out = {}
    for url, (count, first_start, last_finish) in speeds.items():
        span = last_finish - first_start
        if count and span > 0:
            out[url] = count / span
    return out


@dataclass(frozen=True)
class Snapshot:
    counts: Mapping[JobState, int]
    #: videos per second per endpoint URL, over the speed window
    rates: Mapping[str, float] = field(default_factory=dict)
    lanes: Sequence[LaneView] = ()
    failures: Sequence[Failure] = ()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        done = (JobState.SUCCEEDED, JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED)
        return sum(self.counts.get(s, 0) for s in done)

    @property
    def running(self) -> int:
        return sum(self.counts.get(s, 0) for s in _RUNNING)

    @property
    def waiting(self) -> int:
        return sum(self.counts.get(s, 0) for s in _WAITING)

    @property
    def throughput(self) -> float:
        """Videos per second from the endpoints that can work now (all, without lanes)."""
        if not self.lanes:
            return sum(self.rates.values())
        return sum(self.rates.get(lane.url, 0.0) for lane in self.lanes if lane.healthy)

    @property
    def eta(self) -> float | None:
        """Seconds until the unfinished jobs are done at the current throughput."""
        left = self.running + self.waiting
        if left == 0:
            return 0.0
        return left / self.throughput if self.throughput > 0 else None


def duration(seconds: float | None) -> str:
    """``2.5s``, ``45s``, ``12m 05s``, ``3h 20m``, ``2d 4h``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def per_minute(rate: float) -> str:
    return f"{rate * 60:.1f} videos/min"


def summary_line(snap: Snapshot) -> str:
    """The one-line progress: counts, throughput and ETA (the non-terminal display)."""
    c = snap.counts
    line = (
        f"{c.get(JobState.SUCCEEDED, 0)} done, {c.get(JobState.FAILED, 0)} failed, "
        f"{snap.running} running, {snap.waiting} pending"
    )
    left = snap.running + snap.waiting
    if snap.throughput > 0:
        line += f" · {per_minute(snap.throughput)}"
        if left:
            line += f" · ETA {duration(snap.eta)}"
    elif left:
        line += " · ETA when the first videos are done"
    return line


def _now_doing(lane: LaneView) -> Text:
    if not lane.healthy:
        return Text("—", style="dim")
    if lane.job is None:
        return Text("idle" if not lane.queued else f"{lane.queued} queued", style="dim")
    text = Text(lane.job, style="bold")
    if lane.node is not None:
        text.append(f" · node {lane.node}")
    if lane.step is not None:
        text.append(f" · step {lane.step[0]}/{lane.step[1]}", style="cyan")
    if lane.queued:
        text.append(f" (+{lane.queued} queued)", style="dim")
    return text


def lanes_table(snap: Snapshot) -> Table:
    table = Table(box=None, pad_edge=False, expand=True, header_style="bold")
    table.add_column("endpoint", no_wrap=True)
    table.add_column("health", no_wrap=True)
    table.add_column("now", ratio=3, no_wrap=True, overflow="ellipsis")
    table.add_column("done", justify="right")
    table.add_column("speed", justify="right", no_wrap=True)
    errors = any(lane.last_error for lane in snap.lanes)
    if errors:  # the column takes room from "now" only when there is something to show
        table.add_column("last error", ratio=2, overflow="ellipsis", no_wrap=True)
    for lane in snap.lanes:
        rate = snap.rates.get(lane.url)
        cells: list[Text | str] = [
            lane.name,
            Text("up", style="green") if lane.healthy else Text("down", style="bold red"),
            _now_doing(lane),
            str(lane.done),
            f"{duration(1 / rate)}/video" if rate else "—",
        ]
        if errors:
            cells.append(Text(lane.last_error or "", style="red"))
        table.add_row(*cells)
    return table


def failures_table(failures: Sequence[Failure]) -> Table:
    table = Table(box=None, pad_edge=False, expand=True, header_style="bold", title_justify="left")
    table.title = "recent failures"
    table.add_column("job", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("tries", justify="right")
    table.add_column("reason", overflow="ellipsis", no_wrap=True, ratio=1)
    for f in failures:
        style = "red" if f.state is JobState.FAILED else "yellow"
        table.add_row(f.key, Text(f.state.value, style=style), str(f.attempts), f.error or "")
    return table


def render(snap: Snapshot) -> RenderableType:
    """The whole live display: overall bar and numbers, one line per endpoint, failures."""
    bar = Table.grid(expand=True, padding=(0, 1))
    bar.add_column(no_wrap=True)
    bar.add_column(ratio=1)
    bar.add_column(no_wrap=True, justify="right")
    pct = f"{100 * snap.finished / snap.total:.0f}%" if snap.total else ""
    bar.add_row(
        Text("videos", style="bold"),
        ProgressBar(total=max(snap.total, 1), completed=snap.finished),
        f"{snap.finished}/{snap.total} {pct}",
    )
    parts: list[RenderableType] = [bar, Text(summary_line(snap))]
    if snap.lanes:
        parts.append(lanes_table(snap))
    if snap.failures:
        parts.append(failures_table(snap.failures))
    return Group(*parts)
