"""ComfyUI API-format graphs: finding nodes and inputs, and typing values for them.

An API-format graph maps node ids (strings) to ``{"class_type", "inputs", "_meta"?}``.
An input's value is either a widget value (string, number, boolean) or a link
``[source node id, output index]`` to another node.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from batch_runner.errors import WorkflowError

Graph: TypeAlias = dict[str, Any]

_INT_RE = re.compile(r"[+-]?[0-9]+")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


@dataclass(frozen=True, slots=True, order=True)
class NodeInput:
    """One input of one node, by node id."""

    node_id: str
    name: str

    def __str__(self) -> str:
        return f"{self.node_id}.{self.name}"


def is_link(value: object) -> bool:
    """True if an input value is a link to another node's output."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def node_label(graph: Mapping[str, Any], node_id: str) -> str:
    """``'61 (SaveVideo "My title")'``: how a node is named in messages."""
    node = graph[node_id]
    title = node.get("_meta", {}).get("title") if isinstance(node.get("_meta"), dict) else None
    named = f' "{title}"' if isinstance(title, str) and title else ""
    return f"{node_id} ({node.get('class_type')}{named})"


class NodeIndex:
    """Looks nodes up by id, by ``_meta.title``, or by class type when only one node has it."""

    def __init__(self, graph: Mapping[str, Any]) -> None:
        self._graph = graph
        self._titles: dict[str, list[str]] = {}
        self._classes: dict[str, list[str]] = {}
        for node_id, node in graph.items():
            meta = node.get("_meta")
            title = meta.get("title") if isinstance(meta, dict) else None
            if isinstance(title, str):
                self._titles.setdefault(title, []).append(node_id)
            self._classes.setdefault(str(node.get("class_type")), []).append(node_id)

    def find(self, ref: str) -> str:
        """Return the id of the node ``ref`` names; raise ``WorkflowError`` if none or several.

        An exact node id wins over a title, and a title over a class type.
        """
        if ref in self._graph:
            return ref
        for kind, table in (("title", self._titles), ("class type", self._classes)):
            ids = table.get(ref)
            if ids is None:
                continue
            if len(ids) > 1:
                named = ", ".join(node_label(self._graph, i) for i in ids)
                raise WorkflowError(
                    f"{len(ids)} nodes have the {kind} {ref!r}: {named}; use a node id instead"
                )
            return ids[0]
        raise WorkflowError(
            f"no node with id or title {ref!r} in the workflow; nodes are: "
            + ", ".join(node_label(self._graph, i) for i in self._graph)
        )

    def input(self, ref: str, name: str) -> NodeInput:
        """Return input ``name`` of node ``ref``; ``WorkflowError`` if absent or a link."""
        node_id = self.find(ref)
        inputs = self._graph[node_id]["inputs"]
        if name not in inputs:
            have = ", ".join(sorted(inputs)) or "none"
            raise WorkflowError(
                f"node {node_label(self._graph, node_id)} has no input {name!r}; its inputs: {have}"
            )
        value = inputs[name]
        if is_link(value):
            raise WorkflowError(
                f"input {name!r} of node {node_label(self._graph, node_id)} is connected to node "
                f"{value[0]}; only inputs holding a value can be set"
            )
        return NodeInput(node_id, name)


def like(current: object, value: object) -> object:
    """Write a number the way the graph wrote the value it replaces.

    API graphs store whole-valued floats as ints (``"fps": 16``); keeping that makes a
    rendered graph byte-identical to the workflow it came from when nothing changed.
    """
    if (
        isinstance(value, float)
        and value.is_integer()
        and isinstance(current, int)
        and not isinstance(current, bool)
    ):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(current, float):
        return float(value)
    return value


def convert_override(current: object, value: object, where: str) -> object:
    """Convert a ``node.<node>.<input>`` value to the type of the value it replaces.

    CSV cells arrive as strings: they become an int or float where the graph holds a
    number (an int only if written as one, since API graphs store whole floats as ints),
    a bool where it holds a bool (true/false, yes/no, on/off, 1/0), and stay strings
    otherwise. JSON values keep their type but must match the kind of the current value.
    """
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise WorkflowError(f"{where} expects true or false, got {value!r}")
    if isinstance(current, int | float):
        if isinstance(value, str):
            text = value.strip()
            try:
                number: float = int(text) if _INT_RE.fullmatch(text) else float(text)
            except ValueError:
                raise WorkflowError(f"{where} expects a number, got {value!r}") from None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = value
        else:
            raise WorkflowError(f"{where} expects a number, got {value!r}")
        if not math.isfinite(number):
            raise WorkflowError(f"{where} expects a finite number, got {value!r}")
        return like(current, number)
    if isinstance(current, str) and not isinstance(value, str):
        raise WorkflowError(f"{where} expects text, got {value!r}")
    return value
