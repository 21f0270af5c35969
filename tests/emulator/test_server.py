"""Schemas, run order, restarts and the private stats route."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import aiohttp
import pytest

from batch_runner.emulator import WAN22_MODELS, Emulator, EmulatorConfig
from tests.emulator import replay
from tests.emulator.conftest import (
    connect,
    history,
    new_id,
    simple_workflow,
    submit,
    upload,
    wan_workflow,
)

DYNAMIC = {
    ("LoadImage", "image"),
    ("UNETLoader", "unet_name"),
    ("CLIPLoader", "clip_name"),
    ("VAELoader", "vae_name"),
    ("LoraLoaderModelOnly", "lora_name"),
}


async def test_object_info_matches_recording(session: aiohttp.ClientSession) -> None:
    wan = replay.load("05a_object_info_wan_nodes")["object_info"]
    full = replay.load("15_object_info_full")["object_info"]
    async with Emulator(EmulatorConfig(models=WAN22_MODELS)) as emulator:
        await upload(session, emulator.url, "wan_start.png")
        async with session.get(emulator.url + "/object_info") as response:
            published = await response.json()
    for name, recorded in wan.items():
        expected = dict(recorded)
        if name == "LoadImage":
            expected["input"] = {"required": {"image": [["wan_start.png"], {"image_upload": True}]}}
        assert published[name] == expected, name
    for name, info in published.items():
        recorded = full[name]
        for section in ("required", "optional"):
            for field, spec in info["input"].get(section, {}).items():
                if (name, field) not in DYNAMIC and name != "UpscaleModelLoader":
                    assert spec == recorded["input"][section][field], (name, field)
        assert info["output"] == recorded["output"]
        assert info["output_node"] == recorded["output_node"]


async def test_wan_order_matches_05b(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    derived = replay.load("05b_wan_execution_order_DERIVED")
    await upload(session, emulator.url)
    client_id = new_id()
    socket = await connect(session, emulator.url, client_id)
    prompt_id = await submit(session, emulator.url, wan_workflow(), client_id)
    await socket.wait("executing", node=None, prompt_id=prompt_id)
    await socket.close()
    messages = socket.of(prompt_id)
    order = [m["data"]["node"] for m in messages if m["type"] == "executing"]
    assert order[:-1] == [step["node"] for step in derived["wan_execution_order"]]
    progress = [
        (m["data"]["node"], m["data"]["value"], m["data"]["max"])
        for m in messages
        if m["type"] == "progress"
    ]
    assert progress == [("57", v, 10) for v in range(1, 11)] + [("58", v, 10) for v in range(1, 11)]


async def test_restart_forgets_memory_but_keeps_files_and_port(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    await upload(session, emulator.url)
    client_id = new_id()
    socket = await connect(session, emulator.url, client_id)
    prompt_id = await submit(session, emulator.url, simple_workflow(), client_id)
    await socket.wait("executing", node=None, prompt_id=prompt_id)
    url = emulator.url
    await emulator.restart()
    async with asyncio.timeout(5):
        await socket.closed.wait()
    assert emulator.url == url
    assert await history(session, url, prompt_id) == {}
    # Same graph again: number counter back at 0, cache empty, output counter continues.
    socket = await connect(session, url, client_id)
    again = await submit(session, url, simple_workflow(), client_id, prompt_id=prompt_id)
    cached = await socket.wait("execution_cached", prompt_id=again)
    await socket.wait("executing", node=None, prompt_id=again)
    entry = await history(session, url, again)
    await socket.close()
    assert cached["data"]["nodes"] == []
    assert entry["prompt"][0] == 0
    assert entry["outputs"]["4"]["images"][0]["filename"] == "t_00002_.mp4"
    # Executions are counted across restarts: this prompt id ran twice.
    assert emulator.executions[prompt_id] == 2
    async with session.get(url + "/emulator/stats") as response:
        stats = await response.json()
    assert stats["executions"] == {prompt_id: 2}
    assert all(gap >= 0 for gap in stats["switch_gaps_ms"])


async def test_restart_without_forget_keeps_history(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    await upload(session, emulator.url)
    client_id = new_id()
    socket = await connect(session, emulator.url, client_id)
    prompt_id = await submit(session, emulator.url, simple_workflow(), client_id)
    await socket.wait("executing", node=None, prompt_id=prompt_id)
    await emulator.restart(forget=False)
    assert (await history(session, emulator.url, prompt_id))["status"]["completed"] is True


async def test_crash_refuses_http_until_restart(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    await emulator.crash()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(emulator.url + "/queue"):
            pass
    await emulator.restart()
    async with session.get(emulator.url + "/queue") as response:
        assert response.status == 200


async def test_switch_gaps_are_recorded_between_queued_prompts(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    await upload(session, emulator.url)
    client_id = new_id()
    socket = await connect(session, emulator.url, client_id)
    ids = [
        await submit(session, emulator.url, simple_workflow(frames=n), client_id) for n in (2, 3, 4)
    ]
    await socket.wait("executing", node=None, prompt_id=ids[-1])
    await socket.close()
    assert len(emulator.switch_gaps_ms) == 2
    assert all(0 <= gap < 1000 for gap in emulator.switch_gaps_ms)


async def test_history_keeps_at_most_max_history_entries(session: aiohttp.ClientSession) -> None:
    async with Emulator(EmulatorConfig(step_ms=0, max_history=3)) as emulator:
        await upload(session, emulator.url)
        client_id = new_id()
        socket = await connect(session, emulator.url, client_id)
        ids = [
            await submit(session, emulator.url, simple_workflow(frames=2), client_id)
            for _ in range(5)
        ]
        await socket.wait("executing", node=None, prompt_id=ids[-1])
        await socket.close()
        async with session.get(emulator.url + "/history") as response:
            assert list(await response.json()) == ids[2:]
        async with session.get(emulator.url + "/history", params={"max_items": "2"}) as response:
            assert list(await response.json()) == ids[3:]
        params = {"max_items": "1", "offset": "1"}
        async with session.get(emulator.url + "/history", params=params) as response:
            assert list(await response.json()) == ids[3:4]


async def _step_ends(
    monkeypatch: pytest.MonkeyPatch,
    session: aiohttp.ClientSession,
    step_s: float,
    host_work_s: float,
) -> list[float]:
    """When each sampler step of one Wan2.2 prompt ends on a fake clock (starting at 0), with
    ``host_work_s`` of the emulator's own work after each step."""
    from batch_runner.emulator import executor as executor_mod

    now = [0.0]
    step_ends: list[float] = []

    async def gpu_wait(seconds: float) -> None:
        now[0] += max(seconds, 0.0)
        step_ends.append(now[0])
        now[0] += host_work_s

    monkeypatch.setattr(executor_mod, "gpu_clock", lambda: now[0])
    async with Emulator(EmulatorConfig(step_ms=step_s * 1000, models=WAN22_MODELS)) as emulator:
        monkeypatch.setattr(emulator._require().executor, "_gpu_wait", gpu_wait)
        await upload(session, emulator.url, "start.png")
        client_id = new_id()
        socket = await connect(session, emulator.url, client_id)
        prompt_id = await submit(session, emulator.url, wan_workflow("start.png"), client_id)
        await socket.wait("executing", node=None, prompt_id=prompt_id)
        await socket.close()
    assert len(step_ends) == 20
    return step_ends


