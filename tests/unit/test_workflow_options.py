"""LoRAs and the 4-step set-up of the built-in template; the manifest's workflow column."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch_runner.config import build_settings
from batch_runner.errors import ConfigError, WorkflowError
from batch_runner.manifest import JobSpec, read_manifest, workflow_names
from batch_runner.workflow import render, resolve
from batch_runner.workflow.wan22 import (
    FAST4_LORAS,
    Lora,
    parse_lora,
    wan22_fast4_template,
    wan22_template,
)
from tests.helpers import make_image, write_csv, write_jsonl


def _spec(**fields: object) -> JobSpec:
    return JobSpec(job_id="j", line=2, image=Path("/in/a.png"), prompt="walk", **fields)  # type: ignore[arg-type]


def test_parse_lora() -> None:
    assert parse_lora("high.safetensors") == Lora("high.safetensors", 1.0)
    assert parse_lora(" wan/high.safetensors:0.8 ") == Lora("wan/high.safetensors", 0.8)
    # A colon that is not followed by a number is part of the name.
    assert parse_lora("a:b.safetensors") == Lora("a:b.safetensors", 1.0)
    with pytest.raises(WorkflowError, match="FILE"):
        parse_lora(":0.5")
    with pytest.raises(WorkflowError, match="finite"):
        parse_lora("x.safetensors:nan")


def test_fast4_switches_at_2_and_recomputes_when_steps_change() -> None:
    template = wan22_fast4_template()
    resolved = resolve(_spec(), (1280, 704), template.defaults)
    graph = render(template, resolved, "a.png")
    first, second = graph["57"]["inputs"], graph["58"]["inputs"]
    assert (first["steps"], first["cfg"], first["end_at_step"], second["start_at_step"]) == (
        4, 1.0, 2, 2,
    )  # fmt: skip
    assert graph["64"]["inputs"]["lora_name"] == FAST4_LORAS[0].name
    assert graph["65"]["inputs"]["lora_name"] == FAST4_LORAS[1].name
    # 8 steps at the preset's shift 5: sigma stays at or above 0.9 for 3 steps.
    eight = render(template, resolve(_spec(steps=8), (1280, 704), template.defaults), "a.png")
    assert eight["57"]["inputs"]["end_at_step"] == 3
    # A row's own switch step still wins.
    own = render(template, resolve(_spec(switch_step=1), (1280, 704), template.defaults), "a")
    assert own["58"]["inputs"]["start_at_step"] == 1


def test_loras_sit_between_each_expert_and_its_model_sampling() -> None:
    plain = wan22_template()
    graph = wan22_template(lora_high=Lora("h.safetensors", 0.7)).graph
    assert graph["64"] == {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"lora_name": "h.safetensors", "strength_model": 0.7, "model": ["37", 0]},
    }
    assert graph["54"]["inputs"]["model"] == ["64", 0]
    assert graph["55"] == plain.graph["55"] and "65" not in graph
    assert wan22_template(lora_high=Lora("h")).fingerprint() != plain.fingerprint()


def test_workflow_column_keeps_ids_and_hashes_of_rows_without_it(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    plain = write_csv(tmp_path / "plain.csv", [{"image": "a.png", "prompt": "cat"}])
    mixed = write_csv(
        tmp_path / "mixed.csv",
        [
            {"image": "a.png", "prompt": "cat", "workflow": ""},
            {"image": "a.png", "prompt": "cat", "workflow": "wan22-fast4"},
        ],
    )
    (before,) = read_manifest(plain)
    same, fast = read_manifest(mixed)
    assert isinstance(before, JobSpec) and isinstance(same, JobSpec) and isinstance(fast, JobSpec)
    # Ids derived from content, and content hashes, are those of a manifest without the column.
    assert same.job_id == before.job_id and same.content_hash() == before.content_hash()
    assert "workflow" not in same.to_json()
    assert fast.workflow == "wan22-fast4" and fast.job_id != same.job_id
    assert JobSpec.from_json(fast.to_json()) == fast


def test_workflow_names_reads_only_that_column(tmp_path: Path) -> None:
    csv_path = write_csv(
        tmp_path / "m.csv",
        [
            {"image": "x.png", "prompt": "a", "workflow": " flows/a.json "},
            {"image": "x.png", "prompt": "b", "workflow": ""},
            {"image": "x.png", "prompt": "c", "workflow": "wan22"},
        ],
    )
    assert workflow_names(csv_path) == {"flows/a.json", "wan22"}
    jsonl = write_jsonl(
        tmp_path / "m.jsonl",
        [{"image": "x.png", "prompt": "a", "workflow": "b.json"}, {"image": "x", "prompt": "b"}],
    )
    assert workflow_names(jsonl) == {"b.json"}
    assert workflow_names(write_csv(tmp_path / "n.csv", [{"image": "x", "prompt": "a"}])) == set()


def test_config_reads_workflow_bindings_loras_and_fast4(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'lora_high = "h.safetensors:0.5"\nfast4 = true\nobject_info = "info.json"\n'
        '[workflows."flows/a.json".bindings]\nprompt = "6.text"\n'
    )
    settings = build_settings(tmp_path / "m.csv", config_file=config, lora_low="l.safetensors")
    assert (settings.lora_high, settings.lora_low, settings.fast4) == (
        "h.safetensors:0.5", "l.safetensors", True,
    )  # fmt: skip
    assert settings.object_info == tmp_path / "info.json"
    assert settings.workflow_bindings == {"flows/a.json": {"prompt": "6.text"}}
    config.write_text('[workflows."a.json"]\nbinds = {}\n')
    with pytest.raises(ConfigError, match="may only hold a bindings table"):
        build_settings(tmp_path / "m.csv", config_file=config)
