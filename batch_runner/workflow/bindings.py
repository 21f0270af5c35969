"""Which node input receives which job field in a user's workflow.

Explicit bindings are ``FIELD=NODE.INPUT`` strings (``prompt=6.text``,
``seed=My Sampler.noise_seed``) or a TOML table ``{field = "NODE.INPUT" | [...]}``;
``NODE`` is a node id, a node title, or a class type that only one node has. The
input name is after the last dot, so titles may contain dots. ``output=NODE`` picks
the node whose outputs are downloaded.

Fields not bound explicitly are detected from the graph's shape (``detect``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from batch_runner.errors import WorkflowError
from batch_runner.workflow.graph import NodeIndex, NodeInput, is_link, node_label
from batch_runner.workflow.template import FIELDS

OUTPUT = "output"
#: Nodes that write a video we can download, by class type.
VIDEO_OUTPUT_CLASSES = frozenset(
    {"SaveVideo", "SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveWEBM", "VHS_VideoCombine"}
)
_TEXT_INPUTS = ("text", "prompt")
_MAX_HOPS = 64


def parse_bind(text: str) -> tuple[str, str, str | None]:
    """Split ``FIELD=NODE.INPUT`` (or ``output=NODE``) into (field, node, input)."""
    field, eq, target = text.partition("=")
    field, target = field.strip(), target.strip()
    if not eq or not field or not target:
        raise WorkflowError(f"binding {text!r} must look like FIELD=NODE.INPUT")
    if field == OUTPUT:
        return field, target, None
    if field not in FIELDS:
        raise WorkflowError(
            f"binding {text!r}: unknown field {field!r}; fields: {', '.join(FIELDS)}, {OUTPUT}"
        )
    node, dot, name = target.rpartition(".")
    if not dot or not node.strip() or not name.strip():
        raise WorkflowError(f"binding {text!r} must look like {field}=NODE.INPUT")
    return field, node.strip(), name.strip()


def bind_strings(binds: Iterable[str], table: Mapping[str, Any] | None = None) -> list[str]:
    """Flatten ``--bind`` strings and a TOML ``{field: target | [targets]}`` table into one list."""
    out = list(binds)
    for field, targets in (table or {}).items():
        items = [targets] if isinstance(targets, str) else targets
        if not isinstance(items, Sequence) or not all(isinstance(t, str) for t in items):
            raise WorkflowError(
                f"binding for {field!r} must be a string NODE.INPUT or a list of them"
            )
        out.extend(f"{field}={target}" for target in items)
    return out


def explicit_bindings(
    graph: Mapping[str, Any], binds: Iterable[str]
) -> tuple[dict[str, list[NodeInput]], list[str]]:
    """Resolve binding strings against ``graph``; return (field bindings, output node ids)."""
    index = NodeIndex(graph)
    fields: dict[str, list[NodeInput]] = {}
    outputs: list[str] = []
    for text in binds:
        field, node, name = parse_bind(text)
        try:
            if name is None:
                outputs.append(index.find(node))
            else:
                target = index.input(node, name)
                if target not in fields.setdefault(field, []):
                    fields[field].append(target)
        except WorkflowError as exc:
            raise WorkflowError(f"binding {text!r}: {exc.message}") from None
    return fields, outputs


def detect(graph: Mapping[str, Any]) -> tuple[dict[str, list[NodeInput]], list[str]]:
    """Find the usual inputs by the graph's shape; return (field bindings, output node ids).

    image: the LoadImage node. prompt/negative_prompt: the text encoders feeding the
    samplers' ``positive``/``negative``, followed through conditioning nodes such as
    WanImageToVideo. seed: samplers that add noise. width/height/frames: nodes with
    width, height and length (WanImageToVideo and other latent-video nodes), else
    RepeatImageBatch.amount for frames. fps: fps/frame_rate of video nodes. steps, cfg:
    samplers, schedulers, guiders. shift: ModelSampling* nodes. switch_step: a
    KSamplerAdvanced pair where the second continues the first's leftover noise.
    Fields found on several nodes are bound to all of them; for image, prompts and
    output, more than one candidate is ambiguous and the caller must ask for a binding.
    """
    found: dict[str, list[NodeInput]] = {}
    for node_id, node in graph.items():
        for field, name in _node_fields(node["class_type"], node["inputs"]):
            _add(found, field, NodeInput(node_id, name))
    if "frames" not in found:
        for node_id, node in graph.items():
            if node["class_type"] == "RepeatImageBatch" and _is_value(
                node["inputs"].get("amount"), int
            ):
                _add(found, "frames", NodeInput(node_id, "amount"))
    for field, targets in _prompt_encoders(graph).items():
        found[field] = targets
    switch = _switch_pair(graph)
    if switch:
        found["switch_step"] = switch
    outputs = [i for i, n in graph.items() if n["class_type"] in VIDEO_OUTPUT_CLASSES]
    return found, outputs


def _node_fields(kind: str, inputs: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, input name) pairs one node offers, judged by its class type and inputs."""
    if kind == "LoadImage" and _is_value(inputs.get("image"), str):
        yield "image", "image"
    if _adds_noise(kind, inputs):
        yield from (("seed", n) for n in ("noise_seed", "seed") if _is_value(inputs.get(n), int))
    if all(_is_value(inputs.get(n), int) for n in ("width", "height", "length")):
        yield from (("width", "width"), ("height", "height"), ("frames", "length"))
    yield from (("fps", n) for n in ("fps", "frame_rate") if _is_value(inputs.get(n), float))
    if ("Sampler" in kind or "Scheduler" in kind) and _is_value(inputs.get("steps"), int):
        yield "steps", "steps"
    if ("Sampler" in kind or "Guider" in kind) and _is_value(inputs.get("cfg"), float):
        yield "cfg", "cfg"
    if kind.startswith("ModelSampling") and _is_value(inputs.get("shift"), float):
        yield "shift", "shift"


