"""Workflows saved from the ComfyUI editor ("UI format") turned into API-format graphs (pure).

A UI file lists ``nodes`` (``id``, ``type``, ``inputs`` [{name, link, widget?}], ``outputs``,
``widgets_values``, ``mode``, ``title``) and ``links`` ([id, from node, from slot, to node,
to slot, type], or the same as objects). Widget values are stored by position, so the node
schemas of a server (its ``/object_info``, whose input key order is the widget order) are
needed to name them. The editor's own rules, reproduced here:

- a link becomes ``[from node id, from slot]`` on the input it ends at; links through
  ``Reroute`` nodes are followed to their source;
- a ``PrimitiveNode`` is not sent: its value goes into every widget input it feeds;
- muted nodes (mode 2) are left out; bypassed nodes (mode 4) are left out and each of
  their outputs is wired to their input of the same type, as if the node were not there;
- seed widgets are followed by a "control after generate" value (``randomize``,
  ``fixed``…) that is an editor setting, not an input;
- notes are dropped; group nodes and subgraphs cannot be converted here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from batch_runner.errors import WorkflowError
from batch_runner.workflow.graph import Graph

MODE_MUTED = 2
MODE_BYPASSED = 4
#: Editor-only nodes that never reach the server.
_NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
_REROUTE = "Reroute"
_PRIMITIVE = "PrimitiveNode"
_WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
#: What the editor stores after a seed widget: how the seed changes after each queueing.
_CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
_SEED_NAMES = frozenset({"seed", "noise_seed"})
_MAX_HOPS = 256


def is_ui_workflow(data: object) -> bool:
    """True for a workflow saved from the editor (``nodes`` and ``links`` lists)."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("nodes"), list)
        and isinstance(data.get("links"), list)
    )


def object_info_schemas(data: object, source: str) -> dict[str, Any]:
    """The node schemas in a saved ``/object_info`` answer (bare, or under ``object_info``)."""
    if isinstance(data, dict) and isinstance(data.get("object_info"), dict):
        data = data["object_info"]
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"{source}: not an /object_info answer (a JSON object of node classes)")
    for name, info in data.items():
        if not isinstance(info, dict) or not isinstance(info.get("input"), dict):
            raise WorkflowError(f"{source}: {name!r} is not a node schema from /object_info")
    return data


@dataclass(frozen=True, slots=True)
class _Link:
    source: int
    slot: int
    kind: str


@dataclass(frozen=True, slots=True)
class _Widget:
    name: str
    #: the editor stores a "control after generate" value after this widget
    control: bool


def convert_ui_workflow(data: Mapping[str, Any], schemas: Mapping[str, Any], source: str) -> Graph:
    """Return the API-format graph the editor would send for the UI workflow ``data``.

    ``schemas`` is a server's ``/object_info``. Raises ``WorkflowError`` naming the node for
    anything that cannot be converted: node classes the server does not have, group nodes
    and subgraphs, required inputs left without a link or a value.
    """
    return _Converter(data, schemas, source).graph()


