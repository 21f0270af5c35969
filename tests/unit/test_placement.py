"""Placement of the last jobs: each goes to the endpoint that would finish it first."""

from __future__ import annotations

import pytest

from batch_runner.placement import Load, estimate_paces, takes_a_job

SLOW, FAST = 4.0, 1.0


def test_a_slow_idle_gpu_leaves_the_last_job_to_a_fast_one_about_to_free() -> None:
    # The fast GPU frees in 0.5 s and then needs 1 s: done at 1.5 s, before the slow one's 4 s.
    assert not takes_a_job(Load(0.0, SLOW), [Load(0.5, FAST)], waiting=1)
    assert takes_a_job(Load(0.5, FAST), [Load(0.0, SLOW)], waiting=1)


def test_the_slow_gpu_takes_a_job_once_enough_wait_for_the_fast_one_to_fall_behind() -> None:
    # The fast GPU finishes jobs at 1.5, 2.5, 3.5, 4.5 s: the fourth job is the slow one's.
    assert not takes_a_job(Load(0.0, SLOW), [Load(0.5, FAST)], waiting=3)
    assert takes_a_job(Load(0.0, SLOW), [Load(0.5, FAST)], waiting=4)


def test_several_fast_gpus_share_the_jobs_before_the_slow_one_gets_any() -> None:
    fast = [Load(0.0, FAST), Load(0.2, FAST)]
    # Finishes: 1.0, 1.2, 2.0, 2.2, 3.0, 3.2, then the slow one's 4.0.
    assert not takes_a_job(Load(0.0, SLOW), fast, waiting=6)
    assert takes_a_job(Load(0.0, SLOW), fast, waiting=7)


def test_equal_gpus_take_the_last_jobs_in_the_order_they_free() -> None:
    busy, idle = Load(1.0, 1.0), Load(0.0, 1.0)
    assert takes_a_job(idle, [busy], waiting=1)
    assert not takes_a_job(busy, [idle], waiting=1)
    assert takes_a_job(busy, [idle], waiting=2)


def test_a_tie_goes_to_the_asking_gpu_and_nothing_waiting_means_no_job() -> None:
    assert takes_a_job(Load(0.0, 1.0), [Load(0.0, 1.0)], waiting=1)
    assert takes_a_job(Load(0.0, 1.0), [], waiting=1)
    assert not takes_a_job(Load(0.0, 1.0), [Load(0.0, 1.0)], waiting=0)


def test_unmeasured_endpoints_take_the_mean_pace_of_the_measured_ones() -> None:
    assert estimate_paces([2.0, None, 4.0]) == pytest.approx([2.0, 3.0, 4.0])
    assert estimate_paces([None, None]) == [1.0, 1.0]
