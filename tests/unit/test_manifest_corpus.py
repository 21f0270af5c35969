"""Every malformed manifest in tests/manifests/ yields a clear file:line:column problem."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from batch_runner.errors import ManifestError, ManifestProblem
from batch_runner.manifest import JobSpec, RowProblems, read_manifest, validate_manifest

CORPUS = Path(__file__).parent.parent / "manifests"
CASES: list[dict[str, Any]] = tomllib.loads((CORPUS / "cases.toml").read_text("utf-8"))["case"]


def _problems(path: Path) -> tuple[list[ManifestProblem], bool]:
    """All problems from reading ``path``, and whether they were raised for the whole file."""
    try:
        items = list(read_manifest(path))
    except ManifestError as exc:
        return exc.problems, True
    return [p for item in items if isinstance(item, RowProblems) for p in item.problems], False


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    # A copy, so a test run never depends on (or changes) the checked-in files' location.
    target = tmp_path / "manifests"
    shutil.copytree(CORPUS, target)
    return target


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c["file"] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_malformed_manifest_reports_file_line_column(corpus: Path, case: dict[str, Any]) -> None:
    path = corpus / case["file"]
    problems, file_level = _problems(path)

    assert file_level == case.get("file_level", False)
    matching = [p for p in problems if case["reason"] in p.reason]
    assert matching, f"no problem mentions {case['reason']!r}: {[str(p) for p in problems]}"
    problem = matching[0]
    assert problem.file == str(path)
    assert problem.line == case["line"]
    assert problem.column == case.get("column")
    # A whole-file problem (line 0) is shown as just the file name.
    where = f"{path}:{case['line']}" if case["line"] else str(path)
    where += f":{case['column']}" if case.get("column") else ""
    assert str(problem).startswith(f"{where}: ")


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_validate_manifest_never_raises_for_bad_input(corpus: Path, case: dict[str, Any]) -> None:
    good, problems = validate_manifest(corpus / case["file"])
    assert problems
    assert good >= 0


def test_rows_after_a_bad_row_are_still_read(corpus: Path) -> None:
    items = list(read_manifest(corpus / "csv_unclosed_quote.csv"))
    assert [type(i) for i in items] == [JobSpec, RowProblems]
    items = list(read_manifest(corpus / "csv_latin1_row.csv"))
    assert isinstance(items[0], JobSpec) and items[0].job_id == "a"


@pytest.mark.parametrize("name", ["good.csv", "good.jsonl", "bom_crlf.csv"])
def test_valid_fixtures_have_no_problems(corpus: Path, name: str) -> None:
    good, problems = validate_manifest(corpus / "valid" / name)
    assert problems == []
    assert good >= 1


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_command_line_exits_2_without_traceback(corpus: Path, case: dict[str, Any]) -> None:
    from click.testing import CliRunner

    from batch_runner.cli import main

    path = corpus / case["file"]
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert case["reason"].split(":")[0] in " ".join(result.output.split())
