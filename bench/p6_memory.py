"""P6 memory: RSS growth of the runner across 100,000 jobs.

    python -m bench.p6_memory            # 100,000 jobs, 2 endpoints, 0 ms steps, 1 step
    python -m bench.p6_memory --quick    # 10,000 jobs

RSS is sampled every 0.5 s while the run works. Growth = RSS at the end minus RSS once the
first 5% of the jobs are done (imports, caches, connections and SQLite's page cache are
warm by then). Jobs use 1 sampler step and 5 frames so the run stays short; the runner's
per-job bookkeeping is the same as for a full-size job.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import _common as c


class Sampler:
    def __init__(self, db: c.Path, warm_after: int) -> None:
        self.db = db
        self.warm_after = warm_after
        self.result: dict[str, Any] = {"samples": []}

    async def __call__(self) -> None:
        import sqlite3

        warm = None
        while True:
            await asyncio.sleep(0.5)
            try:
                with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
                    done = conn.execute(
                        "SELECT count(*) FROM jobs WHERE state = 'succeeded'"
                    ).fetchone()[0]
            except sqlite3.Error:
                continue
            rss = c.rss_mb()
            self.result["samples"].append((done, rss))
            if warm is None and done >= self.warm_after:
                warm = rss
                self.result["warm"] = (done, rss)


def main() -> None:
    p = c.parser(__doc__ or "")
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--endpoints", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.jobs = 10_000
    c.quiet_logs()
    with c.workdir(args.keep) as work:
        manifest = c.write_manifest(work / "jobs.csv", args.jobs, steps=1, frames=5)
        with c.emulators([(0.0, 1.0)] * args.endpoints) as emus:
            settings = c.settings_for(manifest, [e.url for e in emus], work)
            sampler = Sampler(settings.db, args.jobs // 20)
            result = c.run_runner(settings, sampler=sampler)
            assert result.counts.get("succeeded") == args.jobs, result.counts
    end_rss = c.rss_mb()
    warm_done, warm_rss = sampler.result.get("warm", (0, end_rss))
    growth = end_rss - warm_rss
    peak = max((r for _, r in sampler.result["samples"]), default=end_rss)
    ok = c.report(
        "P6 memory",
        [
            ("jobs", f"{args.jobs:,}", f"{args.endpoints} endpoints, 0 ms steps", None),
            ("wall", f"{result.wall_s:.0f} s", "(info)", None),
            ("RSS when warm", f"{warm_rss:.1f} MB", f"after {warm_done:,} jobs", None),
            ("RSS at the end", f"{end_rss:.1f} MB", "", None),
            ("peak RSS while running", f"{peak:.1f} MB", "(info)", None),
            ("growth", f"{growth:.1f} MB", "≤ 20 MB", growth <= 20.0),
        ],
    )
    raise SystemExit(0 if ok else c.MISSED)


if __name__ == "__main__":
    main()
