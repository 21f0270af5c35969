"""Output download (atomic, hashed, bounded) and video verification with real MP4s."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from batch_runner import outputs
from batch_runner.comfy import ComfyClient, Endpoint, OutputFile
from batch_runner.errors import DownloadIncomplete, OutputRejected, PromptLost, TransientError
from batch_runner.outputs import DiskFull, download, safe_extension, sha256_file, verify_video

FRAMES = 17


def make_mp4(path: Path, frames: int = FRAMES) -> bytes:
    """A tiny H.264 MP4 like SaveVideo's (64×48, 16 fps)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame(64, 48, "rgb24")
            plane = frame.planes[0]
            plane.update(bytes([index * 12 % 256]) * plane.buffer_size)
            frame.pts, frame.time_base = index, Fraction(1, 16)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path.read_bytes()


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_mp4(tmp_path_factory.mktemp("video") / "src.mp4")


def vfile(name: str = "ComfyUI_00001_.mp4") -> OutputFile:
    return OutputFile(name, "video", "output", "61", True)


@pytest.fixture
async def view_server() -> AsyncIterator[Callable[[Any], Awaitable[ComfyClient]]]:
    """Serve /view with a handler; returns a client for it."""
    servers: list[TestServer] = []
    clients: list[ComfyClient] = []

    async def start(handler: Any) -> ComfyClient:
        app = web.Application()
        app.router.add_get("/view", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        client = ComfyClient(Endpoint(str(server.make_url(""))))
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.aclose()
    for server in servers:
        await server.close()


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------- download


async def test_download_writes_hashes_and_fsyncs(
    view_server: Any, video: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries: list[dict[str, str]] = []

    async def view(request: web.Request) -> web.Response:
        queries.append(dict(request.query))
        return web.Response(body=video, content_type="video/mp4")

    client = await view_server(view)
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    dest = tmp_path / ".incoming" / "job-42.mp4"
    got = await download(client, vfile(), dest, base_dir=tmp_path)
    assert got.path == dest.resolve()
    assert got.size == len(video)
    assert got.sha256 == hashlib.sha256(video).hexdigest() == sha256_file(dest)
    assert dest.read_bytes() == video
    assert queries == [{"filename": "ComfyUI_00001_.mp4", "subfolder": "video", "type": "output"}]
    assert leftovers(tmp_path) == [".incoming/job-42.mp4"]
    # the data under its temporary name, then the folder after the rename
    assert synced == [str(dest) + ".part", str(dest.parent)]


async def test_the_loop_runs_on_while_a_download_is_synced_to_disk(
    view_server: Any, video: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync on a slow disk must not stall every endpoint's traffic: each fsync here waits
    until the event loop has run a callback, which it can only do if the sync is elsewhere."""

    async def view(request: web.Request) -> web.Response:
        return web.Response(body=video, content_type="video/mp4")

    client = await view_server(view)
    loop = asyncio.get_running_loop()
    real_fsync = os.fsync
    loop_ran: list[bool] = []

    def slow_disk(fd: int) -> None:
        seen = threading.Event()
        loop.call_soon_threadsafe(seen.set)
        loop_ran.append(seen.wait(timeout=5))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_disk)
    await download(client, vfile(), tmp_path / "job-1.mp4", base_dir=tmp_path)
    assert loop_ran == [True, True]


async def test_truncated_body_leaves_nothing(tmp_path: Path) -> None:
    async def short_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: 100000\r\n\r\n"
        )
        writer.write(b"x" * 40000)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(short_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ComfyClient(Endpoint(f"127.0.0.1:{port}")) as client:
            with pytest.raises(DownloadIncomplete, match="broke after") as caught:
                await download(client, vfile(), tmp_path / "job.mp4", base_dir=tmp_path)
    finally:
        server.close()
        await server.wait_closed()
    assert isinstance(caught.value, TransientError)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("announce_length", [True, False])
async def test_over_max_bytes_is_rejected(
    view_server: Any, tmp_path: Path, announce_length: bool
) -> None:
    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if announce_length:
            response.content_length = 10 * 65536
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(10):
            await response.write(b"v" * 65536)
        return response

    client = await view_server(big)
    with pytest.raises(OutputRejected, match="limit"):
        await download(client, vfile(), tmp_path / "job.mp4", base_dir=tmp_path, max_bytes=100_000)
    assert leftovers(tmp_path) == []


async def test_missing_output_is_prompt_lost(view_server: Any, tmp_path: Path) -> None:
    async def gone(request: web.Request) -> web.Response:
        return web.Response(status=404)

    client = await view_server(gone)
    with pytest.raises(PromptLost, match="404"):
        await download(client, vfile(), tmp_path / "job.mp4", base_dir=tmp_path)
    assert leftovers(tmp_path) == []


async def test_disk_full_is_transient_and_leaves_nothing(
    view_server: Any, video: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def view(request: web.Request) -> web.Response:
        return web.Response(body=video)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    client = await view_server(view)
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull) as caught:
        await download(client, vfile(), tmp_path / "job.mp4", base_dir=tmp_path)
    assert isinstance(caught.value, TransientError)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["evil.sh", "video", "a.tar.gz", "x.mp4.exe", ""])
async def test_unsafe_extension_is_refused_before_any_request(tmp_path: Path, name: str) -> None:
    client = ComfyClient(Endpoint("127.0.0.1:9"))  # nothing listens: a request would fail
    with pytest.raises(OutputRejected):
        await download(client, vfile(name), tmp_path / "job.mp4", base_dir=tmp_path)


@pytest.mark.parametrize(
    ("name", "extension"),
    [("a.mp4", ".mp4"), ("A.MP4", ".mp4"), ("x (1).webm", ".webm"), ("dir/y.gif", ".gif")],
)
def test_safe_extension(name: str, extension: str) -> None:
    assert safe_extension(name) == extension


async def test_destination_outside_the_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    base = tmp_path / "out"
    base.mkdir()
    (base / "link").symlink_to(outside)
    client = ComfyClient(Endpoint("127.0.0.1:9"))
    for dest in (base / ".." / "job.mp4", base / "link" / "job.mp4", Path("/tmp/job.mp4"), base):
        with pytest.raises(ValueError, match="outside the output folder"):
            await download(client, vfile(), dest, base_dir=base)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------- verify


def test_verify_good_video(video: bytes, tmp_path: Path) -> None:
    path = tmp_path / "good.mp4"
    path.write_bytes(video)
    info = verify_video(path, FRAMES)
    assert info == outputs.VideoInfo(width=64, height=48, frames=FRAMES, fps=16.0, codec="h264")
    assert verify_video(path, None).frames == FRAMES


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_video_is_incomplete(video: bytes, tmp_path: Path, keep: float) -> None:
    path = tmp_path / "cut.mp4"
    path.write_bytes(video[: int(len(video) * keep)])
    with pytest.raises(DownloadIncomplete):
        verify_video(path, FRAMES, endpoint="gpu1:8188")


def test_wrong_frame_count_is_rejected(video: bytes, tmp_path: Path) -> None:
    path = tmp_path / "good.mp4"
    path.write_bytes(video)
    with pytest.raises(OutputRejected, match=f"has {FRAMES} frames, 81 expected"):
        verify_video(path, 81)


def test_file_without_video_stream_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        stream.layout = "mono"
        for index in range(5):
            frame = av.AudioFrame(format="fltp", layout="mono", samples=1024)
            frame.planes[0].update(bytes(frame.planes[0].buffer_size))
            frame.sample_rate, frame.pts = 8000, index * 1024
            frame.time_base = Fraction(1, 8000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(OutputRejected, match="no video stream"):
        verify_video(path, FRAMES)
