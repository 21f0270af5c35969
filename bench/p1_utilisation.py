"""P1 utilisation: 8 emulated endpoints (separate processes), 400 jobs of fixed GPU time.

    python -m bench.p1_utilisation            # 400 jobs, 20 steps × 25 ms, 8 endpoints
    python -m bench.p1_utilisation --quick    # 64 jobs

Prints makespan / ideal for the runner, with ideal = total GPU time / endpoints, and the same
ratio for the baseline client (bench/baseline_client.py: one job at a time per endpoint,
polling /queue and /history every --poll seconds). "GPU time" is the emulated sampler time
(steps × step_ms); the ratio against the servers' measured busy time (execution_start to
execution_success, which also holds the emulator's own per-prompt work such as encoding the
video) is printed too, since that is the part a client can influence.
"""

from __future__ import annotations

import asyncio

from bench import _common as c


def _busy_s(emus: list[c.EmulatorProcess]) -> tuple[float, int, float, float]:
    """Total busy seconds, prompts, first start and last end (epoch s) over all servers."""
    total, count, first, last = 0.0, 0, float("inf"), 0.0
    for emu in emus:
        for start, end in c.gpu_busy_ms(emu.history()):
            total += (end - start) / 1000
            count += 1
            first, last = min(first, start / 1000), max(last, end / 1000)
    return total, count, first, last


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def main() -> None:
    p = c.parser(__doc__ or "")
    p.add_argument("--jobs", type=int, default=400)
    p.add_argument("--endpoints", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-ms", type=float, default=25.0)
    p.add_argument("--poll", type=float, default=1.0, help="baseline poll interval, s")
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.jobs = 64
    c.quiet_logs()
    gpu_s = args.steps * args.step_ms / 1000
    ideal = args.jobs * gpu_s / args.endpoints
    rows: list[tuple[str, str, str, bool | None]] = []
    with c.workdir(args.keep) as work:
        manifest = c.write_manifest(work / "jobs.csv", args.jobs, steps=args.steps)
        specs = [(args.step_ms, 1.0)] * args.endpoints
        with c.emulators(specs) as emus:
            settings = c.settings_for(manifest, [e.url for e in emus], work)
            result = c.run_runner(settings)
            busy, count, first, last = _busy_s(emus)
            gaps = [g for e in emus for g in e.stats()["switch_gaps_ms"]]
            assert result.counts.get("succeeded") == args.jobs, result.counts
        ratio = result.wall_s / ideal
        measured = result.wall_s / (busy / args.endpoints)
        rows += [
            (
                "jobs × GPU time",
                f"{args.jobs} × {gpu_s:.3f} s",
                f"{args.endpoints} endpoints",
                None,
            ),
            ("ideal makespan", f"{ideal:.2f} s", "", None),
            ("runner makespan", f"{result.wall_s:.2f} s", "", None),
            ("runner makespan / ideal", f"{ratio:.3f}", "≤ 1.01", ratio <= 1.01),
            ("runner / measured server busy", f"{measured:.3f}", "(info)", None),
            ("server busy per prompt", f"{busy / max(count, 1) * 1000:.0f} ms", "(info)", None),
            (
                "run start → first prompt starts",
                f"{(first - result.started_at) * 1000:.0f} ms",
                "(info)",
                None,
            ),
            (
                "last prompt ends → run returns",
                f"{(result.started_at + result.wall_s - last) * 1000:.0f} ms",
                "(info)",
                None,
            ),
            ("runner CPU per job", f"{result.cpu_s / args.jobs * 1000:.1f} ms", "(info)", None),
            (
                "switch gap mean / max",
                f"{_mean(gaps):.1f} / {max(gaps, default=0):.1f} ms",
                "(info; P7)",
                None,
            ),
        ]
        if not args.no_baseline:
            from bench.baseline_client import run_baseline

            with c.emulators(specs) as emus:
                base = asyncio.run(
                    run_baseline(manifest, [e.url for e in emus], work / "base", poll_s=args.poll)
                )
            rows += [
                ("baseline makespan", f"{base['wall_s']:.2f} s", f"poll {args.poll:g} s", None),
                ("baseline makespan / ideal", f"{base['wall_s'] / ideal:.3f}", "(info)", None),
            ]
    ok = c.report("P1 utilisation", rows)
    raise SystemExit(0 if ok else c.MISSED)


if __name__ == "__main__":
    main()