async def test_emulated_gpu_time_does_not_grow_with_the_emulators_own_work(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step k of a prompt ends k × step_ms after it started, however long the emulator's own
    work between steps takes (here 7 ms per 25 ms step), so a benchmark's ideal makespan is
    what the emulated servers deliver."""
    ends = await _step_ends(monkeypatch, session, 0.025, 0.007)
    assert ends == pytest.approx([k * 0.025 for k in range(1, 21)])


async def _prompt_spans(
    monkeypatch: pytest.MonkeyPatch,
    session: aiohttp.ClientSession,
    prompts: int,
    host_work_s: Callable[[int], float],
) -> list[float]:
    """Start to end of each of ``prompts`` Wan2.2 prompts (20 steps × 25 ms) on a fake clock
    that moves only while steps wait, the emulator's own work after step k of the run taking
    ``host_work_s(k)``."""
    from batch_runner.emulator import executor as executor_mod

    now = [0.0]
    ends: list[float] = []

    async def gpu_wait(seconds: float) -> None:
        now[0] += max(seconds, 0.0) + host_work_s(len(ends))
        ends.append(now[0])

    monkeypatch.setattr(executor_mod, "gpu_clock", lambda: now[0])
    async with Emulator(EmulatorConfig(step_ms=25, models=WAN22_MODELS)) as emulator:
        monkeypatch.setattr(emulator._require().executor, "_gpu_wait", gpu_wait)
        await upload(session, emulator.url, "start.png")
        client_id = new_id()
        socket = await connect(session, emulator.url, client_id)
        for seed in range(prompts):
            workflow = wan_workflow("start.png")
            workflow["57"]["inputs"]["noise_seed"] = seed  # not served from the cache
            prompt_id = await submit(session, emulator.url, workflow, client_id)
            await socket.wait("executing", node=None, prompt_id=prompt_id)
        await socket.close()
    # Each prompt ends when its last step's work is done; the clock does not move otherwise.
    assert len(ends) == prompts * 20, len(ends)
    prompt_ends = ends[19::20]
    return [b - a for a, b in itertools.pairwise([0.0, *prompt_ends])]


async def test_a_prompt_lasts_its_gpu_time_with_the_emulators_own_work_after_the_steps(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The emulator's own work after the last step (here 7 ms) is made up by the next
    prompt: the first prompt lasts 507 ms for its 20 × 25 ms, the later ones 500 ms."""
    spans = await _prompt_spans(monkeypatch, session, 8, lambda _step: 0.007)
    assert spans[0] == pytest.approx(0.507)
    assert spans[1:] == pytest.approx([0.500] * 7, abs=1e-6)


async def test_a_stall_of_the_host_is_made_up_by_the_next_prompts(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 40 ms stall at the last step of the second prompt (the host busy elsewhere) makes
    that prompt long; the next ones are shorter, half a step at most each, until the server
    has been busy its 20 × 25 ms per prompt in all."""
    spans = await _prompt_spans(monkeypatch, session, 8, lambda step: 0.040 if step == 39 else 0.0)
    assert spans[:2] == pytest.approx([0.500, 0.540], abs=1e-6)
    assert all(0.4875 - 1e-6 <= span <= 0.500 + 1e-6 for span in spans[2:])
    assert sum(spans) == pytest.approx(8 * 0.500, abs=1e-6)


async def test_a_stalled_emulator_does_not_burst_through_the_steps_it_owes(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more own work per step than the step takes (40 ms per 25 ms step), each step
    still waits half a step: clients never see a burst of steps."""
    ends = await _step_ends(monkeypatch, session, 0.025, 0.040)
    gaps = [later - earlier for earlier, later in itertools.pairwise(ends)]
    assert min(gaps) == pytest.approx(0.040 + 0.0125)
