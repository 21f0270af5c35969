"""POST /prompt validation with the real server's strengths, gaps and error shapes.

Checked: unknown classes, missing required inputs, link targets and their output types,
INT/FLOAT/STRING conversion and min/max, classic list inputs (model names, sampler enums,
ImageScale methods) and LoadImage's file check. Not checked, as on the real server:
newer-style COMBO values (SaveVideo format/codec), step grids, file contents.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from batch_runner.emulator import schemas

JsonDict = dict[str, Any]
Prompt = dict[str, JsonDict]


class PromptRejected(Exception):
    """The prompt cannot be queued; `body` is the 400 answer."""

    def __init__(self, body: JsonDict) -> None:
        super().__init__(body["error"]["message"])
        self.body = body


@dataclass
class Accepted:
    outputs: list[str]
    node_errors: JsonDict = field(default_factory=dict)


def _error(kind: str, message: str, details: str = "", extra: JsonDict | None = None) -> JsonDict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra or {}}


def reject(
    kind: str, message: str, details: str = "", node_errors: JsonDict | None = None
) -> NoReturn:
    raise PromptRejected(
        {"error": _error(kind, message, details), "node_errors": node_errors or {}}
    )


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _types_match(received: str, wanted: str) -> bool:
    if "*" in (received, wanted):
        return True
    return bool(set(received.split(",")) & set(wanted.split(",")))


def _fake_traceback(*frames: str) -> list[str]:
    return [f'  File "/srv/ComfyUI/execution.py", line 0, in {frame}\n' for frame in frames]


class _Validator:
    def __init__(
        self,
        prompt: Prompt,
        models: Mapping[str, Sequence[str]],
        image_exists: Callable[[str], bool],
    ) -> None:
        self.prompt = prompt
        self.models = models
        self.image_exists = image_exists
        # node id -> (valid, errors)
        self.validated: dict[str, tuple[bool, list[JsonDict]]] = {}

    def node(self, node_id: str) -> tuple[bool, list[JsonDict]]:
        node = self.prompt[node_id]
        class_type = node["class_type"]
        inputs: JsonDict = node.setdefault("inputs", {})
        errors: list[JsonDict] = []
        valid = True
        for name, info, required in schemas.input_spec(class_type):
            config = [info[0], info[1] if len(info) > 1 else {}]
            if name not in inputs:
                if required:
                    errors.append(
                        _error(
                            "required_input_missing",
                            "Required input is missing",
                            name,
                            {"input_name": name},
                        )
                    )
                continue
            value = inputs[name]
            if isinstance(value, list):
                if not self._link(node_id, name, config, value, errors):
                    valid = False
                continue
            problem = self._value(class_type, name, config, value, inputs)
            if problem is not None:
                errors.append(problem)
        if class_type == "LoadImage" and isinstance(inputs.get("image"), str):
            image = inputs["image"]
            if not self.image_exists(image):
                errors.append(
                    _error(
                        "custom_validation_failed",
                        "Custom validation failed for node",
                        f"image - Invalid image file: {image}",
                        {"input_name": "image"},
                    )
                )
        result = (valid and not errors, errors)
        self.validated[node_id] = result
        return result

    def _link(
        self, node_id: str, name: str, config: list[Any], value: list[Any], errors: list[JsonDict]
    ) -> bool:
        if len(value) != 2:
            errors.append(
                _error(
                    "bad_linked_input",
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    name,
                    {"input_name": name, "input_config": config, "received_value": value},
                )
            )
            return True
        source_id = str(value[0])
        # A missing source raises here, outside the guarded recursion below, so the real
        # server reports it one step downstream; the KeyError is deliberate.
        source_class = self.prompt[source_id]["class_type"]
        outputs = schemas.output_types(source_class)
        received = outputs[value[1]]
        if not _types_match(received, str(config[0])):
            errors.append(
                _error(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    f"{name}, received_type({received}) mismatch input_type({config[0]})",
                    {
                        "input_name": name,
                        "input_config": config,
                        "received_type": received,
                        "linked_node": value,
                    },
                )
            )
            return True
        try:
            if source_id in self.validated:
                ok = self.validated[source_id][0]
            else:
                ok = self.node(source_id)[0]
        except Exception as exc:
            self.validated[source_id] = (
                False,
                [
                    _error(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        str(exc),
                        {
                            "input_name": name,
                            "input_config": config,
                            "exception_message": str(exc),
                            "exception_type": type(exc).__name__,
                            "traceback": _fake_traceback("validate_inputs", "validate_inputs"),
                            "linked_node": value,
                        },
                    )
                ],
            )
            return False
        return ok

    def _value(
        self, class_type: str, name: str, config: list[Any], value: Any, inputs: JsonDict
    ) -> JsonDict | None:
        kind, extra = config
        if kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            convert: Callable[[Any], Any] = {"INT": int, "FLOAT": float, "STRING": str}.get(
                kind, bool
            )
            try:
                value = convert(value)
            except (TypeError, ValueError) as exc:
                return _error(
                    "invalid_input_type",
                    f"Failed to convert an input value to a {kind} value",
                    f"{name}, {value}, {exc}",
                    {
                        "input_name": name,
                        "input_config": config,
                        "received_value": value,
                        "exception_message": str(exc),
                    },
                )
            # The stored copy of the graph holds converted values (fps 16 -> 16.0).
            inputs[name] = value
            if kind in ("INT", "FLOAT"):
                details = {"input_name": name, "input_config": config, "received_value": value}
                if "min" in extra and value < extra["min"]:
                    return _error(
                        "value_smaller_than_min",
                        f"Value {value} smaller than min of {extra['min']}",
                        name,
                        details,
                    )
                if "max" in extra and value > extra["max"]:
                    return _error(
                        "value_bigger_than_max",
                        f"Value {value} bigger than max of {extra['max']}",
                        name,
                        details,
                    )
            return None
        if class_type == "LoadImage":
            # LoadImage validates its name itself, so the option list is not consulted.
            return None
        options = schemas.list_options(class_type, name, config, self.models)
        if options is None or value in options:
            return None
        if len(options) > 20:
            listed, shown_config = f"(list of length {len(options)})", None
        else:
            listed, shown_config = str(options), [options, extra]
        return _error(
            "value_not_in_list",
            "Value not in list",
            f"{name}: '{value}' not in {listed}",
            {"input_name": name, "input_config": shown_config, "received_value": value},
        )


def _output_nodes(prompt: Prompt) -> list[str]:
    """Output node ids; unknown or missing classes reject the whole prompt."""
    known = schemas.known_classes()
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            reject(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
        class_type = node["class_type"]
        if class_type not in known:
            reject(
                "invalid_prompt",
                f"Cannot execute because node {class_type} does not exist.",
                f"Node ID '#{node_id}'",
            )
        if schemas.is_output_node(class_type):
            outputs.append(node_id)
    return outputs


def validate(
    prompt: Any,
    models: Mapping[str, Sequence[str]],
    image_exists: Callable[[str], bool],
    targets: Sequence[str] | None = None,
) -> Accepted:
    """Validate (and type-convert in place) an API-format graph; raises PromptRejected."""
    if not isinstance(prompt, dict):
        if prompt:
            raise TypeError("prompt must be an object")
        reject("prompt_no_outputs", "Prompt has no outputs")
    outputs = _output_nodes(prompt)
    if targets is not None:
        outputs = [node_id for node_id in targets if node_id in outputs]
    if not outputs:
        reject("prompt_no_outputs", "Prompt has no outputs")

    checker = _Validator(prompt, models, image_exists)
    good: list[str] = []
    node_errors: JsonDict = {}
    for output in outputs:
        try:
            ok = checker.validated[output][0] if output in checker.validated else None
            if ok is None:
                ok = checker.node(output)[0]
        except Exception as exc:
            ok = False
            checker.validated[output] = (
                False,
                [
                    _error(
                        "exception_during_validation",
                        "Exception when validating node",
                        str(exc),
                        {
                            "exception_type": type(exc).__name__,
                            "traceback": traceback.format_tb(exc.__traceback__),
                        },
                    )
                ],
            )
        if ok:
            good.append(output)
            continue
        for node_id, (valid, reasons) in checker.validated.items():
            if valid or not reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {
                    "errors": reasons,
                    "dependent_outputs": [],
                    "class_type": prompt[node_id]["class_type"],
                },
            )
            if output not in entry["dependent_outputs"]:
                entry["dependent_outputs"].append(output)
    if not good:
        reject(
            "prompt_outputs_failed_validation",
            "Prompt outputs failed validation",
            node_errors=node_errors,
        )
    return Accepted(outputs=good, node_errors=node_errors)
