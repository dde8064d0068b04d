"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ca_server.storage.tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "roots",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("cert_pem", sa.Text, nullable=False),
        sa.Column("chain_pem", sa.Text, nullable=False),
        sa.Column("anchor_pem", sa.Text, nullable=False),
        sa.Column("key_ref", sa.Text, nullable=False),
        sa.Column("not_after", UTCDateTime, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "clusters",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("trust_domain", sa.String(253), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("rotation_pending", sa.Boolean, nullable=False),
        sa.Column("gateway", sa.JSON, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("agent_token_id", sa.String(32), nullable=True, unique=True),
        sa.Column("agent_token_hash", sa.String(64), nullable=True),
        sa.Column("exports", sa.JSON, nullable=True),
        sa.Column("agent_status", sa.JSON, nullable=True),
        sa.Column("revoked_at", UTCDateTime, nullable=True),
    )
    op.create_table(
        "certificates",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("serial", sa.String(64), nullable=False, unique=True),
        sa.Column("cluster", sa.String(63), nullable=False),
        sa.Column("root_id", sa.String(64), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("cert_pem", sa.Text, nullable=False),
        sa.Column("public_key_fp", sa.String(64), nullable=False),
        sa.Column("not_before", UTCDateTime, nullable=False),
        sa.Column("not_after", UTCDateTime, nullable=False),
        sa.Column("issued_at", UTCDateTime, nullable=False),
        sa.Column("revoked_at", UTCDateTime, nullable=True),
        sa.Column("revocation_reason", sa.String(32), nullable=True),
    )
    op.create_index("ix_certificates_cluster", "certificates", ["cluster"])
    op.create_index("ix_certificates_root_id", "certificates", ["root_id"])
    op.create_table(
        "bootstrap_tokens",
        sa.Column("token_id", sa.String(32), primary_key=True),
        sa.Column("cluster", sa.String(63), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("used_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_bootstrap_tokens_cluster", "bootstrap_tokens", ["cluster"])
    op.create_table(
        "admin_tokens",
        sa.Column("token_id", sa.String(32), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
    )
    op.create_table(
        "crls",
        sa.Column("root_id", sa.String(64), primary_key=True),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("der", sa.LargeBinary, nullable=False),
        sa.Column("pem", sa.Text, nullable=False),
        sa.Column("this_update", UTCDateTime, nullable=False),
        sa.Column("next_update", UTCDateTime, nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    meta = op.create_table(
        "meta",
        sa.Column("key", sa.String(32), primary_key=True),
        sa.Column("int_value", sa.Integer, nullable=False),
        sa.Column("str_value", sa.String(64), nullable=False),
    )
    op.bulk_insert(
        meta,
        [
            {"key": "audit_head", "int_value": 0, "str_value": "0" * 64},
            {"key": "revision", "int_value": 0, "str_value": ""},
        ],
    )


def downgrade() -> None:
    for name in ("meta", "audit", "crls", "admin_tokens", "bootstrap_tokens", "certificates", "clusters", "roots"):
        op.drop_table(name)
