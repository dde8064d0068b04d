"""Plain records the core works with. No framework types here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class RootStatus(str, enum.Enum):
    TRUSTED = "trusted"  # in the trust bundle, not signing (phase 2)
    ACTIVE = "active"  # the signer
    RETIRED = "retired"  # out of the trust bundle (phase 4)


class ClusterStatus(str, enum.Enum):
    PENDING = "pending"
    ACTIVE = "active"
    REVOKED = "revoked"


@dataclass
class Root:
    id: str
    status: RootStatus
    cert_pem: str  # the signing CA certificate
    chain_pem: str  # certificates above it up to the trust anchor ("" when self-signed)
    key_ref: str
    not_after: datetime
    created_at: datetime
    anchor_pem: str = ""  # the self-signed trust anchor (== cert_pem when self-signed)
    endorsement_pem: str = ""  # this root cross-signed by the root active when it was added ("" if none)


@dataclass
class Cluster:
    name: str
    trust_domain: str
    status: ClusterStatus
    generation: int
    rotation_pending: bool
    gateway: dict[str, Any] | None
    created_at: datetime
    agent_token_id: str | None = None
    agent_token_hash: str | None = None
    exports: dict[str, Any] | None = None  # the last PUT /exports body, as stored
    agent_status: dict[str, Any] | None = None
    revoked_at: datetime | None = None
    proof_floor: int | None = None  # the lowest certificate id that may prove a renewal (None: any)


@dataclass
class CertificateRecord:
    serial: str
    cluster: str
    root_id: str
    generation: int
    cert_pem: str
    public_key_fp: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    id: int | None = None


@dataclass
class BootstrapToken:
    token_id: str
    cluster: str
    token_hash: str
    expires_at: datetime
    created_at: datetime
    used_at: datetime | None = None


@dataclass
class AdminToken:
    """An operator token of the admin API: ``role`` is ``admin`` or ``viewer`` (core/operators.py)."""

    token_id: str
    token_hash: str
    created_at: datetime
    description: str = ""
    name: str = ""
    role: str = "admin"
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass
class CRLRecord:
    root_id: str
    number: int
    der: bytes
    pem: str
    this_update: datetime
    next_update: datetime


@dataclass
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any] = field(default_factory=dict)
    prev_hash: str = ""
    hash: str = ""
