"""Users' API-format workflows: loading, explicit bindings, auto-detection, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch_runner.errors import WorkflowError
from batch_runner.manifest import JobSpec
from batch_runner.workflow import (
    NodeInput,
    custom_template,
    load_api_workflow,
    probe_image_size,
    render,
    resolve,
    wan22_template,
)

WORKFLOWS = Path(__file__).parent.parent / "manifests" / "workflows"


@pytest.fixture
def card() -> dict[str, Any]:
    return load_api_workflow(WORKFLOWS / "card_api.json")


@pytest.fixture
def model_free() -> dict[str, Any]:
    return load_api_workflow(WORKFLOWS / "model_free_api.json")


def _spec(**fields: Any) -> JobSpec:
    return JobSpec(job_id="job-1", line=2, image=Path("/in/a.png"), prompt="walk", **fields)


def _targets(template: Any) -> dict[str, list[str]]:
    return {field: [str(t) for t in targets] for field, targets in template.bindings.items()}


def test_auto_detection_on_the_card_graph_matches_the_built_in(card: dict[str, Any]) -> None:
    template = custom_template(card)
    assert _targets(template) == _targets(wan22_template())
    assert template.output_node_ids == ("61",)
    assert template.frames_bound
    # Defaults reproduce the graph's own values; the switch step is recomputed (it matches).
    d = template.defaults
    assert (d.preset, d.width, d.height, d.frames, d.fps, d.steps, d.cfg, d.shift) == (
        None, 1280, 704, 81, 16.0, 20, 3.5, 8.0,
    )  # fmt: skip
    assert d.switch_step is None


def test_custom_card_render_changes_only_job_values(card: dict[str, Any]) -> None:
    template = custom_template(card)
    before = copy.deepcopy(card)
    graph = render(template, resolve(_spec(seed=9), None, template.defaults), "in.png")
    assert card == before
    changed = {
        f"{n}.{k}"
        for n, node in graph.items()
        for k, v in node["inputs"].items()
        if v != before[n]["inputs"][k]
    }
    assert changed == {"62.image", "6.text", "57.noise_seed"}
    assert graph["57"]["inputs"]["noise_seed"] == 9


def test_model_free_graph(model_free: dict[str, Any]) -> None:
    template = custom_template(model_free)
    assert _targets(template) == {"image": ["1.image"], "frames": ["2.amount"], "fps": ["3.fps"]}
    assert template.output_node_ids == ("4",)
    assert template.defaults.frames == 17 and template.defaults.preset is None
    graph = render(template, resolve(_spec(frames=33), None, template.defaults), "up.png")
    assert graph["1"]["inputs"]["image"] == "up.png"
    assert graph["2"]["inputs"]["amount"] == 33
    assert graph["3"]["inputs"]["fps"] == 16
    # A row asking for something the graph cannot do is caught before rendering.
    assert template.check_spec(_spec(steps=30, seed=3)) == [
        "the row sets seed but the workflow has no input bound to seed "
        "(bind one with --bind seed=NODE.INPUT)",
        "the row sets steps but the workflow has no input bound to steps "
        "(bind one with --bind steps=NODE.INPUT)",
    ]
    assert template.check_spec(_spec(frames=33)) == []


def test_explicit_bindings_by_id_and_title_replace_detection(card: dict[str, Any]) -> None:
    card["57"]["_meta"] = {"title": "High.noise sampler"}
    template = custom_template(
        card,
        ["seed=High.noise sampler.noise_seed", "frames=63.length"],
        {"prompt": "7.text", "negative_prompt": ["6.text"], "output": "61"},
    )
    assert template.bindings["seed"] == (NodeInput("57", "noise_seed"),)
    assert template.bindings["prompt"] == (NodeInput("7", "text"),)
    assert template.bindings["negative_prompt"] == (NodeInput("6", "text"),)
    graph = render(template, resolve(_spec(negative_prompt="n"), None, template.defaults), "a")
    assert (graph["7"]["inputs"]["text"], graph["6"]["inputs"]["text"]) == ("walk", "n")


def test_node_override_columns_use_the_same_lookup(card: dict[str, Any]) -> None:
    card["60"]["_meta"] = {"title": "Video"}
    template = custom_template(card)
    spec = _spec(node_inputs=(("Video", "fps", "24"), ("CLIPLoader", "device", "cpu")))
    assert template.check_spec(spec) == []
    graph = render(template, resolve(spec, None, template.defaults), "a")
    assert graph["60"]["inputs"]["fps"] == 24
    assert graph["38"]["inputs"]["device"] == "cpu"


@pytest.mark.parametrize(
    ("binds", "message"),
    [
        (["prompt=99.text"], "binding 'prompt=99.text': no node with id or title '99'"),
        (["prompt=6.txt"], "has no input 'txt'"),
        (["prompt=6.clip"], "is connected to node 38"),
        (["seed=Sampler.noise_seed"], "2 nodes have the title 'Sampler'"),
        (["colour=6.text"], "unknown field 'colour'"),
        (["prompt=6"], "must look like prompt=NODE.INPUT"),
        (["prompt"], "must look like FIELD=NODE.INPUT"),
        (["output=nowhere"], "no node with id or title 'nowhere'"),
    ],
)
def test_bindings_that_resolve_to_nothing_fail_before_the_run(
    card: dict[str, Any], binds: list[str], message: str
) -> None:
    card["57"]["_meta"] = {"title": "Sampler"}
    card["58"]["_meta"] = {"title": "Sampler"}
    with pytest.raises(WorkflowError) as caught:
        custom_template(card, binds)
    assert message in caught.value.message


def test_bind_table_values_must_be_strings(card: dict[str, Any]) -> None:
    with pytest.raises(WorkflowError, match=r"must be a string NODE\.INPUT or a list"):
        custom_template(card, bind_table={"prompt": 6})


def test_ambiguous_detection_asks_for_a_binding(card: dict[str, Any]) -> None:
    card["64"] = {"class_type": "LoadImage", "inputs": {"image": "other.png"}}
    with pytest.raises(WorkflowError, match=r"several inputs could take the image: 62 .*64"):
        custom_template(card)
    assert custom_template(card, ["image=64.image"]).bindings["image"] == (
        NodeInput("64", "image"),
    )


def test_outputs_must_be_found_and_unique(model_free: dict[str, Any]) -> None:
    second = copy.deepcopy(model_free)
    second["5"] = {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["2", 0], "fps": 8.0}}
    with pytest.raises(WorkflowError, match="several output nodes: 4, 5"):
        custom_template(second)
    assert custom_template(second, ["output=5"]).output_node_ids == ("5",)
    del model_free["4"]
    with pytest.raises(WorkflowError, match="no video output node found"):
        custom_template(model_free)


def test_missing_load_image_is_an_error(model_free: dict[str, Any]) -> None:
    model_free["1"]["class_type"] = "LoadImageFromUrl"
    with pytest.raises(WorkflowError, match="no LoadImage node"):
        custom_template(model_free)


def test_prompt_tracing_through_conditioning_and_zero_out() -> None:
    graph: dict[str, Any] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "p", "clip": ["9", 0]}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 1,
                "steps": 8,
                "cfg": 1.0,
                "positive": ["2", 0],
                "negative": ["3", 0],
                "model": ["9", 0],
                "latent_image": ["9", 0],
            },
        },
        "5": {"class_type": "VHS_VideoCombine", "inputs": {"frame_rate": 8, "images": ["4", 0]}},
    }
    template = custom_template(graph)
    assert _targets(template) == {
        "image": ["1.image"],
        "prompt": ["2.text"],
        "seed": ["4.seed"],
        "fps": ["5.frame_rate"],
        "steps": ["4.steps"],
        "cfg": ["4.cfg"],
    }
    assert not template.frames_bound
    assert template.output_node_ids == ("5",)


def test_load_rejects_ui_format_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="UI format; export it in API format"):
        load_api_workflow(WORKFLOWS / "ui_format.json")
    with pytest.raises(WorkflowError, match=r"broken\.json:3:22: not valid JSON"):
        load_api_workflow(WORKFLOWS / "broken.json")
    with pytest.raises(WorkflowError, match="workflow file not found"):
        load_api_workflow(tmp_path / "none.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(WorkflowError, match="must be a JSON object of nodes"):
        load_api_workflow(tmp_path / "list.json")
    (tmp_path / "node.json").write_text(json.dumps({"1": {"inputs": {}}}))
    with pytest.raises(WorkflowError, match="node '1' is not an API-format node"):
        load_api_workflow(tmp_path / "node.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(WorkflowError, match="has no nodes"):
        load_api_workflow(tmp_path / "empty.json")


def test_probe_image_size_honours_exif_orientation(tmp_path: Path) -> None:
    plain = tmp_path / "plain.jpg"
    Image.new("RGB", (64, 32)).save(plain)
    assert probe_image_size(plain) == (64, 32)
    rotated = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (64, 32))
    exif = image.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated a quarter turn
    image.save(rotated, exif=exif)
    assert probe_image_size(rotated) == (32, 64)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(WorkflowError, match="cannot read image"):
        probe_image_size(tmp_path / "text.png")
