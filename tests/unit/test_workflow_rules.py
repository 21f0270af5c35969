"""Expert switch, output size and seed rules of the Wan2.2 workflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batch_runner.errors import WorkflowError
from batch_runner.manifest import JobSpec
from batch_runner.workflow import (
    DERIVED_SEED_LIMIT,
    PRESETS,
    WAN22_DEFAULTS,
    TemplateDefaults,
    derive_seed,
    resolve,
    resolve_size,
    switch_step,
)


@pytest.mark.parametrize(
    ("steps", "shift", "expected"),
    [
        (20, 8, 10),  # the model card's split
        (40, 5, 15),  # Wan2.2's own I2V setting
        (40, 8, 19),
        (30, 8, 15),
        (4, 8, 2),
        (1, 8, 1),
        (10, 1, 2),  # no shift: sigma is u itself; 0.9 exactly is still "at or above"
        (20, 8.0, 10),
    ],
)
def test_switch_step_is_first_step_below_the_boundary(
    steps: int, shift: float, expected: int
) -> None:
    assert switch_step(steps, shift) == expected
    sigma = [shift * u / (1 + (shift - 1) * u) for u in (1 - i / steps for i in range(steps + 1))]
    assert sigma[expected] < 0.9 + 1e-12
    assert expected == 0 or sigma[expected - 1] >= 0.9 - 1e-12


def test_switch_step_follows_the_boundary() -> None:
    assert switch_step(20, 8, boundary=0.875) == 11
    assert switch_step(20, 8, boundary=0.5) > switch_step(20, 8)


@pytest.mark.parametrize(("steps", "shift", "boundary"), [(0, 8, 0.9), (20, 0, 0.9), (20, 8, 1.0)])
def test_switch_step_rejects_impossible_inputs(steps: int, shift: float, boundary: float) -> None:
    with pytest.raises(WorkflowError):
        switch_step(steps, shift, boundary)


@pytest.mark.parametrize(
    ("preset", "image", "expected"),
    [
        ("720p", (1280, 704), (1280, 704)),
        ("480p", (832, 480), (832, 480)),
        ("720p", (704, 1280), (704, 1280)),
        ("720p", (1000, 1000), (944, 944)),
        ("720p", (1920, 1080), (1264, 704)),
        ("480p", (320, 240), (736, 544)),
        ("480p", (240, 320), (544, 736)),
    ],
)
def test_resolve_size_keeps_aspect_at_preset_area(
    preset: str, image: tuple[int, int], expected: tuple[int, int]
) -> None:
    width, height = resolve_size(preset, image)
    assert (width, height) == expected
    assert width % 16 == 0 and height % 16 == 0
    ref_w, ref_h = PRESETS[preset]
    assert abs(width * height / (ref_w * ref_h) - 1) < 0.05
    # Within one 16-pixel step of the input's aspect ratio.
    assert abs(width / height - image[0] / image[1]) <= 16 / min(width, height)


@pytest.mark.parametrize("image", [(4000, 3000), (3000, 4000), (512, 512), (5000, 100)])
def test_resolve_size_orientation_follows_the_image(image: tuple[int, int]) -> None:
    width, height = resolve_size("720p", image)
    assert (width > height) == (image[0] > image[1]) or image[0] == image[1]
    assert width % 16 == 0 and height % 16 == 0 and min(width, height) >= 16


def test_resolve_size_without_adjust_is_the_preset() -> None:
    assert resolve_size("720p", (240, 320), adjust=False) == (1280, 704)
    assert resolve_size("480p", None, adjust=False) == (832, 480)


def test_resolve_size_errors() -> None:
    with pytest.raises(WorkflowError, match="unknown preset '1080p'"):
        resolve_size("1080p", (10, 10))
    with pytest.raises(WorkflowError, match="size is needed"):
        resolve_size("720p", None)


def test_derived_seed_is_stable_distinct_and_json_safe() -> None:
    seeds = [derive_seed(f"job-{i}") for i in range(2000)]
    assert seeds == [derive_seed(f"job-{i}") for i in range(2000)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < DERIVED_SEED_LIMIT for s in seeds)
    assert all(int(float(s)) == s for s in seeds)
    # Pinned: changing the derivation would change every derived video.
    assert derive_seed("a") == 6615842164555210


def _spec(**fields: Any) -> JobSpec:
    return JobSpec(job_id="job-1", line=2, image=Path("/in/a.png"), prompt="walk", **fields)


def test_resolve_applies_defaults_and_derived_seed() -> None:
    job = resolve(_spec(), (1280, 704), WAN22_DEFAULTS)
    assert job.seed == derive_seed("job-1")
    assert (job.width, job.height, job.frames, job.fps) == (1280, 704, 81, 16.0)
    assert (job.steps, job.cfg, job.shift, job.switch_step) == (20, 3.5, 8.0, 10)
    assert job.negative_prompt == WAN22_DEFAULTS.negative_prompt
    assert job.output_stem == "job-1"


def test_resolve_row_values_win() -> None:
    spec = _spec(
        seed=7,
        negative_prompt="blurry",
        preset="480p",
        frames=33,
        fps=24.0,
        steps=40,
        shift=5.0,
        cfg=4.0,
        output="clip",
        node_inputs=(("57", "sampler_name", "dpmpp_2m"),),
    )
    job = resolve(spec, (240, 320), WAN22_DEFAULTS)
    assert job.seed == 7
    assert job.negative_prompt == "blurry"
    assert (job.width, job.height) == resolve_size("480p", (240, 320))
    assert (job.frames, job.fps, job.steps, job.shift, job.cfg) == (33, 24.0, 40, 5.0, 4.0)
    assert job.switch_step == 15  # recomputed for 40 steps at shift 5
    assert job.output_stem == "clip"
    assert job.node_inputs == (("57", "sampler_name", "dpmpp_2m"),)


def test_resolve_explicit_size_and_switch_override() -> None:
    job = resolve(_spec(width=640, height=640, switch_step=4), None, WAN22_DEFAULTS)
    assert (job.width, job.height, job.switch_step) == (640, 640, 4)


def test_resolve_run_defaults_and_their_errors() -> None:
    defaults = TemplateDefaults(
        preset="480p", adjust=False, switch_step=25, node_inputs=(("38", "device", "cpu"),)
    )
    with pytest.raises(WorkflowError, match="switch step 25 is after the last step"):
        resolve(_spec(), None, defaults)
    job = resolve(_spec(steps=30, node_inputs=(("6", "text", "x"),)), None, defaults)
    assert (job.width, job.height, job.switch_step) == (832, 480, 25)
    assert job.node_inputs == (("38", "device", "cpu"), ("6", "text", "x"))


def test_resolve_needs_image_size_only_to_adjust() -> None:
    with pytest.raises(WorkflowError, match="size is needed"):
        resolve(_spec(), None, WAN22_DEFAULTS)
    assert resolve(_spec(width=16, height=16), None, WAN22_DEFAULTS).width == 16
