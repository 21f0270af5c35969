"""Workflow templates, bindings, resolution and rendering: pure functions, no I/O.

The built-in Wan2.2 template and users' API-format workflows are both a
``WorkflowTemplate``; every job goes ``resolve`` → ``render`` through it::

    template = wan22_template()  # or custom_template(load_api_workflow(path), binds)
    resolved = resolve(spec, probe_image_size(spec.image), template.defaults)
    graph = render(template, resolved, image_ref="uploaded_name.png")
"""

from __future__ import annotations

from batch_runner.workflow.bindings import VIDEO_OUTPUT_CLASSES, detect, parse_bind
from batch_runner.workflow.custom import (
    check_api_graph,
    custom_template,
    graph_defaults,
    load_api_workflow,
)
from batch_runner.workflow.graph import Graph, NodeInput
from batch_runner.workflow.images import probe_image_size
from batch_runner.workflow.render import render
from batch_runner.workflow.resolve import ResolvedJob, resolve
from batch_runner.workflow.seed import DERIVED_SEED_LIMIT, derive_seed
from batch_runner.workflow.sizes import PRESETS, resolve_size
from batch_runner.workflow.switch import I2V_BOUNDARY, switch_step
from batch_runner.workflow.template import FIELDS, TemplateDefaults, WorkflowTemplate
from batch_runner.workflow.wan22 import (
    WAN22_DEFAULTS,
    WAN_NEGATIVE_PROMPT,
    WanModels,
    card_graph,
    wan22_template,
)

__all__ = [
    "DERIVED_SEED_LIMIT",
    "FIELDS",
    "I2V_BOUNDARY",
    "PRESETS",
    "VIDEO_OUTPUT_CLASSES",
    "WAN22_DEFAULTS",
    "WAN_NEGATIVE_PROMPT",
    "Graph",
    "NodeInput",
    "ResolvedJob",
    "TemplateDefaults",
    "WanModels",
    "WorkflowTemplate",
    "card_graph",
    "check_api_graph",
    "custom_template",
    "derive_seed",
    "detect",
    "graph_defaults",
    "load_api_workflow",
    "parse_bind",
    "probe_image_size",
    "render",
    "resolve",
    "resolve_size",
    "switch_step",
    "wan22_template",
]
