"""PromptTracker: routing, repeats and out-of-order messages are no-ops, orphans, reconciliation."""

from __future__ import annotations

from typing import Any

import pytest

from batch_runner import clock
from batch_runner.comfy import events as ev
from batch_runner.comfy.models import ExecutionErrorInfo, HistoryEntry, Outcome
from batch_runner.tracking import MAX_ORPHANS, PACE_WEIGHT, PromptTracker, outcome_of


def test_messages_reach_only_their_watch() -> None:
    tracker = PromptTracker()
    mine = tracker.watch("p1", "job-1")
    other = tracker.watch("p2", "job-2")
    tracker.handle(ev.ExecutionStart("p1"))
    tracker.handle(ev.Progress("p1", "57", 3, 10))
    assert mine.started and mine.step == (3, 10)
    assert not other.started
    assert tracker.running_prompt == "p1"


def test_outcome_is_set_once_and_repeats_are_ignored() -> None:
    tracker = PromptTracker()
    watch = tracker.watch("p1", "job-1")
    tracker.handle(ev.Executing("p1", None))  # end marker before the outcome: no outcome yet
    assert not watch.finished
    tracker.handle(ev.ExecutionSuccess("p1"))
    info = ExecutionErrorInfo("57", "KSamplerAdvanced", "RuntimeError", "late\n")
    tracker.handle(ev.ExecutionError("p1", info))  # a contradicting late message
    tracker.handle(ev.ExecutionSuccess("p1"))
    assert outcome_of(watch) is Outcome.SUCCESS


def test_reconnect_hint_without_prompt_id_changes_nothing() -> None:
    tracker = PromptTracker()
    watch = tracker.watch("p1", "job-1")
    watch.changed.clear()
    tracker.handle(ev.Executing(None, "6"))
    assert not watch.changed.is_set() and not watch.started


def test_end_that_arrives_before_the_watch_is_kept() -> None:
    tracker = PromptTracker()
    tracker.handle(ev.ExecutionSuccess("early"))
    assert outcome_of(tracker.watch("early", "job")) is Outcome.SUCCESS


def test_orphan_buffer_is_bounded() -> None:
    tracker = PromptTracker()
    for n in range(MAX_ORPHANS + 10):
        tracker.handle(ev.ExecutionSuccess(f"p{n}"))
    assert outcome_of(tracker.watch("p0", "job")) is None, "oldest orphan should be dropped"
    last = f"p{MAX_ORPHANS + 9}"
    assert outcome_of(tracker.watch(last, "job")) is Outcome.SUCCESS


def test_reconciliation_states() -> None:
    tracker = PromptTracker()
    running = tracker.watch("r", "a")
    assert not tracker.reconciled(running, None, running=True, pending=False)
    assert running.started and not running.finished

    gone = tracker.watch("g", "b")
    tracker.reconciled(gone, None, running=False, pending=False)
    assert gone.lost and gone.finished

    done = tracker.watch("d", "c")
    entry = HistoryEntry("d", Outcome.SUCCESS, ())
    assert tracker.reconciled(done, entry, running=False, pending=False), (
        "an end found only in history means the socket missed it"
    )
    assert outcome_of(done) is Outcome.SUCCESS

    tracker.handle(ev.ExecutionSuccess("x"))
    heard = tracker.watch("x", "d")
    assert not tracker.reconciled(heard, entry, running=False, pending=False)


def test_pace_averages_the_run_times_of_successful_prompts(monkeypatch: Any) -> None:
    now = [50.0]
    monkeypatch.setattr(clock, "monotonic", lambda: now[0])
    tracker = PromptTracker()
    assert tracker.pace is None
    for prompt_id, seconds in (("p1", 10.0), ("p2", 20.0)):
        tracker.watch(prompt_id, prompt_id)
        tracker.handle(ev.ExecutionStart(prompt_id))
        now[0] += seconds
        tracker.handle(ev.ExecutionSuccess(prompt_id))
    assert tracker.pace == pytest.approx(10.0 + PACE_WEIGHT * 10.0)
    # A failed prompt says nothing about how long a job takes there.
    tracker.watch("p3", "p3")
    tracker.handle(ev.ExecutionStart("p3"))
    now[0] += 1.0
    info = ExecutionErrorInfo("57", "KSamplerAdvanced", "RuntimeError", "oom\n")
    tracker.handle(ev.ExecutionError("p3", info))
    assert tracker.pace == pytest.approx(10.0 + PACE_WEIGHT * 10.0)


def test_held_work_counts_what_is_left_of_the_running_prompt_and_all_queued_ones(
    monkeypatch: Any,
) -> None:
    now = [0.0]
    monkeypatch.setattr(clock, "monotonic", lambda: now[0])
    tracker = PromptTracker()
    for prompt_id in ("running", "queued", "done"):
        tracker.watch(prompt_id, prompt_id)
    tracker.handle(ev.ExecutionStart("done"))
    tracker.handle(ev.ExecutionSuccess("done"))
    tracker.handle(ev.ExecutionStart("running"))
    now[0] = 3.0
    assert tracker.held_work(10.0, now[0]) == pytest.approx(7.0 + 10.0)
    # Overdue: the running prompt may end any moment, it owes nothing more.
    assert tracker.held_work(2.0, now[0]) == pytest.approx(0.0 + 2.0)
