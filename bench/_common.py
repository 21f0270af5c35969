"""Shared pieces of the benchmarks: emulator processes, generated manifests, measured runs.

Every benchmark runs the real runner in this process against emulated ComfyUI servers that
run as separate processes (``python -m batch_runner emulate``), so the CPU time and memory
measured here are the runner's own.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Exit status of a benchmark that ran but missed a target (a crash exits 1).
MISSED = 3


# ----------------------------------------------------------------------------- machine


def machine() -> str:
    """One line naming the machine and how busy it is, for the results table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as handle:
            kb = int(handle.readline().split()[1])
            mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    import sqlite3

    load = f", load average {os.getloadavg()[0]:.1f}"
    return (
        f"{os.cpu_count()} CPU ({cpu}){mem}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}{load}"
    )


def cpu_seconds() -> float:
    """CPU time of this process (all its threads), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1000


def children_peak_rss_mb() -> float:
    """Largest peak resident set size of any ended child process, MB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1000


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument("--keep", action="store_true", help="keep the work folder and print it")
    return p


def report(title: str, rows: Sequence[tuple[str, str, str, bool | None]]) -> bool:
    """Print figures as ``name  value  target  ok``; returns whether every target held."""
    print(f"\n{title}\nmachine: {machine()}")
    width = max(len(r[0]) for r in rows)
    ok_all = True
    for name, value, target, ok in rows:
        mark = "" if ok is None else ("  ok" if ok else "  MISSED")
        if ok is False:
            ok_all = False
        print(f"  {name:<{width}}  {value:>14}  {target}{mark}")
    return ok_all


@contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="br-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"work folder kept: {path}")
        else:
            subprocess.run(["rm", "-rf", str(path)], check=False)


# ----------------------------------------------------------------------------- emulators


@dataclass
class EmulatorProcess:
    url: str
    proc: subprocess.Popen[str]
    step_ms: float
    speed: float

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/emulator/stats", timeout=30) as answer:
            data: dict[str, Any] = json.load(answer)
            return data

    def history(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/history", timeout=60) as answer:
            data: dict[str, Any] = json.load(answer)
            return data


@contextmanager
def emulators(
    specs: Sequence[tuple[float, float]], *, video_max_side: int = 16
) -> Iterator[list[EmulatorProcess]]:
    """Start one emulator process per ``(step_ms, speed)``; stop them (by pid) on exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    started: list[EmulatorProcess] = []
    try:
        for step_ms, speed in specs:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "batch_runner",
                    "emulate",
                    "--port",
                    "0",
                    "--step-ms",
                    str(step_ms),
                    "--speed",
                    str(speed),
                    "--video-max-side",
                    str(video_max_side),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            started.append(EmulatorProcess("", proc, step_ms, speed))
        for emu in started:
            assert emu.proc.stdout is not None
            line = emu.proc.stdout.readline()
            if "listening on" not in line:
                raise RuntimeError(f"emulator did not start: {line!r}")
            emu.url = line.strip().rsplit(" ", 1)[-1]
        yield started
    finally:
        for emu in started:
            emu.proc.terminate()
        for emu in started:
            try:
                emu.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                emu.proc.kill()
                emu.proc.wait()


def gpu_busy_ms(history: dict[str, Any]) -> list[tuple[float, float]]:
    """(start, end) in ms of every prompt in an emulator's history, from its own messages."""
    spans = []
    for entry in history.values():
        marks = {m[0]: m[1].get("timestamp") for m in entry["status"]["messages"]}
        start, end = marks.get("execution_start"), marks.get("execution_success")
        if start is not None and end is not None:
            spans.append((float(start), float(end)))
    return sorted(spans)


# ----------------------------------------------------------------------------- manifests


def make_images(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = folder / f"img{n:04d}.png"
        Image.new("RGB", (64, 48), ((n * 37) % 256, (n * 91) % 256, (n * 13) % 256)).save(path)
        paths.append(path)
    return paths


def write_manifest(
    path: Path,
    rows: int,
    *,
    images: int = 8,
    steps: int = 20,
    frames: int = 81,
    preset: str = "480p",
) -> Path:
    """A CSV manifest of ``rows`` jobs sharing ``images`` input images."""
    image_paths = make_images(path.parent / "images", images)
    names = [p.relative_to(path.parent).as_posix() for p in image_paths]
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["id", "image", "prompt", "steps", "frames", "preset"])
        for n in range(rows):
            out.writerow(
                [
                    f"job{n:07d}",
                    names[n % len(names)],
                    f"a slow pan across scene {n}, cinematic light",
                    steps,
                    frames,
                    preset,
                ]
            )
    return path


# ----------------------------------------------------------------------------- the runner


@dataclass
class RunResult:
    wall_s: float
    cpu_s: float
    counts: dict[str, int]
    exit_code: int
    started_at: float
    extra: dict[str, Any] = field(default_factory=dict)


def settings_for(
    manifest: Path, urls: Sequence[str], work: Path, *, max_inflight: int = 2, **kw: Any
) -> Any:
    from batch_runner.config import EndpointSettings, RunSettings

    return RunSettings(
        manifest=manifest,
        db=work / "run.sqlite",
        output_dir=work / "out",
        endpoints=tuple(EndpointSettings(u, None, max_inflight) for u in urls),
        **kw,
    )


def run_runner(settings: Any, *, sampler: Any = None) -> RunResult:
    """Run ``run_batch`` in this process; wall and CPU time of the whole call."""
    from batch_runner.runner import run_batch, template_for

    async def main() -> RunResult:
        task = asyncio.create_task(sampler()) if sampler is not None else None
        started = time.time()
        t0, c0 = time.perf_counter(), cpu_seconds()
        summary = await run_batch(settings, template_for(settings), asyncio.Event())
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        extra: dict[str, Any] = {}
        if os.environ.get("BENCH_THREADS"):
            print("CPU by thread:", {k: round(v, 2) for k, v in thread_cpu().items()})
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            extra = getattr(sampler, "result", {})
        counts = {state.value: n for state, n in summary.counts.items() if n}
        return RunResult(wall, cpu, counts, summary.exit_code, started, extra)

    return asyncio.run(main())


def quiet_logs() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def thread_cpu() -> dict[str, float]:
    """CPU seconds per live thread of this process, by thread name (Linux)."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    result: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(task.name), f"tid {task.name}")
        result[name] = result.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return result
