"""Fixtures shared by every test package: a PostgreSQL server for the shared-store tests."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy.engine import URL, make_url

from tests import pgserver


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """Base URL of a PostgreSQL server: CI's (``BATCH_RUNNER_TEST_PG``) or one started here."""
    given = os.environ.get(pgserver.ENV)
    if given:
        yield given
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must start PostgreSQL and set {pgserver.ENV} (see .ci/run)")
    try:
        with pgserver.started_server() as url:
            yield url
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"no PostgreSQL server could be started: {exc}")


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database on the test server for one test; dropped afterwards.

    Synchronous, so async fixtures can ask for it with ``request.getfixturevalue``.
    """
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_url(pg_server).set(database="postgres")
    _admin(admin, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    finally:
        _admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin(url: URL, statement: str) -> None:
    # In a thread of its own: the calling test may already be inside an event loop.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _execute(url, statement)).result()


async def _execute(url: URL, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        database=url.database,
    )
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
