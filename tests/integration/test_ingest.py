"""Taking in a manifest in one pass: every problem of the file is found, and an invalid row
leaves nothing of the ingest behind (unless --skip-invalid), on both dialects."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batch_runner.errors import ManifestError
from batch_runner.runner import RUN_KEY, ingest, template_for
from batch_runner.states import JobState
from batch_runner.store import Store
from batch_runner.store import repository as repository_mod
from tests.helpers import make_image, settings_for, write_csv

ROWS = 3000


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    where = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    async with Store.open(where or tmp_path / "run.sqlite") as s:
        yield s


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many INSERTs before the bad row is met, so a rollback has something to undo.
    monkeypatch.setattr(repository_mod, "INGEST_FRESH_BATCH", 100)
    monkeypatch.setattr(repository_mod, "INGEST_BATCH", 100)


def manifest_rows(
    n: int, *, bad: dict[int, dict[str, object]] | None = None
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [
        {"id": f"j{i}", "image": "a.png", "prompt": f"scene {i}", "frames": 5} for i in range(n)
    ]
    for index, changes in (bad or {}).items():
        rows[index] = {**rows[index], **changes}
    return rows


async def stored(store: Store, run_id: int) -> dict[JobState, int]:
    return {state: n for state, n in (await store.counts(run_id)).items() if n}


async def test_a_late_invalid_row_keeps_nothing_and_every_problem_is_listed(
    tmp_path: Path, store: Store
) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    # Late: by then every earlier row went into the database, in many INSERTs.
    bad = {ROWS - 3: {"frames": 6}, ROWS - 2: {"seed": "-1"}, ROWS - 1: {"id": "j10"}}
    manifest = write_csv(tmp_path / "jobs.csv", manifest_rows(ROWS, bad=bad))
    settings = settings_for(manifest, [])
    run = await store.ensure_run(RUN_KEY, str(manifest))

    with pytest.raises(ManifestError) as caught:
        await ingest(store, run.id, settings, template_for(settings))

    found = [(p.line, p.column) for p in caught.value.problems]
    assert found == [(ROWS - 1, "frames"), (ROWS, "seed"), (ROWS + 1, "id")]
    assert "already used on line 12" in caught.value.problems[-1].reason
    assert await stored(store, run.id) == {}
    assert (await store.only_run()) == run, "the run keeps no manifest stamp"


async def test_a_late_invalid_row_leaves_an_earlier_ingest_as_it_was(
    tmp_path: Path, store: Store
) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    manifest = write_csv(tmp_path / "jobs.csv", manifest_rows(ROWS))
    settings = settings_for(manifest, [])
    run = await store.ensure_run(RUN_KEY, str(manifest))
    first, _ = await ingest(store, run.id, settings, template_for(settings))
    assert first.added == ROWS

    # Every row but the last changes its prompt, and the last is invalid.
    edited = [{**row, "prompt": f"{row['prompt']}, at night"} for row in manifest_rows(ROWS - 1)]
    write_csv(manifest, [*edited, {"id": "late", "image": "missing.png", "prompt": "x"}])
    with pytest.raises(ManifestError) as caught:
        await ingest(store, run.id, settings, template_for(settings))

    assert [p.line for p in caught.value.problems] == [ROWS + 1]
    rows = [row async for row in store.export_rows(run.id)]
    assert [row["key"] for row in rows] == [f"j{i}" for i in range(ROWS)]
    assert [json.loads(row["spec"])["prompt"] for row in rows] == [
        f"scene {i}" for i in range(ROWS)
    ]


async def test_skip_invalid_keeps_the_valid_rows_and_records_the_rest(
    tmp_path: Path, store: Store
) -> None:
    make_image(tmp_path / "a.png", (64, 48))
    manifest = write_csv(tmp_path / "jobs.csv", manifest_rows(ROWS, bad={ROWS - 1: {"steps": 0}}))
    settings = dataclasses.replace(settings_for(manifest, []), skip_invalid=True)
    run = await store.ensure_run(RUN_KEY, str(manifest))

    report, problems = await ingest(store, run.id, settings, template_for(settings))

    assert [(p.line, p.column) for p in problems] == [(ROWS + 1, "steps")]
    assert report.added == ROWS
    assert await stored(store, run.id) == {JobState.PENDING: ROWS - 1, JobState.SKIPPED: 1}
