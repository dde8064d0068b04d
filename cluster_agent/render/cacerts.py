"""Istio's plugged-in CA secret `cacerts`, the check istiod runs on it, and the intermediate's CRL.

`check_cacerts_bundle` mirrors istiod's `Verify` (security/pkg/pki/util/keycertbundle.go; see
ISTIO-NOTES "What istiod does with cacerts") and adds the checks that istiod skips but Envoy
applies to every workload chain, so a bundle that passes here is one istiod loads and Envoy
accepts:
- ca-cert.pem: a CA certificate with keyCertSign, no EKU or an EKU that includes serverAuth
  (Go verifies with an empty usage list, i.e. serverAuth), RSA 2048-4096 or ECDSA P-256/P-384;
- ca-key.pem: an unencrypted PKCS#1, SEC1 or PKCS#8 key matching ca-cert.pem;
- cert-chain.pem: starts with ca-cert.pem, each certificate issued by the next, ending at or
  issued by a root in root-cert.pem (Istio appends it verbatim to workload certificates);
- every CA on that path allows the workload certificate below it (pathLen), uses no SHA-1, and
  when `now` is given, is within its validity;
- ca-crl.pem, when given: a CRL signed by every certificate of cert-chain.pem (istiod's "missing
  CRL signed by certificates"), none of which revokes a certificate of the chain, and, when `now`
  is given, no CRL past its nextUpdate (Envoy fails a chain on an expired CRL).

ca-crl.pem may also hold the final CRL of each superseded intermediate of this cluster
(`sign_final_crl`): istiod's check ignores CRLs no certificate of cert-chain.pem signed, and
Envoy needs them for the workload certificates the old intermediate issued (see
`compose_ca_crl`).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from cluster_agent.render.errors import BundleError
from cluster_agent.render.objects import (
    CLUSTER_LABEL,
    COMPONENT_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Manifest,
    metadata,
)

__all__ = [
    "CACERTS_SECRET",
    "MAX_CRL_VALIDITY",
    "check_cacerts_bundle",
    "compose_ca_crl",
    "crl_needs_resign",
    "earliest_next_update",
    "issued_by",
    "render_cacerts_secret",
    "sign_final_crl",
    "sign_intermediate_crl",
]

CACERTS_SECRET = "cacerts"
MAX_CRL_VALIDITY = timedelta(days=7)
# lastUpdate is set this far back so that a peer whose clock runs a little behind still accepts it.
CRL_BACKDATE = timedelta(minutes=5)

_WEAK_HASHES = (hashes.SHA1, hashes.MD5)


def _pem_text(value: str) -> str:
    return value if value.endswith("\n") else value + "\n"


def render_cacerts_secret(
    namespace: str,
    *,
    ca_cert_pem: str,
    ca_key_pem: str,
    cert_chain_pem: str,
    root_cert_pem: str,
    crl_pem: str | None = None,
    cluster: str | None = None,
) -> Manifest:
    """Secret `cacerts` (type Opaque) with base64 `data`, so the output is byte-stable.

    `ca-crl.pem` only when a CRL is given; never an `istio-generated` key (that marks Istio's own
    self-signed CA).
    """
    files = {
        "ca-cert.pem": ca_cert_pem,
        "ca-key.pem": ca_key_pem,
        "cert-chain.pem": cert_chain_pem,
        "root-cert.pem": root_cert_pem,
    }
    if crl_pem is not None:
        files["ca-crl.pem"] = crl_pem
    labels = {MANAGED_BY_LABEL: MANAGED_BY, COMPONENT_LABEL: "cacerts"}
    if cluster:
        labels[CLUSTER_LABEL] = cluster
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": metadata(CACERTS_SECRET, namespace, labels),
        "data": {key: base64.b64encode(_pem_text(text).encode()).decode() for key, text in sorted(files.items())},
    }


# --------------------------------------------------------------------------------------------
# Parsing helpers


def _certs(pem: str, what: str) -> list[x509.Certificate]:
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise BundleError(f"{what}: holds no certificate")
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as exc:
        raise BundleError(f"{what}: not PEM certificates ({exc})") from None
    if not certs:
        raise BundleError(f"{what}: holds no certificate")
    return certs


def _crls(pem: str, what: str) -> list[x509.CertificateRevocationList]:
    blocks = _pem_blocks(pem, "X509 CRL")
    if not blocks:
        raise BundleError(f"{what}: holds no CRL")
    crls = []
    for i, block in enumerate(blocks, start=1):
        try:
            crls.append(x509.load_pem_x509_crl(block.encode()))
        except ValueError as exc:
            raise BundleError(f"{what}: CRL {i} does not parse ({exc})") from None
    return crls


def _pem_blocks(pem: str, label: str) -> list[str]:
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    blocks: list[str] = []
    rest = pem
    while (start := rest.find(begin)) != -1:
        stop = rest.find(end, start)
        if stop == -1:
            raise BundleError(f"unterminated PEM block '{begin}'")
        blocks.append(rest[start : stop + len(end)] + "\n")
        rest = rest[stop + len(end) :]
    return blocks


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


def _public_der(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes")  # noqa: B009 - every supported public key has it
    der: bytes = public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _load_key(pem: str) -> CertificateIssuerPrivateKeyTypes:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except TypeError:
        raise BundleError("ca-key.pem: the key is encrypted; istiod needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(f"ca-key.pem: not a PKCS#1, SEC1 or PKCS#8 private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise BundleError(f"ca-key.pem: {type(key).__name__} keys are not supported; use RSA or ECDSA")
    return key


def _check_key_type(cert: x509.Certificate, what: str) -> None:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= 4096:
            raise BundleError(f"{what}: RSA key of {key.key_size} bits; istiod signs with RSA 2048-4096")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise BundleError(f"{what}: ECDSA curve {key.curve.name}; use P-256 or P-384")
    else:
        raise BundleError(f"{what}: {type(key).__name__} keys are not supported; use RSA or ECDSA")


# --------------------------------------------------------------------------------------------
# The check


def check_cacerts_bundle(
    *,
    ca_cert_pem: str,
    ca_key_pem: str,
    cert_chain_pem: str,
    root_cert_pem: str,
    crl_pem: str | None = None,
    now: datetime | None = None,
) -> None:
    """Raise BundleError, naming the file and the certificate, unless istiod would load this
    bundle and Envoy would accept the workload chains it signs."""
    ca_cert = _certs(ca_cert_pem, "ca-cert.pem")[0]
    _check_ca_profile(ca_cert, "ca-cert.pem", now=now)
    _check_key_type(ca_cert, "ca-cert.pem")
    key = _load_key(ca_key_pem)
    if _public_der(key.public_key()) != _public_der(ca_cert.public_key()):
        raise BundleError("ca-key.pem: does not match ca-cert.pem (the public keys differ)")

    chain = _certs(cert_chain_pem, "cert-chain.pem")
    if chain[0] != ca_cert:
        raise BundleError(
            f"cert-chain.pem: must start with ca-cert.pem ({_subject(ca_cert)}) but starts with {_subject(chain[0])}"
        )
    roots = _certs(root_cert_pem, "root-cert.pem")
    path = _verify_path(chain, roots)
    for depth, cert in enumerate(path):
        what = "ca-cert.pem" if depth == 0 else f"certificate {_subject(cert)}"
        if depth > 0:
            _check_ca_profile(cert, what, now=now)
        _check_path_length(cert, depth, what)
    if crl_pem is not None:
        _check_crls(_crls(crl_pem, "ca-crl.pem"), chain, path, now=now)


def _check_ca_profile(cert: x509.Certificate, what: str, *, now: datetime | None) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise BundleError(f"{what}: not a CA certificate (basicConstraints CA:TRUE is missing)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise BundleError(f"{what}: keyUsage lacks keyCertSign; Envoy refuses such a CA")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(eku):
        names = ", ".join(getattr(oid, "_name", oid.dotted_string) for oid in eku)
        raise BundleError(
            f"{what}: extendedKeyUsage ({names}) excludes serverAuth; istiod's Go verification "
            f"fails on it. Issue CA certificates without extendedKeyUsage"
        )
    # Go never checks a root's self-signature, only signatures it relies on.
    hash_algorithm = None if _is_self_issued(cert) else cert.signature_hash_algorithm
    if isinstance(hash_algorithm, _WEAK_HASHES):
        raise BundleError(f"{what}: signed with {hash_algorithm.name}, which Go refuses; use SHA-256")
    if now is not None:
        if now < cert.not_valid_before_utc:
            raise BundleError(f"{what}: not valid before {cert.not_valid_before_utc.isoformat()}")
        if now > cert.not_valid_after_utc:
            raise BundleError(f"{what}: expired at {cert.not_valid_after_utc.isoformat()}")


def _check_path_length(cert: x509.Certificate, depth: int, what: str) -> None:
    # A workload certificate hangs below ca-cert.pem, so the CA at `depth` has `depth` CA
    # certificates under it on every workload chain.
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if constraints.path_length is not None and constraints.path_length < depth:
        raise BundleError(
            f"{what}: pathLen {constraints.path_length} allows fewer than the {depth} CA certificate(s) "
            f"below it, so Envoy rejects every workload chain (roots get no pathLen)"
        )


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """`issuer` signed `cert` (its name and key match): False for any failure, never an exception."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and issued_by(cert, cert)


