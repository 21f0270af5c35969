"""``batch-runner report``: one self-contained HTML page for reviewing a batch.

The page works offline when opened from disk: styles are inline, thumbnails are small JPEG
data URIs, and each video is a relative link played by the browser's own <video> player, so
the page and the output folder can be moved together. Everything taken from the run
(prompts, ids, error messages, file names) is user or server text and is escaped; the page
carries no script, and its content security policy forbids any.
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from PIL import Image, UnidentifiedImageError

from batch_runner import export
from batch_runner.errors import InputError
from batch_runner.states import JobState
from batch_runner.store import Store
from batch_runner.store.location import DbLocation

THUMBNAIL_SIDE = 160
#: Job ids listed under one failure reason; the rest are counted.
IDS_PER_REASON = 30

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2430;background:#f7f8fa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .5em}
.meta{color:#5b6472}
.cards{display:flex;flex-wrap:wrap;gap:.6em;margin:1em 0}
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:.5em .9em;min-width:7em}
.card b{display:block;font-size:1.5em}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border:1px solid #dde1e7;padding:.35em .5em;text-align:left;vertical-align:top}
th{background:#eef1f5}
td.prompt{max-width:28em;white-space:pre-wrap;overflow-wrap:anywhere}
td.err{max-width:30em;overflow-wrap:anywhere;color:#8a1c1c}
img.thumb{max-width:160px;max-height:160px;display:block}
video{max-width:320px;max-height:200px;display:block;background:#000}
.state{font-weight:600}.succeeded{color:#1b7a36}.failed{color:#b42318}
.skipped,.cancelled{color:#6b7280}.pending,.retry_wait,.running{color:#9a6700}
"""

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; media-src *"


def esc(value: object) -> str:
    """HTML-escape any value for element content and quoted attributes; None is empty."""
    return "" if value is None else html.escape(str(value), quote=True)


@lru_cache(maxsize=512)
def thumbnail(image_path: str) -> str | None:
    """A small JPEG data URI of the input image, or None when it cannot be read any more.

    Cached: many rows of a batch often share one image."""
    try:
        with Image.open(image_path) as image:
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=75)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def relative_link(target: str, page_dir: Path) -> str:
    """A URL from the page's folder to ``target``, percent-encoded (names may hold # or ?)."""
    rel = os.path.relpath(target, page_dir)
    return quote(Path(rel).as_posix())


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def when(epoch: float | None) -> str:
    return "" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


@dataclass
class Summary:
    """The numbers at the top of the page, gathered in one pass over the jobs."""

    counts: Counter[str] = field(default_factory=Counter)
    per_endpoint: Counter[str] = field(default_factory=Counter)
    durations: list[float] = field(default_factory=list)
    first_submit: float | None = None
    last_finish: float | None = None
    #: (error kind, message) → job ids
    failures: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, record: Mapping[str, Any]) -> None:
        state = str(record["state"])
        self.counts[state] += 1
        if state == JobState.SUCCEEDED and record["endpoint"]:
            self.per_endpoint[str(record["endpoint"])] += 1
        if record["duration_s"] is not None and state == JobState.SUCCEEDED:
            self.durations.append(float(record["duration_s"]))
        if record["submitted_at"] is not None:
            start = float(record["submitted_at"])
            self.first_submit = min(self.first_submit or start, start)
        if record["finished_at"] is not None:
            end = float(record["finished_at"])
            self.last_finish = max(self.last_finish or end, end)
        if state in (JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED):
            reason = (str(record["error_kind"] or state), str(record["last_error"] or "no reason"))
            self.failures.setdefault(reason, []).append(str(record["job_id"]))


def render_head(title: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n"
    )


