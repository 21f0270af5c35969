"""Preflight against emulated servers that lack things: what is missing where, and what a run
does about it."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import socket
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from batch_runner.config import EndpointSettings
from batch_runner.emulator import Emulator, EmulatorConfig
from batch_runner.emulator.config import WAN22_MODELS
from batch_runner.preflight import PreflightFailed, check_endpoints, requirements
from batch_runner.runner import run_batch, template_for
from batch_runner.states import JobState
from batch_runner.workflow import WorkflowTemplate, wan22_template
from tests.helpers import make_image, settings_for, write_csv

LOW_NOISE = "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"
HIGH_NOISE = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
WITHOUT_LOW_NOISE = {**WAN22_MODELS, "diffusion_models": (HIGH_NOISE,)}


def fast(**changes: object) -> EmulatorConfig:
    return EmulatorConfig(step_ms=1.0, video_max_side=32, **changes)  # type: ignore[arg-type]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def batch(tmp_path: Path, n: int) -> Path:
    make_image(tmp_path / "a.png", (64, 48))
    rows = [{"id": f"j{i}", "image": "a.png", "prompt": f"p{i}", "frames": 5} for i in range(n)]
    return write_csv(tmp_path / "jobs.csv", rows)


def test_requirements_of_the_builtin_workflow_name_every_card_file() -> None:
    needs = requirements(wan22_template())
    assert {"UNETLoader", "CLIPLoader", "VAELoader", "SaveVideo"} <= set(needs.node_classes)
    where = {m.where for m in needs.models}
    assert where == {
        f"diffusion_models/{HIGH_NOISE}",
        f"diffusion_models/{LOW_NOISE}",
        "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "vae/wan_2.1_vae.safetensors",
    }


async def test_each_endpoint_says_what_it_lacks() -> None:
    template = wan22_template()
    async with AsyncExitStack() as stack:
        good = await stack.enter_async_context(Emulator(fast()))
        short = await stack.enter_async_context(Emulator(fast(models=WITHOUT_LOW_NOISE)))
        down = closed_port_url()
        checks = await check_endpoints(
            [EndpointSettings(u) for u in (good.url, short.url, down)], template
        )
    assert [c.ready for c in checks] == [True, False, False]
    assert [m.name for m in checks[1].missing_models] == [LOW_NOISE]
    assert checks[1].missing_models[0].needed_by == "node 56 UNETLoader.unet_name"
    assert "lacks model file(s) diffusion_models/" + LOW_NOISE in checks[1].verdict()
    assert not checks[2].reachable and checks[2].verdict().startswith("unreachable")


async def test_a_refused_token_is_told_apart_from_an_unreachable_server() -> None:
    template = wan22_template()
    async with Emulator(fast(require_token="right")) as proxy:
        wrong, right, none = await check_endpoints(
            [
                EndpointSettings(proxy.url, "wrong"),
                EndpointSettings(proxy.url, "right"),
                EndpointSettings(proxy.url),
            ],
            template,
        )
    assert wrong.reachable and not wrong.token_accepted
    assert "401" in wrong.verdict() and "refused" in wrong.verdict()
    assert "missing" in (none.error or "")
    assert right.ready


async def test_unknown_node_classes_and_option_list_models_are_found() -> None:
    graph = copy.deepcopy(dict(wan22_template().graph))
    graph["90"] = {"class_type": "FancyFrameInterpolator", "inputs": {"images": ["8", 0]}}
    graph["91"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x.pth"}}
    base = wan22_template()
    template = WorkflowTemplate("custom", graph, base.bindings, base.output_node_ids)
    with_upscaler = {**WAN22_MODELS, "upscale_models": ("4x.pth",)}
    async with AsyncExitStack() as stack:
        has = await stack.enter_async_context(Emulator(fast(models=with_upscaler)))
        lacks = await stack.enter_async_context(Emulator(fast()))
        endpoints = [EndpointSettings(has.url), EndpointSettings(lacks.url)]
        checks = await check_endpoints(endpoints, template)
    assert checks[0].missing_nodes == ("FancyFrameInterpolator",)
    assert checks[0].missing_models == ()
    # UpscaleModelLoader has no /models folder mapping: its published option list decides.
    assert [m.name for m in checks[1].missing_models] == ["4x.pth"]


async def test_model_files_come_from_the_loaders_option_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loaders publish the files they accept, so no folder is listed; where a loader
    publishes no option list, its folder's listing decides."""
    from batch_runner.comfy.client import ComfyClient

    listed: list[str] = []
    models, object_info = ComfyClient.models, ComfyClient.object_info

    async def listing(self: ComfyClient, folder: str) -> list[str] | None:
        listed.append(folder)
        return await models(self, folder)

    monkeypatch.setattr(ComfyClient, "models", listing)
    template = wan22_template()
    async with Emulator(fast(models=WITHOUT_LOW_NOISE)) as short:
        [check] = await check_endpoints([EndpointSettings(short.url)], template)
        assert [m.name for m in check.missing_models] == [LOW_NOISE]
        assert listed == []

        async def without_unet_options(self: ComfyClient, node_class: str) -> dict[str, Any]:
            answer = await object_info(self, node_class)
            if node_class == "UNETLoader":
                answer["UNETLoader"]["input"]["required"]["unet_name"] = ["STRING", {}]
            return answer

        monkeypatch.setattr(ComfyClient, "object_info", without_unet_options)
        [check] = await check_endpoints([EndpointSettings(short.url)], template)
    assert [m.name for m in check.missing_models] == [LOW_NOISE]
    assert listed == ["diffusion_models"]


