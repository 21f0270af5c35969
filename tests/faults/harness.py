"""Kill-and-resume trials against emulated servers, checked against what the servers ran.

Used by the tests (a few trials) and from the command line for longer campaigns::

    python -m tests.faults.harness --trials 50 --seed 7 --budget 900

prints one line: ``trials=K lost=0 duplicated=0 corrupt=0 unfinished=0``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import decoded_frames, make_image, write_csv

CLI = [sys.executable, "-m", "batch_runner"]


@dataclass
class Tally:
    trials: int = 0
    lost: int = 0
    duplicated: int = 0
    corrupt: int = 0
    unfinished: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"trials={self.trials} lost={self.lost} duplicated={self.duplicated} "
            f"corrupt={self.corrupt} unfinished={self.unfinished}"
        )

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.corrupt or self.unfinished)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("BATCH_RUNNER_CRASH_AT", None)
    env.update(extra or {})
    return env


@contextmanager
def emulator(workdir: Path, args: Sequence[str]) -> Iterator[str]:
    """A `batch-runner emulate` process on a free port; yields its URL."""
    proc = subprocess.Popen(
        [*CLI, "emulate", "--port", "0", *args],
        cwd=workdir,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"emulator did not start: {line!r}")
        yield line.strip().rsplit(" ", 1)[-1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def executions(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/emulator/stats", timeout=10) as answer:
        data = json.loads(answer.read())
    return {str(k): int(v) for k, v in data["executions"].items()}


def make_batch(workdir: Path, jobs: int) -> Path:
    make_image(workdir / "a.png", (64, 48))
    make_image(workdir / "b.png", (48, 64), "red")
    rows = [
        {"id": f"t{i:02d}", "image": "a.png" if i % 2 else "b.png", "prompt": f"p{i}", "frames": 5}
        for i in range(jobs)
    ]
    return write_csv(workdir / "jobs.csv", rows)


def run_cli(
    workdir: Path,
    url: str,
    *,
    crash_at: str | None = None,
    timeout: float = 120,
    extra: Sequence[str] = (),
) -> int:
    """Run the batch once; the return code, with the output kept in ``workdir/last.log``."""
    env = _env({"BATCH_RUNNER_CRASH_AT": crash_at} if crash_at else None)
    result = subprocess.run(
        [*CLI, "--debug", "run", "jobs.csv", "--endpoint", url, "--max-attempts", "10", *extra],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    (workdir / "last.log").write_text(result.stdout + result.stderr)
    return result.returncode


def check(workdir: Path, jobs: int, executed: dict[str, int], tally: Tally) -> None:
    """Compare the run database, the output folder and the server's execution counts."""
    db = workdir / "jobs.csv.batch.sqlite"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        states = dict(conn.execute("SELECT key, state FROM jobs").fetchall())
        done = conn.execute(
            "SELECT key, output_path, output_sha256 FROM jobs WHERE state='succeeded'"
        ).fetchall()
        prompts = conn.execute(
            "SELECT j.key, a.prompt_id, a.state FROM attempts a JOIN jobs j ON j.id=a.job_id"
        ).fetchall()
    tally.lost += jobs - len(states)
    tally.unfinished += sum(1 for s in states.values() if s not in ("succeeded", "failed"))
    for prompt_id, count in executed.items():
        if count > 1:
            tally.duplicated += 1
            tally.notes.append(f"{workdir.name}: prompt {prompt_id} ran {count} times")
    succeeded_attempts: dict[str, int] = {}
    for key, _prompt_id, state in prompts:
        if state == "succeeded":
            succeeded_attempts[key] = succeeded_attempts.get(key, 0) + 1
    tally.duplicated += sum(1 for n in succeeded_attempts.values() if n > 1)
    for key, path, sha in done:
        file = Path(path)
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != sha:
            tally.corrupt += 1
            tally.notes.append(f"{workdir.name}: {key} output missing or altered")
        elif decoded_frames(file)[0] != 5:
            tally.corrupt += 1
            tally.notes.append(f"{workdir.name}: {key} output has the wrong frame count")


def one_trial(workdir: Path, rng: random.Random, jobs: int = 4) -> Tally:
    """Random fault knobs, a SIGKILL at a random moment (or crash point), then resume."""
    tally = Tally(trials=1)
    workdir.mkdir(parents=True)
    make_batch(workdir, jobs)
    knobs = [
        "--seed",
        str(rng.randrange(1 << 30)),
        "--step-ms",
        str(rng.choice([2, 10, 25])),
        "--video-max-side",
        "32",
        "--http-5xx-rate",
        str(rng.choice([0, 0, 0.05])),
        "--ws-drop-rate",
        str(rng.choice([0, 0, 0.02])),
        "--execution-error-rate",
        str(rng.choice([0, 0, 0.1])),
        "--truncate-view-rate",
        str(rng.choice([0, 0, 0.1])),
    ]
    with emulator(workdir, knobs) as url:
        kind = rng.choice(["commit", "http", "signal"])
        if kind == "signal":
            proc = subprocess.Popen(
                [*CLI, "run", "jobs.csv", "--endpoint", url, "--max-attempts", "10"],
                cwd=workdir,
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
            time.sleep(rng.uniform(0.3, 3.0))  # the kill moment is the random variable here
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            run_cli(workdir, url, crash_at=f"{kind}:{rng.randrange(1, 60)}")
        code = 130
        for _ in range(3):
            code = run_cli(workdir, url)
            if code in (0, 1):
                break
        if code not in (0, 1):
            tally.notes.append(f"{workdir.name}: resume exited {code}")
        check(workdir, jobs, executions(url), tally)
    return tally


def run_trials(root: Path, trials: int, seed: int, budget_s: float) -> Tally:
    rng = random.Random(seed)
    total = Tally()
    deadline = time.monotonic() + budget_s
    for n in range(trials):
        if time.monotonic() > deadline:
            break
        result = one_trial(root / f"trial{n:03d}", rng)
        for name in ("trials", "lost", "duplicated", "corrupt", "unfinished"):
            setattr(total, name, getattr(total, name) + getattr(result, name))
        total.notes += result.notes
    return total


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds at most")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        tally = run_trials(Path(root), args.trials, args.seed, args.budget)
    for note in tally.notes:
        print(note, file=sys.stderr)
    print(tally.line())
    sys.exit(0 if tally.clean else 1)


if __name__ == "__main__":
    main()
