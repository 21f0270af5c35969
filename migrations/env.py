"""Alembic environment: batch_runner opens the connection itself and hands it over."""

from __future__ import annotations

from alembic import context

from batch_runner.store.models import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "migrations run through batch_runner.store (opening a run database applies them)"
    )

# Batch mode: SQLite alters tables by copy-and-move; named constraints make that possible.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
