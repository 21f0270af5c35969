"""Where the two Wan2.2 A14B experts hand over.

The high-noise expert denoises while the shifted noise level is at or above the
boundary (0.9 for image-to-video); the low-noise expert takes the rest. With flow
shift ``s`` and ``N`` steps, step ``i`` has ``sigma = s·u / (1 + (s−1)·u)`` with
``u = 1 − i/N``.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

from batch_runner.errors import WorkflowError

#: Wan2.2's expert boundary for image-to-video.
I2V_BOUNDARY = 0.9


def switch_step(steps: int, shift: float, boundary: float = I2V_BOUNDARY) -> int:
    """Return the first step whose shifted sigma is below ``boundary``.

    The low-noise expert starts there: 10 of 20 steps at shift 8, 15 of 40 at shift 5.
    Arithmetic is exact on the decimal values given, so a sigma that equals the
    boundary counts as "at or above" and never flips with float rounding.
    """
    if steps < 1:
        raise WorkflowError(f"steps must be at least 1, got {steps}")
    if not shift > 0:
        raise WorkflowError(f"shift must be positive, got {shift}")
    if not 0 < boundary < 1:
        raise WorkflowError(f"the expert boundary must be between 0 and 1, got {boundary}")
    return _switch_step(steps, _exact(shift), _exact(boundary))


def _exact(value: float) -> Fraction:
    # repr() is the shortest decimal that reads back as the same float: 0.9, not 0.9000…02.
    return Fraction(repr(float(value)))


@lru_cache(maxsize=256)
def _switch_step(steps: int, shift: Fraction, boundary: Fraction) -> int:
    for i in range(steps + 1):
        u = 1 - Fraction(i, steps)
        if shift * u / (1 + (shift - 1) * u) < boundary:
            return i
    raise AssertionError("unreachable: sigma is 0 at the last step")
