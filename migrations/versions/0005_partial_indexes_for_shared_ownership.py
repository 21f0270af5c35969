"""the jobs indexes on runner and claimed endpoint only hold rows that have one

Only a shared database sets ``runner_id`` and ``claimed_endpoint_id``. Indexing the rows
where they are NULL (every row of a lone runner's run) bought nothing, yet a first ingest
built both indexes over every row and each state change rewrote an entry in each. Every
query on them compares the column with a value, which implies ``IS NOT NULL``, so both
SQLite and PostgreSQL still use them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 07:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_INDEXES = (
    ("ix_jobs_runner_id_state", "runner_id"),
    ("ix_jobs_claimed_endpoint_id_state", "claimed_endpoint_id"),
)


def upgrade() -> None:
    for name, column in _INDEXES:
        op.drop_index(op.f(name), table_name="jobs")
        where = sa.text(f"{column} IS NOT NULL")
        op.create_index(
            op.f(name),
            "jobs",
            [column, "state"],
            unique=False,
            sqlite_where=where,
            postgresql_where=where,
        )


def downgrade() -> None:
    for name, column in _INDEXES:
        op.drop_index(op.f(name), table_name="jobs")
        op.create_index(op.f(name), "jobs", [column, "state"], unique=False)
