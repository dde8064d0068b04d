"""What every concern of the authority shares: its ports, settings and clock, and the audited write.

A concern (roots, CRLs, clusters, issuance, fleet) receives one ``Context`` from the front
(``authority.Authority``) and imports no other concern's front: the write transaction, the audit
writer and the one revision bump live here, so every change, its audit entry and the fleet
revision commit together or not at all, and listeners hear of a change only once it committed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from ca_server.core.keytypes import KeyType
from ca_server.core.ports import Clock, KeyBackend, Store, Tx

log = logging.getLogger("meshbridge.ca.authority")
T = TypeVar("T")
# an audited event as logged once committed: (action, subject, actor, serial or generation)
CommittedEvent = tuple[str, str, str, Any]
# a joined job's outcome: its result, its audited events, whether it moved the revision
Joined = tuple[T, list[CommittedEvent], bool]

CRL_VALIDITY = timedelta(days=7)
BOOTSTRAP_TTL = timedelta(hours=1)
WORKLOAD_CERT_LIFETIME = timedelta(hours=24)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Policy:
    org: str = "meshbridge"
    intermediate_validity: timedelta = timedelta(days=90)
    root_validity: timedelta = timedelta(days=3650)
    bootstrap_ttl: timedelta = BOOTSTRAP_TTL
    crl_validity: timedelta = CRL_VALIDITY
    root_key_type: KeyType = KeyType.ECDSA_P256
    # the longest a workload certificate istiod signs may live: root retirement waits this long
    # (plus a margin, see core.gates) after every istiod signs under another root. Istio's default
    # is 24 h (DEFAULT_WORKLOAD_CERT_TTL, pilot/pkg/bootstrap/istio_ca.go; security/pkg/cmd/constants.go)
    workload_cert_lifetime: timedelta = WORKLOAD_CERT_LIFETIME


def _log_committed(events: list[CommittedEvent]) -> None:
    """Identifiers only: never a token or key."""
    for action, subject, actor, extra in events:
        log.info("%s %s", action, subject, extra={"actor": actor, **({"serial": extra} if extra else {})})


class _Pending(threading.local):
    """This thread's open write: its audited events awaiting commit and whether it bumped the revision."""

    events: list[CommittedEvent] | None = None
    changed: bool = False


class Context:
    """The ports, the settings, the clock and the audited write transaction the concerns share."""

    def __init__(self, store: Store, keys: KeyBackend, policy: Policy, clock: Clock) -> None:
        self.store = store
        self.keys = keys
        self.policy = policy
        self.clock = clock
        self.on_change: list[Callable[[], None]] = []  # called after a commit that bumped the revision
        self._pending = _Pending()

    @contextlib.contextmanager
    def write(self) -> Iterator[Tx]:
        """A write transaction whose audited changes are logged once it has committed (a change that
        rolled back is never logged as done), and whose revision bump (``changed``) is announced to
        ``on_change`` then too. Identifiers only in the log: never a token or key."""
        pending = self._pending
        pending.events, pending.changed = [], False
        try:
            with self.store.write() as tx:
                yield tx
            _log_committed(pending.events)
            changed = pending.changed
        finally:
            pending.events, pending.changed = None, False
        if changed:
            self.notify_changed()

    def write_unaudited(self) -> contextlib.AbstractContextManager[Tx]:
        """A write transaction for a change that is neither audited nor announced (an agent's status
        report: ``Store.write_unaudited``); ``audit`` and ``changed`` refuse it."""
        return self.store.write_unaudited()

    def write_joined(self, job: Callable[[Tx], T], *, cluster: str | None = None) -> T:
        """``job(tx)`` as in ``write``, in a transaction the store may share with other callers'
        jobs (group commit, ``Store.write_joined``): it may run on another thread, so its audited
        events and revision bump are collected around it there, and logged and announced here once
        its transaction committed. ``cluster``: the one the job works on."""
        return self.joined_result(self.store.write_joined(self._collecting(job), cluster=cluster))

    def submit_joined(self, job: Callable[[Tx], T], *, cluster: str | None = None) -> Future[Joined[T]]:
        """``write_joined`` without waiting (``Store.submit_joined``): the future's outcome goes to
        ``joined_result`` once done, which logs and announces what the job did."""
        return self.store.submit_joined(self._collecting(job), cluster=cluster)

    def _collecting(self, job: Callable[[Tx], T]) -> Callable[[Tx], Joined[T]]:
        """``job``, returning with its result the audited events and revision bump it made (on
        whichever thread runs it)."""

        def collected(tx: Tx) -> Joined[T]:
            pending = self._pending
            events: list[CommittedEvent] = []
            pending.events, pending.changed = events, False
            try:
                return job(tx), events, pending.changed
            finally:
                pending.events, pending.changed = None, False

        return collected

    def joined_result(self, outcome: Joined[T]) -> T:
        """The job's result, its committed events logged and its revision bump announced."""
        result, events, changed = outcome
        _log_committed(events)
        if changed:
            self.notify_changed()
        return result

    def audit(self, tx: Tx, *, actor: str, action: str, subject: str, **details: Any) -> None:
        """Append an audit entry in ``tx``; it is logged once ``tx`` commits."""
        tx.append_audit(at=self.clock(), actor=actor, action=action, subject=subject, details=details)
        events = self._pending.events
        if events is not None:
            events.append((action, subject, actor, details.get("serial") or details.get("generation")))

    def changed(self, tx: Tx) -> None:
        """The one revision bump: desired state may differ after ``tx``; listeners hear it once committed."""
        tx.bump_revision()
        self._pending.changed = True

    def notify_changed(self) -> None:
        for cb in self.on_change:
            cb()