async def test_run_leaves_out_an_endpoint_that_lacks_a_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = batch(tmp_path, 3)
    async with AsyncExitStack() as stack:
        good = await stack.enter_async_context(Emulator(fast()))
        short = await stack.enter_async_context(Emulator(fast(models=WITHOUT_LOW_NOISE)))
        settings = settings_for(manifest, [short.url, good.url])
        with caplog.at_level(logging.WARNING):
            summary = await run_batch(settings, template_for(settings), asyncio.Event())
    assert summary.exit_code == 0 and summary.counts[JobState.SUCCEEDED] == 3
    assert short.executions == {} and len(good.executions) == 3
    assert any(short.url in r.message and LOW_NOISE in r.message for r in caplog.records)


async def test_run_refuses_to_start_when_no_endpoint_can_run_the_workflow(tmp_path: Path) -> None:
    manifest = batch(tmp_path, 2)
    async with Emulator(fast(models=WITHOUT_LOW_NOISE)) as short:
        settings = settings_for(manifest, [short.url, closed_port_url()])
        with pytest.raises(PreflightFailed) as refused:
            await run_batch(settings, template_for(settings), asyncio.Event())
    message = str(refused.value)
    assert LOW_NOISE in message and "unreachable" in message
    assert "models/ folder" in message, "the message says what to do"
    assert short.executions == {}
    with sqlite3.connect(settings.db) as conn:
        assert conn.execute("SELECT count(*) FROM attempts").fetchone() == (0,)


async def test_run_refuses_when_every_endpoint_is_unreachable(tmp_path: Path) -> None:
    settings = settings_for(batch(tmp_path, 1), [closed_port_url(), closed_port_url()])
    with pytest.raises(PreflightFailed) as refused:
        await run_batch(settings, template_for(settings), asyncio.Event())
    assert str(refused.value).count("unreachable") == 2
    assert "check the URLs and that ComfyUI is running there" in str(refused.value)


