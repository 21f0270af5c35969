"""Can each endpoint run the workflow? Asked before anything is sent.

Per endpoint: does it answer, does it (or a proxy in front of it) accept our token, does it
know every node class of the workflow, and does it have every model file the workflow names.
Only read-only GETs are sent (``/system_stats``, ``/object_info/{class}``,
``/models/{folder}``), so a preflight never changes a server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from batch_runner import crashpoints
from batch_runner.comfy.client import ComfyClient
from batch_runner.comfy.config import DEFAULT_LIMITS, Endpoint
from batch_runner.config import EndpointSettings
from batch_runner.errors import (
    AccessDenied,
    EndpointError,
    EndpointUnavailable,
    InputError,
    NotComfyUI,
    ServerError,
)
from batch_runner.workflow import WorkflowTemplate

if TYPE_CHECKING:
    from batch_runner.workflows import TemplateBook

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Loader inputs whose value is a file in a model folder the server lists on /models/{folder}
#: (asked when the loader's /object_info schema publishes no option list for the input).
MODEL_FOLDERS: Mapping[tuple[str, str], str] = {
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("LoraLoader", "lora_name"): "loras",
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
}

#: A string input ending in one of these names a model file; other loaders are checked
#: against the option list their /object_info schema publishes.
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")

#: Tries per question before an endpoint counts as unreachable or broken.
RETRIES = 4
#: The preflight's questions are small JSON GETs that ComfyUI answers at once, even while a
#: prompt runs. A server that holds them longer is hung; the run should not wait the full
#: request timeout (a minute) on it before starting on the others. It is kept as one that
#: does not answer yet, and joins when it does.
PREFLIGHT_LIMITS = dataclasses.replace(DEFAULT_LIMITS, request_timeout=10.0)

#: Questions in flight per endpoint. A few at a time reuse their connections; one connection
#: per question cost the runner about twice the CPU (a new TCP connection each), at start-up
#: where every millisecond delays the first prompts.
CONCURRENT_QUESTIONS = 4


@dataclass(frozen=True, order=True)
class ModelFile:
    """One model file a node of the workflow loads."""

    name: str
    #: the /models folder it lives in (listed only when its loader publishes no option list),
    #: or None when only the loader's option list tells
    folder: str | None
    node_id: str
    class_type: str
    input_name: str

    @property
    def where(self) -> str:
        return f"{self.folder}/{self.name}" if self.folder else self.name

    @property
    def needed_by(self) -> str:
        return f"node {self.node_id} {self.class_type}.{self.input_name}"


@dataclass(frozen=True)
class Requirements:
    """What a workflow needs from a server."""

    node_classes: tuple[str, ...]
    models: tuple[ModelFile, ...]


@dataclass(frozen=True)
class EndpointCheck:
    """What one endpoint said. ``error`` is set when it could not be asked at all."""

    url: str
    reachable: bool
    token_accepted: bool = True
    #: False when the URL answers HTTP, but not as ComfyUI (a wrong port, path or host)
    comfyui: bool = True
    error: str | None = None
    missing_nodes: tuple[str, ...] = ()
    missing_models: tuple[ModelFile, ...] = field(default_factory=tuple)

    @property
    def ready(self) -> bool:
        return self.reachable and self.token_accepted and not self.error and not self.lacks

    @property
    def unable(self) -> bool:
        """It answered, and what it said shows it cannot run the workflow."""
        return self.reachable and (not self.token_accepted or not self.comfyui or self.lacks)

    @property
    def lacks(self) -> bool:
        return bool(self.missing_nodes or self.missing_models)

    def verdict(self) -> str:
        """One line for tables and warnings: ``ready`` or what is wrong."""
        if not self.reachable:
            return f"unreachable: {self.error}"
        if not self.token_accepted:
            return f"token refused: {self.error}"
        if not self.comfyui:
            return f"not ComfyUI: {self.error}"
        if self.error:
            return f"could not check: {self.error}"
        if not self.lacks:
            return "ready"
        parts = []
        if self.missing_nodes:
            parts.append(f"lacks node class(es) {', '.join(self.missing_nodes)}")
        if self.missing_models:
            parts.append(f"lacks model file(s) {', '.join(m.where for m in self.missing_models)}")
        return "; ".join(parts)


def requirements(templates: WorkflowTemplate | TemplateBook) -> Requirements:
    """The node classes and model files of every workflow's graph (run-wide settings applied)."""
    classes: set[str] = set()
    models: set[ModelFile] = set()
    many = [templates] if isinstance(templates, WorkflowTemplate) else templates.templates()
    for template in many:
        _add_requirements(template, classes, models)
    return Requirements(tuple(sorted(classes)), tuple(sorted(models)))


