"""Real H.264 MP4 files made from one picture with a slow pan and zoom."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image

# PyAV's from_image carries no annotations; this gives it its real signature.
_to_frame: Callable[[Image.Image], av.VideoFrame] = av.VideoFrame.from_image

# Frames keep this much margin around the visible window so the camera has room to move.
_MARGIN = 0.12


def fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Scale (width, height) so the longest side is at most max_side; sides even and >= 2."""
    scale = min(1.0, max_side / max(width, height, 1))
    out_w = max(2, int(width * scale) // 2 * 2)
    out_h = max(2, int(height * scale) // 2 * 2)
    return out_w, out_h


def _frames(picture: Image.Image, count: int, size: tuple[int, int]) -> list[Image.Image]:
    width, height = size
    big = picture.convert("RGB").resize(
        (int(width * (1 + _MARGIN)) + 2, int(height * (1 + _MARGIN)) + 2)
    )
    frames = []
    for index in range(count):
        t = index / max(count - 1, 1)
        # Pan left to right while zooming in a little.
        zoom = 1.0 - 0.5 * _MARGIN * t
        crop_w, crop_h = width * zoom, height * zoom
        left = (big.width - crop_w) * t
        top = (big.height - crop_h) * 0.5
        box = (left, top, left + crop_w, top + crop_h)
        frames.append(big.resize(size, Image.Resampling.BILINEAR, box=box))
    return frames


def encode_mp4(picture: Image.Image, count: int, fps: float, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for frame in _frames(picture, count, size):
            for packet in stream.encode(_to_frame(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


class VideoWriter:
    """Encodes videos, reusing the bytes of recent identical encodings.

    Benchmarks send thousands of jobs that differ only in text or seed; those give the
    same pixels here, so the second and later files are copies.
    """

    def __init__(self, remembered: int = 32) -> None:
        self._recent: OrderedDict[tuple[str, int, float, tuple[int, int]], bytes] = OrderedDict()
        self._remembered = remembered
        self._lock = threading.Lock()

    def write_known(
        self,
        path: Path,
        picture_key: str,
        count: int,
        fps: float,
        size: tuple[int, int],
    ) -> bool:
        """Write a copy of a recent identical encoding, if there is one; False otherwise.

        Cheap enough to run on the event loop: a thread hop would cost more than the copy
        and add to the prompt's emulated GPU time.
        """
        key = (picture_key, count, fps, size)
        with self._lock:
            data = self._recent.get(key)
            if data is None:
                return False
            self._recent.move_to_end(key)
        _write_file(path, data)
        return True

    def write(
        self,
        path: Path,
        picture: Image.Image,
        picture_key: str,
        count: int,
        fps: float,
        size: tuple[int, int],
    ) -> None:
        if self.write_known(path, picture_key, count, fps, size):
            return
        data = encode_mp4(picture, count, fps, size)
        with self._lock:
            self._recent[(picture_key, count, fps, size)] = data
            while len(self._recent) > self._remembered:
                self._recent.popitem(last=False)
        _write_file(path, data)


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
