"""runners and job ownership, for several runners on one shared database

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runners",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_runners_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runners")),
        sa.UniqueConstraint("run_id", "name", name=op.f("uq_runners_run_id_name")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("runner_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("claimed_endpoint_id", sa.Integer(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_jobs_runner_id_state"), ["runner_id", "state"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_jobs_claimed_endpoint_id_state"),
            ["claimed_endpoint_id", "state"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_claimed_endpoint_id_state"))
        batch_op.drop_index(batch_op.f("ix_jobs_runner_id_state"))
        batch_op.drop_column("claimed_endpoint_id")
        batch_op.drop_column("runner_id")
    op.drop_table("runners")
