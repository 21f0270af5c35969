"""Editor-format workflows converted to API format with the recorded node schemas.

Each converted graph is also sent to the emulator, whose validation follows the real
server's: a conversion that names inputs wrongly or breaks a link is answered 400.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest

from batch_runner.comfy import ComfyClient, Endpoint
from batch_runner.emulator import Emulator, EmulatorConfig
from batch_runner.emulator.config import WAN22_MODELS
from batch_runner.errors import WorkflowError
from batch_runner.workflow import card_graph
from batch_runner.workflow.ui import convert_ui_workflow, is_ui_workflow, object_info_schemas
from batch_runner.workflow.wan22 import Lora, wan22_template
from tests.helpers import make_image
from tests.ui_workflows import UiBuilder, recorded_schemas, ui_from_api

LORAS = ("speed_high.safetensors", "speed_low.safetensors")


def convert(doc: dict[str, Any]) -> dict[str, Any]:
    return convert_ui_workflow(doc, recorded_schemas(), "test.json")


def without_meta(graph: dict[str, Any]) -> dict[str, Any]:
    return {i: {k: v for k, v in n.items() if k != "_meta"} for i, n in graph.items()}


def node(doc: dict[str, Any], node_id: int) -> dict[str, Any]:
    found: dict[str, Any] = next(n for n in doc["nodes"] if n["id"] == node_id)
    return found


def relink(doc: dict[str, Any], link_id: int, source: int, slot: int = 0) -> None:
    for link in doc["links"]:
        if link[0] == link_id:
            link[1], link[2] = source, slot


def input_link(doc: dict[str, Any], node_id: int, name: str) -> int:
    link: int = next(s["link"] for s in node(doc, node_id)["inputs"] if s["name"] == name)
    return link


async def accepted_by_emulator(graph: dict[str, Any], tmp_path: Any) -> None:
    """POST /prompt answers 200 (WorkflowRejected otherwise)."""
    models = {**WAN22_MODELS, "loras": LORAS}
    async with (
        Emulator(EmulatorConfig(models=models, data_dir=tmp_path / "srv")) as emulator,
        ComfyClient(Endpoint(emulator.url)) as client,
    ):
        image = make_image(tmp_path / "start.png", (64, 48))
        name = await client.upload_image(image.read_bytes(), "wan_start.png")
        graph = copy.deepcopy(graph)
        for item in graph.values():
            if item["class_type"] == "LoadImage":
                item["inputs"]["image"] = name
        await client.submit(graph, prompt_id=str(uuid.uuid4()), client_id="test")


async def test_card_graph_round_trips_and_the_emulator_accepts_it(tmp_path: Any) -> None:
    doc = ui_from_api(card_graph()).document()
    assert is_ui_workflow(doc)
    graph = convert(doc)
    assert without_meta(graph) == card_graph()
    assert graph["57"]["_meta"] == {"title": "KSampler (Advanced)"}
    await accepted_by_emulator(graph, tmp_path)


def test_seed_widgets_are_followed_by_a_control_value_that_is_not_an_input() -> None:
    # As the editor saves KSamplerAdvanced: "randomize" after noise_seed is the seed's
    # "control after generate" setting; taking it as a value would shift steps, cfg...
    doc = ui_from_api(card_graph()).document()
    values = node(doc, 57)["widgets_values"]
    assert values[:4] == ["enable", 123, "randomize", 20]
    inputs = convert(doc)["57"]["inputs"]
    assert (inputs["noise_seed"], inputs["steps"], inputs["cfg"]) == (123, 20, 3.5)
    assert inputs["return_with_leftover_noise"] == "enable"
    # Files saved without the control value convert the same.
    del values[2]
    assert convert(doc)["57"]["inputs"] == inputs


def test_ksampler_seed_and_load_image_upload_value() -> None:
    ui = UiBuilder()
    ui.node(1, "LoadImage", widgets_values=["cat.png", "image"])
    sockets = [
        {"name": name, "type": "*", "link": ui.link(1, 0, 2, "*")}
        for name in ("model", "positive", "negative", "latent_image")
    ]
    ui.node(
        2, "KSampler", inputs=sockets, widgets_values=[42, "fixed", 8, 6.5, "euler", "karras", 0.75]
    )
    graph = convert(ui.document())
    # The upload button's "image" value after the file name is not an input.
    assert graph["1"]["inputs"] == {"image": "cat.png"}
    assert {k: v for k, v in graph["2"]["inputs"].items() if not isinstance(v, list)} == {
        "seed": 42, "steps": 8, "cfg": 6.5, "sampler_name": "euler", "scheduler": "karras",
        "denoise": 0.75,
    }  # fmt: skip
    sockets.pop()
    with pytest.raises(
        WorkflowError, match=r"node 2 \(KSampler\): required input 'latent_image' is not connected"
    ):
        convert(ui.document())


async def test_reroutes_primitives_and_notes(tmp_path: Any) -> None:
    ui = ui_from_api(card_graph())
    doc = ui.document()
    # 37 → Reroute 100 → Reroute 101 → 54.model
    link = input_link(doc, 54, "model")
    ui.node(100, "Reroute", inputs=[{"name": "", "type": "*", "link": None}])
    ui.node(101, "Reroute", inputs=[{"name": "", "type": "*", "link": None}])
    node(doc, 100)["inputs"][0]["link"] = ui.link(37, 0, 100, "MODEL")
    node(doc, 101)["inputs"][0]["link"] = ui.link(100, 0, 101, "MODEL")
    relink(doc, link, 101)
    # A primitive drives the width widget of 63 (converted to an input).
    ui.node(102, "PrimitiveNode", widgets_values=[832, "fixed"])
    node(doc, 63)["inputs"].append(
        {
            "name": "width",
            "type": "INT",
            "widget": {"name": "width"},
            "link": ui.link(102, 0, 63, "INT"),
        }
    )
    ui.node(103, "Note", widgets_values=["remember to set the prompt"])
    graph = convert(ui.document())
    assert graph["54"]["inputs"]["model"] == ["37", 0]
    assert graph["63"]["inputs"]["width"] == 832
    assert not {"100", "101", "102", "103"} & set(graph)
    await accepted_by_emulator(graph, tmp_path)


async def test_bypassed_nodes_pass_their_input_through_and_muted_ones_vanish(
    tmp_path: Any,
) -> None:
    template = wan22_template(lora_high=Lora(LORAS[0], 0.5), lora_low=Lora(LORAS[1]))
    ui = ui_from_api(template.graph)
    doc = ui.document()
    # A muted preview branch and a bypassed high-noise LoRA.
    ui.node(110, "SaveImage", mode=2, widgets_values=["preview"])
    node(doc, 110)["inputs"] = [
        {"name": "images", "type": "IMAGE", "link": ui.link(8, 0, 110, "IMAGE")}
    ]
    node(doc, 64)["mode"] = 4
    graph = convert(ui.document())
    assert "64" not in graph and "110" not in graph
    assert graph["54"]["inputs"]["model"] == ["37", 0]
    assert graph["55"]["inputs"]["model"] == ["65", 0]
    assert graph["65"]["inputs"] == {
        "model": ["56", 0],
        "lora_name": LORAS[1],
        "strength_model": 1.0,
    }
    await accepted_by_emulator(graph, tmp_path)


def test_a_node_fed_only_by_a_muted_node_is_reported() -> None:
    doc = ui_from_api(card_graph()).document()
    node(doc, 37)["mode"] = 2
    with pytest.raises(WorkflowError, match=r"node 54 .*'model' is connected only to a muted"):
        convert(doc)


def test_refusals_name_the_problem() -> None:
    doc = ui_from_api(card_graph()).document()
    node(doc, 8)["type"] = "VHS_VideoCombine"
    with pytest.raises(WorkflowError, match="no node class 'VHS_VideoCombine'"):
        convert(doc)
    doc = ui_from_api(card_graph()).document()
    doc["definitions"] = {"subgraphs": [{"id": "5f1c-uuid", "nodes": []}]}
    node(doc, 8)["type"] = "5f1c-uuid"
    with pytest.raises(WorkflowError, match="node 8 is a subgraph; unpack it"):
        convert(doc)
    doc = ui_from_api(card_graph()).document()
    node(doc, 8)["type"] = "workflow>Decode"
    with pytest.raises(WorkflowError, match="group node"):
        convert(doc)


def test_links_as_objects_and_object_info_files() -> None:
    doc = ui_from_api(card_graph()).document()
    doc["links"] = [
        {"id": a, "origin_id": b, "origin_slot": c, "target_id": d, "target_slot": e, "type": f}
        for a, b, c, d, e, f in doc["links"]
    ]
    assert without_meta(convert(doc)) == card_graph()
    wrapped = {"object_info": recorded_schemas()}
    assert object_info_schemas(wrapped, "f") is recorded_schemas()
    with pytest.raises(WorkflowError, match="not an /object_info answer"):
        object_info_schemas([], "f")
