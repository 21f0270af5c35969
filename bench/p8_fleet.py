"""P1 and P3 again, with the run on PostgreSQL and two runner processes sharing it.

    python -m bench.p8_fleet            # P1: 8 endpoints, 400 jobs; P3: 2,000 zero-time jobs
    python -m bench.p8_fleet --quick    # 64 and 500 jobs

A throwaway PostgreSQL server is started from the installed binaries (apt-get install
postgresql; as in the tests it runs with fsync=off, so database durability costs are not in
these figures). Two `batch-runner run --db postgresql+asyncpg://… --runner-name rN`
processes start together on the same manifest and endpoints; the figures are taken when both
have exited. CPU time is the two processes' user + system time (start-up included).
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench import _common as c


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _create_database(server: str) -> str:
    """A fresh database on the server; its URL."""
    import asyncpg
    from sqlalchemy.engine import make_url

    name = f"bench_{uuid.uuid4().hex[:10]}"
    url = make_url(server)

    async def create() -> None:
        conn = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, database="postgres"
        )
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return url.set(database=name).render_as_string(hide_password=False)


def _runners(work: Path, db: str, urls: list[str], count: int) -> tuple[float, float, list[int]]:
    """Start ``count`` runners together; wall seconds until all exit, their CPU, exit codes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(c.ROOT), env.get("PYTHONPATH")]))
    endpoints = [arg for url in urls for arg in ("--endpoint", url)]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "batch_runner",
                "--quiet",
                "run",
                "jobs.csv",
                "--db",
                db,
                "--runner-name",
                f"r{n}",
                "--output-dir",
                str(work / "out"),
                *endpoints,
            ],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        for n in range(count)
    ]
    codes = []
    for proc in procs:
        _out, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            print(err[-2000:], file=sys.stderr)
        codes.append(proc.returncode)
    return time.perf_counter() - t0, _children_cpu() - cpu0, codes


def _split(db: str) -> str:
    """Jobs each runner held last, as "r0 n / r1 m"."""
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(db)

    async def fetch() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, database=url.database
        )
        try:
            rows = await conn.fetch(
                "SELECT r.name, count(*) FROM jobs j JOIN runners r ON r.id = j.runner_id "
                "GROUP BY r.name ORDER BY r.name"
            )
            return [(str(r[0]), int(r[1])) for r in rows]
        finally:
            await conn.close()

    return " / ".join(f"{name} {n}" for name, n in asyncio.run(fetch())) or "n/a"


def main() -> None:
    sys.path.insert(0, str(c.ROOT))
    from tests.pgserver import started_server

    p = c.parser(__doc__ or "")
    p.add_argument("--jobs", type=int, default=400, help="P1 jobs")
    p.add_argument("--overhead-jobs", type=int, default=2000, help="P3 jobs")
    p.add_argument("--runners", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.jobs, args.overhead_jobs = 64, 500
    steps, step_ms, endpoints = 20, 25.0, 8
    rows: list[tuple[str, str, str, bool | None]] = []
    with started_server() as server, c.workdir(args.keep) as work:
        p1 = work / "p1"
        p1.mkdir()
        c.write_manifest(p1 / "jobs.csv", args.jobs, steps=steps)
        with c.emulators([(step_ms, 1.0)] * endpoints) as emus:
            db = _create_database(server)
            wall, _cpu, codes = _runners(p1, db, [e.url for e in emus], args.runners)
        ideal = args.jobs * steps * step_ms / 1000 / endpoints
        rows += [
            (
                "P1 jobs × GPU time",
                f"{args.jobs} × {steps * step_ms / 1000:.3f} s",
                f"{endpoints} endpoints, {args.runners} runners",
                None,
            ),
            ("P1 makespan / ideal", f"{wall / ideal:.3f}", "≤ 1.01", wall / ideal <= 1.01),
            ("P1 jobs by runner", _split(db), "(info)", None),
            ("P1 exit codes", " ".join(map(str, codes)), "all 0", set(codes) == {0}),
        ]
        p3 = work / "p3"
        p3.mkdir()
        c.write_manifest(p3 / "jobs.csv", args.overhead_jobs)
        with c.emulators([(0.0, 1.0)] * 2) as emus:
            db = _create_database(server)
            wall, cpu, codes = _runners(p3, db, [e.url for e in emus], args.runners)
        per_job = cpu / args.overhead_jobs * 1000
        rows += [
            (
                "P3 jobs",
                f"{args.overhead_jobs}",
                f"2 endpoints, 0 ms, {args.runners} runners",
                None,
            ),
            ("P3 runners' CPU per job", f"{per_job:.2f} ms", "≤ 1 ms", per_job <= 1.0),
            ("P3 jobs/s", f"{args.overhead_jobs / wall:.0f}", "(info)", None),
            ("P3 jobs by runner", _split(db), "(info)", None),
            ("P3 exit codes", " ".join(map(str, codes)), "all 0", set(codes) == {0}),
        ]
    ok = c.report("P8 PostgreSQL, several runners (P1 and P3 again)", rows)
    sys.exit(0 if ok else 3)


if __name__ == "__main__":
    main()
