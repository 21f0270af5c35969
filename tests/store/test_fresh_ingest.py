"""A run's first ingest stores its rows in INSERT batches, each on the store's side while
the next is read; whatever happens, the schema is the one the database had and a rolled
back ingest keeps nothing."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batch_runner.errors import ManifestError, ManifestProblem
from batch_runner.store import NewJob, Store
from batch_runner.store import repository as repository_mod
from tests.store.schema import postgres_schema_diff, sqlite_schema_diff


def rows(n: int, prefix: str = "k") -> list[NewJob]:
    return [NewJob(f"{prefix}{i}", i + 2, {"prompt": f"p{i}"}, f"h{i}") for i in range(n)]


def schema(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))


def integrity(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r for (r,) in conn.execute("PRAGMA integrity_check")]


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several INSERT batches, so one is in flight while the next is read.
    monkeypatch.setattr(repository_mod, "INGEST_FRESH_BATCH", 7)


async def test_the_first_ingest_stores_every_row_and_keeps_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    async with Store.open(path) as store:
        before = schema(path)
        run = await store.ensure_run("default", "m.csv")
        report = await store.ingest(run.id, rows(30))
        assert report.added == 30
        assert sum((await store.counts(run.id)).values()) == 30
    assert schema(path) == before
    assert sqlite_schema_diff(path) == []
    assert integrity(path) == ["ok"]


async def test_a_rolled_back_first_ingest_keeps_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"

    def invalid_at_the_end() -> Iterator[NewJob]:
        yield from rows(30)
        raise ManifestError([ManifestProblem("m.csv", 33, None, "broken")])

    async with Store.open(path) as store:
        before = schema(path)
        run = await store.ensure_run("default", "m.csv")
        with pytest.raises(ManifestError):
            await store.ingest(run.id, invalid_at_the_end())
        assert sum((await store.counts(run.id)).values()) == 0
        # The store goes on: the next ingest is a first one again.
        assert (await store.ingest(run.id, rows(3))).added == 3
    assert schema(path) == before
    assert integrity(path) == ["ok"]


async def test_postgresql_keeps_its_schema_through_a_first_ingest(pg_url: str) -> None:
    async with Store.open(pg_url) as store:
        run = await store.ensure_run("default", "m.csv")
        assert (await store.ingest(run.id, rows(20))).added == 20
    assert await postgres_schema_diff(pg_url) == []


async def test_new_jobs_are_stored_alike_by_a_first_and_a_later_ingest(tmp_path: Path) -> None:
    from batch_runner.states import JobState

    def new(prefix: str) -> list[NewJob]:
        return [
            NewJob(f"{prefix}0", 2, '{"line":2,"prompt":"p"}', "h0"),
            NewJob(f"{prefix}1", 3, {"prompt": "q", "line": 3}, "h1"),
            NewJob(f"{prefix}2", 4, {"invalid": "bad"}, "h2", JobState.SKIPPED, "bad"),
        ]

    path = tmp_path / "run.sqlite"
    async with Store.open(path) as store:
        run = await store.ensure_run("default", "m.csv")
        await store.ingest(run.id, new("a"))  # the first ingest
        await store.ingest(run.id, new("a") + new("b"))  # a later one adds the b rows
    with sqlite3.connect(path) as conn:
        stored = {
            key: rest
            for key, *rest in conn.execute(
                "SELECT key, line, spec, content_hash, in_manifest, state, attempts, last_error,"
                " error_kind, created_at = updated_at FROM jobs"
            )
        }
    for prefix in "ab":
        assert stored[f"{prefix}0"] == [
            2,
            '{"line":2,"prompt":"p"}',
            "h0",
            1,
            "pending",
            0,
            None,
            None,
            1,
        ]
        assert stored[f"{prefix}1"] == [
            3,
            '{"line":3,"prompt":"q"}',
            "h1",
            1,
            "pending",
            0,
            None,
            None,
            1,
        ]
        assert stored[f"{prefix}2"] == [
            4,
            '{"invalid":"bad"}',
            "h2",
            1,
            "skipped",
            0,
            "bad",
            "invalid",
            1,
        ]