class _Converter:
    def __init__(self, data: Mapping[str, Any], schemas: Mapping[str, Any], source: str) -> None:
        self.source = source
        self.schemas = schemas
        self.nodes: dict[int, dict[str, Any]] = {}
        for node in data["nodes"]:
            if not isinstance(node, dict) or not isinstance(node.get("id"), int | str):
                raise WorkflowError(f"{source}: a node without an id: {str(node)[:80]}")
            self.nodes[_node_id(node["id"], source)] = node
        self.links = dict(_read_links(data["links"], source))
        self._refuse_nesting(data)

    def _refuse_nesting(self, data: Mapping[str, Any]) -> None:
        definitions = data.get("definitions")
        subgraphs = definitions.get("subgraphs", []) if isinstance(definitions, dict) else []
        sub_ids = {s.get("id") for s in subgraphs if isinstance(s, dict)}
        extra = data.get("extra")
        groups = extra.get("groupNodes", {}) if isinstance(extra, dict) else {}
        for node_id, node in self.nodes.items():
            kind = node.get("type")
            if kind in sub_ids:
                raise WorkflowError(
                    f"{self.source}: node {node_id} is a subgraph; unpack it in the editor "
                    "(right-click → Unpack Subgraph) or export the workflow in API format"
                )
            grouped = isinstance(groups, dict) and kind in groups
            if grouped or (isinstance(kind, str) and kind.startswith(("workflow>", "workflow/"))):
                raise WorkflowError(
                    f"{self.source}: node {node_id} is a group node ({kind}); convert it back "
                    "to nodes in the editor or export the workflow in API format"
                )

    def graph(self) -> Graph:
        unknown = sorted(
            {
                str(n.get("type"))
                for n in self.nodes.values()
                if self._sent(n) and n.get("type") not in self.schemas
            }
        )
        if unknown:
            raise WorkflowError(
                f"{self.source}: the server has no node class {', '.join(map(repr, unknown))} "
                "(a custom node that is not installed there?)"
            )
        out: Graph = {}
        for node_id, node in self.nodes.items():
            if self._sent(node):
                out[str(node_id)] = self._node(node_id, node)
        if not out:
            raise WorkflowError(f"{self.source}: the workflow has no nodes to run")
        return out

    def _sent(self, node: Mapping[str, Any]) -> bool:
        kind = node.get("type")
        return (
            kind not in _NOTE_TYPES
            and kind not in (_REROUTE, _PRIMITIVE)
            and node.get("mode", 0) not in (MODE_MUTED, MODE_BYPASSED)
        )

    def _where(self, node_id: int, node: Mapping[str, Any]) -> str:
        title = node.get("title")
        named = f' "{title}"' if isinstance(title, str) and title else ""
        return f"{self.source}: node {node_id} ({node.get('type')}{named})"

    def _node(self, node_id: int, node: Mapping[str, Any]) -> dict[str, Any]:
        kind = str(node["type"])
        schema = self.schemas[kind]
        where = self._where(node_id, node)
        slots = {
            s["name"]: s.get("link")
            for s in node.get("inputs") or ()
            if isinstance(s, dict) and isinstance(s.get("name"), str)
        }
        widgets = _widgets(schema)
        values = _widget_values(node.get("widgets_values"), widgets, where)
        inputs: dict[str, Any] = {}
        for name, _spec, required in _schema_inputs(schema):
            link = slots.get(name)
            if link is not None:
                source = self._source(link, where, name)
                if source is not None:
                    inputs[name] = self._value_from(source, name)
            elif name in values:
                inputs[name] = values[name]
            if required and name not in inputs:
                if link is not None:
                    reason = "is connected only to a muted or bypassed node"
                elif any(w.name == name for w in widgets):
                    reason = (
                        "has no widget value (saved by a ComfyUI version whose node "
                        "has other inputs?)"
                    )
                else:
                    reason = "is not connected"
                raise WorkflowError(f"{where}: required input {name!r} {reason}")
        title = node.get("title")
        display = schema.get("display_name") or kind
        meta_title = title if isinstance(title, str) and title else display
        return {"inputs": inputs, "class_type": kind, "_meta": {"title": meta_title}}

    def _value_from(self, source: tuple[int, int], name: str) -> object:
        """What an input linked to ``source`` receives: the link, or a primitive's value."""
        source_id, slot = source
        node = self.nodes[source_id]
        if node.get("type") != _PRIMITIVE:
            return [str(source_id), slot]
        widgets = node.get("widgets_values")
        if not isinstance(widgets, list) or not widgets:
            where = self._where(source_id, node)
            raise WorkflowError(f"{where}: the primitive feeding {name!r} has no value")
        return widgets[0]

    def _source(self, link_id: object, where: str, name: str) -> tuple[int, int] | None:
        """Follow a link back through reroutes and bypassed nodes to the node that sends.

        ``None`` when it ends at nothing the server gets: a muted node, or a bypassed node
        without an input of the link's type (the editor leaves the input unset then).
        """
        for _ in range(_MAX_HOPS):
            number = _link_id(link_id)
            link = self.links.get(number) if number is not None else None
            if link is None:
                raise WorkflowError(f"{where}: input {name!r} uses link {link_id}, not in the file")
            node = self.nodes.get(link.source)
            if node is None:
                raise WorkflowError(
                    f"{where}: input {name!r} is linked to node {link.source}, not in the file"
                )
            kind, mode = node.get("type"), node.get("mode", 0)
            if mode == MODE_MUTED:
                return None
            if kind == _REROUTE or mode == MODE_BYPASSED:
                link_id = _passthrough(node, link)
                if link_id is None:
                    return None
                continue
            return link.source, link.slot
        raise WorkflowError(f"{where}: input {name!r} goes round a loop of reroutes")


