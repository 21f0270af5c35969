"""The workflows of one run: the run's own template and the ones manifest rows name.

Loading reads files and may ask a server for its node schemas (to convert UI-format
files); the templates themselves come from the pure ``batch_runner.workflow`` package.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch_runner.comfy import ComfyClient, Endpoint, Limits
from batch_runner.config import RunSettings
from batch_runner.errors import ConfigError, EndpointError, InputError, WorkflowError
from batch_runner.manifest import JobSpec, workflow_names
from batch_runner.workflow import WorkflowTemplate, custom_template
from batch_runner.workflow.custom import load_workflow, read_json_file
from batch_runner.workflow.ui import is_ui_workflow, object_info_schemas
from batch_runner.workflow.wan22 import (
    BUILT_IN_NAMES,
    WAN22_FAST4,
    parse_lora,
    wan22_fast4_template,
    wan22_template,
)

if TYPE_CHECKING:
    from batch_runner.lane import Lane

log = logging.getLogger(__name__)

Schemas = Mapping[str, Any]
#: A full /object_info of a server with many custom nodes runs to tens of megabytes.
_OBJECT_INFO_LIMITS = Limits(request_timeout=120.0, max_json_bytes=256 * 2**20)


class TemplateBook:
    """The run's default template plus the templates rows name in their ``workflow`` column.

    Named templates are loaded on first use and kept, failures too: a workflow that cannot
    be loaded is a problem of each row that names it.
    """

    def __init__(
        self,
        default: WorkflowTemplate,
        loader: Callable[[str], WorkflowTemplate] | None = None,
    ) -> None:
        self.default = default
        self._loader = loader
        self._named: dict[str, WorkflowTemplate | WorkflowError] = {}

    def get(self, name: str | None) -> WorkflowTemplate:
        """The template for a row's ``workflow`` value (``None``: the run's own)."""
        if name is None:
            return self.default
        found = self._named.get(name)
        if found is None:
            if self._loader is None:
                found = WorkflowError(f"workflow {name!r}: this run takes no per-row workflows")
            else:
                try:
                    found = self._loader(name)
                except WorkflowError as exc:
                    found = WorkflowError(f"workflow {name!r}: {exc.message}")
            self._named[name] = found
        if isinstance(found, WorkflowError):
            raise found
        return found

    def for_spec(self, spec: JobSpec) -> WorkflowTemplate:
        """The template ``spec`` renders with; ``WorkflowError`` if its workflow cannot load."""
        return self.get(spec.workflow)

    def preload(self, names: Iterable[str]) -> None:
        """Load ``names`` now, so ``fingerprint`` covers them (failures are kept for rows)."""
        for name in sorted(names):
            with contextlib.suppress(WorkflowError):
                self.get(name)

    def templates(self) -> list[WorkflowTemplate]:
        """The default template and every named one that loaded."""
        named = [t for _, t in sorted(self._named.items()) if isinstance(t, WorkflowTemplate)]
        return [self.default, *named]

    def fingerprint(self) -> str:
        """The default template's fingerprint when no row names a workflow (as runs always
        had); else a digest over every template by name, so any of them changing shows."""
        if not self._named:
            return self.default.fingerprint()
        data = {
            "default": self.default.fingerprint(),
            "named": {
                name: t.fingerprint() if isinstance(t, WorkflowTemplate) else f"error: {t}"
                for name, t in sorted(self._named.items())
            },
        }
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def as_book(templates: WorkflowTemplate | TemplateBook, settings: RunSettings) -> TemplateBook:
    """A book for callers that hand over one template; rows may still name workflows
    (API-format files, or UI ones when ``settings.object_info`` is set)."""
    if isinstance(templates, TemplateBook):
        return templates
    return TemplateBook(templates, _loader(settings, None, None))


def built_in_template(settings: RunSettings, name: str | None = None) -> WorkflowTemplate:
    """``wan22`` or ``wan22-fast4`` (default: ``--fast4`` decides) with the run's LoRAs."""
    high = parse_lora(settings.lora_high) if settings.lora_high else None
    low = parse_lora(settings.lora_low) if settings.lora_low else None
    fast4 = settings.fast4 if name is None else name == WAN22_FAST4
    if fast4:
        return wan22_fast4_template(lora_high=high, lora_low=low)
    return wan22_template(lora_high=high, lora_low=low)


def default_template(
    settings: RunSettings, schemas: Schemas | None = None, why_no_schemas: str | None = None
) -> WorkflowTemplate:
    """The template of rows without a ``workflow``: ``--workflow`` with its bindings, or the
    built-in one."""
    if settings.workflow is not None:
        if settings.lora_high or settings.lora_low or settings.fast4:
            raise ConfigError("--lora-high, --lora-low and --fast4 apply to the built-in template")
        graph = load_workflow(settings.workflow, schemas or _file_schemas(settings), why_no_schemas)
        binds = [f"{name}={target}" for name, target in settings.bindings.items()]
        template = custom_template(graph, binds, name=settings.workflow.name)
    else:
        if settings.bindings:
            raise ConfigError("bindings apply to a custom --workflow only")
        template = built_in_template(settings)
    return _with_preset(template, settings)


