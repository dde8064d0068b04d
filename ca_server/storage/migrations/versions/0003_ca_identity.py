"""the CA service's own names (excluded from cluster intermediates) and root endorsements

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ca_server.storage.tables import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_names",
        sa.Column("name", sa.String(253), primary_key=True),
        sa.Column("added_at", UTCDateTime, nullable=False),
    )
    with op.batch_alter_table("roots") as batch:
        batch.add_column(sa.Column("endorsement_pem", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("roots") as batch:
        batch.drop_column("endorsement_pem")
    op.drop_table("server_names")
