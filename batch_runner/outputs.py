"""Output files: streamed download, atomic write, checksum, video verification.

A file exists under its final name only once it is complete: bytes go to ``<dest>.part`` in
the same folder, are hashed on the way, flushed and fsync'd, renamed over ``dest`` and the
folder is fsync'd. Every failure removes the ``.part`` file. Final names come from our job
ids; the server's file name only contributes an extension from a fixed whitelist.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import aiohttp

from batch_runner.comfy.client import ComfyClient, HistoryEntry, OutputFile
from batch_runner.disk import fsync_path
from batch_runner.errors import DownloadIncomplete, OutputRejected, TransientError
from batch_runner.threads import run_to_the_end

__all__ = [
    "SAFE_EXTENSIONS",
    "DiskFull",
    "Downloaded",
    "VideoInfo",
    "download",
    "no_video_error",
    "safe_extension",
    "sha256_file",
    "verify_video",
]

#: Extensions an output may have; anything else is refused (DESIGN §8).
SAFE_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".gif", ".webp", ".png"})
_CHUNK = 1024 * 1024
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFull(TransientError):
    """The local disk (or quota) is full; nothing partial was left behind."""


@dataclass(frozen=True)
class Downloaded:
    """A complete, fsync'd file at ``path``."""

    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class VideoInfo:
    """What decoding the first video stream found."""

    width: int
    height: int
    frames: int
    fps: float
    codec: str


def safe_extension(filename: str) -> str:
    """The lower-case extension of a server file name if whitelisted; else OutputRejected."""
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    if suffix not in SAFE_EXTENSIONS:
        raise OutputRejected(f"output {filename!r} does not have an accepted video extension")
    return suffix


def no_video_error(entry: HistoryEntry, endpoint: str) -> OutputRejected:
    """The error for a successful prompt whose outputs hold no usable video file."""
    listed = ", ".join(f"{f.node_id}:{f.filename}" for f in entry.outputs) or "no files"
    return OutputRejected(
        f"prompt {entry.prompt_id} on {endpoint} finished without a video output ({listed})",
        endpoint=endpoint,
    )


async def download(
    client: ComfyClient,
    file: OutputFile,
    dest: Path,
    *,
    base_dir: Path,
    max_bytes: int | None = None,
) -> Downloaded:
    """Stream ``file`` from ``/view`` into ``dest`` (inside ``base_dir``), atomically.

    Raises OutputRejected (unsafe extension, more than ``max_bytes`` — default the client's
    ``limits.max_download_bytes``), DownloadIncomplete (body shorter than announced or cut),
    DiskFull, and whatever :meth:`ComfyClient.open_view` raises. ``dest`` outside
    ``base_dir`` is a programming error (ValueError).
    """
    name = client.endpoint.name
    safe_extension(file.filename)
    dest = _inside(dest, base_dir)
    limit = client.limits.max_download_bytes if max_bytes is None else max_bytes
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        async with client.open_view(file) as response:
            expected = response.content_length
            if expected is not None and expected > limit:
                raise OutputRejected(
                    f"output {file.filename!r} is {expected} bytes, over the {limit} byte limit",
                    endpoint=name,
                )
            size, digest = await _stream_to(response, part, limit, file.filename, name)
        if expected is not None and size != expected:
            raise DownloadIncomplete(
                f"output {file.filename!r}: got {size} of {expected} bytes", endpoint=name
            )
        # Off the loop: a sync on a slow or network disk would stall every endpoint.
        await run_to_the_end(_replace_durably, part, dest)
    except OSError as exc:
        _remove(part)
        if exc.errno in _DISK_FULL:
            raise DiskFull(f"no space left for {dest.name}: {exc.strerror}", endpoint=name) from exc
        raise
    except BaseException:
        _remove(part)
        raise
    return Downloaded(dest, size, digest)


async def _stream_to(
    response: aiohttp.ClientResponse, part: Path, limit: int, filename: str, endpoint: str
) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    # Plain blocking writes: they land in the page cache in microseconds; only fsync is slow.
    with part.open("wb") as out:
        try:
            async for chunk in response.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise OutputRejected(
                        f"output {filename!r} exceeds the {limit} byte limit", endpoint=endpoint
                    )
                digest.update(chunk)
                out.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise DownloadIncomplete(
                f"output {filename!r}: the transfer broke after {size} bytes ({exc})",
                endpoint=endpoint,
            ) from exc
        out.flush()
        await run_to_the_end(os.fsync, out.fileno())
    return size, digest.hexdigest()


def _replace_durably(part: Path, dest: Path) -> None:
    os.replace(part, dest)
    fsync_path(dest.parent)


def _inside(dest: Path, base_dir: Path) -> Path:
    base = base_dir.resolve()
    resolved = dest.resolve()
    if resolved.parent != base and base not in resolved.parent.parents:
        raise ValueError(f"refusing to write {dest}: it is outside the output folder {base}")
    return resolved


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (for checking finished outputs on resume)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_video(
    path: Path, expected_frames: int | None, *, endpoint: str | None = None
) -> VideoInfo:
    """Decode every frame of the first video stream (blocking: use ``asyncio.to_thread``).

    A file that does not open or decode, or decodes fewer frames than its header announces,
    is DownloadIncomplete (truncated: download again); no video stream or a complete file
    with a frame count other than ``expected_frames`` is OutputRejected.
    """
    import av  # PyAV loads FFmpeg: only when verification is actually used

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise OutputRejected(f"{path.name} has no video stream", endpoint=endpoint)
            stream = container.streams.video[0]
            announced = int(stream.frames or 0)
            decoded = sum(1 for _ in container.decode(stream))
            info = VideoInfo(
                width=int(stream.codec_context.width),
                height=int(stream.codec_context.height),
                frames=decoded,
                fps=float(stream.average_rate or 0.0),
                codec=str(stream.codec_context.name),
            )
    except av.error.FFmpegError as exc:
        raise DownloadIncomplete(f"{path.name} does not decode: {exc}", endpoint=endpoint) from exc
    if decoded == 0 or decoded < announced:
        raise DownloadIncomplete(
            f"{path.name} decodes {decoded} of {announced} announced frames", endpoint=endpoint
        )
    if expected_frames is not None and decoded != expected_frames:
        raise OutputRejected(
            f"{path.name} has {decoded} frames, {expected_frames} expected", endpoint=endpoint
        )
    return info