def _add_requirements(
    template: WorkflowTemplate, classes: set[str], models: set[ModelFile]
) -> None:
    overrides = {(ref, name): value for ref, name, value in template.defaults.node_inputs}
    for node_id, node in template.graph.items():
        class_type = str(node.get("class_type", ""))
        classes.add(class_type)
        for input_name, value in dict(node.get("inputs", {})).items():
            value = overrides.get((node_id, input_name), value)
            if not isinstance(value, str):
                continue  # links are lists; numbers are never file names
            folder = MODEL_FOLDERS.get((class_type, input_name))
            if folder is not None or value.lower().endswith(MODEL_SUFFIXES):
                models.add(ModelFile(value, folder, node_id, class_type, input_name))


def _options(schema: Mapping[str, Any], input_name: str) -> list[str] | None:
    """The choices a node schema publishes for one input, in either combo style (§2.10)."""
    inputs = schema.get("input", {})
    for section in ("required", "optional"):
        spec = inputs.get(section, {}).get(input_name) if isinstance(inputs, dict) else None
        if not isinstance(spec, list) or not spec:
            continue
        if isinstance(spec[0], list):  # classic: [[option, ...], {...}]
            return [str(o) for o in spec[0]]
        if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
            return [str(o) for o in spec[1].get("options", [])]
    return None


async def check_endpoint(settings: EndpointSettings, needs: Requirements) -> EndpointCheck:
    """Ask one endpoint everything :func:`requirements` lists."""
    endpoint = Endpoint(url=settings.url, token=settings.token, name=settings.name)
    async with ComfyClient(endpoint, limits=PREFLIGHT_LIMITS) as client:
        try:
            await _patiently(client.system_stats)
        except EndpointUnavailable as exc:
            return EndpointCheck(settings.url, reachable=False, error=exc.message)
        except AccessDenied as exc:
            return EndpointCheck(settings.url, True, token_accepted=False, error=exc.message)
        except NotComfyUI as exc:
            return EndpointCheck(settings.url, True, comfyui=False, error=exc.message)
        except EndpointError as exc:
            return EndpointCheck(settings.url, True, error=exc.message)
        try:
            at_once = asyncio.Semaphore(CONCURRENT_QUESTIONS)
            schemas = await _each(needs.node_classes, client.object_info, at_once)
            # A loader's option list is the files the server will accept (it validates a
            # prompt by name against it), so a folder is listed only for a loader that
            # publishes none: usually no question at all, and no second round of them.
            folders = sorted(
                {m.folder for m in needs.models if m.folder and _published(m, schemas) is None}
            )
            listed = await _each(folders, client.models, at_once)
        except EndpointError as exc:
            return EndpointCheck(settings.url, True, error=exc.message)
    # An unknown class answers {} (PROTOCOL §2.10).
    missing_nodes = tuple(c for c in needs.node_classes if c not in schemas[c])
    missing_models = tuple(m for m in needs.models if not _has_model(m, listed, schemas))
    return EndpointCheck(
        settings.url, True, missing_nodes=missing_nodes, missing_models=missing_models
    )


async def _each(
    keys: Sequence[str], ask: Callable[[str], Awaitable[T]], at_once: asyncio.Semaphore
) -> dict[str, T]:
    """Ask about every key, as many at a time as ``at_once`` lets."""

    async def one(key: str) -> T:
        async with at_once:
            return await _patiently(functools.partial(ask, key))

    answers = await asyncio.gather(*(one(k) for k in keys))
    return dict(zip(keys, answers, strict=True))


