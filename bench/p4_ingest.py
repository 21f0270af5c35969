"""P4 ingest: a generated 1,000,000-row CSV manifest (images shared across rows).

    python -m bench.p4_ingest             # 1,000,000 rows, 16 images
    python -m bench.p4_ingest --quick     # 100,000 rows

Prints the time to validate and take in the manifest (the ``ingest`` step of a run: read,
check every row, write every job to a fresh run database) and the process's peak RSS. The
manifest is generated first, outside the measurement, and the RSS baseline (interpreter and
imports) is printed too.
"""

from __future__ import annotations

import asyncio
import time

from bench import _common as c


def main() -> None:
    p = c.parser(__doc__ or "")
    p.add_argument("--rows", type=int, default=1_000_000)
    args = p.parse_args()
    if args.quick:
        args.rows = 100_000
    c.quiet_logs()
    from batch_runner.runner import RUN_KEY, ingest, template_for
    from batch_runner.store import Store

    with c.workdir(args.keep) as work:
        manifest = c.write_manifest(work / "jobs.csv", args.rows, images=16)
        settings = c.settings_for(manifest, ["http://127.0.0.1:9"], work)
        template = template_for(settings)

        async def go() -> tuple[float, int]:
            async with Store.open(settings.db) as store:
                run = await store.ensure_run(RUN_KEY, str(manifest))
                t0 = time.perf_counter()
                report, _ = await ingest(store, run.id, settings, template)
                return time.perf_counter() - t0, report.added

        base_rss = c.rss_mb()
        elapsed, added = asyncio.run(go())
        peak = c.peak_rss_mb()
        workers_peak = c.children_peak_rss_mb()
        assert added == args.rows, added
        size_mb = manifest.stat().st_size / 1e6
    ok = c.report(
        "P4 ingest",
        [
            ("rows", f"{args.rows:,}", f"{size_mb:.0f} MB CSV, 16 images", None),
            (
                "ingest time",
                f"{elapsed:.2f} s",
                "≤ 10 s",
                elapsed <= 10.0,
            ),
            ("rows/s", f"{args.rows / elapsed:,.0f}", "(info)", None),
            ("RSS before ingest", f"{base_rss:.0f} MB", "(info)", None),
            ("peak RSS", f"{peak:.0f} MB", "≤ 200 MB", peak <= 200),
            # Forked from the runner's process: most of their pages are shared with it.
            ("parsing workers' peak RSS", f"{workers_peak:.0f} MB", "(info, each)", None),
        ],
    )
    raise SystemExit(0 if ok else c.MISSED)


if __name__ == "__main__":
    main()
