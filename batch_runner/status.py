"""Read-side commands on a run database: status, retry, export."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from batch_runner import export
from batch_runner.errors import InputError
from batch_runner.progress import describe
from batch_runner.store import RunRecord, Store
from batch_runner.store.location import DbLocation


async def _the_run(store: Store) -> RunRecord:
    run = await store.only_run()
    if run is None:
        raise InputError(f"{store.db} holds no run yet")
    return run


def require_db(db: DbLocation) -> None:
    # A server database is checked by connecting to it; a file must exist already.
    if isinstance(db, Path) and not db.is_file():
        raise InputError(f"no run database at {db}; start the run first or give --db")


async def print_status(db: DbLocation, console: Console) -> int:
    require_db(db)
    async with Store.open(db, exclusive=False) as store:
        run = await _the_run(store)
        counts = await store.counts(run.id)
        per_endpoint = await store.endpoint_counts(run.id)
        failures = await store.failures(run.id)
    console.print(f"[bold]{run.manifest}[/]: {describe(counts)}")
    states = Table("state", "jobs", title="jobs by state")
    for state, n in counts.items():
        if n:
            states.add_row(state.value, str(n))
    console.print(states)
    if per_endpoint:
        table = Table("endpoint", "attempts by state", title="per endpoint")
        for url, by_state in sorted(per_endpoint.items()):
            table.add_row(url, ", ".join(f"{s} {n}" for s, n in sorted(by_state.items())))
        console.print(table)
    if failures:
        table = Table("line", "job", "state", "tries", "reason", title="failures", expand=True)
        for f in failures:
            table.add_row(str(f.line), f.key, f.state.value, str(f.attempts), f.error or "")
        console.print(table)
    return 0


async def retry_failed(db: DbLocation, console: Console) -> int:
    require_db(db)
    async with Store.open(db) as store:
        run = await _the_run(store)
        n = await store.retry_failed(run.id)
    console.print(f"{n} failed job(s) sent back to pending; run the batch again to retry them")
    return 0


async def export_results(db: DbLocation, output: Path | None, fmt: str) -> int:
    require_db(db)
    writer = export.write_jsonl if fmt == "jsonl" else export.write_csv
    async with Store.open(db, exclusive=False) as store:
        run = await _the_run(store)
        if output is None:
            await writer(store, run.id, sys.stdout)
        else:
            with output.open("w", encoding="utf-8", newline="") as handle:
                await writer(store, run.id, handle)
    return 0
