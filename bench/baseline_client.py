"""The baseline: a client that works like the sample API clients people start from.

One job at a time per endpoint: upload the image, POST /prompt, then poll /queue and
/history at a fixed interval until the prompt is in the history, download the video, take
the next job. It renders the same Wan2.2 graph as the runner, so only the way of driving the
servers differs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from batch_runner.manifest import JobSpec, read_manifest
from batch_runner.workflow import probe_image_size, render, resolve, wan22_template


async def _one_job(
    session: aiohttp.ClientSession, url: str, spec: JobSpec, out: Path, poll_s: float
) -> None:
    template = wan22_template()
    form = aiohttp.FormData()
    form.add_field("image", spec.image.read_bytes(), filename=spec.image.name)
    form.add_field("overwrite", "true")
    async with session.post(f"{url}/upload/image", data=form) as answer:
        answer.raise_for_status()
        name = (await answer.json())["name"]
    resolved = resolve(spec, probe_image_size(spec.image), template.defaults)
    graph = render(template, resolved, name)
    client_id = uuid.uuid4().hex
    async with session.post(f"{url}/prompt", json={"prompt": graph, "client_id": client_id}) as a:
        a.raise_for_status()
        prompt_id = (await a.json())["prompt_id"]
    while True:
        await asyncio.sleep(poll_s)
        async with session.get(f"{url}/queue") as answer:
            queue = await answer.json()
        waiting = [item[1] for item in queue["queue_running"] + queue["queue_pending"]]
        if prompt_id in waiting:
            continue
        async with session.get(f"{url}/history/{prompt_id}") as answer:
            history = await answer.json()
        if prompt_id in history:
            break
    for node in history[prompt_id]["outputs"].values():
        for files in node.values():
            if not isinstance(files, list):
                continue
            for file in files:
                if isinstance(file, dict) and str(file.get("filename", "")).endswith(".mp4"):
                    params = {k: file.get(k, "") for k in ("filename", "subfolder", "type")}
                    async with session.get(f"{url}/view", params=params) as answer:
                        answer.raise_for_status()
                        (out / f"{spec.job_id}.mp4").write_bytes(await answer.read())
                    return
    raise RuntimeError(f"prompt {prompt_id} on {url} gave no video")


async def run_baseline(
    manifest: Path, urls: Sequence[str], out: Path, *, poll_s: float = 1.0
) -> dict[str, Any]:
    """Run every row of ``manifest``; returns wall time and jobs done."""
    out.mkdir(parents=True, exist_ok=True)
    specs = [item for item in read_manifest(manifest) if isinstance(item, JobSpec)]
    queue: asyncio.Queue[JobSpec] = asyncio.Queue()
    for spec in specs:
        queue.put_nowait(spec)
    done = 0

    async def worker(session: aiohttp.ClientSession, url: str) -> None:
        nonlocal done
        while True:
            try:
                spec = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await _one_job(session, url, spec, out, poll_s)
            done += 1

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session, url) for url in urls))
    return {"wall_s": time.perf_counter() - started, "done": done}
