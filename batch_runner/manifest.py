"""Streaming reader for job manifests: CSV with a header row, or JSON Lines.

A manifest may hold a million rows, so it is read one record at a time and each
row costs a few microseconds: image checks are cached per distinct path and
duplicate detection keeps 12 bytes per row in flat arrays. Problems with the file
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
``node.<node>.<input>``  sets any node input; ``<node>`` is a node id or title
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import os
import re
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
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

    def content_hash(self) -> str:
        """Return a sha256 hex digest of everything that affects the output (not ``line``).

        Stored with the job so a later run can tell that a row with the same id changed.
        """
        data = self.to_json()
        del data["line"]
        return hashlib.sha256(_canonical(data).encode("utf-8")).hexdigest()

    def to_json(self) -> dict[str, object]:
        """Return a JSON-serialisable dict; ``from_json`` reads it back."""
        data = asdict(self)
        data["image"] = str(self.image)
        data["node_inputs"] = [list(item) for item in self.node_inputs]
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
        )


@dataclass(frozen=True)
class RowProblems:
    """A manifest row that cannot become a job, with every reason found."""

    line: int
    problems: list[ManifestProblem]
    job_id: str | None  #: the row's own id when it had a valid one


# ----------------------------------------------------------------------------- limits and columns

#: Longest prompt or negative prompt accepted, in characters.
MAX_TEXT_CHARS: Final = 10_000
#: Longest manifest line read; a longer one is reported and skipped.
MAX_LINE_BYTES: Final = 1 << 20
MAX_STEPS: Final = 10_000
#: WanImageToVideo accepts at most 16384 frames; the largest 4k+1 below that.
MAX_FRAMES: Final = 16_381
MAX_NAME_CHARS: Final = 128
#: Python's csv module refuses longer fields; it is a process-wide setting we leave alone.
CSV_FIELD_LIMIT: Final = csv.field_size_limit()

REQUIRED_COLUMNS: Final = ("image", "prompt")
KNOWN_COLUMNS: Final = (
    "id",
    "image",
    "prompt",
    "negative_prompt",
    "seed",
    "preset",
    "width",
    "height",
    "frames",
    "fps",
    "steps",
    "cfg",
    "shift",
    "switch_step",
    "output",
)
_NODE_PREFIX: Final = "node."
_NODE_HINT: Final = "node.<node id or title>.<input>"
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_INT_RE: Final = re.compile(r"[+-]?[0-9]+")
_EXTENSIONS: Final = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_UTF16_BOMS: Final = (b"\xff\xfe", b"\xfe\xff")


class _Bad(Exception):
    """A cell's value is wrong; the message is the plain-words reason."""


# Value checks: each takes a parsed value and raises _Bad with the reason.


def _check_name(value: str, what: str) -> None:
    if len(value) > MAX_NAME_CHARS:
        raise _Bad(f"{what} is longer than {MAX_NAME_CHARS} characters")
    if not _NAME_RE.fullmatch(value) or value in {".", ".."}:
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


def _check_preset(value: str) -> None:
    if value not in PRESETS:
        raise _Bad(f"unknown preset {value!r}; use one of: {', '.join(PRESETS)}")


def _check_switch(value: int) -> None:
    if value < 0:
        raise _Bad(f"must be 0 or more, got {value}")
    if value > MAX_STEPS:
        raise _Bad(f"{value} is too large (at most {MAX_STEPS})")


@dataclass(frozen=True, slots=True)
class _Column:
    kind: str  # "text", "int" or "float"
    check: Callable[[Any], None]


_COLUMNS: Final[dict[str, _Column]] = {
    "id": _Column("text", lambda v: _check_name(v, "id")),
    "image": _Column("text", lambda v: None),
    "prompt": _Column("text", lambda v: _check_text(v, "prompt")),
    "negative_prompt": _Column("text", lambda v: _check_text(v, "negative prompt")),
    "seed": _Column("int", _check_seed),
    "preset": _Column("text", _check_preset),
    "width": _Column("int", _check_side),
    "height": _Column("int", _check_side),
    "frames": _Column("int", _check_frames),
    "fps": _Column("float", lambda v: _check_positive(v, 1000)),
    "steps": _Column("int", lambda v: _check_positive(v, MAX_STEPS)),
    "cfg": _Column("float", lambda v: _check_positive(v, 100)),
    "shift": _Column("float", lambda v: _check_positive(v, 100)),
    "switch_step": _Column("int", _check_switch),
    "output": _Column("text", lambda v: _check_name(v, "output name")),
}
assert tuple(_COLUMNS) == KNOWN_COLUMNS


