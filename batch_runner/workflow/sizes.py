"""Output resolution: presets and aspect-preserving sizing.

Wan2.2 works on latents that are 1/8 of the picture and then patches of 2×2, so
both sides must be multiples of 16 (WanImageToVideo's width/height step is 16).
"""

from __future__ import annotations

import math

from batch_runner.errors import WorkflowError

#: Preset name → (width, height) of its landscape reference size; the pixel area is what counts.
PRESETS: dict[str, tuple[int, int]] = {"480p": (832, 480), "720p": (1280, 704)}

SIDE_STEP = 16
#: WanImageToVideo accepts sides from 16 to 16384.
MIN_SIDE = 16
MAX_SIDE = 16384


def round_side(value: float) -> int:
    """Round a side length to the nearest multiple of 16 (halves up), kept within 16..16384."""
    steps = math.floor(value / SIDE_STEP + 0.5)
    return min(MAX_SIDE, max(MIN_SIDE, steps * SIDE_STEP))


def resolve_size(
    preset: str, image_size: tuple[int, int] | None, adjust: bool = True
) -> tuple[int, int]:
    """Return the (width, height) to render for ``preset`` and an input of ``image_size``.

    With ``adjust`` on, the result keeps the input's aspect ratio at the preset's
    pixel area: the exact sides are ``sqrt(area·r)`` and ``sqrt(area/r)`` with
    ``r = width/height``, then each side is rounded on its own to the nearest
    multiple of 16 (halves up). So a 1280×704 input at 720p stays 1280×704, a
    square one becomes 960×944 and a 16:9 one 1264×704. The area stays within a
    few percent of the preset's; the aspect ratio within one 16-pixel step.

    With ``adjust`` off, the preset's own size is returned (ComfyUI then scales
    and centre-crops the image to it) and ``image_size`` may be ``None``.
    """
    try:
        ref_w, ref_h = PRESETS[preset]
    except KeyError:
        known = ", ".join(PRESETS)
        raise WorkflowError(f"unknown preset {preset!r}; use one of: {known}") from None
    if not adjust:
        return ref_w, ref_h
    if image_size is None:
        raise WorkflowError(f"the input image's size is needed to fit preset {preset} to it")
    img_w, img_h = image_size
    if img_w <= 0 or img_h <= 0:
        raise WorkflowError(f"image size {img_w}×{img_h} is not a picture size")
    area = ref_w * ref_h
    ratio = img_w / img_h
    return round_side(math.sqrt(area * ratio)), round_side(math.sqrt(area / ratio))
