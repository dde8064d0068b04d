"""one certificate per key, and the floor of the intermediates that may prove a renewal

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clusters") as batch:
        batch.add_column(sa.Column("proof_floor", sa.Integer, nullable=True))
    with op.batch_alter_table("certificates") as batch:
        batch.add_column(sa.Column("unique_key_fp", sa.String(64), nullable=True))
    # a key certified more than once (replayed renewals, before this revision) keeps the claim of
    # its first certificate only
    op.execute(
        "UPDATE certificates SET unique_key_fp = public_key_fp WHERE id IN "
        "(SELECT MIN(id) FROM certificates GROUP BY public_key_fp)"
    )
    with op.batch_alter_table("certificates") as batch:
        batch.create_unique_constraint("uq_certificates_unique_key_fp", ["unique_key_fp"])


def downgrade() -> None:
    with op.batch_alter_table("certificates") as batch:
        batch.drop_constraint("uq_certificates_unique_key_fp", type_="unique")
        batch.drop_column("unique_key_fp")
    with op.batch_alter_table("clusters") as batch:
        batch.drop_column("proof_floor")
