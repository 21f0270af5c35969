"""P7 pipelining: the gap between one prompt finishing and the next starting, per server.

    python -m bench.p7_pipelining           # 4 endpoints × 50 jobs, 20 steps × 25 ms
    python -m bench.p7_pipelining --quick   # 4 endpoints × 12 jobs

The emulator records every gap (``switch_gaps_ms`` in /emulator/stats). First the server's
own switch time is measured: a direct client fills one server's queue with every prompt at
once, so the next prompt is always waiting. Then the runner drives the servers; its gaps
should match that, which means the next prompt was already in the server's queue.
"""

from __future__ import annotations

import asyncio
import statistics

import aiohttp

from bench import _common as c


async def _fill_queue(url: str, manifest: c.Path, count: int) -> None:
    """POST ``count`` prompts at once (no waiting between them), then wait for the queue."""
    from batch_runner.manifest import JobSpec, read_manifest
    from batch_runner.workflow import probe_image_size, render, resolve, wan22_template

    template = wan22_template()
    specs = [s for s in read_manifest(manifest) if isinstance(s, JobSpec)][:count]
    async with aiohttp.ClientSession() as session:
        names = {}
        for spec in specs:
            if spec.image not in names:
                form = aiohttp.FormData()
                form.add_field("image", spec.image.read_bytes(), filename=spec.image.name)
                async with session.post(f"{url}/upload/image", data=form) as answer:
                    names[spec.image] = (await answer.json())["name"]
        for spec in specs:
            resolved = resolve(spec, probe_image_size(spec.image), template.defaults)
            graph = render(template, resolved, names[spec.image])
            async with session.post(f"{url}/prompt", json={"prompt": graph}) as answer:
                answer.raise_for_status()
        while True:
            await asyncio.sleep(0.2)
            async with session.get(f"{url}/queue") as answer:
                queue = await answer.json()
            if not queue["queue_running"] and not queue["queue_pending"]:
                return


def _describe(gaps: list[float]) -> str:
    if not gaps:
        return "no gaps"
    p95 = sorted(gaps)[max(0, int(len(gaps) * 0.95) - 1)]
    return f"{statistics.mean(gaps):.2f} / {p95:.2f} / {max(gaps):.2f}"


def main() -> None:
    p = c.parser(__doc__ or "")
    p.add_argument("--endpoints", type=int, default=4)
    p.add_argument("--jobs-per-endpoint", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-ms", type=float, default=25.0)
    args = p.parse_args()
    if args.quick:
        args.jobs_per_endpoint = 12
    c.quiet_logs()
    jobs = args.endpoints * args.jobs_per_endpoint
    rows: list[tuple[str, str, str, bool | None]] = []
    with c.workdir(args.keep) as work:
        manifest = c.write_manifest(work / "jobs.csv", jobs, steps=args.steps)
        with c.emulators([(args.step_ms, 1.0)]) as (emu,):
            asyncio.run(_fill_queue(emu.url, manifest, args.jobs_per_endpoint))
            own = emu.stats()["switch_gaps_ms"]
        rows.append(("server's own switch time", _describe(own), "mean / p95 / max ms", None))
        with c.emulators([(args.step_ms, 1.0)] * args.endpoints) as emus:
            settings = c.settings_for(manifest, [e.url for e in emus], work)
            result = c.run_runner(settings)
            assert result.counts.get("succeeded") == jobs, result.counts
            per = [e.stats()["switch_gaps_ms"] for e in emus]
    own_p95 = sorted(own)[max(0, int(len(own) * 0.95) - 1)] if own else 0.0
    for n, gaps in enumerate(per, start=1):
        rows.append((f"runner, endpoint {n}", _describe(gaps), "mean / p95 / max ms", None))
    everything = [g for gaps in per for g in gaps]
    mean_all = statistics.mean(everything) if everything else 0.0
    # "≈ the server's own switch time": within 2 ms of it on average (loopback, loaded box).
    limit = (statistics.mean(own) if own else 0.0) + 2.0
    rows.append(
        (
            "runner, all endpoints (mean)",
            f"{mean_all:.2f} ms",
            f"≤ own mean + 2 ms = {limit:.1f} ms",
            mean_all <= limit,
        )
    )
    rows.append(("server's own p95", f"{own_p95:.2f} ms", "(info)", None))
    # A gap over 1 ms means the server's queue ran dry: the next prompt was not there yet.
    waiting = sum(1 for g in everything if g < 1.0)
    rows.append(
        (
            "next prompt already queued",
            f"{waiting}/{len(everything)}",
            "all switches (gap < 1 ms)",
            waiting == len(everything),
        )
    )
    ok = c.report("P7 pipelining (switch gaps)", rows)
    raise SystemExit(0 if ok else c.MISSED)


if __name__ == "__main__":
    main()
