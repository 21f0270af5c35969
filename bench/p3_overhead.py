"""P3 overhead: the runner's own CPU time per job, against endpoints with zero GPU time.

    python -m bench.p3_overhead            # 20,000 jobs, 2 endpoints, 0 ms steps
    python -m bench.p3_overhead --quick    # 2,000 jobs

Prints the runner process's CPU time (user + system, every thread; the emulators are other
processes) per job, and jobs/s. Each job is the full flow: claim, image check, upload (once
per endpoint and image), render, write-ahead attempt, POST /prompt, websocket follow-up,
download, decode-verify, fsync, success record.
"""

from __future__ import annotations

from bench import _common as c


def main() -> None:
    p = c.parser(__doc__ or "")
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--endpoints", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--profile", help="write a pyinstrument HTML profile here")
    args = p.parse_args()
    if args.quick:
        args.jobs = 2_000
    c.quiet_logs()
    with c.workdir(args.keep) as work:
        manifest = c.write_manifest(
            work / "jobs.csv", args.jobs, steps=args.steps, frames=args.frames
        )
        with c.emulators([(0.0, 1.0)] * args.endpoints) as emus:
            settings = c.settings_for(manifest, [e.url for e in emus], work)
            profiler = None
            if args.profile:
                from pyinstrument import Profiler

                profiler = Profiler(async_mode="disabled")
                profiler.start()
            result = c.run_runner(settings)
            if profiler is not None:
                profiler.stop()
                with open(args.profile, "w") as handle:
                    handle.write(
                        profiler.output_text(unicode=False, show_all=False)
                        if args.profile.endswith(".txt")
                        else profiler.output_html()
                    )
            assert result.counts.get("succeeded") == args.jobs, result.counts
    per_job = result.cpu_s / args.jobs * 1000
    ok = c.report(
        "P3 overhead",
        [
            ("jobs", f"{args.jobs}", f"{args.endpoints} endpoints, 0 ms steps", None),
            ("wall", f"{result.wall_s:.1f} s", "", None),
            ("runner CPU", f"{result.cpu_s:.1f} s", "", None),
            ("runner CPU per job", f"{per_job:.2f} ms", "≤ 1 ms", per_job <= 1.0),
            ("jobs/s", f"{args.jobs / result.wall_s:.0f}", "(info)", None),
        ],
    )
    raise SystemExit(0 if ok else c.MISSED)


if __name__ == "__main__":
    main()
