"""Table definitions: the single source of truth for the schema (Alembic migrations must match)."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

# Named constraints from day one: SQLite's batch migrations can only alter what has a name.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Times are Unix epoch seconds (UTC) as REAL: compact, sortable, dialect-neutral.

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String, nullable=False, unique=True),
    Column("manifest", Text, nullable=False),
    # size:mtime of the manifest at the last full ingest: an unchanged manifest is not re-read.
    Column("manifest_stamp", String, nullable=True),
    Column("workflow_fingerprint", String, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

endpoints = Table(
    "endpoints",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("url", Text, nullable=False),
    # Stable per (run, endpoint): a restarted runner reconnects under the same websocket id.
    Column("client_id", String, nullable=False),
    UniqueConstraint("run_id", "url"),
)

runners = Table(
    "runners",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    # Chosen by the operator (--runner-name): a restarted runner with the same name resumes
    # its own in-flight jobs.
    Column("name", String, nullable=False),
    Column("host", String, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    # Set when it stopped cleanly, or when another runner took over its jobs.
    Column("stopped_at", Float, nullable=True),
    UniqueConstraint("run_id", "name"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("key", Text, nullable=False),
    Column("line", Integer, nullable=False),
    Column("spec", Text, nullable=False),
    Column("content_hash", String, nullable=False),
    # A row whose manifest content changed after it ran keeps its old spec; the new hash waits here.
    Column("changed_hash", String, nullable=True),
    Column("in_manifest", Boolean, nullable=False, default=True),
    Column("state", String, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_eligible_at", Float, nullable=True),
    Column("avoid_endpoint_id", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("error_kind", String, nullable=True),
    Column("resolved", Text, nullable=True),
    Column("output_path", Text, nullable=True),
    Column("output_sha256", String, nullable=True),
    Column("output_size", Integer, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    # Shared databases only: the runner holding the job while it is active (takeover finds a
    # dead runner's jobs by it), and the endpoint it was claimed for (capacity across runners).
    Column("runner_id", Integer, nullable=True),
    Column("claimed_endpoint_id", Integer, nullable=True),
    UniqueConstraint("run_id", "key"),
    # Matches the claim query: claimable states of one run, oldest first. With in_manifest
    # it also covers counting a run's jobs by state (no row is read).
    Index(None, "run_id", "state", "id", "in_manifest"),
    # Partial: only shared databases set these, so a lone runner's jobs (every row on SQLite)
    # cost these indexes nothing on ingest or on a state change. Each query on them compares
    # the column with a value, which implies the condition.
    Index(
        None,
        "runner_id",
        "state",
        sqlite_where=text("runner_id IS NOT NULL"),
        postgresql_where=text("runner_id IS NOT NULL"),
    ),
    Index(
        None,
        "claimed_endpoint_id",
        "state",
        sqlite_where=text("claimed_endpoint_id IS NOT NULL"),
        postgresql_where=text("claimed_endpoint_id IS NOT NULL"),
    ),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("endpoint_id", Integer, ForeignKey("endpoints.id"), nullable=False),
    Column("prompt_id", String, nullable=False, unique=True),
    Column("state", String, nullable=False),
    Column("graph", Text, nullable=False),
    Column("outputs", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("error_kind", String, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("submitted_at", Float, nullable=True),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Index(None, "job_id"),
    # By state, then finish time: the live display's speed window seeks to recent successes.
    Index(None, "state", "finished_at"),
    # Per-endpoint questions: what is in flight there (cancel, takeover), counts for status.
    Index(None, "endpoint_id", "state"),
)

uploads = Table(
    "uploads",
    metadata,
    Column("endpoint_id", Integer, ForeignKey("endpoints.id"), primary_key=True),
    Column("sha256", String, primary_key=True),
    Column("name", Text, nullable=False),
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("at", Float, nullable=False),
    Column("from_state", String, nullable=True),
    Column("to_state", String, nullable=False),
    Column("attempt_id", Integer, nullable=True),
    Column("detail", Text, nullable=True),
    Index(None, "job_id"),
)
