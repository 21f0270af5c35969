"""Rendering the built-in Wan2.2 template: every value in its node, nothing else changed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from batch_runner.errors import WorkflowError
from batch_runner.manifest import JobSpec
from batch_runner.workflow import (
    WAN22_DEFAULTS,
    WanModels,
    WorkflowTemplate,
    card_graph,
    render,
    resolve,
    wan22_template,
)

# The card graph as recorded against a real ComfyUI (protocol trace 05, "workflow" key).
CARD_API = Path(__file__).parent.parent / "manifests" / "workflows" / "card_api.json"
CARD_IDS = {"6", "7", "8", "37", "38", "39", "54", "55", "56", "57", "58", "60", "61", "62", "63"}


def _spec(**fields: Any) -> JobSpec:
    fields.setdefault("prompt", "walk")
    return JobSpec(job_id="job-1", line=2, image=Path("/in/a.png"), **fields)


def _changed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """{"node.input": new value} for every input that differs."""
    assert before.keys() == after.keys()
    diff = {}
    for node_id, node in before.items():
        assert after[node_id]["class_type"] == node["class_type"]
        assert after[node_id]["inputs"].keys() == node["inputs"].keys()
        for name, value in node["inputs"].items():
            new = after[node_id]["inputs"][name]
            if new != value or type(new) is not type(value):
                diff[f"{node_id}.{name}"] = new
    return diff


def test_template_graph_is_the_card_graph() -> None:
    graph = wan22_template().graph
    assert set(graph) == CARD_IDS
    assert graph == json.loads(CARD_API.read_text())
    assert graph["37"]["inputs"]["unet_name"] == "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
    assert graph["56"]["inputs"]["unet_name"] == "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"
    assert graph["38"]["inputs"]["clip_name"] == "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    assert graph["39"]["inputs"]["vae_name"] == "wan_2.1_vae.safetensors"
    assert graph["61"]["class_type"] == "SaveVideo"


def test_rendering_the_recorded_values_reproduces_the_card_graph_exactly() -> None:
    template = wan22_template()
    spec = _spec(
        prompt="a red square slowly rotating", negative_prompt="blurry, low quality", seed=123
    )
    graph = render(template, resolve(spec, (1280, 704), template.defaults), "wan_start.png")
    assert json.dumps(graph) == json.dumps(json.loads(CARD_API.read_text()))
    assert graph == card_graph()


def test_every_bound_value_lands_in_its_node() -> None:
    template = wan22_template()
    spec = _spec(
        prompt="a cat walks",
        negative_prompt="static",
        seed=2**64 - 1,
        width=832,
        height=480,
        frames=33,
        fps=24.5,
        steps=40,
        cfg=5.0,
        shift=5.0,
    )
    before = copy.deepcopy(dict(template.graph))
    graph = render(template, resolve(spec, None, template.defaults), "br_abc.png")

    assert _changed(before, graph) == {
        "62.image": "br_abc.png",
        "6.text": "a cat walks",
        "7.text": "static",
        "57.noise_seed": 2**64 - 1,
        "63.width": 832,
        "63.height": 480,
        "63.length": 33,
        "60.fps": 24.5,
        "57.steps": 40,
        "58.steps": 40,
        "57.cfg": 5.0,
        "58.cfg": 5.0,
        "54.shift": 5.0,
        "55.shift": 5,  # written as the card writes it: a whole float stays an int there
        "57.end_at_step": 15,
        "58.start_at_step": 15,
    }
    assert dict(template.graph) == before  # the template is untouched
    assert graph["58"]["inputs"]["noise_seed"] == 0  # the second stage adds no noise


def test_defaults_fill_what_the_row_leaves_out() -> None:
    template = wan22_template()
    graph = render(template, resolve(_spec(), (640, 480), template.defaults), "x.png")
    inputs = {node_id: node["inputs"] for node_id, node in graph.items()}
    assert inputs["7"]["text"] == WAN22_DEFAULTS.negative_prompt
    assert (inputs["63"]["width"], inputs["63"]["height"], inputs["63"]["length"]) == (
        1104,
        816,
        81,
    )
    assert inputs["57"]["noise_seed"] == resolve(_spec(), (640, 480), template.defaults).seed


def test_renders_are_independent_copies() -> None:
    template = wan22_template()
    job = resolve(_spec(), (1280, 704), template.defaults)
    first = render(template, job, "a.png")
    first["6"]["inputs"]["text"] = "mutated"
    first["57"]["inputs"]["model"].append("x")
    second = render(template, job, "a.png")
    assert second["6"]["inputs"]["text"] == "walk"
    assert second["57"]["inputs"]["model"] == ["54", 0]


def test_node_inputs_are_typed_from_the_graph_and_win_over_fields() -> None:
    template = wan22_template()
    spec = _spec(
        seed=5,
        node_inputs=(
            ("57", "sampler_name", "dpmpp_2m"),
            ("57", "noise_seed", "99"),
            ("60", "fps", "12.5"),
            ("WanImageToVideo", "batch_size", "2"),
        ),
    )
    graph = render(template, resolve(spec, (1280, 704), template.defaults), "a.png")
    assert graph["57"]["inputs"]["sampler_name"] == "dpmpp_2m"
    assert graph["57"]["inputs"]["noise_seed"] == 99
    assert graph["60"]["inputs"]["fps"] == 12.5
    assert graph["63"]["inputs"]["batch_size"] == 2


@pytest.mark.parametrize(
    ("node_input", "message"),
    [
        (("99", "text", "x"), "no node with id or title '99'"),
        (("6", "txt", "x"), "has no input 'txt'; its inputs: clip, text"),
        (("6", "clip", "x"), "is connected to node 38"),
        (("57", "steps", "many"), "expects a number"),
        (("57", "sampler_name", 3), "expects text"),
        (("KSamplerAdvanced", "steps", "3"), "2 nodes have the class type 'KSamplerAdvanced'"),
    ],
)
def test_bad_node_inputs_are_workflow_errors(
    node_input: tuple[str, str, object], message: str
) -> None:
    template = wan22_template()
    spec = _spec(node_inputs=(node_input,))
    problems = template.check_spec(spec)
    assert len(problems) == 1 and message in problems[0]
    with pytest.raises(WorkflowError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render(template, resolve(spec, (1280, 704), template.defaults), "a.png")


def test_model_names_are_overridable() -> None:
    models = WanModels(high_noise="h.safetensors", low_noise="l.safetensors", vae="v.safetensors")
    graph = wan22_template(models).graph
    assert graph["37"]["inputs"]["unet_name"] == "h.safetensors"
    assert graph["56"]["inputs"]["unet_name"] == "l.safetensors"
    assert graph["39"]["inputs"]["vae_name"] == "v.safetensors"
    assert graph["38"]["inputs"]["clip_name"] == WanModels().text_encoder


def test_template_shape_for_callers() -> None:
    template = wan22_template()
    assert template.output_node_ids == ("61",)
    assert template.frames_bound
    assert template.check_spec(_spec(frames=17, seed=1, preset="480p")) == []


def test_fingerprint_tracks_graph_bindings_and_defaults() -> None:
    base = wan22_template()
    assert base.fingerprint() == wan22_template().fingerprint()
    assert wan22_template(WanModels(vae="other.safetensors")).fingerprint() != base.fingerprint()
    assert base.with_defaults(preset="480p").fingerprint() != base.fingerprint()
    fewer = dict(base.bindings)
    del fewer["fps"]
    rebound = WorkflowTemplate(base.name, base.graph, fewer, base.output_node_ids, base.defaults)
    assert rebound.fingerprint() != base.fingerprint()