@asynccontextmanager
async def some_other_web_server() -> AsyncIterator[str]:
    """An HTTP server that is not ComfyUI: every path is its web page."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>Grafana</title>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/")


async def test_a_url_that_is_not_comfyui_is_left_out_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = batch(tmp_path, 2)
    async with some_other_web_server() as other, Emulator(fast()) as good:
        settings = settings_for(manifest, [other, good.url])
        summary = await run_batch(settings, template_for(settings), asyncio.Event())
        assert summary.counts[JobState.SUCCEEDED] == 2 and len(good.executions) == 2
        assert any(
            other in r.message and "left out" in r.message and "not ComfyUI" in r.message
            for r in caplog.records
        )
        # Alone, it stops the run before anything is sent, saying what to check.
        settings = settings_for(manifest, [other])
        with pytest.raises(PreflightFailed) as refused:
            await run_batch(settings, template_for(settings), asyncio.Event())
    assert f"{other}: not ComfyUI" in str(refused.value)
    assert "check the URLs and that ComfyUI is running there" in str(refused.value)


@asynccontextmanager
async def hung_server() -> AsyncIterator[str]:
    """Accepts connections and reads requests, but never answers (a hung ComfyUI)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
def short_preflight(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preflight gives up on a question after half a second."""
    from batch_runner import preflight

    short = dataclasses.replace(preflight.PREFLIGHT_LIMITS, request_timeout=0.5)
    monkeypatch.setattr(preflight, "PREFLIGHT_LIMITS", short)


@pytest.mark.usefixtures("short_preflight")
async def test_a_hung_server_does_not_hold_the_start_for_the_full_request_timeout() -> None:
    async with hung_server() as hung, Emulator(fast()) as good:
        endpoints = [EndpointSettings(hung), EndpointSettings(good.url)]
        # The bound is far below the one-minute request timeout a run's requests have.
        stuck, ready = await asyncio.wait_for(
            check_endpoints(endpoints, wan22_template()), timeout=30
        )
    assert ready.ready
    assert not stuck.reachable and "timed out on /system_stats" in stuck.verdict()


@pytest.mark.usefixtures("short_preflight")
async def test_a_run_works_on_while_a_hung_endpoint_is_probed_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner import scheduler

    # A slot waiting for the hung endpoint's websocket would hold the end of the run.
    monkeypatch.setattr(scheduler, "WS_READY_WAIT_S", 120.0)
    manifest = batch(tmp_path, 3)
    async with hung_server() as hung, Emulator(fast()) as good:
        settings = settings_for(manifest, [hung, good.url])
        # Far below the one-minute request timeout of the hung endpoint's own lane, and the
        # wait for its socket.
        summary = await asyncio.wait_for(
            run_batch(settings, template_for(settings), asyncio.Event()), timeout=30
        )
    assert summary.exit_code == 0 and len(good.executions) == 3


async def test_questions_to_one_endpoint_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from batch_runner import preflight
    from batch_runner.comfy.client import ComfyClient

    in_flight, most = 0, 0
    object_info = ComfyClient.object_info

    async def counting(self: ComfyClient, node_class: str) -> object:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await object_info(self, node_class)
        finally:
            in_flight -= 1

    monkeypatch.setattr(ComfyClient, "object_info", counting)
    needs = requirements(wan22_template())
    assert len(needs.node_classes) > preflight.CONCURRENT_QUESTIONS
    async with Emulator(fast()) as emulator:
        [check] = await check_endpoints([EndpointSettings(emulator.url)], wan22_template())
    assert check.ready
    assert most == preflight.CONCURRENT_QUESTIONS


async def test_a_run_does_not_probe_again_what_the_preflight_just_heard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_runner.comfy.client import ComfyClient

    probed: list[str] = []
    system_stats = ComfyClient.system_stats

    async def counting(self: ComfyClient) -> dict[str, object]:
        probed.append(self.endpoint.url)
        return await system_stats(self)

    monkeypatch.setattr(ComfyClient, "system_stats", counting)
    manifest = batch(tmp_path, 2)
    async with Emulator(fast()) as emulator:
        settings = settings_for(manifest, [emulator.url])
        summary = await run_batch(settings, template_for(settings), asyncio.Event())
    assert summary.exit_code == 0
    assert probed == [emulator.url]
