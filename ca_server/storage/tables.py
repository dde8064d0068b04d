"""SQLAlchemy Core tables, all in ``metadata`` (the Alembic environment's target). The schema is
created and changed only by the Alembic migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: the same microseconds on SQLite and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


metadata = MetaData()

roots = Table(
    "roots",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("cert_pem", Text, nullable=False),
    Column("chain_pem", Text, nullable=False, default=""),
    Column("anchor_pem", Text, nullable=False),
    Column("key_ref", Text, nullable=False),
    Column("not_after", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # cross-certificate of this root by the root active when it was added ("" for the first root)
    Column("endorsement_pem", Text, nullable=False, default="", server_default=""),
)

clusters = Table(
    "clusters",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("trust_domain", String(253), nullable=False),
    Column("status", String(16), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("rotation_pending", Boolean, nullable=False),
    Column("gateway", JSON, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("agent_token_id", String(32), nullable=True, unique=True),
    Column("agent_token_hash", String(64), nullable=True),
    Column("exports", JSON, nullable=True),
    Column("agent_status", JSON, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    # the lowest certificate id whose key may still prove a renewal (set by enrollment and rotate)
    Column("proof_floor", Integer, nullable=True),
)

certificates = Table(
    "certificates",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("serial", String(64), nullable=False, unique=True),
    Column("cluster", String(63), nullable=False, index=True),
    Column("root_id", String(64), nullable=False, index=True),
    Column("generation", Integer, nullable=False),
    Column("cert_pem", Text, nullable=False),
    Column("public_key_fp", String(64), nullable=False),
    # public_key_fp again, unique: one certificate per key. NULL only on the later certificates of
    # a key certified more than once before migration 0004 made that impossible
    Column("unique_key_fp", String(64), nullable=True, unique=True),
    Column("not_before", UTCDateTime, nullable=False),
    Column("not_after", UTCDateTime, nullable=False),
    Column("issued_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("revocation_reason", String(32), nullable=True),
)

bootstrap_tokens = Table(
    "bootstrap_tokens",
    metadata,
    Column("token_id", String(32), primary_key=True),
    Column("cluster", String(63), nullable=False, index=True),
    Column("token_hash", String(64), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("used_at", UTCDateTime, nullable=True),
)

admin_tokens = Table(
    "admin_tokens",
    metadata,
    Column("token_id", String(32), primary_key=True),
    Column("token_hash", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("description", Text, nullable=False, default=""),
    # issue 14: a named operator token with a role, an optional expiry, revoked in place (kept for the audit)
    Column("name", String(63), nullable=False, server_default=""),
    Column("role", String(16), nullable=False, server_default="admin"),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
)

crls = Table(
    "crls",
    metadata,
    Column("root_id", String(64), primary_key=True),
    Column("number", Integer, nullable=False),
    Column("der", LargeBinary, nullable=False),
    Column("pem", Text, nullable=False),
    Column("this_update", UTCDateTime, nullable=False),
    Column("next_update", UTCDateTime, nullable=False),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("details", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

# single-row counters: 'audit_head' (int_value = last id, str_value = last hash), 'revision'
meta = Table(
    "meta",
    metadata,
    Column("key", String(32), primary_key=True),
    Column("int_value", Integer, nullable=False, default=0),
    Column("str_value", String(64), nullable=False, default=""),
)

# the CA service's own names (DNS names and IPs), excluded from every cluster intermediate
server_names = Table(
    "server_names",
    metadata,
    Column("name", String(253), primary_key=True),
    Column("added_at", UTCDateTime, nullable=False),
)

# the rate limiter's counters, shared by the replicas (storage/ratecounters.py)
rate_counters = Table(
    "rate_counters",
    metadata,
    Column("key", String(128), primary_key=True),
    Column("window", BigInteger, primary_key=True),
    Column("count", Integer, nullable=False),
)