def _node_id(raw: object, source: str) -> int:
    try:
        return int(str(raw))
    except ValueError:
        raise WorkflowError(f"{source}: node id {raw!r} is not a number") from None


def _link_id(raw: object) -> int | None:
    try:
        return int(str(raw))
    except ValueError:
        return None


def _read_links(items: list[Any], source: str) -> Iterator[tuple[int, _Link]]:
    for item in items:
        if isinstance(item, list) and len(item) >= 5:
            link_id, origin, slot = item[0], item[1], item[2]
            kind = item[5] if len(item) > 5 else "*"
        elif isinstance(item, dict):
            link_id, origin, slot = item.get("id"), item.get("origin_id"), item.get("origin_slot")
            kind = item.get("type", "*")
        else:
            raise WorkflowError(f"{source}: a link is not [id, from, slot, to, slot, type]: {item}")
        if not isinstance(link_id, int) or not isinstance(slot, int):
            raise WorkflowError(f"{source}: a link is not [id, from, slot, to, slot, type]: {item}")
        yield link_id, _Link(_node_id(origin, source), slot, str(kind))


def _passthrough(node: Mapping[str, Any], link: _Link) -> object | None:
    """The link into ``node`` that stands in for its output ``link.slot``.

    A reroute has one input. A bypassed node hands on its input of the output's type,
    preferring the input in the same position (the editor's rule); ``*`` matches any type.
    """
    inputs = [s for s in node.get("inputs") or () if isinstance(s, dict)]
    if node.get("type") == _REROUTE:
        return inputs[0].get("link") if inputs else None
    outputs = node.get("outputs") or ()
    kind = link.kind
    if link.slot < len(outputs) and isinstance(outputs[link.slot], dict):
        kind = str(outputs[link.slot].get("type", kind))

    def fits(slot: Mapping[str, Any]) -> bool:
        other = str(slot.get("type", "*"))
        return slot.get("link") is not None and (other == kind or "*" in (other, kind))

    if link.slot < len(inputs) and fits(inputs[link.slot]):
        return inputs[link.slot].get("link")
    return next((s.get("link") for s in inputs if fits(s)), None)


def _schema_inputs(schema: Mapping[str, Any]) -> Iterator[tuple[str, list[Any], bool]]:
    """(name, spec, required) in widget order: ``input_order`` when given, else key order."""
    sections = schema.get("input", {})
    order = schema.get("input_order") or {}
    for section, required in (("required", True), ("optional", False)):
        specs = sections.get(section) or {}
        names = order.get(section) or list(specs)
        for name in names:
            if name in specs:
                yield name, list(specs[name]), required


def _is_widget(spec: list[Any]) -> bool:
    if not spec:
        return False
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in _WIDGET_TYPES


def _widgets(schema: Mapping[str, Any]) -> list[_Widget]:
    out = []
    for name, spec, _required in _schema_inputs(schema):
        if not _is_widget(spec):
            continue
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        control = spec[0] == "INT" and (
            bool(options.get("control_after_generate")) or name in _SEED_NAMES
        )
        out.append(_Widget(name, control))
    return out


def _widget_values(raw: object, widgets: list[_Widget], where: str) -> dict[str, Any]:
    """Name the stored widget values after the schema's widgets.

    A dict (some custom nodes save one) is already named. In a list, each seed-like widget
    may be followed by its control value; it is skipped only when it is one, so files
    saved without it convert too. Values after the last widget belong to editor-only
    widgets (LoadImage's upload button) and are ignored.
    """
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return {w.name: raw[w.name] for w in widgets if w.name in raw}
    if not isinstance(raw, list):
        raise WorkflowError(f"{where}: widgets_values is neither a list nor an object")
    values: dict[str, Any] = {}
    position = 0
    for widget in widgets:
        if position >= len(raw):
            break
        values[widget.name] = raw[position]
        position += 1
        if widget.control and position < len(raw) and raw[position] in _CONTROL_VALUES:
            position += 1
    return values