def _verify_path(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The path ca-cert.pem → … → trusted root, following cert-chain.pem's order."""
    for i in range(len(chain) - 1):
        if not issued_by(chain[i], chain[i + 1]):
            raise BundleError(
                f"cert-chain.pem: certificate {i + 1} ({_subject(chain[i])}) is not signed by certificate "
                f"{i + 2} ({_subject(chain[i + 1])}); the chain is out of order or incomplete"
            )
    last = chain[-1]
    if last in roots:
        return list(chain)
    if _is_self_issued(last):
        raise BundleError(f"cert-chain.pem: ends with the root {_subject(last)}, which root-cert.pem does not hold")
    for root in roots:
        if issued_by(last, root):
            return [*chain, root]
    raise BundleError(
        f"cert-chain.pem: its last certificate ({_subject(last)}) is not issued by any root in root-cert.pem"
    )


def _check_crls(
    crls: Sequence[x509.CertificateRevocationList],
    chain: Sequence[x509.Certificate],
    path: Sequence[x509.Certificate],
    *,
    now: datetime | None,
) -> None:
    signed_by: dict[int, x509.CertificateRevocationList] = {}
    for index, cert in enumerate(path):
        for crl in crls:
            try:
                valid = crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
            except (TypeError, ValueError, UnsupportedAlgorithm):
                valid = False
            if valid:
                signed_by[index] = crl
                break
    missing = [_subject(cert) for index, cert in enumerate(chain) if index not in signed_by]
    if missing:
        raise BundleError(
            f"ca-crl.pem: missing CRL signed by {', '.join(missing)}; istiod needs one from every "
            f"certificate of cert-chain.pem (the intermediate signs its own)"
        )
    for index, cert in enumerate(path[:-1]):
        issuer_crl = signed_by.get(index + 1)
        if issuer_crl is not None and issuer_crl.get_revoked_certificate_by_serial_number(cert.serial_number):
            raise BundleError(f"ca-crl.pem: {_subject(cert)} (serial {cert.serial_number:x}) is revoked by its issuer")
    if now is not None:
        for index, crl in signed_by.items():
            if crl.next_update_utc is not None and crl.next_update_utc < now:
                raise BundleError(
                    f"ca-crl.pem: the CRL signed by {_subject(path[index])} expired at "
                    f"{crl.next_update_utc.isoformat()}; re-sign it"
                )
        for number, crl in enumerate(crls, start=1):
            if crl.next_update_utc is not None and crl.next_update_utc < now:
                raise BundleError(
                    f"ca-crl.pem: CRL {number} (issuer {crl.issuer.rfc4514_string()}) expired at "
                    f"{crl.next_update_utc.isoformat()}; Envoy fails every chain it is picked for"
                )


# --------------------------------------------------------------------------------------------
# The intermediate's own CRL


def _as_cert(value: x509.Certificate | str) -> x509.Certificate:
    return value if isinstance(value, x509.Certificate) else _certs(value, "ca-cert.pem")[0]


def _as_key(value: CertificateIssuerPrivateKeyTypes | str) -> CertificateIssuerPrivateKeyTypes:
    return _load_key(value) if isinstance(value, str) else value


def sign_intermediate_crl(
    ca_cert: x509.Certificate | str,
    ca_key: CertificateIssuerPrivateKeyTypes | str,
    revoked_serials: Iterable[int] = (),
    *,
    now: datetime,
    validity: timedelta = MAX_CRL_VALIDITY,
) -> str:
    """PEM CRL signed by the cluster intermediate (istiod wants one from every CA in the chain).

    lastUpdate is `now` minus a few minutes, nextUpdate `now + validity` (at most 7 days); the
    CRL number is `now` in seconds, so a later CRL always has a larger number.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not timedelta(0) < validity <= MAX_CRL_VALIDITY:
        raise ValueError(f"validity must be more than 0 and at most 7 days (got {validity})")
    return _sign_crl(ca_cert, ca_key, revoked_serials, now=now, next_update=now + validity)


def sign_final_crl(
    ca_cert: x509.Certificate | str,
    ca_key: CertificateIssuerPrivateKeyTypes | str,
    *,
    now: datetime,
    keep_until: datetime,
) -> str:
    """The last CRL a superseded intermediate signs, before its key is dropped: nextUpdate is
    `keep_until`, the end of the time ca-crl.pem keeps it (no re-signing is possible after)."""
    if now.tzinfo is None or keep_until.tzinfo is None:
        raise ValueError("now and keep_until must be timezone-aware")
    if keep_until <= now:
        raise ValueError(f"keep_until must be after now (got {keep_until.isoformat()})")
    return _sign_crl(ca_cert, ca_key, (), now=now, next_update=keep_until)


def _sign_crl(
    ca_cert: x509.Certificate | str,
    ca_key: CertificateIssuerPrivateKeyTypes | str,
    revoked_serials: Iterable[int],
    *,
    now: datetime,
    next_update: datetime,
) -> str:
    cert, key = _as_cert(ca_cert), _as_key(ca_key)
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise BundleError("the key does not belong to the intermediate certificate")
    now = now.astimezone(UTC)
    # The authorityKeyIdentifier tells this CRL from another intermediate's of this cluster: they
    # share the issuer name, and OpenSSL scores same-name CRLs by it (crypto/x509/x509_vfy.c
    # get_crl_sk → get_crl_score → crl_akid_check) before checking the signature.
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cert.subject)
        .last_update(now - CRL_BACKDATE)
        .next_update(next_update.astimezone(UTC))
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
        .add_extension(_authority_key_identifier(cert), critical=False)
    )
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - CRL_BACKDATE).build()
        )
    crl = builder.sign(key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM).decode()


def _authority_key_identifier(cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def crl_needs_resign(crl_pem: str | None, *, now: datetime) -> bool:
    """True when half of the CRL's validity is gone (or there is none): time to sign a new one."""
    if not crl_pem:
        return True
    try:
        crl = x509.load_pem_x509_crl(crl_pem.encode())
    except ValueError:
        return True
    next_update = crl.next_update_utc
    if next_update is None:
        return True
    halfway = crl.last_update_utc + (next_update - crl.last_update_utc) / 2
    return now >= halfway


def compose_ca_crl(root_crls_pem: str, intermediate_crl_pem: str) -> str:
    """Istio's `ca-crl.pem`: the roots' CRLs (`Bundle["crl.pem"]`) followed by the intermediates'
    (the current one's, then the final CRL of each superseded one still kept), each re-encoded
    canonically, duplicates dropped.

    istiod copies the file as is into every namespace's `istio-ca-crl` ConfigMap
    (pilot/pkg/bootstrap/istio_ca.go handleEvent → keycertbundle Watcher.SetAndNotifyCACRL →
    kube/controller/namespacecontroller.go reconcileCACertAndCRL); istio-agent hands it to Envoy as
    the ROOTCA validation context's `crl` (security/pkg/nodeagent/sds/sdsservice.go), and Envoy then
    checks every certificate of a peer's chain with CRL_CHECK|CRL_CHECK_ALL (default_validator.cc
    initializeSslContexts): a workload certificate of a superseded intermediate verifies only while
    that intermediate's CRL is here."""
    out: list[str] = []
    seen: set[bytes] = set()
    sources = [("crl.pem", root_crls_pem), ("intermediate CRL", intermediate_crl_pem)]
    for what, pem in sources:
        if what == "crl.pem" and not pem.strip():
            continue
        for crl in _crls(pem, what):
            der = crl.public_bytes(serialization.Encoding.DER)
            if der not in seen:
                seen.add(der)
                out.append(crl.public_bytes(serialization.Encoding.PEM).decode())
    return "".join(out)


def earliest_next_update(ca_crl_pem: str) -> datetime | None:
    """The earliest nextUpdate of the CRLs in a ca-crl.pem (None when none carries one)."""
    updates = [crl.next_update_utc for crl in _crls(ca_crl_pem, "ca-crl.pem") if crl.next_update_utc is not None]
    return min(updates, default=None)


def bundle_files(bundle: Mapping[str, str]) -> tuple[str, str, str, str]:
    """(ca-cert.pem, cert-chain.pem, root-cert.pem, crl.pem) of an API `Bundle`."""
    try:
        return bundle["ca-cert.pem"], bundle["cert-chain.pem"], bundle["root-cert.pem"], bundle.get("crl.pem", "")
    except KeyError as exc:
        raise BundleError(f"bundle: {exc.args[0]} is missing") from None
