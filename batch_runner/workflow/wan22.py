"""The built-in template: the model card's two-stage Wan2.2 I2V A14B graph.

Node ids and class types are those of the card workflow (as recorded against a
real ComfyUI in ``05_wan22_placeholder_models.json``), so server logs and node
errors read the same as for users of the card.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from batch_runner.errors import WorkflowError
from batch_runner.workflow.graph import Graph, NodeInput
from batch_runner.workflow.template import TemplateDefaults, WorkflowTemplate

NAME = "wan2.2-i2v-a14b"
#: Names a manifest's ``workflow`` column may use for the built-in templates.
WAN22 = "wan22"
WAN22_FAST4 = "wan22-fast4"
BUILT_IN_NAMES = (WAN22, WAN22_FAST4)

#: Wan2.2's own default negative prompt, used verbatim: the model was tuned with it.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)

#: 81 frames at 16 fps, 20 euler/simple steps at cfg 3.5, shift 8, 720p (1280×704 area).
WAN22_DEFAULTS = TemplateDefaults(
    preset="720p",
    adjust=True,
    frames=81,
    fps=16.0,
    steps=20,
    cfg=3.5,
    shift=8.0,
    negative_prompt=WAN_NEGATIVE_PROMPT,
)


#: The widely used 4-step setup: a step-distilled LoRA on each expert, 4 steps at cfg 1.0
#: and shift 5, which puts the expert switch at step 2 (computed, so it follows other
#: steps/shift values).
FAST4_DEFAULTS = dataclasses.replace(WAN22_DEFAULTS, steps=4, cfg=1.0, shift=5.0)


@dataclass(frozen=True, slots=True)
class Lora:
    """A LoRA file as the server lists it (``/models/loras``) and its model strength."""

    name: str
    strength: float = 1.0


#: The 4-step distilled LoRAs under the names ComfyUI's own Wan2.2 workflows use.
FAST4_LORAS = (
    Lora("wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors"),
    Lora("wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"),
)
#: Node ids of the LoRA loaders added in front of each expert's ModelSamplingSD3.
LORA_HIGH_NODE, LORA_LOW_NODE = "64", "65"


def parse_lora(text: str) -> Lora:
    """Read ``FILE[:strength]``: ``wan_high.safetensors:0.8``; the strength defaults to 1."""
    name, colon, tail = text.strip().rpartition(":")
    if colon:
        try:
            strength = float(tail)
        except ValueError:
            name, strength = text.strip(), 1.0
        else:
            if not math.isfinite(strength):
                raise WorkflowError(f"LoRA {text!r}: the strength must be a finite number")
    else:
        name, strength = tail, 1.0
    if not name:
        raise WorkflowError(f"LoRA {text!r} must look like FILE[:strength]")
    return Lora(name, strength)


@dataclass(frozen=True, slots=True)
class WanModels:
    """Model file names as the server lists them (``/object_info``)."""

    high_noise: str = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
    low_noise: str = "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"
    text_encoder: str = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    vae: str = "wan_2.1_vae.safetensors"


_CARD_MODELS = WanModels()


def _link(node_id: str, index: int = 0) -> list[Any]:
    return [node_id, index]


# Placeholder values (prompt, seed, image, size) are overwritten for every job; they are
# the ones of the recorded card run so an unchanged render equals that graph exactly.
_CARD_GRAPH: Graph = {
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "a red square slowly rotating", "clip": _link("38")},
    },
    "7": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "blurry, low quality", "clip": _link("38")},
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": _link("58"), "vae": _link("39")}},
    "37": {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": _CARD_MODELS.high_noise, "weight_dtype": "default"},
    },
    "38": {
        "class_type": "CLIPLoader",
        "inputs": {"clip_name": _CARD_MODELS.text_encoder, "type": "wan", "device": "default"},
    },
    "39": {"class_type": "VAELoader", "inputs": {"vae_name": _CARD_MODELS.vae}},
    "54": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 8.0, "model": _link("37")}},
    "55": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 8, "model": _link("56")}},
    "56": {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": _CARD_MODELS.low_noise, "weight_dtype": "default"},
    },
    "57": {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "add_noise": "enable",
            "noise_seed": 123,
            "steps": 20,
            "cfg": 3.5,
            "sampler_name": "euler",
            "scheduler": "simple",
            "start_at_step": 0,
            "end_at_step": 10,
            "return_with_leftover_noise": "enable",
            "model": _link("54"),
            "positive": _link("63", 0),
            "negative": _link("63", 1),
            "latent_image": _link("63", 2),
        },
    },
    "58": {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "add_noise": "disable",
            "noise_seed": 0,
            "steps": 20,
            "cfg": 3.5,
            "sampler_name": "euler",
            "scheduler": "simple",
            "start_at_step": 10,
            "end_at_step": 10000,
            "return_with_leftover_noise": "disable",
            "model": _link("55"),
            "positive": _link("63", 0),
            "negative": _link("63", 1),
            "latent_image": _link("57"),
        },
    },
    "60": {"class_type": "CreateVideo", "inputs": {"fps": 16, "images": _link("8")}},
    "61": {
        "class_type": "SaveVideo",
        "inputs": {
            "filename_prefix": "video/ComfyUI_I2V_14B",
            "format": "auto",
            "codec": "auto",
            "video": _link("60"),
        },
    },
    "62": {"class_type": "LoadImage", "inputs": {"image": "wan_start.png"}},
    "63": {
        "class_type": "WanImageToVideo",
        "inputs": {
            "width": 1280,
            "height": 704,
            "length": 81,
            "batch_size": 1,
            "positive": _link("6"),
            "negative": _link("7"),
            "vae": _link("39"),
            "start_image": _link("62"),
        },
    },
}

_BINDINGS: dict[str, tuple[NodeInput, ...]] = {
    "image": (NodeInput("62", "image"),),
    "prompt": (NodeInput("6", "text"),),
    "negative_prompt": (NodeInput("7", "text"),),
    # Only the first sampler adds noise; the second continues from its leftover noise.
    "seed": (NodeInput("57", "noise_seed"),),
    "width": (NodeInput("63", "width"),),
    "height": (NodeInput("63", "height"),),
    "frames": (NodeInput("63", "length"),),
    "fps": (NodeInput("60", "fps"),),
    "steps": (NodeInput("57", "steps"), NodeInput("58", "steps")),
    "cfg": (NodeInput("57", "cfg"), NodeInput("58", "cfg")),
    "shift": (NodeInput("54", "shift"), NodeInput("55", "shift")),
    # The high-noise expert stops where the low-noise one starts.
    "switch_step": (NodeInput("57", "end_at_step"), NodeInput("58", "start_at_step")),
}


def card_graph(models: WanModels | None = None) -> Graph:
    """Return a fresh copy of the card graph with the given model file names."""
    graph = copy.deepcopy(_CARD_GRAPH)
    if models is not None:
        graph["37"]["inputs"]["unet_name"] = models.high_noise
        graph["56"]["inputs"]["unet_name"] = models.low_noise
        graph["38"]["inputs"]["clip_name"] = models.text_encoder
        graph["39"]["inputs"]["vae_name"] = models.vae
    return graph


def wan22_template(
    models: WanModels | None = None,
    defaults: TemplateDefaults = WAN22_DEFAULTS,
    *,
    lora_high: Lora | None = None,
    lora_low: Lora | None = None,
) -> WorkflowTemplate:
    """Return the built-in Wan2.2 I2V A14B template; its output node is ``61`` (SaveVideo).

    A LoRA for an expert is a LoraLoaderModelOnly (node ``64`` high, ``65`` low) between
    that expert's UNETLoader and its ModelSamplingSD3.
    """
    graph = card_graph(models)
    for node_id, lora, loader, sampling in (
        (LORA_HIGH_NODE, lora_high, "37", "54"),
        (LORA_LOW_NODE, lora_low, "56", "55"),
    ):
        if lora is not None:
            graph[node_id] = {
                "class_type": "LoraLoaderModelOnly",
                "inputs": {
                    "lora_name": lora.name,
                    "strength_model": lora.strength,
                    "model": _link(loader),
                },
            }
            graph[sampling]["inputs"]["model"] = _link(node_id)
    return WorkflowTemplate(
        name=NAME,
        graph=graph,
        bindings=dict(_BINDINGS),
        output_node_ids=("61",),
        defaults=defaults,
    )


def wan22_fast4_template(
    models: WanModels | None = None,
    *,
    lora_high: Lora | None = None,
    lora_low: Lora | None = None,
) -> WorkflowTemplate:
    """The built-in template set up for 4 steps (``FAST4_DEFAULTS``); LoRAs not given are
    the distilled ones of ``FAST4_LORAS``."""
    template = wan22_template(
        models,
        FAST4_DEFAULTS,
        lora_high=lora_high or FAST4_LORAS[0],
        lora_low=lora_low or FAST4_LORAS[1],
    )
    return dataclasses.replace(template, name=f"{NAME}-fast4")
