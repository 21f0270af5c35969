"""P2 heterogeneous endpoints: three emulated servers at 1×, 2× and 4× speed.

    python -m bench.p2_heterogeneous           # 280 jobs, 20 steps × 25 ms at 1×
    python -m bench.p2_heterogeneous --quick   # 70 jobs

ideal = the makespan if every server were busy from the first moment to the last:
jobs × GPU time at 1× / (1 + 2 + 4). Prints makespan / ideal (target ≤ 1.03), and the same
against the servers' measured busy time (see P1).
"""

from __future__ import annotations

from bench import _common as c
from bench.p1_utilisation import _busy_s


def main() -> None:
    p = c.parser(__doc__ or "")
    p.add_argument("--jobs", type=int, default=280)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-ms", type=float, default=25.0)
    args = p.parse_args()
    if args.quick:
        args.jobs = 70
    c.quiet_logs()
    speeds = (1.0, 2.0, 4.0)
    gpu_1x = args.steps * args.step_ms / 1000
    ideal = args.jobs * gpu_1x / sum(speeds)
    with c.workdir(args.keep) as work:
        manifest = c.write_manifest(work / "jobs.csv", args.jobs, steps=args.steps)
        with c.emulators([(args.step_ms, s) for s in speeds]) as emus:
            settings = c.settings_for(manifest, [e.url for e in emus], work)
            result = c.run_runner(settings)
            per_server = [len(c.gpu_busy_ms(e.history())) for e in emus]
            # Measured: each server's busy time expressed in 1× seconds of work done.
            busy_1x = 0.0
            for emu in emus:
                for start, end in c.gpu_busy_ms(emu.history()):
                    busy_1x += (end - start) / 1000 * emu.speed
            _busy, _count, first, last = _busy_s(emus)
            assert result.counts.get("succeeded") == args.jobs, result.counts
    ratio = result.wall_s / ideal
    measured = result.wall_s / (busy_1x / sum(speeds))
    ok = c.report(
        "P2 heterogeneous endpoints",
        [
            ("jobs × GPU time at 1×", f"{args.jobs} × {gpu_1x:.3f} s", "speeds 1×, 2×, 4×", None),
            ("jobs per server", " / ".join(map(str, per_server)), "(info)", None),
            ("ideal makespan", f"{ideal:.2f} s", "", None),
            ("makespan", f"{result.wall_s:.2f} s", "", None),
            ("makespan / ideal", f"{ratio:.3f}", "≤ 1.03", ratio <= 1.03),
            ("makespan / measured busy", f"{measured:.3f}", "(info)", None),
            (
                "run start → first prompt",
                f"{(first - result.started_at) * 1000:.0f} ms",
                "(info)",
                None,
            ),
            (
                "last prompt → run returns",
                f"{(result.started_at + result.wall_s - last) * 1000:.0f} ms",
                "(info)",
                None,
            ),
        ],
    )
    raise SystemExit(0 if ok else c.MISSED)


if __name__ == "__main__":
    main()
