"""`workflow convert`, `workflow show` and a run mixing workflows, from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from batch_runner.workflow import card_graph
from tests.acceptance.conftest import cli
from tests.helpers import TRACES, make_image, write_csv
from tests.ui_workflows import ui_from_api

OBJECT_INFO = str(TRACES / "15_object_info_full.json")


def _ui_file(tmp_path: Path) -> Path:
    path = tmp_path / "card_ui.json"
    path.write_text(json.dumps(ui_from_api(card_graph()).document()))
    return path


def test_convert_offline_and_from_an_endpoint(tmp_path: Path, emulator_url: str) -> None:
    ui = _ui_file(tmp_path)
    offline = cli(
        "workflow", "convert", str(ui), "-o", "api.json", "--object-info", OBJECT_INFO, cwd=tmp_path
    )
    assert offline.returncode == 0, offline.stderr
    converted = json.loads((tmp_path / "api.json").read_text())
    assert {i: n["class_type"] for i, n in converted.items()} == {
        i: n["class_type"] for i, n in card_graph().items()
    }
    online = cli("workflow", "convert", str(ui), "--endpoint", emulator_url, cwd=tmp_path)
    assert online.returncode == 0, online.stderr
    assert json.loads(online.stdout) == converted

    bad = cli("workflow", "convert", "api.json", "--object-info", OBJECT_INFO, cwd=tmp_path)
    assert bad.returncode == 2
    assert "not a UI-format workflow" in bad.stderr and "Traceback" not in bad.stderr
    neither = cli("workflow", "convert", str(ui), cwd=tmp_path)
    assert neither.returncode == 2 and "--endpoint URL or --object-info FILE" in neither.stderr


def test_show_prints_what_a_row_sends_and_run_mixes_workflows(tmp_path: Path) -> None:
    _ui_file(tmp_path)
    make_image(tmp_path / "a.png", (320, 240))
    rows = [
        {"id": "plain", "image": "a.png", "prompt": "cat", "frames": 5, "workflow": ""},
        {"id": "ui", "image": "a.png", "prompt": "owl", "frames": 5, "workflow": "card_ui.json"},
    ]
    write_csv(tmp_path / "jobs.csv", rows)
    shown = cli(
        "workflow", "show", "jobs.csv", "--row", "ui", "--object-info", OBJECT_INFO, cwd=tmp_path
    )
    assert shown.returncode == 0, shown.stderr
    graph = json.loads(shown.stdout)
    assert graph["6"]["inputs"]["text"] == "owl" and graph["63"]["inputs"]["length"] == 5
    assert graph["62"]["inputs"]["image"].startswith("br_")
    fast = cli(
        "workflow", "show", "jobs.csv", "--fast4", "--lora-low", "l.safetensors:0.5", cwd=tmp_path
    )
    assert fast.returncode == 0, fast.stderr
    graph = json.loads(fast.stdout)
    assert graph["65"]["inputs"]["strength_model"] == 0.5 and graph["57"]["inputs"]["steps"] == 4
    # A UI-format workflow with no way to convert it: one plain message, exit code 2.
    offline = cli("validate", "jobs.csv", cwd=tmp_path)
    assert offline.returncode == 2 and "--object-info FILE" in offline.stderr
    assert "Traceback" not in offline.stderr

    # The emulated endpoints publish the schemas the UI file is converted with.
    run = cli("--quiet", "run", "jobs.csv", "--emulate", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "outputs" / "jobs").glob("*.mp4")) == [
        "plain.mp4", "ui.mp4",
    ]  # fmt: skip
