"""The tamper-evident audit chain, sealed with a key the database does not hold.

Each entry's hash covers its own content and the previous entry's hash, so altering or deleting
any row breaks every hash after it. Since 0.2 the hash is an HMAC-SHA256 under the audit key
(``AuditKey``, kept outside the database): whoever can write the database cannot recompute it.
Chains written by 0.1.0 hold unkeyed SHA-256 entries; the first keyed entry after them (an
``audit.seal`` entry) links to the last of them, so the unkeyed prefix is held by the keyed part.

Anchors are signed checkpoints ``(id, hash, time)`` kept outside the database (the data
directory's ``audit-anchors``, or any copy of it): a chain that no longer holds an anchored entry,
or ends below one, was rolled back, truncated or replaced. ``verify_chain`` names the first entry
that does not fit, and whether the problem is only that the chain disagrees with its anchors.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from ca_server.core.models import AuditEntry

GENESIS = "0" * 64
SCHEME = "hmac-sha256-v1"
KEY_MIN_BYTES = 32
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def canonical_time(at: datetime) -> str:
    # in UTC, as the store keeps it: a clock in another zone must hash the same when read back
    return at.astimezone(UTC).strftime(_TIME_FORMAT)


def entry_body(
    *, id: int, at: datetime, actor: str, action: str, subject: str, details: dict[str, Any], prev_hash: str
) -> bytes:
    """The bytes an entry's hash covers, in either scheme."""
    return json.dumps(
        [id, canonical_time(at), actor, action, subject, details, prev_hash],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()


def entry_hash(
    *, id: int, at: datetime, actor: str, action: str, subject: str, details: dict[str, Any], prev_hash: str
) -> str:
    """The unkeyed hash of 0.1.0 (anyone can recompute it): written only by a store given no key."""
    return hashlib.sha256(
        entry_body(id=id, at=at, actor=actor, action=action, subject=subject, details=details, prev_hash=prev_hash)
    ).hexdigest()


class EntryHasher(Protocol):
    """How a store hashes the entries it appends: ``entry_hash`` or ``AuditKey.entry_hash``."""

    def __call__(
        self, *, id: int, at: datetime, actor: str, action: str, subject: str, details: dict[str, Any], prev_hash: str
    ) -> str: ...


def _body_of(e: AuditEntry) -> bytes:
    return entry_body(
        id=e.id, at=e.at, actor=e.actor, action=e.action, subject=e.subject, details=e.details, prev_hash=e.prev_hash
    )


def is_unkeyed(e: AuditEntry) -> bool:
    """The entry carries the unkeyed hash of its content (written by 0.1.0, or by anyone)."""
    return hmac.compare_digest(hashlib.sha256(_body_of(e)).hexdigest(), e.hash)


@dataclass(frozen=True)
class Anchor:
    """A signed checkpoint: the chain held entry ``id`` with ``hash`` at time ``at``."""

    id: int
    hash: str
    at: datetime
    mac: str

    def to_line(self) -> str:
        return (
            json.dumps(
                {"id": self.id, "hash": self.hash, "at": canonical_time(self.at), "mac": self.mac}, sort_keys=True
            )
            + "\n"
        )

    @classmethod
    def from_line(cls, line: str) -> Anchor:
        """Parse one line of an anchors file (ValueError when it is not an anchor)."""
        try:
            raw = json.loads(line)
            at = datetime.strptime(raw["at"], _TIME_FORMAT).replace(tzinfo=UTC)
            anchor = cls(id=raw["id"], hash=raw["hash"], at=at, mac=raw["mac"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError("not an audit anchor") from exc
        if type(anchor.id) is not int or not isinstance(anchor.hash, str) or not isinstance(anchor.mac, str):
            raise ValueError("not an audit anchor")
        return anchor

    def describe(self) -> str:
        return f"the anchor of {canonical_time(self.at)}"


class AuditKey:
    """The secret the chain is sealed with (at least 32 bytes, from a file outside the database).

    Two subkeys are derived from it, one for entries and one for anchors, so an anchor can never
    pass for an entry. The secret never appears in a repr or message."""

    __slots__ = ("_anchors", "_entries")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < KEY_MIN_BYTES:
            raise ValueError(f"an audit key needs at least {KEY_MIN_BYTES} bytes")
        self._entries = hmac.digest(secret, b"meshbridge audit entries " + SCHEME.encode(), "sha256")
        self._anchors = hmac.digest(secret, b"meshbridge audit anchors " + SCHEME.encode(), "sha256")

    def __repr__(self) -> str:
        return "AuditKey(<secret>)"

    def entry_hash(
        self, *, id: int, at: datetime, actor: str, action: str, subject: str, details: dict[str, Any], prev_hash: str
    ) -> str:
        return self._seal(
            entry_body(id=id, at=at, actor=actor, action=action, subject=subject, details=details, prev_hash=prev_hash)
        )

    def _seal(self, body: bytes) -> str:
        return hmac.digest(self._entries, body, "sha256").hex()

    def sealed(self, e: AuditEntry) -> bool:
        """The entry's hash is this key's HMAC of its content."""
        return hmac.compare_digest(self._seal(_body_of(e)), e.hash)

    def _anchor_mac(self, id: int, hash: str, at: datetime) -> str:
        body = json.dumps(["anchor", id, hash, canonical_time(at)], separators=(",", ":")).encode()
        return hmac.digest(self._anchors, body, "sha256").hex()

    def anchor(self, id: int, hash: str, at: datetime) -> Anchor:
        at = datetime.strptime(canonical_time(at), _TIME_FORMAT).replace(tzinfo=UTC)  # as a line reads back
        return Anchor(id=id, hash=hash, at=at, mac=self._anchor_mac(id, hash, at))

    def signed(self, a: Anchor) -> bool:
        return hmac.compare_digest(self._anchor_mac(a.id, a.hash, a.at), a.mac)


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    checked: int
    problem: str = ""
    rollback: bool = False  # the chain itself verifies; it only ends below, or departs from, an anchor
    sealed_from: int = 0  # the first entry sealed with the key (0: none)
    anchors: int = 0  # anchors checked


class _Walk:
    """One pass over the entries: ids, links, seals, and the anchored hashes met on the way."""

    def __init__(self, key: AuditKey | None, anchors: Iterable[Anchor], start: tuple[int, str] | None) -> None:
        self.key = key
        self.next_id, self.prev = (start[0] + 1, start[1]) if start else (1, GENESIS)
        self.sealed_from = self.next_id if start and key else 0  # after an anchor, only keyed entries
        self.count = 0
        self.anchored: dict[int, list[Anchor]] = {}
        for a in anchors:
            self.anchored.setdefault(a.id, []).append(a)
        self.departure = ""

    def step(self, e: AuditEntry) -> str:
        """The entry's problem, or ""."""
        if e.id != self.next_id:
            return f"entry {self.next_id} is missing (next present is {e.id})"
        if e.prev_hash != self.prev:
            return f"entry {e.id} does not link to entry {e.id - 1}"
        problem = self._hash_problem(e)
        if problem:
            return problem
        for a in self.anchored.get(e.id, ()):
            if a.hash != e.hash and not self.departure:
                self.departure = (
                    f"entry {e.id} is not the entry anchored by {a.describe()}: the chain was "
                    "replaced from there on (rolled back, then written again)"
                )
        self.prev, self.next_id, self.count = e.hash, self.next_id + 1, self.count + 1
        return ""

    def _hash_problem(self, e: AuditEntry) -> str:
        if self.key is not None and self.key.sealed(e):
            self.sealed_from = self.sealed_from or e.id
            return ""
        if self.sealed_from:
            how = "rehashed without the audit key" if is_unkeyed(e) else "hash mismatch"
            return f"entry {e.id} was altered ({how})"
        if is_unkeyed(e):
            return ""
        hint = ", or this is not the audit key the chain was sealed with" if self.key is not None else ""
        return f"entry {e.id} was altered (hash mismatch){hint}"

    def finish(self, head: tuple[int, str] | None) -> str:
        last = self.next_id - 1
        if head is not None and head != (last, self.prev):
            if head[0] > last:
                return f"entries {self.next_id}..{head[0]} are missing (the head says {head[0]})"
            return f"the chain head does not match entry {last}"
        if self.key is not None and not self.sealed_from and self.count:
            return (
                "no entry is sealed with the audit key: the chain was rewritten without it (or, written "
                "by 0.1.0, it was never sealed: `serve` seals it when it starts)"
            )
        return ""

    def rollback(self) -> str:
        if not self.anchored:
            return ""
        newest = max(self.anchored)
        if newest > self.next_id - 1:
            a = self.anchored[newest][0]
            return (
                f"the chain ends at entry {self.next_id - 1} but {a.describe()} records entry {newest}: "
                "the database was rolled back or truncated"
            )
        return self.departure


def verify_chain(
    entries: Iterable[AuditEntry],
    *,
    head: tuple[int, str] | None = None,
    key: AuditKey | None = None,
    anchors: Iterable[Anchor] = (),
    start: tuple[int, str] | None = None,
) -> ChainReport:
    """Walk the chain from the first entry (or from ``start``, an anchored ``(id, hash)`` the entries
    follow). ``head`` is the separately stored (last id, last hash), which catches a deleted tail.
    With ``key``, entries after the first keyed one must all be keyed and the chain must hold one;
    ``anchors`` (needs ``key``) must be signed by it, and the chain must hold every anchored entry."""
    anchors = list(anchors)
    if anchors and key is None:
        raise ValueError("anchors are checked with the audit key")
    for a in anchors:
        assert key is not None
        if not key.signed(a):
            return ChainReport(
                False,
                0,
                f"{a.describe()} (entry {a.id}) is not signed with this audit key: the "
                "anchors were altered, or they belong to another key",
                anchors=len(anchors),
            )
    walk = _Walk(key, anchors, start)
    for e in entries:
        problem = walk.step(e)
        if problem:
            return ChainReport(False, walk.count, problem, sealed_from=walk.sealed_from, anchors=len(anchors))
    problem = walk.finish(head)
    if problem:
        return ChainReport(False, walk.count, problem, sealed_from=walk.sealed_from, anchors=len(anchors))
    behind = walk.rollback()
    return ChainReport(
        not behind, walk.count, behind, rollback=bool(behind), sealed_from=walk.sealed_from, anchors=len(anchors)
    )
