"""P5 resume: from process start to the first new submission, on a big half-finished run.

    python -m bench.p5_resume            # 1,000,000 jobs, 500,000 succeeded
    python -m bench.p5_resume --quick    # 100,000 jobs

Setup (not timed): a manifest, its run database (ingested as a run would), half the jobs
marked succeeded with an output file each (small files with their recorded sha256). Then
``python -m batch_runner run`` starts as a new process against one emulated server, and the
time from starting that process to the first prompt appearing in the server's queue is
measured (the server's /queue is polled every 5 ms). The runner is then stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

from bench import _common as c

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(200)


def build(work: c.Path, rows: int) -> tuple[c.Path, c.Path, c.Path]:
    from batch_runner.runner import RUN_KEY, ingest, template_for
    from batch_runner.store import Store

    manifest = c.write_manifest(work / "jobs.csv", rows, images=16)
    out = work / "out"
    out.mkdir()
    settings = c.settings_for(manifest, ["http://127.0.0.1:9"], work)

    async def take_in() -> None:
        async with Store.open(settings.db) as store:
            run = await store.ensure_run(RUN_KEY, str(manifest))
            await ingest(store, run.id, settings, template_for(settings))

    asyncio.run(take_in())
    digest = hashlib.sha256(VIDEO).hexdigest()
    with sqlite3.connect(settings.db) as conn:
        keys = [k for (k,) in conn.execute("SELECT key FROM jobs WHERE id % 2 = 0")]
        for key in keys:
            with open(out / f"{key}.mp4", "wb") as handle:
                handle.write(VIDEO)
        now = time.time()
        conn.execute(
            "UPDATE jobs SET state = 'succeeded', attempts = 1, output_path = ? || key || '.mp4',"
            " output_sha256 = ?, output_size = ?, started_at = ?, finished_at = ?"
            " WHERE id % 2 = 0",
            (f"{out}/", digest, len(VIDEO), now, now),
        )
    return manifest, settings.db, out


def first_submission(url: str, proc: subprocess.Popen[bytes], started: float) -> float:
    while proc.poll() is None:
        with urllib.request.urlopen(f"{url}/queue", timeout=5) as answer:
            queue = json.load(answer)
        if queue["queue_running"] or queue["queue_pending"]:
            return time.perf_counter() - started
        time.sleep(0.005)
    raise RuntimeError(f"the runner exited ({proc.returncode}) before submitting anything")


def main() -> None:
    p = c.parser(__doc__ or "")
    p.add_argument("--rows", type=int, default=1_000_000)
    args = p.parse_args()
    if args.quick:
        args.rows = 100_000
    c.quiet_logs()
    with c.workdir(args.keep) as work:
        t0 = time.perf_counter()
        manifest, db, out = build(work, args.rows)
        setup = time.perf_counter() - t0
        env = {**os.environ, "PYTHONPATH": str(c.ROOT)}
        with c.emulators([(1000.0, 1.0)]) as (emu,):
            command = [
                sys.executable,
                "-m",
                "batch_runner",
                "run",
                str(manifest),
                "--db",
                str(db),
                "--output-dir",
                str(out),
                "--endpoint",
                emu.url,
            ]
            started = time.perf_counter()
            proc = subprocess.Popen(
                command,
                cwd=c.ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                elapsed = first_submission(emu.url, proc, started)
            finally:
                proc.send_signal(signal.SIGINT)
                time.sleep(0.2)
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    ok = c.report(
        "P5 resume",
        [
            ("jobs / succeeded", f"{args.rows:,} / {args.rows // 2:,}", "(info)", None),
            ("setup (not timed)", f"{setup:.0f} s", "(info)", None),
            ("process start → first submission", f"{elapsed:.3f} s", "≤ 1 s", elapsed <= 1.0),
        ],
    )
    raise SystemExit(0 if ok else c.MISSED)


if __name__ == "__main__":
    main()
