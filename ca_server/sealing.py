"""What holds the audit chain from outside the database: the audit key and the anchors file.

The key (``D/audit-key``, or the file ``MESHBRIDGE_AUDIT_KEY_FILE`` or ca.json's ``audit_key_file``
names) seals every entry (HMAC-SHA256): a database writer cannot forge or rehash entries. The
anchors file (``D/audit-anchors``, 0600, JSON lines) holds signed checkpoints of the chain's head,
appended by ``init``, ``restore``, the sealing of a 0.1.0 chain, and by ``serve`` every 10 s while
the head moves (and once more as it stops): a database rolled back, truncated or replaced no
longer holds what they record. ``serve`` anchors a head only after checking that the chain still
holds the previous anchor and continues from it with keyed entries, so each anchor vouches for
those before it and the file can be cut to its newest lines when it grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from itertools import takewhile
from pathlib import Path
from typing import Protocol

from ca_server.core.audit import SCHEME, Anchor, AuditKey, is_unkeyed, verify_chain
from ca_server.core.errors import InvalidInput
from ca_server.core.models import AuditEntry
from ca_server.storage.repository import SqlStore

log = logging.getLogger("meshbridge.ca.audit")

ANCHOR_INTERVAL = 10.0  # seconds between two anchors of a moving head
# The check before an anchor reads and verifies every entry since the last one (~10,000 in 10 s at
# 1,000 renewals/s): it pauses this often so the serving thread gets the GIL (bench/RESULTS.md).
_PACE_EVERY, _PACE_PAUSE = 256, 0.002


def _now() -> datetime:
    return datetime.now(UTC)


# ----------------------------------------------------------------------------- the key
def read_key(path: Path) -> AuditKey | None:
    """The audit key in ``path`` (its text, surrounding whitespace ignored), or None when there is
    no such file."""
    try:
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        return None
    try:
        return AuditKey(secret)
    except ValueError:
        raise InvalidInput(
            f"{path} holds no usable audit key: it needs at least 32 characters, e.g. `openssl rand -hex 32`"
        ) from None


def create_key(path: Path) -> AuditKey:
    """A new random key written to ``path`` (0600); never overwrites a key already there."""
    secret = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secret + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return AuditKey(secret)


# ----------------------------------------------------------------------------- the anchors file
class AnchorLog:
    """The anchors file: appended under an flock of ``<file>.lock`` (several processes may share a
    data directory), and cut to its newest ``keep`` lines once it outgrows ``max_bytes``."""

    def __init__(self, path: Path, *, max_bytes: int = 1 << 20, keep: int = 1000) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def append(self, anchor: Anchor) -> None:
        with self._locked():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, anchor.to_line().encode())
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > self.max_bytes:
                self._cut()

    def _cut(self) -> None:
        lines = self.path.read_text().splitlines(keepends=True)[-self.keep :]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, "".join(lines).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> list[Anchor]:
        """Every anchor, in file order ([] without a file); InvalidInput names a line that is none."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        anchors = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                anchors.append(Anchor.from_line(line))
            except ValueError:
                raise InvalidInput(f"{self.path} line {n} is not an audit anchor: the file was altered") from None
        return anchors


def read_anchors(paths: list[Path]) -> list[Anchor]:
    """The anchors of every file named (each must exist: a mistyped path must not skip the check)."""
    for p in paths:
        if not p.is_file():
            raise InvalidInput(f"anchors file {p} does not exist")
    return [a for p in paths for a in AnchorLog(p).read()]


def anchor_head(store: SqlStore, key: AuditKey, anchors: AnchorLog) -> Anchor | None:
    """Anchor the head as it is now (the caller has just written or verified the chain)."""
    head = store.audit_head()
    if head is None or head[0] == 0:
        return None
    anchor = key.anchor(head[0], head[1], _now())
    anchors.append(anchor)
    return anchor


# ----------------------------------------------------------------------------- opening the chain for writing
def open_for_writing(store: SqlStore, key_path: Path, anchors: AnchorLog) -> AuditKey:
    """Give ``store`` the key it seals entries with. A chain written by 0.1.0 (its newest entry
    unkeyed) gets a new key if none is there yet, and is sealed. Refuses a key that did not seal
    the newest entry, and a missing key for a sealed chain: writing on would fork the chain."""
    key = read_key(key_path)
    last = store.last_audit_entry()
    created = False
    if key is None:
        if last is not None and not is_unkeyed(last):
            raise InvalidInput(
                f"no audit key at {key_path}, but the audit chain is sealed with one: give it "
                "(MESHBRIDGE_AUDIT_KEY_FILE, or ca.json's audit_key_file); a new key would fork "
                "the chain"
            )
        key, created = create_key(key_path), True
        log.info("audit key created", extra={"path": str(key_path)})
    store.audit_key = key
    if last is not None and not key.sealed(last):
        if not is_unkeyed(last) or (not created and _was_sealed(store, key, anchors)):
            raise InvalidInput(
                f"the newest audit entry ({last.id}) is not sealed with the audit key at {key_path}: "
                "the wrong key, or the chain was altered; run `meshbridge-ca audit verify`"
            )
        seal(store, key, anchors)
    return key