def _add(found: dict[str, list[NodeInput]], field: str, target: NodeInput) -> None:
    if target not in found.setdefault(field, []):
        found[field].append(target)


def _is_value(value: object, kind: type) -> bool:
    """True for a widget value of ``kind`` (float accepts ints: API graphs write 16 for 16.0)."""
    if isinstance(value, bool) or value is None or is_link(value):
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _adds_noise(kind: str, inputs: Mapping[str, Any]) -> bool:
    if not ("Sampler" in kind or "Noise" in kind):
        return False
    return inputs.get("add_noise", "enable") not in ("disable", False)


def _prompt_encoders(graph: Mapping[str, Any]) -> dict[str, list[NodeInput]]:
    """Trace every sampler's positive/negative link back to a text input."""
    roles: dict[str, list[NodeInput]] = {"prompt": [], "negative_prompt": []}
    for node in graph.values():
        inputs = node["inputs"]
        for role, field in (("positive", "prompt"), ("negative", "negative_prompt")):
            if is_link(inputs.get(role)):
                target = _trace_text(graph, inputs[role], role)
                if target is not None and target not in roles[field]:
                    roles[field].append(target)
    # A negative that is the positive's own encoder (e.g. through ConditioningZeroOut) is
    # not a negative prompt.
    roles["negative_prompt"] = [t for t in roles["negative_prompt"] if t not in roles["prompt"]]
    return {field: targets for field, targets in roles.items() if targets}


def _trace_text(graph: Mapping[str, Any], link: list[Any], role: str) -> NodeInput | None:
    seen: set[str] = set()
    node_id = link[0]
    while node_id in graph and node_id not in seen and len(seen) < _MAX_HOPS:
        seen.add(node_id)
        inputs = graph[node_id]["inputs"]
        for name in _TEXT_INPUTS:
            if _is_value(inputs.get(name), str):
                return NodeInput(node_id, name)
        # Conditioning passes through nodes that take it under the same role name
        # (WanImageToVideo.positive → its positive output) or as "conditioning".
        upstream = next((inputs[n] for n in (role, "conditioning") if is_link(inputs.get(n))), None)
        if upstream is None:
            return None
        node_id = upstream[0]
    return None


def _switch_pair(graph: Mapping[str, Any]) -> list[NodeInput]:
    """The card's expert hand-over: sampler A stops at N with leftover noise, B starts at N."""
    for b_id, b in graph.items():
        b_in = b["inputs"]
        latent = b_in.get("latent_image")
        if b["class_type"] != "KSamplerAdvanced" or not is_link(latent):
            continue
        a = graph.get(latent[0])
        if a is None or a["class_type"] != "KSamplerAdvanced":
            continue
        a_in = a["inputs"]
        if (
            a_in.get("return_with_leftover_noise") == "enable"
            and _is_value(a_in.get("end_at_step"), int)
            and a_in.get("end_at_step") == b_in.get("start_at_step")
        ):
            return [NodeInput(latent[0], "end_at_step"), NodeInput(b_id, "start_at_step")]
    return []


def describe(graph: Mapping[str, Any], targets: Iterable[NodeInput]) -> str:
    """``'6.text (CLIPTextEncode)'`` list for messages."""
    return ", ".join(f"{node_label(graph, t.node_id)}.{t.name}" for t in targets)