def _with_preset(template: WorkflowTemplate, settings: RunSettings) -> WorkflowTemplate:
    return template.with_defaults(preset=settings.preset) if settings.preset else template


def _loader(
    settings: RunSettings, schemas: Schemas | None, why_no_schemas: str | None
) -> Callable[[str], WorkflowTemplate]:
    def load(name: str) -> WorkflowTemplate:
        if name in BUILT_IN_NAMES:
            if name in settings.workflow_bindings:
                raise WorkflowError("bindings apply to workflow files, not built-in templates")
            return _with_preset(built_in_template(settings, name), settings)
        path = settings.manifest.parent / name
        graph = load_workflow(path, schemas or _file_schemas(settings), why_no_schemas)
        table = settings.workflow_bindings.get(name)
        return _with_preset(custom_template(graph, bind_table=table, name=name), settings)

    return load


def _file_schemas(settings: RunSettings) -> Schemas | None:
    if settings.object_info is None:
        return None
    return read_object_info(settings.object_info)


def read_object_info(path: Path) -> Schemas:
    """Node schemas from a saved ``/object_info`` answer."""
    return object_info_schemas(read_json_file(path, "object_info file"), str(path))


async def fetch_object_info(urls: Sequence[tuple[str, str | None]]) -> Schemas:
    """Node schemas from the first of ``(url, token)`` that answers ``/object_info``."""
    if not urls:
        raise InputError(
            "a UI-format workflow is converted with a server's node schemas: give --endpoint "
            "URL or --object-info FILE (a saved /object_info answer)"
        )
    failures: list[str] = []
    for url, token in urls:
        try:
            async with ComfyClient(Endpoint(url, token), limits=_OBJECT_INFO_LIMITS) as client:
                return object_info_schemas(await client.object_info(), f"{url}/object_info")
        except EndpointError as exc:
            failures.append(f"{url}: {exc}")
    raise InputError(
        f"no endpoint answered /object_info ({'; '.join(failures)}); give --object-info FILE "
        "(a saved /object_info answer) instead"
    )


def _needs_schemas(paths: Iterable[Path]) -> bool:
    for path in paths:
        try:
            if is_ui_workflow(read_json_file(path)):
                return True
        except WorkflowError:
            continue  # reported when the workflow is loaded
    return False


async def load_workflows(settings: RunSettings) -> TemplateBook:
    """Every template the run needs, loaded up front: ``--workflow`` (or the built-in one)
    and each workflow the manifest names. A server's node schemas are fetched only if a
    UI-format file is among them and no ``--object-info`` file was given."""
    names = await asyncio.to_thread(workflow_names, settings.manifest)
    files = [settings.manifest.parent / n for n in names if n not in BUILT_IN_NAMES]
    if settings.workflow is not None:
        files.append(settings.workflow)
    schemas = _file_schemas(settings) if settings.object_info else None
    why_not = None
    if schemas is None and await asyncio.to_thread(_needs_schemas, files):
        try:
            schemas = await fetch_object_info([(e.url, e.token) for e in settings.endpoints])
        except InputError as exc:
            # Only the rows using a UI-format file fail, each saying why.
            why_not = exc.message
    default = default_template(settings, schemas, why_not)
    book = TemplateBook(default, _loader(settings, schemas, why_not))
    await asyncio.to_thread(book.preload, names)
    return book


async def check_loras(book: TemplateBook, lanes: Sequence[Lane]) -> None:
    """Before anything is sent: every LoRA file a template names is on every endpoint that
    answers (``/models/loras``)."""
    wanted = sorted(
        {
            str(node["inputs"]["lora_name"])
            for template in book.templates()
            for node in template.graph.values()
            if node.get("class_type") in ("LoraLoaderModelOnly", "LoraLoader")
            and isinstance(node.get("inputs", {}).get("lora_name"), str)
        }
    )
    if not wanted:
        return
    problems = []
    for lane in lanes:
        if not lane.up.is_set():
            continue
        try:
            listed = await lane.client.models("loras")
        except EndpointError as exc:
            log.warning("%s: cannot list its LoRAs (%s)", lane.settings.url, exc)
            continue
        missing = [name for name in wanted if name not in (listed or ())]
        if missing:
            problems.append(f"{lane.settings.url} has no LoRA {', '.join(missing)}")
    if problems:
        raise InputError(
            "; ".join(problems) + " (put the files in ComfyUI's models/loras folder, or name "
            "the ones it has with --lora-high/--lora-low); nothing was sent"
        )
