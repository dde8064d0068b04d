"""Alembic environment: the connection is always handed in by ca_server.storage.migrate."""

from __future__ import annotations

from alembic import context

from ca_server.storage.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
