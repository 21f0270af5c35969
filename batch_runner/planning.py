"""Turning a stored job into what gets sent: the uploaded image's name and the rendered graph."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch_runner.comfy.models import OutputFile
from batch_runner.errors import InputError, WorkflowError
from batch_runner.manifest import JobSpec
from batch_runner.store import AttemptRecord, JobRecord, Store
from batch_runner.workflow import ResolvedJob, WorkflowTemplate, probe_image_size, render, resolve
from batch_runner.workflows import TemplateBook

if TYPE_CHECKING:
    from batch_runner.lane import Lane

IMAGE_CACHE_SIZE = 4096
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".gif", ".webp")
_SAFE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    size: tuple[int, int]
    suffix: str


@dataclass(frozen=True)
class Prepared:
    graph: dict[str, Any]
    resolved: dict[str, Any]
    expected_frames: int | None
    output_stem: str
    output_nodes: tuple[str, ...]

    def pick_outputs(self, files: tuple[OutputFile, ...]) -> list[OutputFile]:
        """The video files of the workflow's output nodes, best candidate first."""
        mine = [f for f in files if not self.output_nodes or f.node_id in self.output_nodes]
        videos = [f for f in mine if f.filename.lower().endswith(VIDEO_EXTENSIONS)]
        return sorted(videos, key=lambda f: (not f.animated, f.type != "output"))


def output_stem(job_key: str, requested: str | None) -> str:
    """The file stem of a job's output: the row's ``output``, else its id when that is a safe
    file name, else a readable slug of the id plus a short hash so distinct ids never collide."""
    if requested:
        return requested
    if _SAFE_STEM.fullmatch(job_key) and job_key not in (".", ".."):
        return job_key
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", job_key).strip("-.")[:60] or "job"
    return f"{slug}-{hashlib.sha256(job_key.encode()).hexdigest()[:10]}"


def upload_name(info: ImageInfo) -> str:
    """The name an input image is uploaded under: its content, so re-uploads dedupe."""
    return f"br_{info.sha256[:24]}{info.suffix}"


def image_info(path: Path) -> ImageInfo:
    """Hash, size (after EXIF orientation) and file suffix of an input image."""
    return _image_info(path)


def _image_info(path: Path) -> ImageInfo:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return ImageInfo(digest.hexdigest(), probe_image_size(path), path.suffix.lower() or ".png")


class Planner:
    def __init__(self, templates: WorkflowTemplate | TemplateBook) -> None:
        # Each row renders with its own workflow's template (the run's, unless it names one).
        self.book = templates if isinstance(templates, TemplateBook) else TemplateBook(templates)
        self.template = self.book.default
        self._images: OrderedDict[tuple[str, int, int], ImageInfo] = OrderedDict()

    async def image_info(self, path: Path) -> ImageInfo:
        """Hash and size of an input image, cached: many rows may share one image."""
        try:
            stat = await asyncio.to_thread(path.stat)
        except OSError as exc:
            raise InputError(f"image {path} cannot be read: {exc.strerror}") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        info = self._images.get(key)
        if info is None:
            try:
                info = await asyncio.to_thread(_image_info, path)
            except OSError as exc:
                raise InputError(f"image {path} cannot be read: {exc}") from None
            self._images[key] = info
            while len(self._images) > IMAGE_CACHE_SIZE:
                self._images.popitem(last=False)
        else:
            self._images.move_to_end(key)
        return info

    async def prepare(self, job: JobRecord, lane: Lane, store: Store) -> Prepared:
        spec = JobSpec.from_json(job.spec)
        template = self.book.for_spec(spec)
        info = await self.image_info(spec.image)
        resolved = resolve(spec, info.size, template.defaults)
        endpoint_id = lane.record.id
        name = await lane.upload(
            read=lambda: asyncio.to_thread(spec.image.read_bytes),
            sha256=info.sha256,
            filename=upload_name(info),
            known=lambda: store.upload_name(endpoint_id, info.sha256),
            remember=lambda n: store.record_upload(endpoint_id, info.sha256, n),
        )
        graph = render(template, resolved, name)
        return self._prepared(job, graph, _resolved_json(resolved), spec.output)

    def prepared_from(self, job: JobRecord, attempt: AttemptRecord) -> Prepared:
        """The same plan, rebuilt from what the attempt stored (for resuming it)."""
        return self._prepared(job, attempt.graph, job.resolved or {}, job.spec.get("output"))

    def _prepared(
        self, job: JobRecord, graph: dict[str, Any], resolved: dict[str, Any], output: Any
    ) -> Prepared:
        try:
            template: WorkflowTemplate | None = self.book.get(job.spec.get("workflow"))
        except WorkflowError:
            # Resuming after the row's workflow file went away: the stored graph still runs;
            # its video is then taken from any node and its length is not checked.
            template = None
        frames = resolved.get("frames") if template and template.frames_bound else None
        return Prepared(
            graph=graph,
            resolved=resolved,
            expected_frames=int(frames) if frames is not None else None,
            output_stem=output_stem(job.key, str(output) if output else None),
            output_nodes=tuple(template.output_node_ids) if template else (),
        )


def _resolved_json(resolved: ResolvedJob) -> dict[str, Any]:
    data = asdict(resolved)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
