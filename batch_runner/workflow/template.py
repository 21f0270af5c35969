"""The one shape every workflow takes: a graph, its bindings, its outputs, its defaults."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batch_runner.errors import WorkflowError
from batch_runner.workflow.graph import NodeIndex, NodeInput, convert_override, node_label
from batch_runner.workflow.switch import I2V_BOUNDARY

if TYPE_CHECKING:
    from batch_runner.manifest import JobSpec

#: Job fields a workflow input can be bound to, in the order they are written into the graph.
FIELDS: tuple[str, ...] = (
    "image",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "frames",
    "fps",
    "steps",
    "cfg",
    "shift",
    "switch_step",
)


@dataclass(frozen=True, slots=True)
class TemplateDefaults:
    """Values used when a row does not set them; ``None`` leaves the graph's own value.

    Size: a row's width/height win, then the row's preset, then ``preset``, then
    ``width``/``height``. ``switch_step`` ``None`` means computed from steps and shift
    at ``boundary``. ``node_inputs`` are run-wide ``(node, input, value)`` settings
    applied before the row's own ``node.<node>.<input>`` columns.
    """

    preset: str | None = "720p"
    adjust: bool = True
    width: int | None = None
    height: int | None = None
    frames: int | None = 81
    fps: float | None = 16.0
    steps: int | None = 20
    cfg: float | None = 3.5
    shift: float | None = 8.0
    switch_step: int | None = None
    boundary: float = I2V_BOUNDARY
    negative_prompt: str | None = None
    node_inputs: tuple[tuple[str, str, object], ...] = ()


@dataclass(frozen=True)
class WorkflowTemplate:
    """An API-format graph plus where each job field goes.

    ``graph`` is never modified; ``render`` works on a copy. ``output_node_ids`` are
    the nodes whose outputs (in ``/history``) are the job's result.
    """

    name: str
    graph: Mapping[str, Any]
    bindings: Mapping[str, tuple[NodeInput, ...]]
    output_node_ids: tuple[str, ...]
    defaults: TemplateDefaults = field(default_factory=TemplateDefaults)
    _index: NodeIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.bindings) - set(FIELDS)
        if unknown:
            raise WorkflowError(f"cannot bind unknown job field(s): {', '.join(sorted(unknown))}")
        object.__setattr__(self, "_index", NodeIndex(self.graph))

    @property
    def frames_bound(self) -> bool:
        """True if the frame count reaches the graph, so the output's length can be checked."""
        return self.is_bound("frames")

    def is_bound(self, job_field: str) -> bool:
        """True if ``job_field`` is written into at least one node input."""
        return bool(self.bindings.get(job_field))

    def node_input(self, ref: str, name: str) -> NodeInput:
        """Resolve a ``node.<ref>.<name>`` setting; ``WorkflowError`` if it names nothing usable."""
        return self._index.input(ref, name)

    def convert_node_value(self, target: NodeInput, value: object) -> object:
        """Type a ``node.<node>.<input>`` value like the graph's current value there."""
        current = self.graph[target.node_id]["inputs"][target.name]
        where = f"input {target.name!r} of node {node_label(self.graph, target.node_id)}"
        return convert_override(current, value, where)

    def with_defaults(self, **changes: Any) -> WorkflowTemplate:
        """Return a copy with some defaults replaced (run-wide settings)."""
        return dataclasses.replace(self, defaults=dataclasses.replace(self.defaults, **changes))

    def check_spec(self, spec: JobSpec) -> list[str]:
        """Return why this template cannot render ``spec``: fields it sets that go nowhere,
        ``node.<node>.<input>`` settings that name nothing or have the wrong type."""
        problems = []
        size = spec.preset if spec.width is None else spec.width
        row_fields: dict[str, tuple[str, object]] = {
            "negative_prompt": ("negative_prompt", spec.negative_prompt),
            "seed": ("seed", spec.seed),
            "width": ("the size (preset/width)", size),
            "height": ("the size (preset/height)", size),
            "frames": ("frames", spec.frames),
            "fps": ("fps", spec.fps),
            "steps": ("steps", spec.steps),
            "cfg": ("cfg", spec.cfg),
            "shift": ("shift", spec.shift),
            "switch_step": ("switch_step", spec.switch_step),
        }
        for job_field, (label, value) in row_fields.items():
            if value is not None and not self.is_bound(job_field):
                problems.append(
                    f"the row sets {label} but the workflow has no input bound to {job_field} "
                    f"(bind one with --bind {job_field}=NODE.INPUT)"
                )
        for ref, name, value in (*self.defaults.node_inputs, *spec.node_inputs):
            try:
                self.convert_node_value(self.node_input(ref, name), value)
            except WorkflowError as exc:
                problems.append(f"node.{ref}.{name}: {exc.message}")
        return problems

    def fingerprint(self) -> str:
        """Return a sha256 hex digest of graph, bindings, outputs and defaults.

        Stored with a run so a later invocation can tell that the workflow changed.
        """
        data = {
            "graph": dict(self.graph),
            "bindings": {k: [str(t) for t in v] for k, v in sorted(self.bindings.items())},
            "outputs": list(self.output_node_ids),
            "defaults": dataclasses.asdict(self.defaults),
        }
        text = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
