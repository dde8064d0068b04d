"""The tamper-evident audit chain.

Each entry's hash covers its own content and the previous entry's hash, so altering or deleting
any row breaks every hash after it. ``verify_chain`` names the first entry that does not fit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ca_server.core.models import AuditEntry

GENESIS = "0" * 64


def canonical_time(at: datetime) -> str:
    # in UTC, as the store keeps it: a clock in another zone must hash the same when read back
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(
    *, id: int, at: datetime, actor: str, action: str, subject: str, details: dict[str, Any], prev_hash: str
) -> str:
    body = json.dumps(
        [id, canonical_time(at), actor, action, subject, details, prev_hash],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    checked: int
    problem: str = ""


def verify_chain(entries: Iterable[AuditEntry], *, head: tuple[int, str] | None = None) -> ChainReport:
    """Walk the chain from the first entry; ``head`` is the separately stored (last id, last hash),
    which catches a deleted tail."""
    prev = GENESIS
    expected_id = 1
    count = 0
    for e in entries:
        if e.id != expected_id:
            return ChainReport(False, count, f"entry {expected_id} is missing (next present is {e.id})")
        if e.prev_hash != prev:
            return ChainReport(False, count, f"entry {e.id} does not link to entry {e.id - 1}")
        h = entry_hash(id=e.id, at=e.at, actor=e.actor, action=e.action, subject=e.subject, details=e.details,
                       prev_hash=e.prev_hash)
        if h != e.hash:
            return ChainReport(False, count, f"entry {e.id} was altered (hash mismatch)")
        prev = e.hash
        expected_id += 1
        count += 1
    if head is not None and head != (expected_id - 1, prev if count else GENESIS):
        if head[0] > expected_id - 1:
            return ChainReport(False, count, f"entries {expected_id}..{head[0]} are missing (the head says {head[0]})")
        return ChainReport(False, count, f"the chain head does not match entry {expected_id - 1}")
    return ChainReport(True, count)
