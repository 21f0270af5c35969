"""Shared test helpers: example images, manifests, settings, video checks."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import av
from PIL import Image, ImageDraw

from batch_runner.config import EndpointSettings, RetryPolicy, RunSettings, Timeouts


def make_image(path: Path, size: tuple[int, int], colour: str = "orange") -> Path:
    image = Image.new("RGB", size, "navy")
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def settings_for(
    manifest: Path,
    urls: Sequence[str],
    *,
    max_inflight: int = 2,
    max_attempts: int = 3,
    silence: float = 5.0,
    endpoint_timeout: float = 10.0,
    **changes: Any,
) -> RunSettings:
    return RunSettings(
        manifest=manifest,
        db=manifest.parent / "run.sqlite",
        output_dir=manifest.parent / "out",
        endpoints=tuple(EndpointSettings(u, None, max_inflight) for u in urls),
        retry=RetryPolicy(
            max_attempts=max_attempts, base_delay=0.05, max_delay=0.2, elsewhere_grace=1.0
        ),
        timeouts=Timeouts(silence=silence, endpoint=endpoint_timeout, grace=30.0),
        **changes,
    )


def decoded_frames(path: Path) -> tuple[int, int, int]:
    """(frames, width, height) of the first video stream, decoding every frame."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.codec_context.width, stream.codec_context.height


#: The recorded ComfyUI traces: ../shared beside the repository, as on every machine and in CI.
TRACES = Path(__file__).resolve().parents[2] / "shared" / "comfyui-protocol" / "traces"
