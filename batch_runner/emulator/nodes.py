"""What each node class does in the emulator.

Models are names only (nothing is loaded); samplers spend emulated GPU time per step;
images travel as one small picture plus the logical size and frame count the real graph
would have, which is enough to write a real video at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, ImageOps

from batch_runner.emulator import files, video
from batch_runner.threads import run_to_the_end

# Kept pictures never need more than this many pixels per side.
_PICTURE_SIDE = 512


class Context(Protocol):
    """What a node may use from the prompt that runs it."""

    folders: files.Folders
    writer: video.VideoWriter
    models: Mapping[str, Sequence[str]]
    video_max_side: int
    placeholder_models: bool

    async def step(self, node_id: str, value: int, total: int) -> None:
        """Spend one emulated GPU step and report progress `value`/`total`."""


@dataclass(frozen=True, repr=False)
class Images:
    """An IMAGE batch: `count` frames of `width`x`height` showing `picture`."""

    picture: Image.Image
    key: str
    width: int
    height: int
    count: int

    def __repr__(self) -> str:
        return f"<Images {self.width}x{self.height}x{self.count} at {id(self):#x}>"


@dataclass(frozen=True, repr=False)
class Latent:
    width: int
    height: int
    frames: int
    start: Images | None

    def __repr__(self) -> str:
        return f"<Latent {self.width}x{self.height}x{self.frames} at {id(self):#x}>"


@dataclass(frozen=True, repr=False)
class Video:
    images: Images
    fps: float

    def __repr__(self) -> str:
        return f"<VideoFromComponents object at {id(self):#x}>"


@dataclass(frozen=True, repr=False)
class Handle:
    """A loaded-model, conditioning or mask stand-in."""

    kind: str
    name: str

    def __repr__(self) -> str:
        return f"<{self.kind} object at {id(self):#x}>"


Outputs = tuple[Any, ...]
UI = dict[str, Any]
Result = tuple[Outputs, UI | None]
NodeFn = Callable[[Context, str, dict[str, Any]], Awaitable[Result]]


def _blank(width: int, height: int) -> Images:
    side = max(width, height, 1)
    scale = min(1.0, _PICTURE_SIDE / side)
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return Images(Image.new("RGB", size, (96, 96, 96)), "blank", width, height, 1)


def _load_picture(path: Path) -> Image.Image:
    with Image.open(path) as opened:
        picture = ImageOps.exif_transpose(opened).convert("RGB")
    picture.thumbnail((_PICTURE_SIDE, _PICTURE_SIDE))
    return picture


async def load_image(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    path = ctx.folders.resolve_annotated(inputs["image"])
    picture = await asyncio.to_thread(_load_picture, path)
    with Image.open(path) as opened:
        width, height = ImageOps.exif_transpose(opened).size
    key = ctx.folders.content_hash(path)
    return (Images(picture, key, width, height, 1), Handle("MASK", "mask")), None


async def repeat_image_batch(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    images: Images = inputs["image"]
    count = images.count * int(inputs["amount"])
    return (Images(images.picture, images.key, images.width, images.height, count),), None


async def image_scale(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    images: Images = inputs["image"]
    width, height = int(inputs["width"]), int(inputs["height"])
    if width == 0 and height == 0:
        width, height = images.width, images.height
    elif width == 0:
        width = max(1, round(images.width * height / images.height))
    elif height == 0:
        height = max(1, round(images.height * width / images.width))
    return (Images(images.picture, images.key, width, height, images.count),), None


async def upscale_model_loader(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    name = inputs["model_name"]
    if name not in ctx.models.get("upscale_models", ()):
        raise FileNotFoundError(
            f"Model in folder 'upscale_models' with filename '{name}' not found."
        )
    return (Handle("UPSCALE_MODEL", name),), None


async def image_upscale_with_model(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    images: Images = inputs["image"]
    for value in range(1, images.count + 1):
        await ctx.step(node_id, value, images.count)
    scaled = Images(images.picture, images.key, images.width * 2, images.height * 2, images.count)
    return (scaled,), None


async def model_passthrough(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    return (inputs["model"],), None


async def wan_image_to_video(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    # The VAE packs 4 frames into one latent frame (plus the first frame on its own).
    frames = (int(inputs["length"]) - 1) // 4 * 4 + 1
    latent = Latent(
        int(inputs["width"]) // 8 * 8,
        int(inputs["height"]) // 8 * 8,
        frames,
        inputs.get("start_image"),
    )
    return (inputs["positive"], inputs["negative"], latent), None


def sampler_steps(inputs: Mapping[str, Any]) -> int:
    last = min(int(inputs["end_at_step"]), int(inputs["steps"]))
    return max(0, last - int(inputs["start_at_step"]))


async def k_sampler_advanced(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    total = sampler_steps(inputs)
    for value in range(1, total + 1):
        await ctx.step(node_id, value, total)
    return (inputs["latent_image"],), None


async def vae_decode(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    latent: Latent = inputs["samples"]
    start = latent.start or _blank(latent.width, latent.height)
    return (Images(start.picture, start.key, latent.width, latent.height, latent.frames),), None


async def create_video(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    return (Video(inputs["images"], float(inputs["fps"])),), None


async def save_video(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    # Newer-style COMBO values are only checked here, at run time, as on the real server.
    if inputs["format"] not in ("auto", "mp4"):
        raise ValueError(f"{inputs['format']!r} is not a valid VideoContainer")
    if inputs["codec"] not in ("auto", "h264"):
        raise ValueError(f"{inputs['codec']!r} is not a valid VideoCodec")
    clip: Video = inputs["video"]
    images = clip.images
    path, name, subfolder = ctx.folders.output_path(inputs["filename_prefix"], "mp4")
    size = video.fit(images.width, images.height, ctx.video_max_side)
    if not ctx.writer.write_known(path, images.key, images.count, clip.fps, size):
        # Seen through when the server stops meanwhile: its output folder is then removed.
        await run_to_the_end(
            ctx.writer.write, path, images.picture, images.key, images.count, clip.fps, size
        )
    entry = {"filename": name, "subfolder": subfolder, "type": "output"}
    return (), {"images": [entry], "animated": [True]}


def _write_pngs(pictures: list[tuple[Path, Image.Image]]) -> None:
    for path, picture in pictures:
        picture.save(path, compress_level=1)


async def save_image(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
    images: Images = inputs["images"]
    size = video.fit(images.width, images.height, ctx.video_max_side)
    picture = images.picture.resize(size)
    entries, pending = [], []
    for _ in range(images.count):
        path, name, subfolder = ctx.folders.output_path(inputs["filename_prefix"], "png")
        pending.append((path, picture))
        entries.append({"filename": name, "subfolder": subfolder, "type": "output"})
    await run_to_the_end(_write_pngs, pending)
    return (), {"images": entries}


class SafetensorError(Exception):
    """What loading a garbage model file raises on the real server."""

    __module__ = "safetensors._safetensors_rust"


def _handle(kind: str) -> NodeFn:
    async def run(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
        return (Handle(kind, node_id),), None

    return run


def _loader(kind: str) -> NodeFn:
    async def run(ctx: Context, node_id: str, inputs: dict[str, Any]) -> Result:
        if ctx.placeholder_models:
            raise SafetensorError("Error while deserializing header: header too large")
        return (Handle(kind, node_id),), None

    return run


NODES: Mapping[str, NodeFn] = {
    "LoadImage": load_image,
    "RepeatImageBatch": repeat_image_batch,
    "ImageScale": image_scale,
    "UpscaleModelLoader": upscale_model_loader,
    "ImageUpscaleWithModel": image_upscale_with_model,
    "UNETLoader": _loader("ModelPatcher"),
    "CLIPLoader": _loader("CLIP"),
    "VAELoader": _loader("VAE"),
    "CLIPTextEncode": _handle("Conditioning"),
    "ModelSamplingSD3": model_passthrough,
    # A LoRA changes the weights, not the graph's shape: the emulated model passes through.
    "LoraLoaderModelOnly": model_passthrough,
    "WanImageToVideo": wan_image_to_video,
    "KSamplerAdvanced": k_sampler_advanced,
    "VAEDecode": vae_decode,
    "CreateVideo": create_video,
    "SaveVideo": save_video,
    "SaveImage": save_image,
}

# Classes where the execution-error fault strikes (the GPU-heavy step).
SAMPLERS = frozenset({"KSamplerAdvanced"})
