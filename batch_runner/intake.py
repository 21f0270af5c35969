"""The manifest as the store takes it in: every row checked and encoded, in one pass.

A row is checked on its own (values, image, derived id), against its workflow, then
against the rows before it (duplicate ids and output names), in file order. A big CSV
file is checked on its own in worker processes, each taking parts of the file that
start and end with whole records; only the duplicate check and the hand-over to the
store stay in this process, so every message (file, line, column, reason) and the order
of rows are the same as when one process reads the whole file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import operator
import os
import signal
import warnings
from collections import deque
from collections.abc import Iterator
from functools import partial
from multiprocessing.connection import Connection
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import IO

from batch_runner.errors import ManifestError, ManifestProblem, WorkflowError
from batch_runner.manifest import (
    SPEC_FIELDS,
    UNCLOSED_QUOTE,
    JobSpec,
    RowDraft,
    RowReader,
    UniqueNames,
    open_manifest,
)
from batch_runner.states import JobState
from batch_runner.store import NewJob
from batch_runner.workflows import TemplateBook

#: CSV files at least this big are parsed in worker processes.
PARALLEL_MIN_BYTES = 8 << 20
#: Bytes of CSV per part handed to a worker (a part ends after a whole record).
PART_BYTES = 1 << 18
#: A part that needs more than this to end on a whole record (a huge multi-line field):
#: the rest of the file is read here instead.
PART_MAX_BYTES = 4 << 20
#: Seconds a worker gets to end by itself once its pipe is closed.
_WORKER_EXIT_WAIT = 5.0

# One row as the checks hand it over: (line, problems or None, explicit id, job id, output
# name, stored spec, content hash, workflow issues or None). Plain tuples: they cross
# process boundaries a million at a time.
_Row = tuple[
    int,
    list[ManifestProblem] | None,
    str | None,
    str | None,
    str | None,
    str | None,
    str | None,
    list[str] | None,
]

#: What ``WorkflowTemplate.check_spec`` asks of a row besides its node inputs: only whether
#: each of these is set.
_CHECKED_NAMES = (
    "negative_prompt",
    "seed",
    "preset",
    "width",
    "frames",
    "fps",
    "steps",
    "cfg",
    "shift",
    "switch_step",
)
_CHECKED_FIELDS = attrgetter(*_CHECKED_NAMES)
#: The same of a row's ``RowDraft.values``.
_CHECKED_VALUES = itemgetter(*map(SPEC_FIELDS.index, _CHECKED_NAMES))
_NODE_INPUTS = SPEC_FIELDS.index("node_inputs")
_WORKFLOW = SPEC_FIELDS.index("workflow")
_unset = partial(operator.is_, None)
_PENDING = JobState.PENDING
#: ``NewJob(key, line, spec, content_hash)`` of a pending job from all six fields, without
#: the Python-level ``__new__`` of a named tuple (a third of a microsecond, a million times).
_new_pending = partial(tuple.__new__, NewJob)


class SpecCheck:
    """Why a row cannot render with its workflow, as ``check_spec`` says.

    Rows without node inputs get the same answer whenever their workflow and the set of
    fields they set are the same, so that answer is kept (a manifest has few such shapes).
    """

    def __init__(self, book: TemplateBook) -> None:
        self._book = book
        self._known: dict[tuple[object, ...], list[str]] = {}

    def __call__(self, spec: JobSpec) -> list[str]:
        if spec.node_inputs:
            return self._check(spec)
        shape = (spec.workflow, *map(_unset, _CHECKED_FIELDS(spec)))
        issues = self._known.get(shape)
        if issues is None:
            issues = self._known[shape] = self._check(spec)
        return issues

    def draft(self, draft: RowDraft) -> list[str]:
        """The same for a row without problems, building its JobSpec only when the answer
        is not known yet."""
        values = draft.values
        assert values is not None
        if values[_NODE_INPUTS]:
            return self(JobSpec(*values))
        shape = (values[_WORKFLOW], *map(_unset, _CHECKED_VALUES(values)))
        issues = self._known.get(shape)
        if issues is None:
            issues = self._known[shape] = self._check(JobSpec(*values))
        return issues

    def _check(self, spec: JobSpec) -> list[str]:
        try:
            return self._book.for_spec(spec).check_spec(spec)
        except WorkflowError as exc:
            return [exc.message]


class Intake:
    """The manifest's rows as the store takes them in, checked in the same single pass.

    Every problem is collected in ``problems``. Without ``skip_invalid``, no row is handed
    over after the first invalid one, but reading goes on to the end so that every problem
    is found; then ``ManifestError`` is raised from the iteration, inside the store's
    transaction, so nothing of the ingest is kept.
    """

    def __init__(self, path: Path, book: TemplateBook, skip_invalid: bool) -> None:
        self._path = path
        self._display = str(path)
        self._check = SpecCheck(book)
        self._skip_invalid = skip_invalid
        self.problems: list[ManifestProblem] = []

    def __iter__(self) -> Iterator[NewJob]:
        reader, columns = open_manifest(self._path)
        names = UniqueNames(self._display)
        for line, problems, explicit_id, job_id, output, text, digest, issues in self._rows(
            reader, columns
        ):
            duplicates = names.check(line, explicit_id, job_id, output)
            if duplicates:
                problems = (problems or []) + duplicates
            elif problems is None and issues is not None:
                problems = [ManifestProblem(self._display, line, None, i) for i in issues]
                explicit_id = job_id
            if problems is None:
                if self._skip_invalid or not self.problems:
                    assert job_id is not None and text is not None and digest is not None
                    yield _new_pending((job_id, line, text, digest, _PENDING, None))
                continue
            self.problems += problems
            if self._skip_invalid:
                key = explicit_id or f"line-{line}"
                reason = "; ".join(str(p) for p in problems)
                digest = hashlib.sha256(reason.encode()).hexdigest()
                yield NewJob(key, line, {"invalid": reason}, digest, JobState.SKIPPED, reason)
        if self.problems and not self._skip_invalid:
            raise ManifestError(self.problems)

    def _rows(self, reader: RowReader, columns: list[str] | None) -> Iterator[_Row]:
        if columns is None:
            return self._encoded(reader.jsonl_drafts())
        body = _single_line_header_end(self._path)
        workers = _worker_count()
        if (
            body is None
            or workers < 2
            or self._path.stat().st_size < PARALLEL_MIN_BYTES
            or "fork" not in multiprocessing.get_all_start_methods()
        ):
            return self._csv_from(reader, columns, 0, 0)
        return _Parallel(self, reader, columns, body, workers).rows()

    def _encoded(self, drafts: Iterator[RowDraft]) -> Iterator[_Row]:
        check = self._check
        for draft in drafts:
            if draft.values is None:
                yield (
                    draft.line,
                    draft.problems,
                    draft.explicit_id,
                    draft.job_id,
                    draft.output,
                    None,
                    None,
                    None,
                )
            else:
                text, digest = draft.encoded()
                issues = check.draft(draft) or None
                yield (
                    draft.line,
                    None,
                    draft.explicit_id,
                    draft.job_id,
                    draft.output,
                    text,
                    digest,
                    issues,
                )

    def _csv_from(
        self, reader: RowReader, columns: list[str], offset: int, lines_before: int
    ) -> Iterator[_Row]:
        """Rows of the CSV file from byte ``offset`` (0: the whole file, header included)."""
        with self._path.open("rb") as raw:
            raw.seek(offset)
            with _text(raw, at_start=not offset) as handle:
                yield from self._encoded(reader.csv_drafts(columns, handle, lines_before))

    def part_rows(
        self, reader: RowReader, columns: list[str], part: bytes, before: int
    ) -> list[_Row]:
        """Rows of one part of the CSV body (in a worker)."""
        with _text(io.BytesIO(part), at_start=False) as handle:
            return list(self._encoded(reader.csv_drafts(columns, handle, before)))


class _Parallel:
    """Parts of a CSV body checked in worker processes, their rows returned in file order."""

    def __init__(
        self, intake: Intake, reader: RowReader, columns: list[str], body: int, workers: int
    ) -> None:
        self._intake = intake
        self._reader = reader
        self._columns = columns
        self._body = body
        self._workers = workers

    def rows(self) -> Iterator[_Row]:
        context = multiprocessing.get_context("fork")
        pipes: list[Connection] = []
        processes = []
        try:
            for _ in range(self._workers):
                mine, theirs = context.Pipe()
                pipes.append(mine)
                # Forked, so the worker has the loaded workflows and the checked header.
                process = context.Process(
                    target=self._work, args=(theirs, list(pipes)), daemon=True
                )
                with warnings.catch_warnings():
                    # Python 3.12+ warns that forking with other threads running (the
                    # store's) may deadlock the child on a lock one of them held; a worker
                    # only parses text and talks over its pipe, it takes none of those.
                    warnings.filterwarnings("ignore", "This process .* fork", DeprecationWarning)
                    process.start()
                theirs.close()
                processes.append(process)
            yield from self._merge(pipes)
        finally:
            # A worker sees its pipe close and ends; one still busy is stopped.
            for pipe in pipes:
                pipe.close()
            for process in processes:
                process.join(_WORKER_EXIT_WAIT)
                if process.is_alive():
                    process.terminate()
                    process.join()

    def _merge(self, pipes: list[Connection]) -> Iterator[_Row]:
        """Hand parts out round-robin, one at a time per worker; take their rows in order."""
        parts = _parts(self._intake._path, self._body)
        waiting: deque[tuple[Connection | None, int, int, bool]] = deque()
        for pipe in pipes:
            if not self._send(pipe, parts, waiting):
                break
        while waiting:
            source, offset, before, last = waiting.popleft()
            if source is None:  # the rest could not be cut into parts
                yield from self._intake._csv_from(self._reader, self._columns, offset, before)
                return
            answer = source.recv()
            if isinstance(answer, str):
                raise RuntimeError(f"reading {self._intake._path} in a worker failed: {answer}")
            rows: list[_Row] = answer
            if not last and rows and _cut_inside_quotes(rows[-1]):
                # The part did not end on a whole record after all (a stray quote threw the
                # count off): from its start on, one process reads the rest.
                yield from self._intake._csv_from(self._reader, self._columns, offset, before)
                return
            yield from rows
            self._send(source, parts, waiting)

    @staticmethod
    def _send(
        pipe: Connection,
        parts: Iterator[tuple[int, int, bytes | None, bool]],
        waiting: deque[tuple[Connection | None, int, int, bool]],
    ) -> bool:
        part = next(parts, None)
        if part is None:
            return False
        offset, before, data, last = part
        if data is None:
            waiting.append((None, offset, before, last))
            return False
        pipe.send((data, before))
        waiting.append((pipe, offset, before, last))
        return True

    def _work(self, pipe: Connection, parent_ends: list[Connection]) -> None:
        _leave_signals_to_the_parent()
        # The copies of the parent's ends forked along would keep this pipe open after
        # the parent closes it, and the worker would never see its end.
        for end in parent_ends:
            end.close()
        try:
            while True:
                try:
                    data, before = pipe.recv()
                except EOFError:
                    return
                pipe.send(self._intake.part_rows(self._reader, self._columns, data, before))
        except (BrokenPipeError, EOFError):
            return  # the parent stopped reading
        except Exception as exc:
            with contextlib.suppress(OSError):
                pipe.send(f"{type(exc).__name__}: {exc}")
        finally:
            pipe.close()


def _leave_signals_to_the_parent() -> None:
    """In a forked worker: drop the signal handling inherited from the parent's event loop.

    Its handlers write the signal's number to a socket the parent's loop reads, so a
    worker's SIGTERM (or the terminal's Ctrl-C reaching the worker) would look like one
    sent to the runner. Ctrl-C is the parent's to handle; it ends the workers.
    """
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _cut_inside_quotes(row: _Row) -> bool:
    problems = row[1]
    return problems is not None and problems[-1].reason == UNCLOSED_QUOTE


def _parts(path: Path, body: int) -> Iterator[tuple[int, int, bytes | None, bool]]:
    """(offset, lines before it, bytes, whether it is the last) of each part of the body;
    bytes None: from there on the file cannot be cut (a record longer than PART_MAX_BYTES).

    A part ends after a newline with an even number of quotes before it since the part's
    start: in well-formed CSV that newline ends a record (a quote inside a quoted field is
    doubled). A stray quote in an unquoted field can fool this; the worker's parse then ends
    inside a quoted field, which ``_merge`` notices.
    """
    with path.open("rb") as raw:
        raw.seek(body)
        offset, before = body, 1
        pending = b""
        ended = False
        while pending or not ended:
            while len(pending) < PART_BYTES and not ended:
                more = raw.read(PART_BYTES)
                ended = not more
                pending += more
            cut = len(pending) if ended else _record_end(pending)
            while cut is None:
                if len(pending) > PART_MAX_BYTES:
                    yield offset, before, None, True
                    return
                more = raw.read(PART_BYTES)
                ended = not more
                pending += more
                cut = len(pending) if ended else _record_end(pending)
            part, pending = pending[:cut], pending[cut:]
            last = ended and not pending
            yield offset, before, part, last
            offset += len(part)
            before += _count_lines(part)


def _record_end(data: bytes) -> int | None:
    """Index just after the last newline of ``data`` with an even number of quotes before
    it, or None."""
    quotes = data.count(b'"')
    end = len(data)
    newline = data.rfind(b"\n")
    while newline >= 0:
        quotes -= data.count(b'"', newline + 1, end)
        if not quotes % 2:
            return newline + 1
        end = newline + 1
        newline = data.rfind(b"\n", 0, newline)
    return None


def _count_lines(data: bytes) -> int:
    """Lines in ``data`` as text read with ``newline=""`` counts them (\\n, \\r\\n or \\r)."""
    lines = data.count(b"\n")
    if b"\r" in data:
        lines += data.count(b"\r") - data.count(b"\r\n")
    return lines


def _single_line_header_end(path: Path) -> int | None:
    """Byte offset of the CSV body when the header is one line without quotes, else None."""
    with path.open("rb") as raw:
        head = raw.read(1 << 16)
    ends = [at for at in (head.find(b"\n"), head.find(b"\r")) if at >= 0]
    if not ends or b'"' in head[: min(ends)]:
        return None
    at = min(ends)
    return at + (2 if head[at : at + 2] == b"\r\n" else 1)


def _text(raw: IO[bytes], *, at_start: bool) -> io.TextIOWrapper:
    # As manifest._open_text, so the text decodes the same way; a byte order mark is
    # dropped only at the start of the file.
    encoding = "utf-8-sig" if at_start else "utf-8"
    return io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape", newline="")


def _worker_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
