"""Certificate revocation lists: signing one per root, re-signing them when due, serving them.

A root's CRL never lapses before an intermediate it issued: its nextUpdate lies past the notAfter
of every intermediate the root issued, or may issue before the CRL is next re-signed
(`next_update_for`). Envoy
checks every peer chain with CRL_CHECK|CRL_CHECK_ALL once istiod ships `ca-crl.pem`
(envoy source/common/tls/cert_validator/default_validator.cc `initializeSslContexts`), and an
expired CRL fails the handshake like a missing one (envoyproxy/envoy#31320): with a 7-day CRL a
week's outage of this service would make every sidecar reject every peer, although each
intermediate is still valid. The CRL is still re-signed every half `crl_validity` (and whenever an
intermediate outlives it), and at once on every revocation, so revocations reach agents as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_server.core import x509profiles as xp
from ca_server.core.context import Context
from ca_server.core.errors import InvalidInput, Unavailable
from ca_server.core.models import CRLRecord, Root, RootStatus
from ca_server.core.ports import Tx
from ca_server.core.rootkeys import RootKeys, active_root, bundle_roots
from meshbridge_wire.pem import load_crls


def crl_pem_from(tx: Tx, roots: Sequence[Root]) -> str:
    """The PEM CRLs of the trust bundle's roots, in the bundle's order."""
    wanted = {r.id for r in bundle_roots(roots)}
    order = {r.id: i for i, r in enumerate(bundle_roots(roots))}
    crls = sorted((c for c in tx.list_crls() if c.root_id in wanted), key=lambda c: order[c.root_id])
    return "".join(c.pem for c in crls)


class Crls:
    def __init__(self, ctx: Context, rootkeys: RootKeys) -> None:
        self.ctx = ctx
        self.rootkeys = rootkeys

    def sign(self, tx: Tx, root: Root, *, now: datetime, actor: str) -> CRLRecord:
        previous = [c for c in tx.list_crls() if c.root_id == root.id]
        number = max((c.number for c in previous), default=0) + 1
        revoked = [
            xp.RevokedEntry(serial=int(r.serial, 16), revoked_at=r.revoked_at or now, reason=r.revocation_reason)
            for r in tx.revoked_certificates(root.id, not_expired_at=now)
        ]
        next_update = self.next_update_for(tx, root.id, now=now)
        crl = xp.build_crl(
            issuer=self.rootkeys.cert(root.cert_pem),
            signer=self.rootkeys.signer(root),
            revoked=revoked,
            now=now,
            next_update=next_update - now,
            crl_number=number,
        )
        rec = CRLRecord(
            root_id=root.id,
            number=number,
            der=crl.public_bytes(serialization.Encoding.DER),
            pem=crl.public_bytes(serialization.Encoding.PEM).decode(),
            this_update=now,
            next_update=next_update,
        )
        tx.put_crl(rec)
        self.ctx.audit(tx, actor=actor, action="crl.sign", subject=root.id, number=number, entries=len(revoked))
        return rec

    def next_update_for(self, tx: Tx, root_id: str, *, now: datetime) -> datetime:
        """Past the notAfter of every intermediate the root issued or may issue before the next
        scheduled re-sign (half `crl_validity` from now), so the CRL stays valid while any of them is,
        even if this service is down; at least `crl_validity` from now."""
        policy = self.ctx.policy
        horizon = now + max(policy.crl_validity, policy.intermediate_validity + policy.crl_validity / 2)
        latest = tx.latest_not_after(root_id)
        return max(horizon, latest) if latest is not None else horizon

    def resign_for(self, tx: Tx, root_ids: set[str], *, now: datetime, actor: str) -> None:
        for root in tx.list_roots():
            if root.id in root_ids and root.status != RootStatus.RETIRED:
                self.sign(tx, root, now=now, actor=actor)

    def refresh(self, *, actor: str = "scheduler") -> int:
        """Re-sign every CRL signed more than half `crl_validity` ago, or whose nextUpdate falls
        before the notAfter of a certificate its root issued since. Safe to call from every replica."""
        now = self.ctx.clock()
        with self.ctx.write() as tx:
            crls = {c.root_id: c for c in tx.list_crls()}
            due = [r for r in bundle_roots(tx.list_roots()) if r.id not in crls or self._due(tx, crls[r.id], now=now)]
            for root in due:
                self.sign(tx, root, now=now, actor=actor)
            if due:
                self.ctx.changed(tx)
        return len(due)

    def _due(self, tx: Tx, crl: CRLRecord, *, now: datetime) -> bool:
        if now - crl.this_update >= self.ctx.policy.crl_validity / 2:
            return True
        latest = tx.latest_not_after(crl.root_id)
        return latest is not None and latest > crl.next_update

    def der(self) -> bytes:
        with self.ctx.store.read() as tx:
            roots = tx.list_roots()
            active = active_root(roots)
            for c in tx.list_crls():
                if c.root_id == active.id:
                    return c.der
        raise Unavailable("no CRL has been signed yet")


def check_published_crls(pem: str, intermediates_pem: Sequence[str]) -> None:
    """InvalidInput unless every CRL in `pem` names one of the cluster's own intermediates as its
    issuer and is signed by it (`intermediates_pem`, every certificate the CA issued to it). Peers
    put these CRLs in their `ca-crl.pem`, where verifiers pick a CRL by its issuer name: one naming
    another cluster's intermediate, signed with another key, would make OpenSSL/BoringSSL fail that
    cluster's chains ("CRL signature failure") in every peer."""
    try:
        crls = load_crls(pem)
    except ValueError as exc:
        raise InvalidInput(f"crl: not PEM CRLs ({exc})") from None
    if not crls:
        raise InvalidInput("crl: no CRL in it")
    certs = [x509.load_pem_x509_certificate(c.encode()) for c in intermediates_pem]
    for i, crl in enumerate(crls):
        # verifiers pick a CRL by its issuer name, so the name must be the signer's own too
        if not any(c.subject == crl.issuer and crl.is_signature_valid(c.public_key()) for c in certs):  # type: ignore[arg-type]
            raise InvalidInput(f"crl[{i}]: not signed by one of this cluster's intermediates")
