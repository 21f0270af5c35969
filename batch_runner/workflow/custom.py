"""Users' own workflows: JSON saved from ComfyUI (API or UI format), plus bindings."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from batch_runner.errors import WorkflowError
from batch_runner.workflow.bindings import (
    OUTPUT,
    bind_strings,
    describe,
    detect,
    explicit_bindings,
)
from batch_runner.workflow.graph import Graph, NodeInput
from batch_runner.workflow.switch import I2V_BOUNDARY, switch_step
from batch_runner.workflow.template import FIELDS, TemplateDefaults, WorkflowTemplate
from batch_runner.workflow.ui import convert_ui_workflow, is_ui_workflow

#: More than one candidate for these is a question only the user can answer.
_SINGLE = ("image", "prompt", "negative_prompt")


def load_api_workflow(path: Path) -> Graph:
    """Read an API-format workflow file; raise ``WorkflowError`` saying what is wrong."""
    data = read_json_file(path)
    check_api_graph(data, str(path))
    graph: Graph = data
    return graph


def load_workflow(
    path: Path, schemas: Mapping[str, Any] | None, why_no_schemas: str | None = None
) -> Graph:
    """Read a workflow file in API or UI format; a UI-format one is converted with
    ``schemas`` (a server's ``/object_info``), which it cannot do without (``why_no_schemas``
    then says why there are none)."""
    data = read_json_file(path)
    if is_ui_workflow(data):
        if schemas is None:
            raise WorkflowError(
                f"{path}: this workflow is in ComfyUI's UI format; converting it needs a "
                "server's node schemas: "
                + (why_no_schemas or "give --endpoint URL or --object-info FILE")
            )
        return convert_ui_workflow(data, schemas, str(path))
    check_api_graph(data, str(path))
    graph: Graph = data
    return graph


def read_json_file(path: Path, what: str = "workflow file") -> Any:
    """Parse a JSON file; ``WorkflowError`` with file, line and column when it cannot."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise WorkflowError(f"{path}: {what} not found") from None
    except UnicodeDecodeError:
        raise WorkflowError(f"{path}: not UTF-8 text; save it from ComfyUI again") from None
    except OSError as exc:
        raise WorkflowError(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise WorkflowError(f"{path}: JSON nested too deeply") from None
    return data


def check_api_graph(data: object, source: str) -> None:
    """Raise ``WorkflowError`` unless ``data`` is an API-format graph."""
    if not isinstance(data, dict):
        raise WorkflowError(f"{source}: a workflow must be a JSON object of nodes")
    if "nodes" in data and "links" in data:
        raise WorkflowError(
            f"{source}: this is a workflow saved in ComfyUI's UI format; export it in API format "
            "instead (Workflow → Export (API), or enable dev mode and use 'Save (API Format)')"
        )
    if not data:
        raise WorkflowError(f"{source}: the workflow has no nodes")
    for node_id, node in data.items():
        if (
            not isinstance(node, dict)
            or not isinstance(node.get("class_type"), str)
            or not isinstance(node.get("inputs"), dict)
        ):
            raise WorkflowError(
                f"{source}: node {node_id!r} is not an API-format node "
                '({"class_type": ..., "inputs": {...}}); export the workflow in API format'
            )


def custom_template(
    graph: Mapping[str, Any],
    binds: Iterable[str] = (),
    bind_table: Mapping[str, Any] | None = None,
    *,
    name: str = "custom",
) -> WorkflowTemplate:
    """Build a template from an API graph, ``--bind`` strings and a TOML bindings table.

    Explicit bindings replace detection for their field. The image input and one video
    output node are required. Defaults are the graph's own values for the bound
    fields (``None`` where bound inputs disagree, so they are left alone); no preset.
    """
    check_api_graph(dict(graph), name)
    explicit, explicit_outputs = explicit_bindings(graph, bind_strings(binds, bind_table))
    detected, detected_outputs = detect(graph)
    bindings: dict[str, list[NodeInput]] = {}
    for field in (f for f in FIELDS if f in explicit or f in detected):
        targets = explicit.get(field) or detected[field]
        if field in _SINGLE and field not in explicit and len(targets) > 1:
            raise WorkflowError(
                f"several inputs could take the {field}: {describe(graph, targets)}; "
                f"choose one with --bind {field}=NODE.INPUT"
            )
        bindings[field] = targets
    if "image" not in bindings:
        raise WorkflowError(
            "no LoadImage node found for the input image; bind one with --bind image=NODE.INPUT"
        )
    outputs = explicit_outputs or detected_outputs
    if not outputs:
        raise WorkflowError(
            "no video output node found (SaveVideo, SaveAnimatedWEBP, VHS_VideoCombine…); "
            f"name it with --bind {OUTPUT}=NODE"
        )
    if len(outputs) > 1 and not explicit_outputs:
        raise WorkflowError(
            f"several output nodes: {', '.join(outputs)}; choose one with --bind {OUTPUT}=NODE"
        )
    frozen = {field: tuple(targets) for field, targets in bindings.items()}
    return WorkflowTemplate(
        name=name,
        graph=graph,
        bindings=frozen,
        output_node_ids=tuple(outputs),
        defaults=graph_defaults(graph, frozen),
    )


def graph_defaults(
    graph: Mapping[str, Any], bindings: Mapping[str, tuple[NodeInput, ...]]
) -> TemplateDefaults:
    """Defaults that reproduce the graph's own values where rows do not set them."""

    def current(field: str, kind: type) -> Any:
        values = {graph[t.node_id]["inputs"][t.name] for t in bindings.get(field, ())}
        if len(values) != 1:
            return None
        (value,) = values
        if kind is int:
            return value if isinstance(value, int) and not isinstance(value, bool) else None
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    steps, shift, switch = (
        current("steps", int),
        current("shift", float),
        current("switch_step", int),
    )
    # Recompute the hand-over when steps change, unless the graph uses its own split.
    if switch is not None and steps and shift and switch == switch_step(steps, shift, I2V_BOUNDARY):
        switch = None
    return TemplateDefaults(
        preset=None,
        width=current("width", int),
        height=current("height", int),
        frames=current("frames", int),
        fps=current("fps", float),
        steps=steps,
        cfg=current("cfg", float),
        shift=shift,
        switch_step=switch,
    )
