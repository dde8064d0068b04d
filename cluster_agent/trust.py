"""The roots this agent trusts, and the only ways that set changes.

The set starts from the configured ``ca.trust_anchor`` file and lives in the agent's state. An
answer from the CA service never rewrites it directly:

- a root of the CA's trust bundle joins the set only when it is already trusted, or when one of the
  answer's endorsements (the root cross-signed: same subject and key, CA:TRUE, valid now) chains to
  a root already trusted — newly accepted roots may endorse further ones;
- a trust bundle that names a root nobody endorses, or holds no root at all, is refused whole;
- a trusted root leaves the set only when the CA's bundle no longer carries it, a root trusted after
  it is in that bundle, and the installed intermediate does not chain to it (phase 4 of a rotation);
- every issued chain must end at a trusted root (``require_chain``).

Everything here is pure over certificates: the caller saves the state and retunes its CA client.
A refusal raises ``TrustRefused`` before anything changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cluster_agent.errors import TrustRefused
from cluster_agent.render.cacerts import issued_by
from cluster_agent.state import AgentState

__all__ = ["TrustRefused", "TrustedRoots"]


def _parse(pem: str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise TrustRefused(f"{what}: not PEM certificates; nothing changed") from None
    if not certs:
        raise TrustRefused(f"{what}: holds no certificate; nothing changed")
    return certs


def _pem(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(cert: x509.Certificate) -> str:
    """The first 16 hex digits of the certificate's SHA-256 (to name a root in a message)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


def _describe(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string() or '<empty subject>'} (sha256 {fingerprint(cert)})"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _chains_to(path: Sequence[x509.Certificate], trusted: Sequence[x509.Certificate], now: datetime) -> bool:
    """Whether ``path`` (each certificate issued by the next, every one a CA valid at ``now``) ends
    at, or is issued by, a trusted root valid at ``now``."""
    if any(not _is_ca(c) or not _valid_at(c, now) for c in path):
        return False
    if any(not issued_by(path[i], path[i + 1]) for i in range(len(path) - 1)):
        return False
    last = path[-1]
    return any(last == root or (_valid_at(root, now) and issued_by(last, root)) for root in trusted)


def endorsed(
    root: x509.Certificate,
    endorsements: Sequence[Sequence[x509.Certificate]],
    trusted: Sequence[x509.Certificate],
    now: datetime,
) -> bool:
    """Whether an endorsement proves ``root``: a cross-certificate with ``root``'s subject and key,
    CA:TRUE, valid now, chaining (through the certificates that follow it) to a trusted root. The
    root itself must be a self-signed CA valid now."""
    if not (_is_ca(root) and _valid_at(root, now) and root.subject == root.issuer and issued_by(root, root)):
        return False
    for endorsement in endorsements:
        cross = endorsement[0]
        if cross.subject == root.subject and _spki(cross) == _spki(root) and _chains_to(endorsement, trusted, now):
            return True
    return False


class TrustedRoots:
    """The agent's trusted roots, kept in ``state.trusted_roots`` (PEM, oldest first)."""

    def __init__(self, state: AgentState, *, configured_pem: str) -> None:
        self.state = state
        self._seed(configured_pem)

    def _seed(self, configured_pem: str) -> None:
        """Start from the configured anchor; when the operator changes that file, its roots join the
        set (recovery for an agent that missed more than one rotation). An agent upgraded from a
        version without a trusted set keeps the bundle it was already trusting."""
        digest = hashlib.sha256(configured_pem.encode()).hexdigest()
        if self.state.trusted_roots and self.state.trusted_anchor_sha256 == digest:
            return
        current = (
            self.certificates()
            if self.state.trusted_roots
            else (_parse(self.state.trust_bundle, "state trust bundle") if self.state.trust_bundle else [])
        )
        configured = _parse(configured_pem, "ca.trust_anchor")
        self.state.trusted_roots = _pem(list(dict.fromkeys([*current, *configured])))
        self.state.trusted_anchor_sha256 = digest

    def certificates(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.state.trusted_roots.encode())

    @property
    def pem(self) -> str:
        return self.state.trusted_roots

    def follow(
        self, bundle_pem: str, endorsement_pems: Sequence[str], *, installed_chain_pem: str, now: datetime
    ) -> bool:
        """Take the CA's trust bundle: accept its endorsed new roots and drop retired ones (see the
        module docstring). TrustRefused, with nothing changed, unless every root of the bundle ends
        up trusted. Returns whether the set changed."""
        trusted = self.certificates()
        bundle = _parse(bundle_pem, "trust bundle")
        endorsements = [_parse(pem, "root endorsement") for pem in endorsement_pems]
        accepted = list(trusted)
        pending = [c for c in dict.fromkeys(bundle) if c not in accepted]
        while pending:
            proven = [c for c in pending if endorsed(c, endorsements, accepted, now)]
            if not proven:
                raise TrustRefused(
                    f"the CA's trust bundle carries root {_describe(pending[0])}, which no trusted root endorses: "
                    "trust, cacerts and state left unchanged"
                )
            accepted += proven
            pending = [c for c in pending if c not in proven]
        kept = [
            c
            for i, c in enumerate(accepted)
            if c in bundle or not self._retired(c, accepted[i + 1 :], bundle, installed_chain_pem)
        ]
        if kept == trusted:
            return False
        self.state.trusted_roots = _pem(kept)
        return True

    @staticmethod
    def _retired(
        root: x509.Certificate,
        newer: Sequence[x509.Certificate],
        bundle: Sequence[x509.Certificate],
        installed_chain_pem: str,
    ) -> bool:
        """A root left out of the bundle is retired once a root trusted after it (``newer``: the set
        is kept in the order roots were accepted) is in the bundle and the installed intermediate no
        longer chains to it."""
        if not any(c in bundle for c in newer):
            return False
        chain = x509.load_pem_x509_certificates(installed_chain_pem.encode()) if installed_chain_pem else []
        return not any(c == root or issued_by(c, root) for c in chain[-1:])

    def require_roots_trusted(self, bundle_pem: str, what: str) -> None:
        """TrustRefused unless every root in ``bundle_pem`` is already trusted."""
        trusted = self.certificates()
        for cert in _parse(bundle_pem, what):
            if cert not in trusted:
                raise TrustRefused(
                    f"{what} carries root {_describe(cert)}, which this agent does not trust: nothing installed"
                )

    def require_chain(self, chain_pem: str, what: str, *, now: datetime) -> None:
        """TrustRefused unless ``chain_pem`` (each certificate issued by the next) ends at a trusted
        root."""
        if not _chains_to(_parse(chain_pem, what), self.certificates(), now):
            raise TrustRefused(f"{what} does not end at a root this agent trusts: nothing installed")
