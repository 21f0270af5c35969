"""The live display's numbers and what it draws, without a terminal."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from rich.console import Console

from batch_runner.dashboard import LaneView, Snapshot, duration, rates, render, summary_line
from batch_runner.jsonlog import JsonFormatter
from batch_runner.progress import LIVE_INTERVAL_S, LIVE_STORE_SHARE, live_pause
from batch_runner.states import JobState
from batch_runner.store.repository import Failure


def counts(**n: int) -> dict[JobState, int]:
    return {state: n.get(state.value, 0) for state in JobState}


def test_speed_is_videos_over_working_time_per_endpoint() -> None:
    speeds = {"http://a": (10, 1000.0, 1600.0), "http://b": (1, 0.0, 0.0)}
    assert rates(speeds) == {"http://a": 10 / 600}


def test_eta_counts_only_endpoints_that_are_up() -> None:
    lanes = [LaneView("http://a", "a", True), LaneView("http://b", "b", False)]
    snap = Snapshot(
        counts(succeeded=40, pending=50, running=10),
        rates={"http://a": 0.1, "http://b": 0.1},
        lanes=lanes,
    )
    assert snap.throughput == 0.1
    assert snap.eta == 600
    assert Snapshot(counts(pending=3)).eta is None, "no speed yet, no guess"
    assert Snapshot(counts(succeeded=3)).eta == 0


def test_summary_line_has_counts_speed_and_eta() -> None:
    snap = Snapshot(counts(succeeded=12, failed=1, running=2, pending=85), rates={"u": 0.05})
    assert (
        summary_line(snap)
        == "12 done, 1 failed, 2 running, 85 pending · 3.0 videos/min · ETA 29m 00s"
    )
    assert "ETA when the first videos are done" in summary_line(Snapshot(counts(pending=5)))


def test_durations_read_naturally() -> None:
    assert [duration(s) for s in (2.54, 45, 725, 12_000, 190_000)] == [
        "2.5s",
        "45s",
        "12m 05s",
        "3h 20m",
        "2d 4h",
    ]


def test_render_shows_each_lane_its_step_health_and_recent_failures() -> None:
    snap = Snapshot(
        counts(succeeded=412, failed=3, running=4, pending=581),
        rates={"http://gpu1:8188": 1 / 62, "http://gpu2:8188": 1 / 70},
        lanes=[
            LaneView("http://gpu1:8188", "gpu1:8188", True, "clip0413", "57", (7, 10), 1, 140),
            LaneView("http://gpu2:8188", "gpu2:8188", False, done=98, last_error="refused"),
        ],
        failures=[Failure("clip0007", 8, JobState.FAILED, "X", "node 37 [UNETLoader] bad", 1)],
    )
    console = Console(record=True, width=130, color_system=None)
    console.print(render(snap))
    text = console.export_text()
    assert "415/1000" in text, "finished jobs (done or failed) fill the bar"
    assert "clip0413 · node 57 · step 7/10 (+1 queued)" in text
    assert "1m 02s/video" in text
    gpu2 = next(line for line in text.splitlines() if line.startswith("gpu2:8188"))
    assert "down" in gpu2 and "refused" in gpu2
    assert "recent failures" in text and "node 37 [UNETLoader] bad" in text


def test_json_log_lines_are_one_object_each() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("batch_runner", logging.WARNING, "x", 1, 'a "b"\nc %s', ("d",), None)
    entry = json.loads(formatter.format(record))
    assert entry["level"] == "warning" and entry["message"] == 'a "b"\nc d'
    assert entry["logger"] == "batch_runner" and entry["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, "x", 1, "m", None, sys.exc_info())
    line = formatter.format(failed)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


def test_live_view_reads_the_store_less_often_when_reading_is_slow() -> None:
    assert live_pause(0.01) == LIVE_INTERVAL_S
    assert live_pause(0.2) == pytest.approx(0.2 / LIVE_STORE_SHARE)
    assert live_pause(0.2) > LIVE_INTERVAL_S
