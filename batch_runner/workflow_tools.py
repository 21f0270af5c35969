"""What the ``workflow convert`` and ``workflow show`` commands do."""

from __future__ import annotations

import json
from pathlib import Path

from batch_runner.errors import InputError, ManifestError, WorkflowError
from batch_runner.manifest import JobSpec, read_manifest
from batch_runner.planning import image_info, upload_name
from batch_runner.workflow import render, resolve
from batch_runner.workflow.custom import read_json_file
from batch_runner.workflow.ui import convert_ui_workflow, is_ui_workflow
from batch_runner.workflows import TemplateBook, fetch_object_info, read_object_info


async def convert_file(
    path: Path, url: str | None, token: str | None, object_info: Path | None
) -> str:
    """The API-format JSON text of the UI-format workflow at ``path``."""
    data = read_json_file(path)
    if not is_ui_workflow(data):
        raise WorkflowError(f"{path}: not a UI-format workflow (no nodes and links lists)")
    if object_info is not None:
        schemas = read_object_info(object_info)
    else:
        assert url is not None  # the command asks for one of the two
        schemas = await fetch_object_info([(url, token)])
    graph = convert_ui_workflow(data, schemas, str(path))
    return json.dumps(graph, indent=2, ensure_ascii=False)


def show_row(manifest: Path, book: TemplateBook, row: str | None) -> str:
    """The graph (JSON text) the manifest row ``row`` (id or line; default the first) renders
    to, with its image under the name it would be uploaded as."""
    spec = _find_row(manifest, row)
    template = book.for_spec(spec)
    issues = template.check_spec(spec)
    if issues:
        raise WorkflowError(f"{manifest}:{spec.line}: " + "; ".join(issues))
    info = image_info(spec.image)
    resolved = resolve(spec, info.size, template.defaults)
    return json.dumps(render(template, resolved, upload_name(info)), indent=2, ensure_ascii=False)


def _find_row(manifest: Path, row: str | None) -> JobSpec:
    for item in read_manifest(manifest):
        if isinstance(item, JobSpec):
            if row is None or row in (item.job_id, str(item.line)):
                return item
        elif row is not None and row in (item.job_id, str(item.line)):
            raise ManifestError(item.problems)
    which = "no valid row" if row is None else f"no row with id or line {row!r}"
    raise InputError(f"{manifest}: {which}")