def _show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _canonical(data: object) -> str:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def parse_node_column(name: str) -> tuple[str, str] | None:
    """Split ``node.<node>.<input>`` into ``(node, input)``; ``None`` if malformed.

    The input name is after the last dot, so node titles may contain dots.
    """
    node, dot, input_name = name[len(_NODE_PREFIX) :].rpartition(".")
    if not name.startswith(_NODE_PREFIX) or not dot or not node.strip() or not input_name.strip():
        return None
    return node.strip(), input_name.strip()


# Converters from a CSV cell (already stripped, non-empty) to a typed value.


def _csv_value(kind: str, text: str) -> object:
    if kind == "text":
        return text
    if kind == "int":
        if not _INT_RE.fullmatch(text):
            raise _Bad(f"{text!r} is not a whole number")
        return int(text)
    try:
        number = float(text)
    except ValueError:
        raise _Bad(f"{text!r} is not a number") from None
    if not math.isfinite(number):
        raise _Bad(f"{text!r} is not a finite number")
    return number


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


def _json_value(kind: str, value: object) -> object:
    if kind == "text":
        if not isinstance(value, str):
            raise _Bad(f"expected a string, got {_json_type(value)}")
        return value.strip()
    if isinstance(value, bool) or not isinstance(value, int | float):
        expected = "a whole number" if kind == "int" else "a number"
        raise _Bad(f"expected {expected}, got {_json_type(value)}")
    if not math.isfinite(value):
        raise _Bad(f"{value} is not a finite number")
    if kind == "int":
        if not isinstance(value, int):
            raise _Bad(f"expected a whole number, got {value}")
        return value
    return float(value)


# ----------------------------------------------------------------------------- duplicate detection


class _SeenTable:
    """Set of strings → the line that first used each, in ~12 bytes per entry.

    Open addressing over two flat arrays of 64-bit string hashes and line numbers;
    a Python dict of the strings themselves would cost ~150 bytes per row. Two
    different strings with the same 64-bit hash (odds ~1e-8 at a million rows)
    would be reported as duplicates.
    """

    def __init__(self) -> None:
        self._hashes = array("q", [0]) * 1024
        self._lines = array("I", [0]) * 1024
        self._count = 0

    def add(self, key: str, line: int) -> int | None:
        """Record ``key`` at ``line``; return the earlier line if it was already there."""
        # hash() never returns -1 and is well spread; 0 marks an empty slot.
        wanted = hash(key) or 1
        hashes = self._hashes
        mask = len(hashes) - 1
        slot = wanted & mask
        while True:
            found = hashes[slot]
            if found == wanted:
                return self._lines[slot]
            if found == 0:
                break
            slot = (slot + 1) & mask
        hashes[slot] = wanted
        self._lines[slot] = line
        self._count += 1
        if self._count * 2 > len(hashes):
            self._grow()
        return None

    def _grow(self) -> None:
        old = zip(self._hashes, self._lines, strict=True)
        size = len(self._hashes) * 2
        self._hashes = array("q", [0]) * size
        self._lines = array("I", [0]) * size
        mask = size - 1
        for wanted, line in old:
            if wanted:
                slot = wanted & mask
                while self._hashes[slot]:
                    slot = (slot + 1) & mask
                self._hashes[slot] = wanted
                self._lines[slot] = line


# ----------------------------------------------------------------------------- public entry points


def read_manifest(path: Path, *, check_images: bool = True) -> Iterator[JobSpec | RowProblems]:
    """Read a manifest and yield one ``JobSpec`` or ``RowProblems`` per row, in file order.

    The format follows the extension: ``.csv`` (header row required), ``.jsonl`` or
    ``.ndjson`` (one JSON object per line). Blank lines are skipped. Problems with
    the file itself (missing, empty, not UTF-8, header without ``image``/``prompt``,
    unknown columns) raise ``ManifestError`` from this call, before any row.

    With ``check_images``, each distinct image is opened with Pillow and verified
    in the calling thread; run the iteration in a worker thread if that matters.
    """
    display = str(path)
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ManifestError(
            [_file_problem(display, "a manifest must end in .csv, .jsonl or .ndjson")]
        )
    _check_file(path, display)
    reader = _RowReader(path, display, check_images)
    if fmt == "csv":
        with path.open("rb") as handle:
            columns = _csv_header(handle, display)
        return reader.csv_rows(columns)
    _check_jsonl_start(path, display)
    return reader.jsonl_rows()


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