def render_summary(manifest: str, summary: Summary) -> str:
    total = sum(summary.counts.values())
    unfinished = total - sum(
        summary.counts[s] for s in ("succeeded", "failed", "skipped", "cancelled")
    )
    cards: list[tuple[str, object]] = [
        ("jobs", total),
        ("succeeded", summary.counts["succeeded"]),
        ("failed", summary.counts["failed"]),
        ("skipped", summary.counts["skipped"]),
        ("cancelled", summary.counts["cancelled"]),
        ("unfinished", unfinished),
    ]
    if summary.durations:
        ordered = sorted(summary.durations)
        cards.append(("median time per video", duration(ordered[len(ordered) // 2])))
    if summary.first_submit is not None and summary.last_finish is not None:
        cards.append(("wall clock", duration(summary.last_finish - summary.first_submit)))
    parts = [
        f"<h1>Batch report: {esc(Path(manifest).name)}</h1>",
        f"<p class=meta>{esc(manifest)} · generated {esc(when(time.time()))}</p>",
        "<div class=cards id=summary>",
        *(f"<div class=card><b>{esc(v)}</b>{esc(k)}</div>" for k, v in cards),
        "</div>",
    ]
    if summary.per_endpoint:
        parts.append("<h2>Videos per endpoint</h2><table id=endpoints><tr><th>endpoint<th>videos")
        parts += [f"<tr><td>{esc(url)}<td>{n}" for url, n in sorted(summary.per_endpoint.items())]
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def render_failures(failures: Mapping[tuple[str, str], list[str]]) -> str:
    if not failures:
        return "<h2>Failures</h2><p id=failures>None.</p>\n"
    rows = []
    ordered = sorted(failures.items(), key=lambda item: (-len(item[1]), item[0]))
    for (kind, message), ids in ordered:
        shown = ", ".join(esc(i) for i in ids[:IDS_PER_REASON])
        more = f" and {len(ids) - IDS_PER_REASON} more" if len(ids) > IDS_PER_REASON else ""
        rows.append(
            f"<tr><td>{len(ids)}<td>{esc(kind)}<td class=err>{esc(message)}<td>{shown}{more}"
        )
    return (
        "<h2>Failures by reason</h2><table id=failures>"
        "<tr><th>jobs<th>kind<th>reason<th>job ids\n" + "\n".join(rows) + "</table>\n"
    )


def render_row(record: Mapping[str, Any], thumb: str | None, page_dir: Path) -> str:
    """One job as a table row: thumbnail, prompt and parameters, video, status, timings."""
    state = str(record["state"])
    image = record["image"]
    picture = f'<img class=thumb alt="input image" src="{esc(thumb)}">' if thumb else ""
    if image:
        picture += f"<small>{esc(Path(str(image)).name)}</small>"
    if state == JobState.SUCCEEDED and record["output_path"]:
        link = esc(relative_link(str(record["output_path"]), page_dir))
        video = (
            f'<video controls preload=metadata src="{link}"></video>'
            f'<small><a href="{link}">{esc(Path(str(record["output_path"])).name)}</a></small>'
        )
    else:
        video = ""
    size = f"{record['width']}×{record['height']}" if record["width"] else ""
    params = " · ".join(
        p
        for p in (
            f"seed {esc(record['seed'])}" if record["seed"] is not None else "",
            esc(size),
            f"{esc(record['frames'])} frames" if record["frames"] else "",
            f"{esc(record['fps'])} fps" if record["fps"] else "",
        )
        if p
    )
    timing = "<br>".join(
        t
        for t in (
            f"submitted {esc(when(record['submitted_at']))}" if record["submitted_at"] else "",
            f"took {esc(duration(record['duration_s']))}"
            if record["duration_s"] is not None
            else "",
            f"{esc(record['attempts'])} attempt(s)" if record["attempts"] else "",
        )
        if t
    )
    return (
        f'<tr class=job id="job-{esc(record["job_id"])}"><td>{esc(record["line"])}'
        f"<td>{picture}<td>{esc(record['job_id'])}"
        f"<td class=prompt>{esc(record['prompt'])}<br><small>{params}</small>"
        f"<td>{video}<td class='state {esc(state)}'>{esc(state)}"
        f"<td>{esc(record['endpoint'])}<td>{timing}<td class=err>{esc(record['last_error'])}\n"
    )


_TABLE_HEAD = (
    "<h2>Jobs</h2><table id=jobs><tr><th>line<th>input<th>job<th>prompt<th>video<th>status"
    "<th>endpoint<th>timings<th>last error\n"
)


async def write_report(store: Store, run_id: int, manifest: str, out: IO[str], page: Path) -> int:
    """Write the page for ``run_id`` to ``out`` (to be saved at ``page``); return the job count.

    Two streamed passes over the jobs: the summary and failures first, then the rows, so a
    run of any size is never held in memory.
    """
    summary = Summary()
    async for record in export.records(store, run_id):
        summary.add(record)
    out.write(render_head(f"Batch report: {Path(manifest).name}"))
    out.write(render_summary(manifest, summary))
    out.write(render_failures(summary.failures))
    out.write(_TABLE_HEAD)
    count = 0
    async for record in export.records(store, run_id):
        image = record["image"]
        thumb = await asyncio.to_thread(thumbnail, str(image)) if image else None
        out.write(render_row(record, thumb, page.parent))
        count += 1
    out.write("</table>\n</body></html>\n")
    return count


def default_page(db: DbLocation, manifest: str) -> Path:
    """Beside an SQLite run database (in the current folder for a server database):
    ``jobs.report.html`` for ``jobs.csv``."""
    folder = db.parent if isinstance(db, Path) else Path.cwd()
    return folder / f"{Path(manifest).stem}.report.html"


async def make_report(db: DbLocation, output: Path | None) -> Path:
    """Write the report of the run in ``db``; return where it went."""
    from batch_runner.status import require_db

    require_db(db)
    async with Store.open(db, exclusive=False) as store:
        run = await store.only_run()
        if run is None:
            raise InputError(f"{db} holds no run yet; start it with `batch-runner run` first")
        page = (output or default_page(db, run.manifest)).absolute()
        page.parent.mkdir(parents=True, exist_ok=True)
        part = page.with_name(page.name + ".part")
        with part.open("w", encoding="utf-8") as handle:
            await write_report(store, run.id, run.manifest, handle, page)
        part.replace(page)
    return page
