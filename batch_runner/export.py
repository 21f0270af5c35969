"""Results export (CSV or JSONL), one row per job in manifest order."""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator, Mapping
from typing import IO, Any

from batch_runner.store import Store

COLUMNS = (
    "job_id",
    "line",
    "state",
    "image",
    "prompt",
    "seed",
    "width",
    "height",
    "frames",
    "fps",
    "endpoint",
    "prompt_id",
    "output_path",
    "output_sha256",
    "output_size",
    "attempts",
    "submitted_at",
    "started_at",
    "finished_at",
    "duration_s",
    "error_kind",
    "last_error",
)
# A spreadsheet treats a cell starting with one of these as a formula.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: Any) -> Any:
    """Make a CSV cell inert in spreadsheets (formula injection) by prefixing a quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def export_record(row: Mapping[str, Any]) -> dict[str, Any]:
    spec = json.loads(row["spec"])
    resolved = json.loads(row["resolved"]) if row["resolved"] else {}
    started, finished = row["started_at"], row["finished_at"]
    return {
        "job_id": row["key"],
        "line": row["line"],
        "state": row["state"],
        "image": spec.get("image"),
        "prompt": spec.get("prompt"),
        "seed": resolved.get("seed", spec.get("seed")),
        "width": resolved.get("width"),
        "height": resolved.get("height"),
        "frames": resolved.get("frames"),
        "fps": resolved.get("fps"),
        "endpoint": row["endpoint"],
        "prompt_id": row["prompt_id"],
        "output_path": row["output_path"],
        "output_sha256": row["output_sha256"],
        "output_size": row["output_size"],
        "attempts": row["attempts"],
        "submitted_at": row["submitted_at"],
        "started_at": started,
        "finished_at": finished,
        "duration_s": round(finished - started, 3) if started and finished else None,
        "error_kind": row["error_kind"],
        "last_error": row["last_error"],
    }


async def records(store: Store, run_id: int) -> AsyncIterator[dict[str, Any]]:
    async for row in store.export_rows(run_id):
        yield export_record(row)


async def write_csv(store: Store, run_id: int, out: IO[str]) -> int:
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    count = 0
    async for record in records(store, run_id):
        writer.writerow({k: neutralise(v) for k, v in record.items()})
        count += 1
    return count


async def write_jsonl(store: Store, run_id: int, out: IO[str]) -> int:
    count = 0
    async for record in records(store, run_id):
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    return count
