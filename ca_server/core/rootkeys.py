"""The roots as signing material: their parsed certificates, open signers and chain verifiers,
cached per process, and the pure choices over a set of roots (the active one, the trust bundle).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509

from ca_server.core import x509profiles as xp
from ca_server.core.errors import Unavailable
from ca_server.core.keytypes import Signer
from ca_server.core.models import Root, RootStatus
from ca_server.core.ports import KeyBackend


def bundle_roots(roots: Sequence[Root]) -> list[Root]:
    return sorted((r for r in roots if r.status != RootStatus.RETIRED), key=lambda r: (r.created_at, r.id))


def active_root(roots: Sequence[Root]) -> Root:
    for r in roots:
        if r.status == RootStatus.ACTIVE:
            return r
    raise Unavailable("no active root: initialise the CA first")


def trust_bundle_from(roots: Sequence[Root]) -> str:
    anchors = dict.fromkeys(r.anchor_pem for r in bundle_roots(roots))
    return "".join(anchors)


def root_endorsements_from(roots: Sequence[Root]) -> list[str]:
    """The endorsement of every root in the trust bundle that has one (oldest root first)."""
    return [r.endorsement_pem for r in bundle_roots(roots) if r.endorsement_pem]


class RootKeys:
    """Parsed root certificates, open signers (by root id) and chain verifiers (by anchor set)."""

    def __init__(self, keys: KeyBackend) -> None:
        self.keys = keys
        self.signers: dict[str, Signer] = {}
        self.certs: dict[str, x509.Certificate] = {}
        self._verifiers: dict[tuple[str, ...], xp.ChainVerifier] = {}

    def cert(self, pem: str) -> x509.Certificate:
        cert = self.certs.get(pem)
        if cert is None:
            cert = x509.load_pem_x509_certificate(pem.encode())
            self.certs[pem] = cert
        return cert

    def signer(self, root: Root) -> Signer:
        signer = self.signers.get(root.id)
        if signer is None:
            try:
                signer = self.keys.load(root.key_ref)
            except Exception as exc:  # the backend's own error types vary; never echo key material
                raise Unavailable(f"signing key of root {root.id} is not usable") from exc
            self.signers[root.id] = signer
        return signer

    def verifier(self, roots: Sequence[Root]) -> xp.ChainVerifier:
        key = tuple(sorted(r.anchor_pem for r in roots))
        v = self._verifiers.get(key)
        if v is None:
            anchors = [self.cert(p) for p in dict.fromkeys(key)]
            v = xp.ChainVerifier(anchors)
            self._verifiers[key] = v
        return v

    def check(self, root: Root) -> None:
        """Raise Unavailable unless ``root``'s key can sign now and matches its certificate."""
        signer = self.signer(root)
        probe = b"meshbridge readiness probe"
        try:
            sig = signer.sign(probe)
        except Exception as exc:
            self.signers.pop(root.id, None)  # reopen next time (token reinserted, HSM back)
            raise Unavailable(f"signing key of root {root.id} cannot sign") from exc
        if not xp.verify_proof(signer.public_key(), probe, sig):
            raise Unavailable(f"signing key of root {root.id} does not match its certificate")
