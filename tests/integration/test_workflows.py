"""Several workflows in one run: built-in names, UI- and API-format files, LoRAs, fast4."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from batch_runner.emulator import Emulator, EmulatorConfig
from batch_runner.emulator.config import WAN22_MODELS
from batch_runner.errors import InputError
from batch_runner.runner import check_manifest, run_batch, template_for
from batch_runner.states import JobState
from batch_runner.workflow import card_graph
from batch_runner.workflow.wan22 import FAST4_LORAS
from batch_runner.workflows import load_workflows
from tests.helpers import TRACES, decoded_frames, make_image, settings_for, write_csv
from tests.ui_workflows import ui_from_api

WORKFLOWS = Path(__file__).parent.parent / "manifests" / "workflows"
OBJECT_INFO = TRACES / "15_object_info_full.json"
WITH_LORAS = EmulatorConfig(
    step_ms=1.0,
    video_max_side=64,
    models={**WAN22_MODELS, "loras": tuple(lora.name for lora in FAST4_LORAS)},
)


def graphs(db: Path) -> dict[str, dict[str, Any]]:
    """Each job's submitted graph, by job key."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT jobs.key, attempts.graph FROM attempts JOIN jobs ON jobs.id = attempts.job_id"
        ).fetchall()
    return {key: json.loads(graph) for key, graph in rows}


def manifest(tmp_path: Path) -> Path:
    make_image(tmp_path / "a.png", (320, 240))
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "card_ui.json").write_text(
        json.dumps(ui_from_api(card_graph()).document())
    )
    shutil.copy(WORKFLOWS / "model_free_api.json", tmp_path / "flows" / "simple.json")
    rows = [
        {"id": "plain", "image": "a.png", "prompt": "cat", "frames": 9, "workflow": ""},
        {"id": "fast", "image": "a.png", "prompt": "dog", "frames": 9, "workflow": "wan22-fast4"},
        {
            "id": "ui",
            "image": "a.png",
            "prompt": "owl",
            "frames": 9,
            "workflow": "flows/card_ui.json",
        },
        {
            "id": "api",
            "image": "a.png",
            "prompt": "fox",
            "frames": 9,
            "workflow": "flows/simple.json",
        },
    ]
    return write_csv(tmp_path / "jobs.csv", rows)


async def test_each_row_renders_with_its_own_workflow(tmp_path: Path) -> None:
    path = manifest(tmp_path)
    async with Emulator(WITH_LORAS) as emulator:
        settings = settings_for(
            path,
            [emulator.url],
            # The UI file is converted with the schemas the endpoint publishes.
            workflow_bindings={"flows/simple.json": {"frames": "2.amount", "prompt": []}},
        )
        book = await load_workflows(settings)
        summary = await run_batch(settings, book, asyncio.Event())
    assert summary.counts[JobState.SUCCEEDED] == 4, summary
    sent = graphs(settings.db)
    assert "64" not in sent["plain"] and sent["plain"]["57"]["inputs"]["steps"] == 20
    fast = sent["fast"]
    assert fast["64"]["inputs"]["lora_name"] == FAST4_LORAS[0].name
    assert fast["54"]["inputs"]["model"] == ["64", 0]
    steps = [fast[i]["inputs"][k] for i, k in (("57", "steps"), ("57", "end_at_step"))]
    assert steps == [4, 2] and fast["58"]["inputs"]["cfg"] == 1.0
    assert {n["class_type"] for n in sent["api"].values()} == {
        "LoadImage", "RepeatImageBatch", "CreateVideo", "SaveVideo",
    }  # fmt: skip
    assert sent["api"]["2"]["inputs"]["amount"] == 9
    # The converted UI graph has the card's nodes and links; the row's values went in.
    ui, plain = sent["ui"], sent["plain"]
    assert {i: n["class_type"] for i, n in ui.items()} == {
        i: n["class_type"] for i, n in plain.items()
    }
    links = [
        {k: v for k, v in g[i]["inputs"].items() if isinstance(v, list)}
        for g in (ui, plain)
        for i in g
    ]
    assert links[: len(ui)] == links[len(ui) :]
    assert (ui["6"]["inputs"]["text"], ui["63"]["inputs"]["length"]) == ("owl", 9)
    for job in ("plain", "fast", "ui", "api"):
        assert decoded_frames(settings.output_dir / f"{job}.mp4")[0] == 9


async def test_fingerprint_covers_every_workflow_and_one_template_runs_are_unchanged(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path)
    settings = settings_for(path, [], object_info=OBJECT_INFO)
    first = (await load_workflows(settings)).fingerprint()
    simple = tmp_path / "flows" / "simple.json"
    graph = json.loads(simple.read_text())
    graph["3"]["inputs"]["fps"] = 24
    simple.write_text(json.dumps(graph))
    assert (await load_workflows(settings)).fingerprint() != first

    write_csv(path, [{"id": "x", "image": "a.png", "prompt": "cat"}])
    book = await load_workflows(settings)
    assert book.fingerprint() == template_for(settings).fingerprint()


async def test_validation_reports_rows_whose_workflow_cannot_load(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    rows = [
        {"id": "ok", "image": "a.png", "prompt": "cat", "workflow": "wan22"},
        {"id": "gone", "image": "a.png", "prompt": "cat", "workflow": "missing.json"},
        {"id": "fast", "image": "a.png", "prompt": "cat", "workflow": "wan22-fast4", "steps": 8},
    ]
    path = write_csv(tmp_path / "jobs.csv", rows)
    good, problems = check_manifest(path, await load_workflows(settings_for(path, [])))
    assert good == 2
    assert [(p.line, p.reason) for p in problems] == [
        (3, f"workflow 'missing.json': {tmp_path / 'missing.json'}: workflow file not found")
    ]


async def test_missing_lora_stops_the_run_before_anything_is_sent(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    path = write_csv(tmp_path / "jobs.csv", [{"id": "a", "image": "a.png", "prompt": "cat"}])
    async with Emulator(WITH_LORAS) as emulator:
        settings = settings_for(path, [emulator.url], lora_high="mine.safetensors:0.7")
        # The preflight finds it, as it finds every model file the workflows name.
        with pytest.raises(InputError, match=r"lacks model file\(s\) loras/mine\.safetensors"):
            await run_batch(settings, await load_workflows(settings), asyncio.Event())
        # The low-noise expert's LoRA alone, present on the server: the run goes through.
        settings = replace(settings, lora_high=None, lora_low=f"{FAST4_LORAS[1].name}:0.5")
        summary = await run_batch(settings, await load_workflows(settings), asyncio.Event())
    assert summary.counts[JobState.SUCCEEDED] == 1
    sent = graphs(settings.db)["a"]
    assert sent["65"]["inputs"] == {
        "lora_name": FAST4_LORAS[1].name, "strength_model": 0.5, "model": ["56", 0],
    }  # fmt: skip
    assert "64" not in sent and sent["55"]["inputs"]["model"] == ["65", 0]