def _decode_line(raw: bytes, number: int) -> tuple[str, str | None]:
    """Decode one line as UTF-8; return the text and, if it was not valid, the reason."""
    try:
        text = raw.decode("utf-8")
        reason = None
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        reason = (
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02X} at byte {exc.start + 1} of the line); "
            "save the manifest as UTF-8"
        )
    if number == 1 and text.startswith("\ufeff"):
        text = text[1:]
    return text, reason


def _csv_header(handle: IO[bytes], display: str) -> list[str]:
    """Read and check the header row; return the column names."""
    lines = _LineSource(handle)
    try:
        header = next(csv.reader(lines, strict=True))
    except StopIteration:
        header = []
    except csv.Error as exc:
        raise ManifestError(
            [_file_problem(display, f"header: {_csv_error_reason(str(exc))}", line=1)]
        ) from None
    if lines.bad:
        line, (reason, _) = next(iter(lines.bad.items()))
        raise ManifestError([_file_problem(display, reason, line=line)])
    columns = [name.strip() for name in header]
    if not any(columns):
        raise ManifestError(
            [_file_problem(display, "the first line must be a header naming the columns", line=1)]
        )
    return _check_columns(columns, display)


def _check_columns(columns: list[str], display: str) -> list[str]:
    problems: list[ManifestProblem] = []
    if not any(c in _COLUMNS or c.startswith(_NODE_PREFIX) for c in columns):
        sample = ",".join(columns)[:80]
        reason = (
            "the first line must be a header naming the columns "
            f"(for example 'id,image,prompt'); found {sample!r}"
        )
        raise ManifestError([_file_problem(display, reason, line=1)])
    seen: set[str] = set()
    for index, name in enumerate(columns, start=1):
        where = name or f"column {index}"
        if not name:
            problems.append(_file_problem(display, f"column {index} has no name", 1, where))
        elif name in seen:
            problems.append(_file_problem(display, f"column {name!r} appears twice", 1, name))
        elif name.startswith(_NODE_PREFIX):
            if parse_node_column(name) is None:
                problems.append(
                    _file_problem(display, f"node columns are written {_NODE_HINT}", 1, name)
                )
        elif name not in _COLUMNS:
            problems.append(_file_problem(display, _unknown_column(name), 1, name))
        seen.add(name)
    missing = [c for c in REQUIRED_COLUMNS if c not in seen]
    if missing:
        problems.append(
            _file_problem(display, f"missing required column(s): {', '.join(missing)}", 1)
        )
    if problems:
        raise ManifestError(problems)
    return columns


def _unknown_column(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), KNOWN_COLUMNS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown column {name!r}{hint}; known columns: {', '.join(KNOWN_COLUMNS)}, {_NODE_HINT}"


