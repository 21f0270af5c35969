"""Editor-format ("UI") workflow files built for tests from an API graph and node schemas.

The builder writes what the ComfyUI editor saves: nodes with positional ``widgets_values``
(a "control after generate" value after each seed), input slots carrying link ids, and a
``links`` table. Tests then add reroutes, primitives, muted and bypassed nodes by hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from typing import Any

from tests.helpers import TRACES

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@cache
def recorded_schemas() -> dict[str, Any]:
    """The full /object_info of the recorded server (trace 15)."""
    data: dict[str, Any] = json.loads((TRACES / "15_object_info_full.json").read_text())
    return data["object_info"]


def _inputs(schema: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    out = []
    for section in ("required", "optional"):
        specs = schema["input"].get(section, {})
        for name in schema.get("input_order", {}).get(section, list(specs)):
            out.append((name, specs[name]))
    return out


def _is_widget(spec: list[Any]) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


class UiBuilder:
    """Accumulates nodes and links of one UI document."""

    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.links: list[list[Any]] = []

    def link(self, source: int, slot: int, target: int, kind: str) -> int:
        link_id = len(self.links) + 1
        self.links.append([link_id, source, slot, target, 0, kind])
        return link_id

    def node(self, node_id: int, kind: str, **extra: Any) -> dict[str, Any]:
        node = {"id": node_id, "type": kind, "mode": 0, "inputs": [], "outputs": [], **extra}
        self.nodes.append(node)
        return node

    def document(self) -> dict[str, Any]:
        return {
            "last_node_id": max(n["id"] for n in self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {},
            "version": 0.4,
        }


def ui_from_api(graph: Mapping[str, Any], schemas: Mapping[str, Any] | None = None) -> UiBuilder:
    """A builder holding ``graph`` as the editor would save it (ids must be numeric)."""
    schemas = schemas or recorded_schemas()
    ui = UiBuilder()
    for node_id, node in graph.items():
        schema = schemas[node["class_type"]]
        values: list[Any] = []
        slots: list[dict[str, Any]] = []
        for name, spec in _inputs(schema):
            value = node["inputs"].get(name)
            linked = isinstance(value, list)
            if linked:
                slot: dict[str, Any] = {"name": name, "type": spec[0], "link": None}
                if _is_widget(spec):
                    slot["widget"] = {"name": name}
                slot["link"] = ui.link(int(value[0]), value[1], int(node_id), str(spec[0]))
                slots.append(slot)
            if _is_widget(spec):
                options = spec[1] if len(spec) > 1 else {}
                values.append(options.get("default") if linked else value)
                if spec[0] == "INT" and options.get("control_after_generate"):
                    values.append("randomize")
        if node["class_type"] == "LoadImage":
            values.append("image")  # the upload button's value
        outputs = [
            {"name": n, "type": t, "links": []}
            for n, t in zip(schema["output_name"], schema["output"], strict=True)
        ]
        ui.node(
            int(node_id),
            node["class_type"],
            inputs=slots,
            outputs=outputs,
            widgets_values=values,
        )
    return ui
