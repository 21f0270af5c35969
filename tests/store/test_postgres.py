"""The store on a real PostgreSQL server: the same schema, and several stores at once."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import pytest

from batch_runner.errors import ConfigError
from batch_runner.store import NewJob, Store
from batch_runner.store.location import database
from tests.store.schema import postgres_schema_diff


def rows(n: int) -> list[NewJob]:
    return [NewJob(f"k{i}", i + 2, {"prompt": f"p{i}"}, f"h{i}") for i in range(n)]


async def test_migrated_schema_matches_models(pg_url: str) -> None:
    async with Store.open(pg_url):
        pass
    assert await postgres_schema_diff(pg_url) == []


async def test_runners_opening_together_migrate_once_and_ingest_once(pg_url: str) -> None:
    async with AsyncExitStack() as stack:
        stores = await asyncio.gather(
            *(stack.enter_async_context(Store.open(pg_url)) for _ in range(3))
        )
        runs = await asyncio.gather(*(s.ensure_run("default", "m.csv") for s in stores))
        assert len({r.id for r in runs}) == 1
        run_id = runs[0].id
        reports = await asyncio.gather(*(s.ingest(run_id, rows(300)) for s in stores))
        assert sorted(r.added for r in reports) == [0, 0, 300]
        assert sum((await stores[0].counts(run_id)).values()) == 300
        eps = await asyncio.gather(*(s.ensure_endpoint(run_id, "http://gpu:1") for s in stores))
        assert len({(e.id, e.client_id) for e in eps}) == 1


async def test_concurrent_claims_never_share_a_job(pg_url: str) -> None:
    async with AsyncExitStack() as stack:
        stores = [await stack.enter_async_context(Store.open(pg_url)) for _ in range(4)]
        run = await stores[0].ensure_run("default", "m.csv")
        ep = await stores[0].ensure_endpoint(run.id, "http://gpu:1")
        await stores[0].ingest(run.id, rows(200))

        async def drain(store: Store) -> list[int]:
            taken: list[int] = []
            while batch := await store.claim(run.id, ep.id, limit=3):
                taken += [job.id for job in batch]
            return taken

        claimed = await asyncio.gather(*(drain(s) for s in stores))
    every = [job_id for ids in claimed for job_id in ids]
    assert len(every) == 200
    assert len(set(every)) == 200, "a job was claimed twice"
    assert all(claimed), "SKIP LOCKED should let every runner take some jobs"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("mysql+aiomysql://u@h/db", "mysql is not supported"),
        ("sqlite://", "needs a file"),
    ],
)
def test_unsupported_urls_are_refused_clearly(given: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        database(given)


def test_urls_and_paths_are_told_apart(tmp_path: Any) -> None:
    assert database(tmp_path / "run.sqlite").path == tmp_path / "run.sqlite"
    pg = database("postgresql://u:secret@127.0.0.1:5432/runs")
    assert pg.shared and pg.path is None
    assert "secret" not in str(pg)
    assert pg.url.drivername == "postgresql+asyncpg"
