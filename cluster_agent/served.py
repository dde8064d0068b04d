"""What the cluster's istiod serves, observed from istiod's own outputs (issue 12 item 4).

"Installed" is what the agent wrote; "served" is what istiod made of it:

- the trust bundle istiod publishes to every namespace, ConfigMap `istio-ca-root-cert` key
  `root-cert.pem` (pilot/pkg/keycertbundle + the namespace controller,
  security/pkg/k8s/namespacecontroller.go `reconcileCACertAndCRL`);
- the intermediate istiod signs with: istiod signs its own serving certificate (the one on its
  secure gRPC port, 15012) with the CA it signs workloads with, and re-signs it when cacerts
  changes (pilot/pkg/bootstrap/istio_ca.go `handleEvent` → `updateRootCertAndGenKeyCert`), so the
  issuer of that certificate is the intermediate in use;
- the CRLs istiod publishes for sidecars, ConfigMap `istio-ca-crl` key `ca-crl.pem`
  (`PILOT_ENABLE_CA_CRL`, on by default).

Each is reported with the time this agent first saw it as it is now; an agent restart forgets
those times, which only makes a root phase gate wait longer. Nothing observed here is trusted for
anything: it is reported, never used to verify a peer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from meshbridge_wire.models import ServedCRL, ServedIn
from meshbridge_wire.pem import certificate_fingerprints, load_crls

__all__ = [
    "IstiodOutputs",
    "IstiodView",
    "ServedTracker",
    "authority_key_id",
    "crl_entries",
    "signing_intermediate",
]


@dataclass(frozen=True)
class IstiodOutputs:
    """istiod's outputs as read this pass; None where they could not be read (see ``problems``)."""

    bundle_pem: str | None
    crl_pem: str | None
    serving_cert_der: bytes | None
    problems: list[str] = field(default_factory=list)


class IstiodView(Protocol):
    """Reads istiod's outputs (cluster_agent.istiod.LiveIstiodView in a cluster)."""

    def read(self) -> IstiodOutputs: ...


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def authority_key_id(ext_owner: x509.Certificate | x509.CertificateRevocationList) -> bytes | None:
    """The key identifier of the CA that signed ``ext_owner`` (None without the extension)."""
    try:
        value = ext_owner.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return value.key_identifier


def crl_entries(pem: str) -> list[ServedCRL]:
    """One entry per CRL in ``pem`` (a `ca-crl.pem` as istiod publishes it)."""
    out: list[ServedCRL] = []
    for crl in load_crls(pem):
        try:
            number: int | None = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = None
        aki = authority_key_id(crl)
        next_update = crl.next_update_utc
        out.append(
            ServedCRL(
                issuer=crl.issuer.rfc4514_string(),
                authority_key_id=aki.hex() if aki else None,
                number=number,
                this_update=_rfc3339(crl.last_update_utc),
                next_update=_rfc3339(next_update) if next_update else None,
            )
        )
    return out


def signing_intermediate(serving_der: bytes, known: Mapping[str, x509.Certificate | bytes]) -> str | None:
    """The serial of the intermediate that signed istiod's serving certificate.

    ``known`` maps serials to what the agent knows of each intermediate it installed: the
    certificate (the current one: its signature is checked) or only its key identifier (superseded
    ones, from their final CRLs: matched against the certificate's authority key identifier).
    """
    leaf = x509.load_der_x509_certificate(serving_der)
    aki = authority_key_id(leaf)
    for serial, what in known.items():
        if isinstance(what, bytes):
            if aki is not None and aki == what:
                return serial
            continue
        try:
            leaf.verify_directly_issued_by(what)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return serial
    return None


@dataclass
class ServedTracker:
    """Turns each pass's outputs into the report, keeping when each part was first seen as it is."""

    last: ServedIn | None = None

    def observe(self, outputs: IstiodOutputs, known: Mapping[str, x509.Certificate | bytes], now: datetime) -> ServedIn:
        problems = list(outputs.problems)
        bundle = certificate_fingerprints(outputs.bundle_pem) if outputs.bundle_pem else []
        signing: str | None = None
        if outputs.serving_cert_der is not None:
            signing = signing_intermediate(outputs.serving_cert_der, known)
            if signing is None:
                problems.append("istiod signs with an intermediate this agent did not install")
        crls = crl_entries(outputs.crl_pem) if outputs.crl_pem else []
        stamp = _rfc3339(now)
        prev = self.last
        report = ServedIn(
            observed_at=stamp,
            bundle=bundle,
            bundle_since=self._since(prev.bundle if prev else None, prev.bundle_since if prev else None, bundle, stamp),
            signing_serial=signing,
            signing_since=self._since(
                prev.signing_serial if prev else None, prev.signing_since if prev else None, signing, stamp
            ),
            crls=crls,
            crls_since=self._since(prev.crls if prev else None, prev.crls_since if prev else None, crls, stamp),
            problems=problems[:20],
        )
        self.last = report
        return report

    @staticmethod
    def _since(previous: object, previous_since: str | None, current: object, stamp: str) -> str | None:
        """When ``current`` was first seen: carried over while it is unchanged, None while empty."""
        if not current:
            return None
        if previous == current and previous_since is not None:
            return previous_since
        return stamp
