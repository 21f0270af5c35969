"""From a template and a resolved job to the API-format graph sent to ComfyUI (pure)."""

from __future__ import annotations

import copy
from typing import Any

from batch_runner.workflow.graph import Graph, like
from batch_runner.workflow.resolve import ResolvedJob
from batch_runner.workflow.template import WorkflowTemplate


def render(template: WorkflowTemplate, resolved: ResolvedJob, image_ref: str) -> Graph:
    """Return a fresh graph for one job; ``image_ref`` is the LoadImage name on the server.

    Every bound field with a value is written to each of its inputs, numbers keeping the
    graph's int/float spelling. ``node_inputs`` are applied afterwards, so a
    ``node.<node>.<input>`` column wins over a bound field. Fields that are ``None`` or
    unbound leave the graph as it is. Raises ``WorkflowError`` for a ``node_inputs``
    entry that names nothing usable (``template.check_spec`` reports those in advance).
    """
    graph: Graph = copy.deepcopy(dict(template.graph))
    values: dict[str, Any] = {
        "image": image_ref,
        "prompt": resolved.prompt,
        "negative_prompt": resolved.negative_prompt,
        "seed": resolved.seed,
        "width": resolved.width,
        "height": resolved.height,
        "frames": resolved.frames,
        "fps": resolved.fps,
        "steps": resolved.steps,
        "cfg": resolved.cfg,
        "shift": resolved.shift,
        "switch_step": resolved.switch_step,
    }
    for job_field, targets in template.bindings.items():
        value = values[job_field]
        if value is None:
            continue
        for target in targets:
            inputs = graph[target.node_id]["inputs"]
            inputs[target.name] = like(inputs[target.name], value)
    for ref, name, raw in resolved.node_inputs:
        target = template.node_input(ref, name)
        graph[target.node_id]["inputs"][target.name] = template.convert_node_value(target, raw)
    return graph
