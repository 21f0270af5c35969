"""Node schemas as the real server publishes them on /object_info.

The JSON file holds the recorded answers for the node classes the emulator can run; the
option lists that depend on the server's files (model names, input images) are filled in
per request, as the real server does.
"""

from __future__ import annotations

import copy
import json
import mimetypes
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

JsonDict = dict[str, Any]

# Which model folder feeds which loader input.
MODEL_INPUTS: Mapping[tuple[str, str], str] = {
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
}

# /models lists these folders, in the real server's order.
MODEL_FOLDERS: tuple[str, ...] = (
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
)


@cache
def _recorded() -> Mapping[str, JsonDict]:
    text = resources.files(__package__).joinpath("node_schemas.json").read_text("utf-8")
    data: dict[str, JsonDict] = json.loads(text)
    return data


def known_classes() -> frozenset[str]:
    return frozenset(_recorded())


def schema(class_type: str) -> JsonDict:
    """The recorded schema, without server-dependent option lists (validation uses this)."""
    return _recorded()[class_type]


def input_spec(class_type: str) -> list[tuple[str, list[Any], bool]]:
    """(name, [type, options], required) for the required then the optional inputs."""
    spec = schema(class_type)["input"]
    out: list[tuple[str, list[Any], bool]] = []
    for section, required in (("required", True), ("optional", False)):
        for name, info in spec.get(section, {}).items():
            out.append((name, list(info), required))
    return out


def output_types(class_type: str) -> list[str]:
    types: list[str] = schema(class_type)["output"]
    return types


def is_output_node(class_type: str) -> bool:
    return bool(schema(class_type)["output_node"])


def folder_listing(models: Mapping[str, Sequence[str]]) -> list[str]:
    extra = [name for name in models if name not in MODEL_FOLDERS]
    return [*MODEL_FOLDERS, *extra]


def input_images(input_dir: Path) -> list[str]:
    """Top-level input files whose names look like images, sorted (LoadImage's option list)."""
    names = []
    for entry in input_dir.iterdir():
        if not entry.is_file():
            continue
        kind, _ = mimetypes.guess_type(entry.name)
        if kind is not None and kind.startswith("image/"):
            names.append(entry.name)
    return sorted(names)


def published(class_type: str, models: Mapping[str, Sequence[str]], input_dir: Path) -> JsonDict:
    """The /object_info answer for one class, with this server's option lists."""
    out = copy.deepcopy(schema(class_type))
    required = out["input"]["required"]
    for (cls, name), folder in MODEL_INPUTS.items():
        if cls == class_type:
            options = list(models.get(folder, ()))
            if class_type == "VAELoader":
                options.append("pixel_space")
            required[name][0] = options
    if class_type == "UpscaleModelLoader":
        required["model_name"][1]["options"] = list(models.get("upscale_models", ()))
    if class_type == "LoadImage":
        required["image"][0] = input_images(input_dir)
    return out


def vae_names(models: Mapping[str, Sequence[str]]) -> list[str]:
    return [*models.get("vae", ()), "pixel_space"]


def list_options(
    class_type: str, name: str, info: list[Any], models: Mapping[str, Sequence[str]]
) -> list[Any] | None:
    """The option list a classic list input is checked against, or None if not a list input."""
    folder = MODEL_INPUTS.get((class_type, name))
    if folder is not None:
        if class_type == "VAELoader":
            return vae_names(models)
        return list(models.get(folder, ()))
    if isinstance(info[0], list):
        return list(info[0])
    return None