def _check_jsonl_start(path: Path, display: str) -> None:
    with path.open("rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), 1):
            text, reason = _decode_line(raw, number)
            if reason is not None:
                raise ManifestError([_file_problem(display, reason, line=number)])
            if text.strip():
                return
    raise ManifestError([_file_problem(display, "file has no rows (only blank lines)")])


# ----------------------------------------------------------------------------- line source


class _LineSource:
    """Iterates a binary file as decoded text lines, noting lines that are not clean.

    ``bad`` maps a line number to (reason, marker) where the marker is the character
    that stands in for the damage in the decoded text, used to find the column.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self._readline = handle.readline
        self.number = 0
        self.bad: dict[int, tuple[str, str]] = {}
        #: Text of the lines read since the consumer last cleared it (one CSV record).
        self.record: list[str] = []

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        raw = self._readline(MAX_LINE_BYTES + 1)
        if not raw:
            raise StopIteration
        self.number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := self._readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
            self.bad[self.number] = (f"line is longer than {MAX_LINE_BYTES:,} bytes", "")
            raw = b"\n"
        text, reason = _decode_line(raw, self.number)
        if reason is not None:
            self.bad[self.number] = (reason, "\ufffd")
        elif "\x00" in text:
            self.bad[self.number] = ("contains a NUL byte (is this a binary file?)", "\x00")
        self.record.append(text)
        return text


def _csv_error_reason(message: str) -> str:
    if "expected after" in message:
        return (
            "broken quoting: a closing quote must be followed by a comma or the end of the line "
            '(write a quote inside a quoted field as "")'
        )
    if "unexpected end of data" in message:
        return "broken quoting: a quoted field is never closed"
    if "field larger than field limit" in message:
        return (
            f"a field is longer than {CSV_FIELD_LIMIT:,} characters "
            "(often a quote that is never closed)"
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


class _RowReader:
    """Turns records into specs; holds the state shared across rows of one read."""

    def __init__(self, path: Path, display: str, check_images: bool) -> None:
        self._path = path
        self._display = display
        self._base = os.path.abspath(path.parent)
        self._check_images = check_images
        self._ids = _SeenTable()
        self._stems = _SeenTable()
        # Per read, so a file fixed between two reads is seen fresh; bounded for huge manifests.
        self._image = lru_cache(maxsize=65_536)(self._probe_image)
        self._node_columns: dict[str, tuple[str, str] | None] = {}

    # --- CSV

    def csv_rows(self, columns: list[str]) -> Iterator[JobSpec | RowProblems]:
        with self._path.open("rb") as handle:
            lines = _LineSource(handle)
            reader = csv.reader(lines, strict=True)
            next(reader)  # the header, checked already
            lines.bad.clear()
            lines.record.clear()
            width = len(columns)
            # The header is valid, so every column is either known or a node column.
            plan = [
                (name, _COLUMNS.get(name), parse_node_column(name) or ("", "")) for name in columns
            ]
            previous_end = reader.line_num
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    start = previous_end + 1
                    previous_end = reader.line_num
                    yield self._csv_error(columns, start, lines, str(exc))
                    continue
                start = previous_end + 1
                previous_end = reader.line_num
                lines.record.clear()
                problems: list[ManifestProblem] = []
                if lines.bad:
                    problems = self._damaged_lines(lines, start, previous_end, columns, fields)
                if not any(f.strip() for f in fields):
                    if problems:
                        yield RowProblems(start, problems, None)
                    continue
                if len(fields) != width:
                    problems.append(
                        self._problem(
                            start,
                            None,
                            f"row has {len(fields)} field{'s' if len(fields) != 1 else ''} "
                            f"but the header has {width}",
                        )
                    )
                    yield RowProblems(start, problems, None)
                    continue
                values: dict[str, Any] = {}
                nodes: list[tuple[str, str, object]] = []
                for (name, column, node), cell in zip(plan, fields, strict=True):
                    text = cell.strip()
                    if not text:
                        continue
                    if column is None:
                        nodes.append((*node, text))
                        continue
                    try:
                        value = _csv_value(column.kind, text)
                        column.check(value)
                    except _Bad as bad:
                        problems.append(self._problem(start, name, str(bad)))
                        continue
                    values[name] = value
                yield self._finish(start, values, nodes, problems)

    def _csv_error(
        self, columns: list[str], start: int, lines: _LineSource, message: str
    ) -> RowProblems:
        text = "".join(lines.record)
        lines.record.clear()
        lines.bad.clear()
        field, offset = _locate_quote_problem(text)
        line = start + text.count("\n", 0, offset)
        column = columns[field] if field < len(columns) else None
        return RowProblems(line, [self._problem(line, column, _csv_error_reason(message))], None)

    def _damaged_lines(
        self, lines: _LineSource, start: int, end: int, columns: list[str], fields: list[str]
    ) -> list[ManifestProblem]:
        problems = []
        for number in range(start, end + 1):
            damage = lines.bad.pop(number, None)
            if damage is None:
                continue
            reason, marker = damage
            column = next(
                (c for c, f in zip(columns, fields, strict=False) if marker and marker in f), None
            )
            problems.append(self._problem(number, column, reason))
        return problems

    # --- JSONL

    def jsonl_rows(self) -> Iterator[JobSpec | RowProblems]:
        with self._path.open("rb") as handle:
            lines = _LineSource(handle)
            for text in lines:
                line = lines.number
                lines.record.clear()
                damage = lines.bad.pop(line, None)
                if damage is not None:
                    yield RowProblems(line, [self._problem(line, None, damage[0])], None)
                    continue
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield RowProblems(
                        line,
                        [self._problem(line, str(exc.colno), f"invalid JSON: {exc.msg}")],
                        None,
                    )
                    continue
                except RecursionError:
                    yield RowProblems(
                        line, [self._problem(line, None, "JSON nested too deeply")], None
                    )
                    continue
                if not isinstance(record, dict):
                    reason = f"each line must be a JSON object {{...}}, got {_json_type(record)}"
                    yield RowProblems(line, [self._problem(line, None, reason)], None)
                    continue
                yield self._json_row(line, record)

    def _json_row(self, line: int, record: dict[str, Any]) -> JobSpec | RowProblems:
        values: dict[str, Any] = {}
        nodes: list[tuple[str, str, object]] = []
        problems: list[ManifestProblem] = []
        for name, raw in record.items():
            column = _COLUMNS.get(name)
            if column is None:
                parsed = self._node_column(name) if name.startswith(_NODE_PREFIX) else None
                if parsed is None:
                    reason = (
                        f"node keys are written {_NODE_HINT}"
                        if name.startswith(_NODE_PREFIX)
                        else _unknown_column(name)
                    )
                    problems.append(self._problem(line, name, reason))
                elif raw is None:
                    continue
                elif isinstance(raw, str | int | float):
                    nodes.append((*parsed, raw))
                else:
                    problems.append(
                        self._problem(
                            line,
                            name,
                            f"a node input must be a string, number or true/false, "
                            f"got {_json_type(raw)}",
                        )
                    )
                continue
            if raw is None:
                continue
            try:
                value = _json_value(column.kind, raw)
                if value == "":
                    continue
                column.check(value)
            except _Bad as bad:
                problems.append(self._problem(line, name, str(bad)))
                continue
            values[name] = value
        for name in REQUIRED_COLUMNS:
            if name not in record:
                problems.append(self._problem(line, name, f"missing required key {name!r}"))
        return self._finish(line, values, nodes, problems)

    # --- shared

    def _node_column(self, name: str) -> tuple[str, str] | None:
        try:
            return self._node_columns[name]
        except KeyError:
            parsed = self._node_columns[name] = parse_node_column(name)
            return parsed

    def _problem(self, line: int, column: str | None, reason: str) -> ManifestProblem:
        return ManifestProblem(self._display, line, column, reason)

    def _finish(
        self,
        line: int,
        values: dict[str, Any],
        nodes: list[tuple[str, str, object]],
        problems: list[ManifestProblem],
    ) -> JobSpec | RowProblems:
        """Cross-field checks, image check, id and output uniqueness; build the spec."""
        reported = {p.column for p in problems}
        prompt = values.get("prompt")
        if prompt is None and "prompt" not in reported:
            problems.append(self._problem(line, "prompt", "empty prompt"))
        image_text = values.get("image")
        image = Path()
        image_key = ""
        if image_text is None:
            if "image" not in reported:
                problems.append(self._problem(line, "image", "no image given"))
        else:
            image, image_key, reason = self._image(image_text)
            if reason is not None:
                problems.append(self._problem(line, "image", reason))
        sides = {"width", "height"}
        if len(sides & values.keys()) == 1 and not sides & reported:
            missing = "height" if "width" in values else "width"
            problems.append(self._problem(line, missing, "width and height must be given together"))
        steps, switch = values.get("steps"), values.get("switch_step")
        if isinstance(steps, int) and isinstance(switch, int) and switch > steps:
            problems.append(
                self._problem(
                    line, "switch_step", f"switch_step {switch} is after the last step ({steps})"
                )
            )

        explicit_id = values.get("id")
        job_id = explicit_id
        first: int | None = None
        if explicit_id is not None:
            first = self._ids.add(explicit_id, line)
            if first is not None:
                reason = f"duplicate id {explicit_id!r} (first used on line {first})"
                problems.append(self._problem(line, "id", reason))
        elif not problems:
            job_id = _derive_id(image_key, values, nodes)
            first = self._ids.add(job_id, line)
            if first is not None:
                reason = (
                    f"same content as line {first}: rows without an id get one from their "
                    "content, so identical rows are duplicates (add an id column)"
                )
                problems.append(self._problem(line, None, reason))
        output = values.get("output")
        # A repeated id already explains a repeated output name taken from it.
        stem = output if output is not None else (job_id if first is None else None)
        if stem is not None:
            first_stem = self._stems.add(stem.casefold(), line)
            if first_stem is not None:
                reason = (
                    f"output name {stem!r} is already used on line {first_stem} "
                    "(output names are compared ignoring case)"
                )
                problems.append(self._problem(line, "output" if output else "id", reason))
        if problems:
            return RowProblems(line, problems, explicit_id)
        assert job_id is not None and prompt is not None  # otherwise a problem was recorded
        return JobSpec(
            job_id=job_id,
            line=line,
            image=image,
            prompt=prompt,
            node_inputs=tuple(nodes),
            **{k: v for k, v in values.items() if k not in _SPEC_SKIP},
        )

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


_SPEC_SKIP: Final = frozenset({"id", "image", "prompt"})


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


def _derive_id(
    image_key: str, values: dict[str, object], nodes: list[tuple[str, str, object]]
) -> str:
    """Id from the row's content, so reordering rows keeps every id."""
    content = {k: v for k, v in values.items() if k != "image"}
    content["image"] = image_key
    content["node_inputs"] = nodes
    return hashlib.sha256(_canonical(content).encode("utf-8")).hexdigest()[:16]