def _was_sealed(store: SqlStore, key: AuditKey, anchors: AnchorLog) -> bool:
    """The chain was sealed with ``key`` before: anchors are there, or a keyed entry is. (The
    newest entry is unkeyed: a key given to a 0.1.0 chain before its first start, or a chain
    downgraded by a database writer.)"""
    return anchors.exists() or any(key.sealed(e) for e in store.iter_audit())


def seal(store: SqlStore, key: AuditKey, anchors: AnchorLog) -> None:
    """Append the ``audit.seal`` entry after a 0.1.0 chain's unkeyed entries, and anchor it."""
    with store.write() as tx:
        last = tx.last_audit_entry()
        if last is None or key.sealed(last):
            return  # another replica sealed it first
        entry = tx.append_audit(
            at=_now(),
            actor="meshbridge-ca",
            action="audit.seal",
            subject="audit",
            details={"scheme": SCHEME, "unkeyed_entries": last.id},
        )
    anchors.append(key.anchor(entry.id, entry.hash, _now()))
    log.info("audit chain sealed with the audit key", extra={"unkeyed_entries": last.id})


# ----------------------------------------------------------------------------- serve's anchoring
class ChainBroken(Exception):
    """The chain no longer continues from the newest anchor; nothing is anchored."""


class AuditSource(Protocol):
    def audit_head(self) -> tuple[int, str] | None: ...
    def iter_audit(self, *, after: int = 0, page: int = 1000) -> Iterator[AuditEntry]: ...


class Anchorer:
    """Anchors the head of the chain when it moved and still continues from the last anchor."""

    def __init__(
        self, store: AuditSource, key: AuditKey, anchors: AnchorLog, clock: Callable[[], datetime] = _now
    ) -> None:
        self.store = store
        self.key = key
        self.anchors = anchors
        self.clock = clock
        self.last = self._newest()
        self._lock = threading.Lock()
        self._reported = ""

    def _newest(self) -> Anchor | None:
        try:
            signed = [a for a in self.anchors.read() if self.key.signed(a)]
        except InvalidInput as exc:
            log.error("audit anchors unreadable: %s", exc)
            return None
        return max(signed, key=lambda a: a.id, default=None)

    def tick(self) -> Anchor | None:
        """The new anchor, or None when the head did not move; ChainBroken when the chain no longer
        continues from the last anchor."""
        with self._lock:
            head = self.store.audit_head()
            last = self.last
            if head is None or head[0] == 0 or (last is not None and (last.id, last.hash) == head):
                return None
            if last is not None and head[0] < last.id:
                raise ChainBroken(
                    f"the chain ends at entry {head[0]} but {last.describe()} records entry "
                    f"{last.id}: the database was rolled back or truncated"
                )
            start = (last.id, last.hash) if last is not None else None
            entries = _paced(
                takewhile(
                    lambda e: e.id <= head[0], self.store.iter_audit(after=start[0] if start else 0, page=_PACE_EVERY)
                )
            )
            report = verify_chain(entries, head=head, key=self.key, start=start)
            if not report.ok:
                raise ChainBroken(report.problem + (f" (after {last.describe()})" if last is not None else ""))
            anchor = self.key.anchor(head[0], head[1], self.clock())
            self.anchors.append(anchor)
            self.last = anchor
            return anchor

    def tick_logged(self) -> None:
        """``tick``, its failures logged (a broken chain once per distinct problem, as an error)."""
        try:
            self.tick()
            self._reported = ""
        except ChainBroken as exc:
            if str(exc) != self._reported:
                log.error("audit chain not anchored: %s; run `meshbridge-ca audit verify`", exc)
                self._reported = str(exc)
        except Exception as exc:
            log.warning("audit anchoring failed: %s", type(exc).__name__)


def _paced(entries: Iterator[AuditEntry]) -> Iterator[AuditEntry]:
    """``entries``, with a short sleep (the GIL released) every ``_PACE_EVERY`` of them."""
    for n, entry in enumerate(entries, start=1):
        if n % _PACE_EVERY == 0:
            time.sleep(_PACE_PAUSE)
        yield entry


async def keep_anchored(anchorer: Anchorer, interval: float = ANCHOR_INTERVAL) -> None:
    """``serve``'s background task: anchor every ``interval`` while the head moves, and once more
    when the service stops."""
    try:
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(anchorer.tick_logged)
    finally:
        anchorer.tick_logged()
