"""covering indexes for the progress counts, the output check and the speed window

The jobs index of the claim gains ``in_manifest`` (after ``id``, so every query it served
keeps its order): counting a run's jobs by state becomes an index-only scan instead of a
lookup of every row. The attempts index on ``state`` gains ``finished_at``, so the live
display's speed window seeks to the recent successes instead of reading every one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 23:10:00.000000
"""

from __future__ import annotations

from alembic import op


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The wider index first: queries keep an index to use at every step.
    op.create_index(
        op.f("ix_jobs_run_id_state_id_in_manifest"),
        "jobs",
        ["run_id", "state", "id", "in_manifest"],
        unique=False,
    )
    op.drop_index(op.f("ix_jobs_run_id_state_id"), table_name="jobs")
    op.create_index(
        op.f("ix_attempts_state_finished_at"), "attempts", ["state", "finished_at"], unique=False
    )
    op.drop_index(op.f("ix_attempts_state"), table_name="attempts")


def downgrade() -> None:
    op.create_index(op.f("ix_attempts_state"), "attempts", ["state"], unique=False)
    op.drop_index(op.f("ix_attempts_state_finished_at"), table_name="attempts")
    op.create_index(
        op.f("ix_jobs_run_id_state_id"), "jobs", ["run_id", "state", "id"], unique=False
    )
    op.drop_index(op.f("ix_jobs_run_id_state_id_in_manifest"), table_name="jobs")
