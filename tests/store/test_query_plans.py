"""The scheduler's hot queries use the index that matches them (no scan of a million jobs)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import event

from batch_runner.store import NewJob, Store
from batch_runner.store.sqlite import SqliteBackend


async def test_claim_queries_search_the_run_state_index(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    seen: list[tuple[str, Any]] = []
    async with Store.open(path) as store:
        run = await store.ensure_run("default", "m.csv")
        await store.ingest(run.id, [NewJob(f"k{i}", i, {}, f"h{i}") for i in range(300)])
        endpoint = await store.ensure_endpoint(run.id, "http://127.0.0.1:1")

        def capture(_c: Any, _cur: Any, statement: str, params: Any, *_rest: Any) -> None:
            seen.append((statement, params))

        backend = store._backend
        assert isinstance(backend, SqliteBackend)
        engines = (backend.engine, backend.reader_engine)
        for engine in engines:
            event.listen(engine, "before_cursor_execute", capture)
        await store.claim(run.id, endpoint.id, avoid_grace=10)
        await store.has_claimable(run.id)
        for engine in engines:
            event.remove(engine, "before_cursor_execute", capture)
    selects = [
        (s, p) for s, p in seen if s.lstrip().upper().startswith("SELECT") and "FROM jobs" in s
    ]
    assert selects, seen
    with sqlite3.connect(path) as conn:
        for sql, params in selects:
            plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            where = sql.split("WHERE", 1)[-1]
            if "jobs.state" in where and "jobs.run_id" in where:
                assert "ix_jobs_run_id_state_id" in plan, (sql, plan)
            assert "SCAN jobs" not in plan, (sql, plan)