async def _patiently(ask: Callable[[], Awaitable[T]]) -> T:
    """A flaky answer (dropped connection, 5xx) is asked again a few times; a timeout is not,
    since each one already took the whole connect timeout."""
    for attempt in range(RETRIES):
        try:
            return await ask()
        except (EndpointUnavailable, ServerError) as exc:
            if attempt == RETRIES - 1 or isinstance(exc.__cause__, TimeoutError):
                raise
            await asyncio.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


def _published(model: ModelFile, schemas: Mapping[str, Mapping[str, Any]]) -> list[str] | None:
    """The option list the model's loader publishes for its input, or None."""
    schema = schemas[model.class_type].get(model.class_type)
    return _options(schema, model.input_name) if isinstance(schema, dict) else None


def _has_model(
    model: ModelFile,
    listed: Mapping[str, list[str] | None],
    schemas: Mapping[str, Mapping[str, Any]],
) -> bool:
    if not isinstance(schemas[model.class_type].get(model.class_type), dict):
        return True  # the class itself is missing, which is reported on its own
    files = _published(model, schemas)
    if files is None and model.folder:
        files = listed.get(model.folder)
    # A loader that publishes no option list and has no folder to list cannot be checked
    # here; the server's own validation will say so at submit time.
    if files is None:
        return True
    # Servers list paths with "/" separators; workflows exported on Windows use "\".
    return model.name.replace("\\", "/") in {f.replace("\\", "/") for f in files}


async def check_endpoints(
    endpoints: Sequence[EndpointSettings], template: WorkflowTemplate | TemplateBook
) -> list[EndpointCheck]:
    """Check every endpoint at once; results in the order given."""
    needs = requirements(template)
    with crashpoints.paused():
        return list(await asyncio.gather(*(check_endpoint(ep, needs) for ep in endpoints)))


class PreflightFailed(InputError):
    """No endpoint can run the workflow; nothing was sent."""


def refusal(checks: Iterable[EndpointCheck]) -> str:
    """The message for a run that no endpoint can take, saying what to do."""
    checks = list(checks)
    lines = [f"  {c.url}: {c.verdict()}" for c in checks]
    advice = []
    if any(not c.reachable or not c.comfyui for c in checks):
        advice.append("check the URLs and that ComfyUI is running there")
    if any(c.reachable and not c.token_accepted for c in checks):
        advice.append("check --token (or token_env in the config file)")
    if any(c.lacks for c in checks):
        advice.append(
            "put the missing model files in the server's models/ folders (or install the "
            "custom nodes), restart ComfyUI"
        )
    return "\n".join(
        [
            "no endpoint can run this workflow; nothing was sent:",
            *lines,
            ("Fix: " + "; ".join(advice) + ", then run the same command again.")
            if advice
            else "Run `batch-runner validate MANIFEST --endpoint URL` for details.",
        ]
    )


async def usable_endpoints(
    endpoints: Sequence[EndpointSettings], template: WorkflowTemplate | TemplateBook
) -> list[tuple[EndpointSettings, EndpointCheck]]:
    """The endpoints a run should use, each with what it answered: all but those shown
    unable to run the workflow.

    An endpoint that answers but refuses the token or lacks something is left out with a
    warning. One that does not answer is kept (it joins when it comes back), and so is one
    whose answers were too flaky to check. Raises :class:`PreflightFailed` when no endpoint
    is left, or none of those left answered at all.
    """
    checks = await check_endpoints(endpoints, template)
    keep = [(ep, c) for ep, c in zip(endpoints, checks, strict=True) if not c.unable]
    if not any(c.reachable for _, c in keep):
        raise PreflightFailed(refusal(checks))
    for check in checks:
        if check.unable:
            log.warning("%s is left out of this run: %s", check.url, check.verdict())
        elif check.reachable and check.error:
            log.warning("%s %s; using it anyway", check.url, check.verdict())
    return keep
