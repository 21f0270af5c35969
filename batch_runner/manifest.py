"""Streaming reader for job manifests: CSV with a header row, or JSON Lines.

A manifest may hold a million rows, so it is read one record at a time and each
row costs a few microseconds: image checks are cached per distinct path and
duplicate detection keeps about 24 bytes per row in flat arrays. Problems with the file
as a whole raise ``ManifestError`` before any row is read; problems with a row
are yielded in file order as ``RowProblems`` so a caller can list them all.

Columns (CSV header names, JSONL keys); empty cells and JSON ``null`` mean "not set":

``id``               stable job key; without it the id is derived from the row's content
``image``            path, relative to the manifest's folder (absolute allowed)
``prompt``           required text
``negative_prompt``  text
``seed``             whole number, 0 ≤ seed < 2**64
``preset``           ``480p`` or ``720p``
``width``/``height`` positive multiples of 16, given together
``frames``           4k+1
``fps``, ``cfg``, ``shift``  positive numbers
``steps``            positive whole number
``switch_step``      0 ≤ switch_step ≤ steps
``output``           output file stem (letters, digits, ``.``, ``_``, ``-``)
``workflow``         ``wan22``, ``wan22-fast4`` or a workflow file (relative to the manifest);
                     empty: the run's workflow
``node.<node>.<input>``  sets any node input; ``<node>`` is a node id or title
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import json
import math
import operator
import os
import re
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from functools import lru_cache, partial
from operator import attrgetter, itemgetter
from pathlib import Path, PurePath
from typing import IO, Any, Final

from PIL import Image

from batch_runner.errors import ManifestError, ManifestProblem
from batch_runner.workflow.sizes import MAX_SIDE, PRESETS, SIDE_STEP

# ----------------------------------------------------------------------------- the job spec


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One valid manifest row: what the user asked for, before any defaults are applied."""

    job_id: str
    line: int  #: 1-based line the record starts on
    image: Path  #: absolute and normalised (``..`` removed lexically; symlinks are kept)
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    preset: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    fps: float | None = None
    steps: int | None = None
    cfg: float | None = None
    shift: float | None = None
    switch_step: int | None = None
    output: str | None = None
    #: ``(node id or title, input name, value)`` from ``node.<node>.<input>`` columns, in
    #: column order. CSV values are strings (converted when rendering); JSONL keeps JSON types.
    node_inputs: tuple[tuple[str, str, object], ...] = ()
    #: the row's workflow as written (a built-in name or a file); None: the run's own
    workflow: str | None = None

    def content_hash(self) -> str:
        """Return a sha256 hex digest of everything that affects the output (not ``line``).

        Stored with the job so a later run can tell that a row with the same id changed.
        """
        return self.encoded()[1]

    def encoded(self) -> tuple[str, str]:
        """Return the spec as stored (JSON that ``from_json`` reads, unset fields left out)
        and its ``content_hash``, without building ``to_json``'s dict.

        The hash is of ``to_json()`` without ``line``, as canonical JSON (keys sorted, no
        spaces, non-ASCII kept); this writes that text directly, a value at a time.
        """
        return _encode(_hashed_values(self), self.line, self.workflow)

    def to_json(self) -> dict[str, object]:
        """Return a JSON-serialisable dict; ``from_json`` reads it back."""
        data: dict[str, object] = {
            "job_id": self.job_id,
            "line": self.line,
            "image": str(self.image),
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "preset": self.preset,
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "fps": self.fps,
            "steps": self.steps,
            "cfg": self.cfg,
            "shift": self.shift,
            "switch_step": self.switch_step,
            "output": self.output,
            "node_inputs": [list(item) for item in self.node_inputs],
        }
        # Only when set, so rows without one keep the content hash they had before the column.
        if self.workflow is not None:
            data["workflow"] = self.workflow
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSpec:
        """Rebuild a spec from ``to_json`` output."""

        def opt_float(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        return cls(
            job_id=str(data["job_id"]),
            line=int(data["line"]),
            image=Path(data["image"]),
            prompt=str(data["prompt"]),
            negative_prompt=data.get("negative_prompt"),
            seed=data.get("seed"),
            preset=data.get("preset"),
            width=data.get("width"),
            height=data.get("height"),
            frames=data.get("frames"),
            fps=opt_float("fps"),
            steps=data.get("steps"),
            cfg=opt_float("cfg"),
            shift=opt_float("shift"),
            switch_step=data.get("switch_step"),
            output=data.get("output"),
            node_inputs=tuple(
                (str(node), str(name), value) for node, name, value in data.get("node_inputs", ())
            ),
            workflow=data.get("workflow"),
        )


#: ``to_json``'s keys in sorted order, without ``line`` (not hashed) and ``workflow`` (added
#: only when set); ``test_manifest`` checks them against ``to_json``.
_HASHED_FIELDS: Final = (
    "cfg",
    "fps",
    "frames",
    "height",
    "image",
    "job_id",
    "negative_prompt",
    "node_inputs",
    "output",
    "preset",
    "prompt",
    "seed",
    "shift",
    "steps",
    "switch_step",
    "width",
)
_hashed_values: Final = attrgetter(*_HASHED_FIELDS)
_unset: Final = partial(operator.is_, None)
_NODE_INPUTS: Final = _HASHED_FIELDS.index("node_inputs")
#: Per shape of a spec: (hashed text, stored text, indexes of the values they take) with
#: ``%`` placeholders. Shapes are few in a manifest; the bound is for hostile ones.
_ENCODED_FORMS: dict[tuple[bool, ...], tuple[str, str, tuple[int, ...]]] = {}
_MAX_FORMS: Final = 4096


def _encode(values: tuple[Any, ...], line: int, workflow: str | None) -> tuple[str, str]:
    """``JobSpec.encoded`` of the spec with these values (``_HASHED_FIELDS``' order)."""
    # Texts for this row's shape (which fields are set) have the unset ones written in.
    shape = (*map(_unset, values), not values[_NODE_INPUTS], workflow is None)
    forms = _ENCODED_FORMS.get(shape)
    if forms is None:
        forms = _encoded_forms(shape)
    hashed, stored, picks = forms
    args = [_json_value(values[i]) for i in picks]
    if workflow is not None:
        args.append(_json_value(workflow))
    digest = hashlib.sha256((hashed % tuple(args)).encode("utf-8")).hexdigest()
    return stored % (line, *args), digest


def _encoded_forms(shape: tuple[bool, ...]) -> tuple[str, str, tuple[int, ...]]:
    *unset, no_nodes, no_workflow = shape
    hashed: list[str] = []
    stored = ['{"line":%d']
    picks: list[int] = []
    for index, (name, is_unset) in enumerate(zip(_HASHED_FIELDS, unset, strict=True)):
        if is_unset:
            hashed.append(f'"{name}":null')
        elif index == _NODE_INPUTS and no_nodes:
            hashed.append(f'"{name}":[]')
        else:
            hashed.append(f'"{name}":%s')
            stored.append(f'"{name}":%s')
            picks.append(index)
    if not no_workflow:
        # Sorts last ("workflow" > "width"); only when set, as in to_json.
        hashed.append('"workflow":%s')
        stored.append('"workflow":%s')
    forms = "{" + ",".join(hashed) + "}", ",".join(stored) + "}", tuple(picks)
    if len(_ENCODED_FORMS) >= _MAX_FORMS:
        _ENCODED_FORMS.clear()
    _ENCODED_FORMS[shape] = forms
    return forms


def _json_value(value: object) -> str:
    """``value`` as ``_canonical`` writes it; the common scalar types without the encoder."""
    if value is None:
        return "null"
    if type(value) is str:
        return _encode_str(value)
    if type(value) is int or type(value) is float:  # finite: the reader rejects inf and nan
        return repr(value)
    if isinstance(value, PurePath):
        return _encode_str(str(value))
    if value == ():  # no node inputs
        return "[]"
    return _canonical(value)


@dataclass(frozen=True)
class RowProblems:
    """A manifest row that cannot become a job, with every reason found."""

    line: int
    problems: list[ManifestProblem]
    job_id: str | None  #: the row's own id when it had a valid one


# ----------------------------------------------------------------------------- limits and columns

#: Longest prompt or negative prompt accepted, in characters.
MAX_TEXT_CHARS: Final = 10_000
#: Longest manifest line read, in characters; a longer one is reported and skipped.
MAX_LINE_CHARS: Final = 1 << 20
MAX_STEPS: Final = 10_000
#: WanImageToVideo accepts at most 16384 frames; the largest 4k+1 below that.
MAX_FRAMES: Final = 16_381
MAX_NAME_CHARS: Final = 128
MAX_WORKFLOW_CHARS: Final = 1024
#: Python's csv module refuses longer fields; it is a process-wide setting we leave alone.
CSV_FIELD_LIMIT: Final = csv.field_size_limit()

REQUIRED_COLUMNS: Final = ("image", "prompt")
_NODE_PREFIX: Final = "node."
_NODE_HINT: Final = "node.<node id or title>.<input>"
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_ESCAPED_BYTE_RE: Final = re.compile("[\udc80-\udcff]")
_EXTENSIONS: Final = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_UTF16_BOMS: Final = (b"\xff\xfe", b"\xfe\xff")
#: Lines kept to explain a CSV quoting error (the record's text is replayed).
_RECENT_LINES: Final = 1024


class _Bad(Exception):
    """A cell's value is wrong; the message is the plain-words reason."""


# Checks take a parsed value and raise _Bad with the reason.


def _check_name(value: str, what: str) -> None:
    if len(value) > MAX_NAME_CHARS:
        raise _Bad(f"{what} is longer than {MAX_NAME_CHARS} characters")
    if not _NAME_RE.fullmatch(value):
        raise _Bad(
            f"{what} {value!r} may only contain letters, digits, '.', '_' and '-' "
            "and must not start with '.' (it names the output file)"
        )


def _check_text(value: str, what: str) -> None:
    if len(value) > MAX_TEXT_CHARS:
        raise _Bad(f"{what} is {len(value):,} characters long; the limit is {MAX_TEXT_CHARS:,}")


def _check_positive(value: float, limit: float) -> None:
    if value <= 0:
        raise _Bad(f"must be positive, got {_show(value)}")
    if value > limit:
        raise _Bad(f"{_show(value)} is too large (at most {_show(limit)})")


def _check_seed(value: int) -> None:
    if not 0 <= value < 2**64:
        raise _Bad(f"seed must be between 0 and 2**64-1, got {value}")


def _check_side(value: int) -> None:
    _check_positive(value, MAX_SIDE)
    if value % SIDE_STEP:
        low = value - value % SIDE_STEP
        nearest = f"{low} or {low + SIDE_STEP}" if low else str(SIDE_STEP)
        raise _Bad(f"{value} is not a multiple of {SIDE_STEP} (nearest: {nearest})")


def _check_frames(value: int) -> None:
    _check_positive(value, MAX_FRAMES)
    if (value - 1) % 4:
        low = value - (value - 1) % 4
        raise _Bad(f"frames must be 4k+1; {value} is not (nearest valid: {low} or {low + 4})")


def _check_workflow(value: str) -> None:
    if len(value) > MAX_WORKFLOW_CHARS:
        raise _Bad(f"workflow is longer than {MAX_WORKFLOW_CHARS} characters")


def _check_preset(value: str) -> None:
    if value not in PRESETS:
        raise _Bad(f"unknown preset {value!r}; use one of: {', '.join(PRESETS)}")


def _check_switch(value: int) -> None:
    if value < 0:
        raise _Bad(f"must be 0 or more, got {value}")
    if value > MAX_STEPS:
        raise _Bad(f"{value} is too large (at most {MAX_STEPS})")


def _show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# Converters: one per column and format, each parses and checks a value or raises _Bad.


def _text(check: Callable[[str], None] | None) -> tuple[Callable[[str], Any], Callable[[Any], Any]]:
    def from_csv(text: str) -> str:
        if check is not None:
            check(text)
        return text

    def from_json(value: Any) -> str:
        if not isinstance(value, str):
            raise _Bad(f"expected a string, got {_json_type(value)}")
        return from_csv(value.strip())

    return from_csv, from_json


def _whole(check: Callable[[int], None]) -> tuple[Callable[[str], Any], Callable[[Any], Any]]:
    def from_csv(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _Bad(f"{text!r} is not a whole number") from None
        check(value)
        return value

    def from_json(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            shown = value if isinstance(value, float) else _json_type(value)
            raise _Bad(f"expected a whole number, got {shown}")
        check(value)
        return value

    return from_csv, from_json


def _number(limit: float) -> tuple[Callable[[str], Any], Callable[[Any], Any]]:
    def check(value: float, shown: object) -> float:
        if not math.isfinite(value):
            raise _Bad(f"{shown!r} is not a finite number")
        _check_positive(value, limit)
        return value

    def from_csv(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _Bad(f"{text!r} is not a number") from None
        return check(value, text)

    def from_json(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad(f"expected a number, got {_json_type(value)}")
        return check(float(value), value)

    return from_csv, from_json


# The checks are bound with partial, not lambdas: a cell of every row goes through them.
_CONVERTERS: Final[dict[str, tuple[Callable[[str], Any], Callable[[Any], Any]]]] = {
    "id": _text(partial(_check_name, what="id")),
    "image": _text(None),
    "prompt": _text(partial(_check_text, what="prompt")),
    "negative_prompt": _text(partial(_check_text, what="negative prompt")),
    "seed": _whole(_check_seed),
    "preset": _text(_check_preset),
    "width": _whole(_check_side),
    "height": _whole(_check_side),
    "frames": _whole(_check_frames),
    "fps": _number(1000),
    "steps": _whole(partial(_check_positive, limit=MAX_STEPS)),
    "cfg": _number(100),
    "shift": _number(100),
    "switch_step": _whole(_check_switch),
    "output": _text(partial(_check_name, what="output name")),
    "workflow": _text(_check_workflow),
}
KNOWN_COLUMNS: Final = tuple(_CONVERTERS)
#: CSV cells as they are converted; text taken as it is (the image, node columns) has none.
_CSV_CONVERTERS: Final = {name: pair[0] for name, pair in _CONVERTERS.items() if name != "image"}
#: Columns whose cells a manifest mostly repeats from row to row (the same preset, steps,
#: negative prompt...): within one read, each distinct cell is converted once. Not those
#: that usually differ on every row (id, prompt, seed, output), where the cache would only
#: cost. Bad cells raise each time (a cache keeps only values).
_REPEATED_COLUMNS: Final = frozenset(
    (
        "negative_prompt",
        "preset",
        "width",
        "height",
        "frames",
        "fps",
        "steps",
        "cfg",
        "shift",
        "switch_step",
        "workflow",
    )
)
_REPEATED_CELLS: Final = 256


def _csv_converter(name: str) -> Callable[[str], Any] | None:
    """The converter of a CSV column for one read."""
    convert = _CSV_CONVERTERS.get(name)
    if convert is not None and name in _REPEATED_COLUMNS:
        # Converters are pure functions of the cell's text; lru_cache is C, a hit no call.
        return lru_cache(maxsize=_REPEATED_CELLS)(convert)
    return convert


#: The columns a row's derived id is made of (besides the image), in their historic order.
_ID_COLUMNS: Final = tuple(c for c in KNOWN_COLUMNS if c not in ("id", "image", "workflow"))


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


_CANONICAL: Final = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))
# The string encoder that _CANONICAL uses (ensure_ascii=False).
_encode_str: Final = json.encoder.encode_basestring


def _canonical(data: object) -> str:
    return _CANONICAL.encode(data)


def parse_node_column(name: str) -> tuple[str, str] | None:
    """Split ``node.<node>.<input>`` into ``(node, input)``; ``None`` if malformed.

    The input name is after the last dot, so node titles may contain dots.
    """
    if not name.startswith(_NODE_PREFIX):
        return None
    node, dot, input_name = name[len(_NODE_PREFIX) :].rpartition(".")
    if not dot or not node.strip() or not input_name.strip():
        return None
    return node.strip(), input_name.strip()


# ----------------------------------------------------------------------------- duplicate detection


class _SeenTable:
    """Set of strings → the line that first used each, in ~24 bytes per entry.

    Open addressing over flat arrays of 64-bit string hashes and line numbers (kept at
    most half full); a dict of the strings would cost ~150 bytes per row. Two different
    strings with the same 64-bit hash (odds ~1e-8 at a million rows) would be reported
    as duplicates.
    """

    def __init__(self) -> None:
        self._hashes = array("q", [0]) * 1024
        self._lines = array("I", [0]) * 1024
        self._free = 512

    def add(self, key: str, line: int) -> int | None:
        """Record ``key`` at ``line``; return the earlier line if it was already there."""
        # hash() never returns -1 and is well spread; 0 marks an empty slot.
        wanted = hash(key) or 1
        hashes = self._hashes
        mask = len(hashes) - 1
        slot = wanted & mask
        found = hashes[slot]
        while found:
            if found == wanted:
                return self._lines[slot]
            slot = (slot + 1) & mask
            found = hashes[slot]
        hashes[slot] = wanted
        self._lines[slot] = line
        self._free -= 1
        if not self._free:
            self._grow()
        return None

    def _grow(self) -> None:
        old = zip(self._hashes, self._lines, strict=True)
        size = len(self._hashes) * 2
        hashes = self._hashes = array("q", [0]) * size
        lines = self._lines = array("I", [0]) * size
        self._free = size // 4
        mask = size - 1
        for wanted, line in old:
            if wanted:
                slot = wanted & mask
                while hashes[slot]:
                    slot = (slot + 1) & mask
                hashes[slot] = wanted
                lines[slot] = line


class UniqueNames:
    """Ids and output names seen so far, in file order.

    They share one namespace: a row's output file is named by its output name, else by
    its id, and file systems may ignore case.
    """

    def __init__(self, display: str) -> None:
        self._display = display
        self._seen = _SeenTable()

    def check(
        self, line: int, explicit_id: str | None, job_id: str | None, output: str | None
    ) -> list[ManifestProblem]:
        """Record the row's names; return the problems of those used before (usually none).

        ``job_id`` is the explicit id, else the derived one (a row without problems), else None.
        """
        problems = []
        if explicit_id is not None:
            first = self._seen.add(explicit_id.casefold(), line)
            if first is not None:
                reason = (
                    f"id {explicit_id!r} is already used on line {first} "
                    "(ids and output names must be unique, compared ignoring case)"
                )
                problems.append(ManifestProblem(self._display, line, "id", reason))
        elif job_id is not None:
            first = self._seen.add(job_id, line)
            if first is not None:
                reason = (
                    f"same content as line {first}: rows without an id get one from their "
                    "content, so identical rows are duplicates (add an id column)"
                )
                problems.append(ManifestProblem(self._display, line, None, reason))
        if output is not None and output.casefold() != (job_id or "").casefold():
            first = self._seen.add(output.casefold(), line)
            if first is not None:
                reason = (
                    f"output name {output!r} is already used on line {first} "
                    "(ids and output names must be unique, compared ignoring case)"
                )
                problems.append(ManifestProblem(self._display, line, "output", reason))
        return problems


@dataclass(slots=True)
class RowDraft:
    """A row checked on its own, before the checks that need the rows before it (duplicate
    ids and output names)."""

    line: int
    problems: list[ManifestProblem]
    explicit_id: str | None = None
    #: the explicit id, else the derived one when the row has no problems
    job_id: str | None = None
    output: str | None = None
    #: when the row has no problems: its spec's values in ``SPEC_FIELDS`` order. Building
    #: the JobSpec (``spec``) costs more than encoding it, so a caller that only needs the
    #: encoded spec (``encoded``) and a few of its values does without one.
    values: tuple[Any, ...] | None = None

    @property
    def spec(self) -> JobSpec | None:
        return None if self.values is None else JobSpec(*self.values)

    def encoded(self) -> tuple[str, str]:
        """``JobSpec.encoded`` of the row's spec (a row without problems)."""
        assert self.values is not None
        values = self.values
        return _encode(_hashed_items(values), values[_LINE], values[_WORKFLOW])


#: JobSpec's fields in order, as ``RowDraft.values`` holds them.
SPEC_FIELDS: Final = tuple(f.name for f in fields(JobSpec))
_LINE: Final = SPEC_FIELDS.index("line")
_WORKFLOW: Final = SPEC_FIELDS.index("workflow")
_hashed_items: Final = itemgetter(*map(SPEC_FIELDS.index, _HASHED_FIELDS))


# ----------------------------------------------------------------------------- public entry points


def read_manifest(path: Path, *, check_images: bool = True) -> Iterator[JobSpec | RowProblems]:
    """Read a manifest and yield one ``JobSpec`` or ``RowProblems`` per row, in file order.

    The format follows the extension: ``.csv`` (header row required), ``.jsonl`` or
    ``.ndjson`` (one JSON object per line). Blank lines are skipped. Problems with
    the file itself (missing, empty, UTF-16, a CSV header that is not UTF-8, lacks
    ``image``/``prompt`` or names unknown columns) raise ``ManifestError`` from this
    call, before any row; bad bytes further down are reported on their row.

    With ``check_images``, each distinct image is opened with Pillow and verified
    in the calling thread; iterate in a worker thread if that matters.
    """
    reader, columns = open_manifest(path, check_images=check_images)
    if columns is not None:
        return reader.csv_rows(columns)
    return reader.jsonl_rows()


def open_manifest(path: Path, *, check_images: bool = True) -> tuple[RowReader, list[str] | None]:
    """Check the file as a whole (``ManifestError`` as ``read_manifest`` raises it); return
    a reader for its rows and, for CSV, the header's columns (``None``: JSON Lines)."""
    display = str(path)
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ManifestError(
            [_file_problem(display, "a manifest must end in .csv, .jsonl or .ndjson")]
        )
    _check_file(path, display)
    reader = RowReader(path, display, check_images)
    if fmt == "csv":
        with _open_text(path) as handle:
            return reader, _csv_header(handle, display)
    _check_jsonl_start(path, display)
    return reader, None


def validate_manifest(
    path: Path, *, check_images: bool = True
) -> tuple[int, list[ManifestProblem]]:
    """Read the whole manifest; return the number of valid rows and every problem found.

    File-level problems are returned too (with zero rows) instead of raised.
    """
    good = 0
    problems: list[ManifestProblem] = []
    try:
        for item in read_manifest(path, check_images=check_images):
            if isinstance(item, JobSpec):
                good += 1
            else:
                problems.extend(item.problems)
    except ManifestError as exc:
        return 0, exc.problems
    return good, problems


def workflow_names(path: Path) -> set[str]:
    """The distinct values of the ``workflow`` column, read quickly (no other checks).

    Used to load every workflow a run needs before its rows are checked; a file that
    cannot be read yields what was found so far (``read_manifest`` reports the problem).
    """
    names: set[str] = set()
    fmt = _EXTENSIONS.get(path.suffix.lower())
    try:
        with _open_text(path) as handle:
            if fmt == "csv":
                rows = csv.reader(handle)
                header = [c.strip() for c in next(rows, [])]
                if "workflow" not in header:
                    return names
                index = header.index("workflow")
                names.update(r[index].strip() for r in rows if len(r) > index)
            elif fmt == "jsonl":
                for line in handle:
                    # Most lines of a big manifest have no workflow key: skip parsing them.
                    if '"workflow"' in line:
                        with contextlib.suppress(ValueError, RecursionError):
                            record = json.loads(line)
                            if isinstance(record, dict) and isinstance(record.get("workflow"), str):
                                names.add(record["workflow"].strip())
    except (OSError, csv.Error):
        pass
    names.discard("")
    return names


# ----------------------------------------------------------------------------- reading text


def _open_text(path: Path) -> IO[str]:
    # surrogateescape keeps going past bytes that are not UTF-8 (each becomes U+DC80..U+DCFF),
    # so they can be reported on their row instead of failing the whole file.
    return path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")


def _bounded_lines(
    handle: IO[str], recent: deque[str], long_lines: list[int], before: int = 0
) -> Iterator[str]:
    """The file's lines, each at most MAX_LINE_CHARS; longer ones are noted (numbered after
    the ``before`` lines that precede the text) and replaced."""
    readline = handle.readline
    for number, line in enumerate(iter(partial(readline, MAX_LINE_CHARS), ""), start=before + 1):
        if len(line) == MAX_LINE_CHARS and not line.endswith("\n"):
            while (rest := readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                pass
            long_lines.append(number)
            line = "\n"
        recent.append(line)
        yield line


def _encoding_reason(text: str) -> str | None:
    """Why ``text`` (decoded with surrogateescape) is not clean UTF-8 text, or None."""
    bad = _ESCAPED_BYTE_RE.search(text)
    if bad is not None:
        byte = ord(bad.group()) - 0xDC00
        return f"not valid UTF-8 (byte 0x{byte:02X}); save the manifest as UTF-8"
    if "\x00" in text:
        return "contains a NUL byte (is this a binary file?)"
    return None


def _long_line_reason() -> str:
    return f"line is longer than {MAX_LINE_CHARS:,} characters"


# ----------------------------------------------------------------------------- file-level checks


def _file_problem(
    display: str, reason: str, line: int = 0, column: str | None = None
) -> ManifestProblem:
    # Line 0 stands for the file as a whole.
    return ManifestProblem(display, line, column, reason)


def _check_file(path: Path, display: str) -> None:
    try:
        with path.open("rb") as handle:
            start = handle.read(4)
    except FileNotFoundError:
        raise ManifestError([_file_problem(display, "file not found")]) from None
    except IsADirectoryError:
        raise ManifestError(
            [_file_problem(display, "is a directory, not a manifest file")]
        ) from None
    except OSError as exc:
        raise ManifestError([_file_problem(display, f"cannot be read: {exc.strerror}")]) from None
    if not start:
        raise ManifestError([_file_problem(display, "file is empty")])
    if start.startswith(_UTF16_BOMS):
        raise ManifestError([_file_problem(display, "file is UTF-16; save it as UTF-8", line=1)])


def _csv_header(handle: IO[str], display: str) -> list[str]:
    """Read and check the header row; return the column names."""
    long_lines: list[int] = []
    lines = _bounded_lines(handle, deque(maxlen=1), long_lines)
    try:
        header = next(csv.reader(lines, strict=True), [])
    except csv.Error as exc:
        reason = f"header: {_csv_error_reason(str(exc))}"
        raise ManifestError([_file_problem(display, reason, line=1)]) from None
    damage = _long_line_reason() if long_lines else _encoding_reason("".join(header))
    if damage is not None:
        raise ManifestError([_file_problem(display, f"header: {damage}", line=1)])
    columns = [name.strip() for name in header]
    if not any(columns):
        reason = "the first line must be a header naming the columns"
        raise ManifestError([_file_problem(display, reason, line=1)])
    _check_columns(columns, display)
    return columns


def _check_columns(columns: list[str], display: str) -> None:
    if not any(c in _CONVERTERS or c.startswith(_NODE_PREFIX) for c in columns):
        sample = ",".join(columns)[:80]
        reason = (
            "the first line must be a header naming the columns "
            f"(for example 'id,image,prompt'); found {sample!r}"
        )
        raise ManifestError([_file_problem(display, reason, line=1)])
    problems: list[ManifestProblem] = []
    seen: set[str] = set()
    for index, name in enumerate(columns, start=1):
        if not name:
            where = f"column {index}"
            problems.append(_file_problem(display, f"{where} has no name", 1, where))
        elif name in seen:
            problems.append(_file_problem(display, f"column {name!r} appears twice", 1, name))
        elif name.startswith(_NODE_PREFIX):
            if parse_node_column(name) is None:
                reason = f"node columns are written {_NODE_HINT}"
                problems.append(_file_problem(display, reason, 1, name))
        elif name not in _CONVERTERS:
            problems.append(_file_problem(display, _unknown_column(name), 1, name))
        seen.add(name)
    missing = [c for c in REQUIRED_COLUMNS if c not in seen]
    if missing:
        reason = f"missing required column(s): {', '.join(missing)}"
        problems.append(_file_problem(display, reason, 1))
    if problems:
        raise ManifestError(problems)


def _unknown_column(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), KNOWN_COLUMNS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    known = ", ".join(KNOWN_COLUMNS)
    return f"unknown column {name!r}{hint}; known columns: {known}, {_NODE_HINT}"


def _check_jsonl_start(path: Path, display: str) -> None:
    """JSON Lines has no header, so the only file-level fault is having no rows at all."""
    with _open_text(path) as handle:
        for line in _bounded_lines(handle, deque(maxlen=1), []):
            if line.strip():
                return
    raise ManifestError([_file_problem(display, "file has no rows (only blank lines)")])


# ----------------------------------------------------------------------------- CSV quoting errors

#: Why a CSV record that the end of the text cut inside a quoted field was rejected.
UNCLOSED_QUOTE: Final = "broken quoting: a quoted field is never closed"


def _csv_error_reason(message: str) -> str:
    if "expected after" in message:
        return (
            "broken quoting: a closing quote must be followed by a comma or the end of the line "
            '(write a quote inside a quoted field as "")'
        )
    if "unexpected end of data" in message:
        return UNCLOSED_QUOTE
    if "field larger than field limit" in message:
        return (
            f"a field is longer than {CSV_FIELD_LIMIT:,} characters (often a quote that is "
            "never closed; the lines it swallowed were not checked)"
        )
    return f"broken CSV: {message}"


def _locate_quote_problem(text: str) -> tuple[int, int]:
    """Return (field index, character offset) of the quoting mistake in a CSV record's text.

    Runs only after the csv module rejected the record; it replays the same rules
    to say which field went wrong.
    """
    field = 0
    opened_at = 0
    in_quotes = False
    at_field_start = True
    i = 0
    while i < len(text):
        char = text[i]
        if in_quotes:
            if char == '"':
                if text.startswith('"', i + 1):
                    i += 2
                    continue
                in_quotes = False
                if text[i + 1 : i + 2] not in ("", ",", "\r", "\n"):
                    return field, i
        elif char == '"' and at_field_start:
            in_quotes = True
            opened_at = i
        elif char == ",":
            field += 1
            at_field_start = True
            i += 1
            continue
        at_field_start = False
        i += 1
    return field, opened_at


# ----------------------------------------------------------------------------- rows


class RowReader:
    """Turns records into specs; holds the state shared across the rows of one read."""

    def __init__(self, path: Path, display: str, check_images: bool) -> None:
        self._path = path
        self._display = display
        self._base = os.path.abspath(path.parent)
        self._check_images = check_images
        self._names = UniqueNames(display)
        # Per read, so a file fixed between two reads is seen fresh; bounded for huge manifests.
        self._image = lru_cache(maxsize=65_536)(self._probe_image)
        self._node_columns: dict[str, tuple[str, str] | None] = {}

    def _problem(self, line: int, column: str | None, reason: str) -> ManifestProblem:
        return ManifestProblem(self._display, line, column, reason)

    # --- CSV

    def csv_rows(self, columns: list[str]) -> Iterator[JobSpec | RowProblems]:
        """Rows of a CSV file whose header was checked already."""
        with _open_text(self._path) as handle:
            yield from map(self.settle, self.csv_drafts(columns, handle, 0))

    def csv_drafts(
        self, columns: list[str], handle: IO[str], header_lines: int
    ) -> Iterator[RowDraft]:
        """The rows of CSV text, each checked on its own: the whole file (``header_lines``
        0: the header is read and skipped) or a part of its body that starts with a record
        and follows ``header_lines`` lines."""
        # The header is valid, so each column is either known or a node column (whose
        # converter is never used).
        plan = [(name, _csv_converter(name), parse_node_column(name)) for name in columns]
        width = len(columns)
        recent: deque[str] = deque(maxlen=_RECENT_LINES)
        long_lines: list[int] = []
        reader = csv.reader(_bounded_lines(handle, recent, long_lines, header_lines), strict=True)
        if not header_lines:
            next(reader)
        end = header_lines + reader.line_num
        while True:
            start = end + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                end = header_lines + reader.line_num
                yield self._csv_error(columns, start, end, recent, str(exc))
                long_lines.clear()
                continue
            end = header_lines + reader.line_num
            problems: list[ManifestProblem] = []
            if long_lines:
                problems += [self._problem(n, None, _long_line_reason()) for n in long_lines]
                long_lines.clear()
            joined = "".join(fields)
            if not joined.isascii() or "\x00" in joined:
                problems += self._damaged_fields(start, columns, fields)
            if len(fields) != width:
                if fields and joined.strip():
                    s = "s" if len(fields) != 1 else ""
                    reason = f"row has {len(fields)} field{s} but the header has {width}"
                    problems.append(self._problem(start, None, reason))
                if problems:
                    yield RowDraft(start, problems)
                continue
            draft = self._csv_record(start, plan, fields, problems)
            if draft is not None:
                yield draft

    def _csv_record(
        self,
        line: int,
        plan: list[tuple[str, Callable[[str], Any] | None, tuple[str, str] | None]],
        fields: list[str],
        problems: list[ManifestProblem],
    ) -> RowDraft | None:
        values: dict[str, Any] = {}
        nodes: list[tuple[str, str, object]] = []
        for (name, convert, node), cell in zip(plan, fields, strict=True):
            text = cell.strip()
            if not text:
                continue
            if convert is None:
                if node is None:
                    values[name] = text
                else:
                    nodes.append((*node, text))
                continue
            try:
                values[name] = convert(text)
            except _Bad as bad:
                problems.append(self._problem(line, name, str(bad)))
        if values or nodes or problems:
            return self._draft(line, values, nodes, problems)
        return None  # a blank row

    def _csv_error(
        self, columns: list[str], start: int, end: int, recent: deque[str], message: str
    ) -> RowDraft:
        count = end - start + 1
        column = None
        line = start
        if count <= len(recent):
            text = "".join(list(recent)[-count:])
            field, offset = _locate_quote_problem(text)
            line = start + text.count("\n", 0, offset)
            column = columns[field] if field < len(columns) else None
        return RowDraft(line, [self._problem(line, column, _csv_error_reason(message))])

    def _damaged_fields(
        self, start: int, columns: list[str], fields: list[str]
    ) -> list[ManifestProblem]:
        problems = []
        line = start
        for column, field in zip(columns, fields, strict=False):
            reason = _encoding_reason(field)
            if reason is not None:
                problems.append(self._problem(line, column, reason))
            line += field.count("\n")
        return problems

    # --- JSONL

    def jsonl_rows(self) -> Iterator[JobSpec | RowProblems]:
        """Rows of a JSON Lines file: one object per line."""
        return map(self.settle, self.jsonl_drafts())

    def jsonl_drafts(self) -> Iterator[RowDraft]:
        """The rows of a JSON Lines file, each checked on its own."""
        long_lines: list[int] = []
        with _open_text(self._path) as handle:
            lines = _bounded_lines(handle, deque(maxlen=1), long_lines)
            for line, text in enumerate(lines, start=1):
                reason = None
                if long_lines:
                    long_lines.clear()
                    reason = _long_line_reason()
                elif not text.isascii() or "\x00" in text:
                    reason = _encoding_reason(text)
                if reason is not None:
                    yield RowDraft(line, [self._problem(line, None, reason)])
                elif text.strip():
                    yield self._json_line(line, text)

    def _json_line(self, line: int, text: str) -> RowDraft:
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problem = self._problem(line, str(exc.colno), f"invalid JSON: {exc.msg}")
            return RowDraft(line, [problem])
        except RecursionError:
            return RowDraft(line, [self._problem(line, None, "JSON nested too deeply")])
        if not isinstance(record, dict):
            reason = f"each line must be a JSON object {{...}}, got {_json_type(record)}"
            return RowDraft(line, [self._problem(line, None, reason)])
        values: dict[str, Any] = {}
        nodes: list[tuple[str, str, object]] = []
        problems: list[ManifestProblem] = []
        for name, raw in record.items():
            converters = _CONVERTERS.get(name)
            if converters is not None:
                if raw is None:
                    continue
                try:
                    value = converters[1](raw)
                except _Bad as bad:
                    problems.append(self._problem(line, name, str(bad)))
                    continue
                if value != "":
                    values[name] = value
                continue
            node = self._node_column(name)
            if node is None:
                prefixed = name.startswith(_NODE_PREFIX)
                reason = (
                    f"node keys are written {_NODE_HINT}" if prefixed else _unknown_column(name)
                )
                problems.append(self._problem(line, name, reason))
            elif isinstance(raw, str | int | float):
                nodes.append((*node, raw))
            elif raw is not None:
                reason = (
                    f"a node input must be a string, number or true/false, got {_json_type(raw)}"
                )
                problems.append(self._problem(line, name, reason))
        for name in REQUIRED_COLUMNS:
            if name not in record:
                problems.append(self._problem(line, name, f"missing required key {name!r}"))
        return self._draft(line, values, nodes, problems)

    def _node_column(self, name: str) -> tuple[str, str] | None:
        try:
            return self._node_columns[name]
        except KeyError:
            parsed = self._node_columns[name] = parse_node_column(name)
            return parsed

    # --- shared

    def settle(self, draft: RowDraft) -> JobSpec | RowProblems:
        """The row's final form, once the rows before it were settled."""
        problems = self._names.check(draft.line, draft.explicit_id, draft.job_id, draft.output)
        if problems:
            draft.problems += problems
        if draft.problems:
            return RowProblems(draft.line, draft.problems, draft.explicit_id)
        spec = draft.spec  # built on each access
        assert spec is not None  # a draft without problems has one
        return spec

    def _draft(
        self,
        line: int,
        values: dict[str, Any],
        nodes: list[tuple[str, str, object]],
        problems: list[ManifestProblem],
    ) -> RowDraft:
        """Cross-field checks, image check and the derived id; build the spec if all is well."""
        reported = {p.column for p in problems} if problems else ()
        prompt = values.get("prompt")
        if prompt is None and "prompt" not in reported:
            problems.append(self._problem(line, "prompt", "empty prompt"))
        image_text = values.get("image")
        image = None
        image_key = ""
        if image_text is not None:
            image, image_key, reason = self._image(image_text)
            if reason is not None:
                problems.append(self._problem(line, "image", reason))
        elif "image" not in reported:
            problems.append(self._problem(line, "image", "no image given"))
        if ("width" in values) != ("height" in values) and not {"width", "height"} & set(reported):
            missing = "height" if "width" in values else "width"
            problems.append(self._problem(line, missing, "width and height must be given together"))
        switch = values.get("switch_step")
        if switch is not None and switch > values.get("steps", switch):
            reason = f"switch_step {switch} is after the last step ({values['steps']})"
            problems.append(self._problem(line, "switch_step", reason))

        explicit_id = values.pop("id", None)
        output = values.get("output")
        if problems:
            return RowDraft(line, problems, explicit_id, explicit_id, output)
        job_id = explicit_id or _derive_id(image_key, values, nodes)
        assert image is not None and prompt is not None  # else a problem
        del values["image"], values["prompt"]
        values.update(job_id=job_id, line=line, image=image, prompt=prompt)
        values["node_inputs"] = tuple(nodes)
        spec_values = tuple(map(values.get, SPEC_FIELDS))  # unset: None, their default
        return RowDraft(line, problems, explicit_id, job_id, output, spec_values)

    def _probe_image(self, text: str) -> tuple[Path, str, str | None]:
        """Resolve an image path; return (absolute path, id key, problem or None)."""
        absolute = os.path.normpath(os.path.join(self._base, text))
        try:
            key = os.path.relpath(absolute, self._base).replace(os.sep, "/")
        except ValueError:  # another drive on Windows
            key = absolute
        path = Path(absolute)
        if not self._check_images:
            return path, key, None
        return path, key, _image_problem(path)


def _image_problem(path: Path) -> str | None:
    """Return why ``path`` is not a usable image, or ``None``."""
    try:
        with Image.open(path) as image:
            image.verify()
    except FileNotFoundError:
        return f"missing image: {path} does not exist"
    except IsADirectoryError:
        return f"{path} is a directory, not an image"
    except PermissionError:
        return f"image {path} cannot be read: permission denied"
    # Pillow reports undecodable data with many exception types (UnidentifiedImageError,
    # SyntaxError, ValueError, struct.error, DecompressionBombError…); all mean "unreadable".
    except Exception as exc:
        if path.is_dir():
            return f"{path} is a directory, not an image"
        return f"unreadable image {path}: {exc}"
    return None


def _derive_id(image_key: str, values: dict[str, Any], nodes: list[tuple[str, str, object]]) -> str:
    """Id from the row's content (image path relative to the manifest, every other field),
    so reordering rows keeps every id."""
    content: list[Any] = [image_key, *(values.get(name) for name in _ID_COLUMNS), nodes]
    # Appended only when set, so rows without a workflow keep the ids they always had.
    if "workflow" in values:
        content.append({"workflow": values["workflow"]})
    text = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
