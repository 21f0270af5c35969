"""Reading an input image's size the way ComfyUI's LoadImage will see it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from batch_runner.errors import WorkflowError

_EXIF_ORIENTATION = 0x0112
#: EXIF orientations 5–8 are rotated by a quarter turn, so width and height swap.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def probe_image_size(path: Path) -> tuple[int, int]:
    """Return ``(width, height)`` of the image at ``path`` after its EXIF orientation.

    LoadImage applies the EXIF orientation before anything else, so a portrait
    phone photo stored as landscape pixels is portrait to the workflow too. Only the
    header is read. Raises ``WorkflowError`` if the file cannot be read as an image.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION)
    # Pillow signals undecodable input with many exception types (OSError, SyntaxError,
    # ValueError, DecompressionBombError…); any of them means "not a usable image".
    except Exception as exc:
        raise WorkflowError(f"cannot read image {path}: {exc}") from exc
    if orientation in _QUARTER_TURNS:
        return height, width
    return width, height
