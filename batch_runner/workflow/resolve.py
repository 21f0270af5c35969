"""From a manifest row and defaults to the concrete values of one job (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from batch_runner.errors import WorkflowError
from batch_runner.workflow.seed import derive_seed
from batch_runner.workflow.sizes import resolve_size
from batch_runner.workflow.switch import switch_step as compute_switch_step
from batch_runner.workflow.template import TemplateDefaults

if TYPE_CHECKING:
    from batch_runner.manifest import JobSpec

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ResolvedJob:
    """Every value one job renders with. ``None`` leaves the workflow's own value in place."""

    job_id: str
    image: Path
    prompt: str
    negative_prompt: str | None
    seed: int
    width: int | None
    height: int | None
    frames: int | None
    fps: float | None
    steps: int | None
    cfg: float | None
    shift: float | None
    switch_step: int | None
    #: run-wide then row ``(node id or title, input, value)`` settings, applied last in that order
    node_inputs: tuple[tuple[str, str, object], ...]
    output_stem: str


def resolve(
    spec: JobSpec, image_size: tuple[int, int] | None, defaults: TemplateDefaults
) -> ResolvedJob:
    """Apply ``defaults`` to ``spec``; ``image_size`` is the input's (width, height) after EXIF
    orientation (see ``probe_image_size``), needed only when a preset is adjusted to it.

    The seed is the row's, else derived from the job id. The switch step is the row's,
    else the defaults', else computed from steps and shift. Raises ``WorkflowError`` if the
    values do not fit together (switch step after the last step, unknown preset).
    """
    width, height = _size(spec, image_size, defaults)
    steps = _pick(spec.steps, defaults.steps)
    shift = _pick(spec.shift, defaults.shift)
    switch = _pick(spec.switch_step, defaults.switch_step)
    if switch is None and steps is not None and shift is not None:
        switch = compute_switch_step(steps, shift, defaults.boundary)
    if switch is not None and steps is not None and switch > steps:
        raise WorkflowError(f"switch step {switch} is after the last step ({steps})")
    return ResolvedJob(
        job_id=spec.job_id,
        image=spec.image,
        prompt=spec.prompt,
        negative_prompt=_pick(spec.negative_prompt, defaults.negative_prompt),
        seed=spec.seed if spec.seed is not None else derive_seed(spec.job_id),
        width=width,
        height=height,
        frames=_pick(spec.frames, defaults.frames),
        fps=_pick(spec.fps, defaults.fps),
        steps=steps,
        cfg=_pick(spec.cfg, defaults.cfg),
        shift=shift,
        switch_step=switch,
        node_inputs=(*defaults.node_inputs, *spec.node_inputs),
        output_stem=spec.output or spec.job_id,
    )


def _pick(row: _T | None, default: _T | None) -> _T | None:
    return row if row is not None else default


def _size(
    spec: JobSpec, image_size: tuple[int, int] | None, defaults: TemplateDefaults
) -> tuple[int | None, int | None]:
    if spec.width is not None and spec.height is not None:
        return spec.width, spec.height
    preset = spec.preset or defaults.preset
    if preset is None:
        return defaults.width, defaults.height
    return resolve_size(preset, image_size, defaults.adjust)
