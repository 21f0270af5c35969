"""The scheduler's hot queries (the claim, and the counts that decide whether to claim) use
the index that matches them (no scan of a million jobs)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event

from batch_runner.store import NewJob, Store
from batch_runner.store.models import jobs
from batch_runner.store.sqlite import SqliteBackend

Statements = list[tuple[str, Any]]


@contextmanager
def statements_of(store: Store) -> Iterator[Statements]:
    """Every statement the store sends, on its write and its read connections, meanwhile."""
    seen: Statements = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, *_rest: Any) -> None:
        seen.append((statement, params))

    backend = store._backend
    assert isinstance(backend, SqliteBackend)
    engines = (backend.engine, backend.reader_engine.sync_engine, backend.quick_engine)
    for engine in engines:
        event.listen(engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", capture)


@asynccontextmanager
async def three_hundred_jobs(path: Path) -> AsyncIterator[tuple[Store, int, int]]:
    """A store whose one run has 300 pending jobs, with its run's and an endpoint's ids."""
    async with Store.open(path) as store:
        run = await store.ensure_run("default", "m.csv")
        await store.ingest(run.id, [NewJob(f"k{i}", i, {}, f"h{i}") for i in range(300)])
        endpoint = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")
        yield store, run.id, endpoint.id


def query_plan(conn: sqlite3.Connection, sql: str, params: Any) -> str:
    return " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))


async def test_claim_queries_search_the_run_state_index(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    async with three_hundred_jobs(path) as (store, run_id, endpoint_id):
        with statements_of(store) as seen:
            await store.claim(run_id, endpoint_id, avoid_grace=10)
            await store.has_claimable(run_id)
            await store.count_claimable(run_id, 64)
    selects = [
        (s, p) for s, p in seen if s.lstrip().upper().startswith("SELECT") and "FROM jobs" in s
    ]
    assert selects, seen
    with sqlite3.connect(path) as conn:
        for sql, params in selects:
            plan = query_plan(conn, sql, params)
            where = sql.split("WHERE", 1)[-1]
            if "jobs.state" in where and "jobs.run_id" in where:
                assert "ix_jobs_run_id_state_id" in plan, (sql, plan)
            assert "SCAN jobs" not in plan, (sql, plan)


async def test_resume_start_up_and_live_display_queries_read_no_row_they_do_not_need(
    tmp_path: Path,
) -> None:
    """What a resumed run asks before its first submission, and what the live display
    polls: each searches an index; counting jobs by state reads the index alone, and the
    speed window seeks to recent successes."""
    path = tmp_path / "run.sqlite"
    async with three_hundred_jobs(path) as (store, run_id, endpoint_id):
        with statements_of(store) as seen:
            await store.ensure_run("default", "m.csv")
            await store.only_run()
            await store.release_all_preparing(run_id)
            await store.ensure_endpoint(run_id, "http://127.0.0.1:1")
            await store.in_flight(run_id)
            await store.claim(run_id, endpoint_id)
            await store.finished_outputs(run_id, after_id=0, finished_before=1e12)
            await store.counts(run_id)
            await store.speeds(run_id, 0.0)
            await store.recent_failures(run_id)
    reads = [(s, p) for s, p in seen if s.lstrip().upper().startswith("SELECT")]
    with sqlite3.connect(path) as conn:
        for sql, params in reads:
            plan = query_plan(conn, sql, params)
            for table in ("jobs", "attempts", "endpoints"):
                assert f"SCAN {table}" not in plan, (sql, plan)
            if "count(*)" in sql and "GROUP BY jobs.state" in sql:
                assert "COVERING INDEX" in plan, (sql, plan)
            if "FROM attempts" in sql and "finished_at >=" in sql:
                assert "finished_at>?" in plan, (sql, plan)
    assert any("GROUP BY jobs.state" in s for s, _ in reads)
    assert any("FROM attempts" in s and "finished_at >=" in s for s, _ in reads)


async def test_shared_ownership_queries_use_the_partial_indexes(tmp_path: Path) -> None:
    """The runner and claimed-endpoint indexes hold only rows that have one; the queries on
    those columns still search them (a value compared implies the index's condition)."""
    path = tmp_path / "run.sqlite"
    async with three_hundred_jobs(path) as (store, run_id, endpoint_id):
        with statements_of(store) as seen:
            await store.claim(run_id, endpoint_id, runner_id=1, capacity=4)
            await store.release_all_preparing(run_id, runner_id=1)
            await store.in_flight(run_id, runner_id=1)
            await store.observations(run_id, 0.0, runner_id=1)
    indexes = {"runner_id": "ix_jobs_runner_id_state", "claimed_endpoint_id": "ix_jobs_claimed"}
    checked = set()
    with sqlite3.connect(path) as conn:
        for sql, params in seen:
            if not sql.lstrip().upper().startswith("SELECT") or "FROM jobs" not in sql:
                continue
            where = sql.split("WHERE", 1)[-1]
            for column, prefix in indexes.items():
                if f"jobs.{column} = " not in where:
                    continue
                assert "SCAN jobs" not in query_plan(conn, sql, params), sql
                # INDEXED BY fails to plan where the index's condition does not hold.
                (index,) = [i.name for i in jobs.indexes if str(i.name).startswith(prefix)]
                forced = sql.replace("FROM jobs", f"FROM jobs INDEXED BY {index}", 1)
                assert index in query_plan(conn, forced, params), sql
                checked.add(column)
    assert checked == set(indexes), seen
