"""``batch-runner status --watch``: follow a run started elsewhere, from its database alone."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from batch_runner.dashboard import Snapshot, duration, render, summary_line
from batch_runner.errors import InputError
from batch_runner.progress import snapshot
from batch_runner.status import require_db
from batch_runner.store import Store
from batch_runner.store.location import DbLocation


def endpoints_table(snap: Snapshot, videos: dict[str, int]) -> Table:
    """Per endpoint: videos made over the whole run and the current speed."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("endpoint", no_wrap=True)
    table.add_column("videos", justify="right")
    table.add_column("speed", justify="right")
    for url in sorted(videos):
        rate = snap.rates.get(url)
        table.add_row(url, str(videos[url]), f"{duration(1 / rate)}/video" if rate else "—")
    return table


def view(manifest: str, snap: Snapshot, videos: dict[str, int]) -> RenderableType:
    parts: list[RenderableType] = [Text(manifest, style="bold"), render(snap)]
    if videos:
        parts.insert(2, endpoints_table(snap, videos))
    return Group(*parts)


async def watch_status(db: DbLocation, console: Console, interval: float) -> None:
    """Refresh until SIGINT or SIGTERM: a live view on a terminal, a plain line per tick
    otherwise.

    A signal ends the loop between two refreshes, and the store then closes as at any
    other end, instead of a cancellation landing inside a read on the store's connections.
    """
    require_db(db)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Store.open(db, exclusive=False) as store:
        run = await store.only_run()
        if run is None:
            raise InputError(f"{db} holds no run yet; start it with `batch-runner run` first")
        if not console.is_terminal:
            while not stop.is_set():
                console.print(summary_line(await snapshot(store, run.id)), highlight=False)
                await _pause(stop, interval)
            return
        with Live(console=console, auto_refresh=False) as live:
            while not stop.is_set():
                snap = await snapshot(store, run.id)
                per_endpoint = await store.endpoint_counts(run.id)
                videos = {url: states.get("succeeded", 0) for url, states in per_endpoint.items()}
                live.update(view(run.manifest, snap, videos), refresh=True)
                await _pause(stop, interval)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
