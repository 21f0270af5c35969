"""The ingest's reading of a manifest: in worker processes over parts of a big CSV file it
finds exactly what one process reading the whole file finds, in the same order."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch_runner import intake as intake_mod
from batch_runner import manifest
from batch_runner.errors import ManifestError, ManifestProblem
from batch_runner.intake import Intake
from batch_runner.runner import check_manifest, template_for
from batch_runner.store import NewJob
from batch_runner.workflows import TemplateBook, as_book
from tests.helpers import settings_for

CORPUS = Path(__file__).parent.parent / "manifests"


def _book(path: Path) -> TemplateBook:
    settings = settings_for(path, [])
    return as_book(template_for(settings), settings)


def _read(path: Path, *, parallel: bool) -> tuple[list[NewJob], list[ManifestProblem]]:
    """Every row the store would take (invalid ones kept as skipped) and every problem."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(intake_mod, "PARALLEL_MIN_BYTES", 0 if parallel else 1 << 62)
        patch.setattr(intake_mod, "PART_BYTES", 7)  # a part of a record or two
        patch.setattr(intake_mod, "_worker_count", lambda: 3)
        rows = Intake(path, _book(path), skip_invalid=True)
        try:
            return list(rows), rows.problems
        except ManifestError as exc:  # a problem with the file as a whole
            return [], exc.problems


def _same_both_ways(path: Path) -> tuple[list[NewJob], list[ManifestProblem]]:
    one = _read(path, parallel=False)
    assert _read(path, parallel=True) == one
    return one


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    target = tmp_path / "manifests"
    shutil.copytree(CORPUS, target)
    return target


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in CORPUS.iterdir() if p.suffix in (".csv", ".jsonl") and p.is_file()),
)
def test_corpus_reads_the_same_in_parts_and_as_the_checks_say(corpus: Path, name: str) -> None:
    path = corpus / name
    rows, problems = _same_both_ways(path)
    try:
        expected = check_manifest(path, _book(path))
    except ManifestError as exc:
        expected = (0, exc.problems)
    assert (sum(r.error is None for r in rows), problems) == expected


@pytest.fixture
def reread_from(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Byte offsets from which the file was read again in this process."""
    offsets: list[int] = []
    real = Intake._csv_from

    def spy(self: Intake, reader: Any, columns: list[str], offset: int, before: int) -> Any:
        if offset:
            offsets.append(offset)
        return real(self, reader, columns, offset, before)

    monkeypatch.setattr(Intake, "_csv_from", spy)
    return offsets


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (32, 24), "blue").save(tmp_path / "a.png")
    return tmp_path


def test_quoted_fields_across_lines_parts_and_line_endings(folder: Path) -> None:
    text = (
        "\ufeffid,image,prompt,seed\r\n"
        'a,a.png,"one\r\ntwo, ""three""\nfour",1\r\n'
        "b,a.png,plain,2\r"
        'c,a.png,"\ufeff""quoted"" at the start",3\n'
        "\ufeffd,a.png,a mark at a line start,4\n"
        'e,a.png,"ends in\n\n\nthree lines",x\n'
        "f,a.png,caf\xe9 \xff,5\n"
        "g,a.png,fine,6"
    )
    path = folder / "m.csv"
    path.write_bytes(text.encode("utf-8", "surrogateescape").replace(b"\xc3\xbf", b"\xff"))
    rows, problems = _same_both_ways(path)
    assert [r.line for r in rows] == [2, 5, 6, 7, 8, 12, 13]
    assert [(p.line, p.column) for p in problems] == [(7, "id"), (8, "seed"), (12, "prompt")]


def test_a_stray_quote_hands_the_rest_to_one_process(folder: Path, reread_from: list[int]) -> None:
    # The quote inside an unquoted field is text, but it makes the quote count odd: a part
    # ends inside the next quoted field and the rest is read again in order.
    rows = "".join(f'r{i},a.png,"p, {i}"\n' for i in range(40))
    path = folder / "m.csv"
    path.write_text(f'id,image,prompt\nq,a.png,say "hi\n{rows}x,a.png,"never closed\n')
    found, problems = _same_both_ways(path)
    assert len(found) == 42
    assert len(reread_from) == 1
    assert [(p.line, p.reason) for p in problems] == [
        (43, "broken quoting: a quoted field is never closed")
    ]


def test_a_record_too_long_to_cut_is_read_in_order(
    folder: Path, monkeypatch: pytest.MonkeyPatch, reread_from: list[int]
) -> None:
    monkeypatch.setattr(intake_mod, "PART_MAX_BYTES", 64)
    long = "\n".join(["a line of a long prompt"] * 20)
    rows = "".join(f"r{i},a.png,p{i}\n" for i in range(30))
    path = folder / "m.csv"
    path.write_text(f'id,image,prompt\n{rows}long,a.png,"{long}"\n{rows.replace("r", "s")}')
    found, problems = _same_both_ways(path)
    assert (len(found), problems) == (61, [])
    assert reread_from == [len(f"id,image,prompt\n{rows}".encode())]


def test_duplicates_across_parts_name_the_first_line(folder: Path) -> None:
    rows = "".join(f"r{i},a.png,p{i},\n" for i in range(30))
    path = folder / "m.csv"
    path.write_text(f"id,image,prompt,output\n{rows}R3,a.png,again,\nz,a.png,out,r7\n")
    _, problems = _same_both_ways(path)
    assert [(p.line, p.column, "line 5" in p.reason or "line 9" in p.reason) for p in problems] == [
        (32, "id", True),
        (33, "output", True),
    ]


async def test_stopping_workers_is_not_a_signal_to_the_runner(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run's loop handles SIGTERM and SIGINT; workers are forked from it, and are sent
    # SIGTERM when they do not end at once.
    monkeypatch.setattr(intake_mod, "_WORKER_EXIT_WAIT", 0.0)
    path = folder / "m.csv"
    path.write_text("id,image,prompt\n" + "".join(f"r{i},a.png,p{i}\n" for i in range(200)))
    loop = asyncio.get_running_loop()
    signalled: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.append, sig)
    try:
        rows, problems = _read(path, parallel=True)
        for _ in range(3):  # let the loop read its wakeup socket and run any handler
            await asyncio.sleep(0)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    assert (len(rows), problems, signalled) == (200, [], [])


def test_overlong_lines_are_numbered_the_same_in_parts(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest, "MAX_LINE_CHARS", 64)
    rows = "".join(f"r{i},a.png,p{i}\n" for i in range(20))
    path = folder / "m.csv"
    path.write_text(f'id,image,prompt\n{rows}long,a.png,{"x" * 200}\nz,a.png,"{"y" * 100}\nq"\n')
    _, problems = _same_both_ways(path)
    assert [(p.line, p.reason) for p in problems] == [
        (22, "line is longer than 64 characters"),
        (23, "line is longer than 64 characters"),
        (24, "row has 1 field but the header has 3"),  # the quote opened on line 23 went
    ]
