"""operator tokens get a name, a role (``admin`` or ``viewer``), an expiry and a revocation time

Every token from before is an admin token named after its id (the initial one, from ``init``),
so it keeps working and can be revoked by name or id once another admin token exists.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ca_server.storage.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("admin_tokens") as batch:
        batch.add_column(sa.Column("name", sa.String(63), nullable=False, server_default=""))
        batch.add_column(sa.Column("role", sa.String(16), nullable=False, server_default="admin"))
        batch.add_column(sa.Column("expires_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("revoked_at", UTCDateTime, nullable=True))
    op.execute("UPDATE admin_tokens SET name = 'initial-' || token_id WHERE name = ''")


def downgrade() -> None:
    with op.batch_alter_table("admin_tokens") as batch:
        batch.drop_column("revoked_at")
        batch.drop_column("expires_at")
        batch.drop_column("role")
        batch.drop_column("name")
