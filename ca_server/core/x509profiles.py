"""The certificate profiles of API.md ("Certificate profiles"), as pure functions.

Nothing here reads a clock, a file or the network: time comes in as ``now`` and keys are used
only through a ``Signer``. Profile decisions worth knowing:

* CA certificates carry no EKU: Envoy (BoringSSL) applies the TLS purpose to CA certificates too,
  and istiod's Go check passes a CA certificate without EKU.
* The root has no pathlen (a root with ``pathlen:0`` breaks every workload chain in Envoy);
  cluster intermediates get ``pathlen:0``.
* A cluster intermediate carries a critical nameConstraints extension permitting the URI subtree
  of its trust domain. For URIs, RFC 5280 compares the host: ``a.mesh`` matches exactly the host
  ``a.mesh`` (a leading ``.`` would mean "subdomains"), and SPIFFE IDs are
  ``spiffe://<trust domain>/…``, so the permitted subtree is the bare trust domain. A URI-only
  constraint does not restrict DNS SANs, so istiod's own DNS certificate keeps working.
* The same extension EXCLUDES the CA service's own names (``excluded_subtrees``: each DNS name,
  which covers the name and its subdomains in OpenSSL/BoringSSL and Go, and each IP address as a
  single-address range), so no cluster intermediate can sign a server certificate for the CA
  service that agents would accept. Names an excluded subtree must never cover are refused by
  ``protectable_name`` (istiod's ``istiod.istio-system.svc`` and workload ``*.svc`` names).
* A root endorsement (``build_endorsement``) is a cross-certificate: the new root's subject and
  key, CA:TRUE, signed by the active root, so an agent that trusts only the older root can prove
  the new one (and a TLS client can chain the CA service's certificate to the older root).
* ``verify_issued`` checks every freshly signed certificate with cryptography's own path
  validator (``x509.verification``) before it is handed out.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from ca_server.core.errors import BadCSR, Conflict, InvalidInput, UnsupportedKey
from ca_server.core.keytypes import Signer

ROOT_VALIDITY = timedelta(days=3652)  # ten years, leap days included
INTERMEDIATE_VALIDITY = timedelta(days=90)
SERVER_CERT_VALIDITY = timedelta(hours=24)
DEFAULT_BACKDATE = timedelta(minutes=5)  # tolerates clocks a little behind the CA's
SERIAL_BYTES = 20  # 159 random bits after clearing the sign bit; RFC 5280 allows 20 octets
ACCEPTED_CSR_KEYS = "ECDSA P-256 or P-384, or RSA with 2048 to 4096 bits and public exponent 65537"
RSA_EXPONENT = 65537  # the only one accepted: a huge exponent makes every verification with the key slow
DEFAULT_TRUST_DOMAIN = "cluster.local"

# RFC 5280 reason names (removeFromCRL only exists in delta CRLs, which we do not issue)
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
_REASONS_BY_LOWER = {name.lower(): name for name in REVOCATION_REASONS}

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_TRUST_DOMAIN = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DNS_NAME = re.compile(r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")
_MAX_DN_VALUE = 64  # ub-common-name, ub-organization-name, ub-organizational-unit-name


class SignedCertificateInvalid(RuntimeError):
    """Internal error: something the CA just signed does not verify. Never shown to clients as-is."""


class RevokedEntry(NamedTuple):
    serial: int
    revoked_at: datetime
    reason: str | None = None


# --- small helpers -------------------------------------------------------------------------


def random_serial() -> int:
    """A positive serial with 159 random bits (20 bytes, top bit cleared)."""
    while True:
        raw = bytearray(os.urandom(SERIAL_BYTES))
        raw[0] &= 0x7F
        serial = int.from_bytes(raw, "big")
        if serial:
            return serial


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def serial_hex(cert: x509.Certificate | int) -> str:
    """Lowercase hex, no separators, no leading zeros (the API's serial format)."""
    serial = cert if isinstance(cert, int) else cert.serial_number
    return format(serial, "x")


def parse_serial_hex(text: str) -> int:
    """The inverse of ``serial_hex``; InvalidInput for anything that is not 1-40 hex digits."""
    if not re.fullmatch(r"[0-9a-fA-F]{1,40}", text):
        raise InvalidInput("serial must be 1 to 40 hexadecimal digits")
    return int(text, 16)


def load_pem_certificates(text: str | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order; InvalidInput if none or malformed."""
    data = text.encode() if isinstance(text, str) else text
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InvalidInput("expected one or more PEM certificates") from None


def public_key_fingerprint(public_key: PublicKeyTypes) -> str:
    """SHA-256 of the SubjectPublicKeyInfo DER, lowercase hex (finds a certificate by its key)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())  # immutable; built once instead of per check


def verify_proof(public_key: object, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``data`` was made by ``public_key`` (ECDSA DER or RSA PKCS#1
    v1.5, both SHA-256). False for any failure, never raises on bad input."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, _ECDSA_SHA256)
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def validate_trust_domain(trust_domain: str) -> str:
    """A SPIFFE trust domain: lowercase letters, digits, '-', '_' and dots, at most 255 chars."""
    if len(trust_domain) > 255 or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise InvalidInput(
            "trust domain must be lowercase letters, digits, '-', '_' in dot-separated labels "
            "(at most 255 characters), e.g. 'a.mesh'"
        )
    return trust_domain


def parse_revocation_reason(name: str) -> str:
    """The RFC 5280 spelling of a reason name given in any case; InvalidInput if unknown."""
    canonical = _REASONS_BY_LOWER.get(name.lower())
    if canonical is None:
        raise InvalidInput(f"unknown revocation reason; accepted: {', '.join(REVOCATION_REASONS)}")
    return canonical


def _dn_value(value: str, what: str) -> str:
    if not 0 < len(value) <= _MAX_DN_VALUE or not value.isprintable():
        raise InvalidInput(f"{what} must be 1 to {_MAX_DN_VALUE} printable characters")
    return value


def default_root_subject(org: str, *, label: str | None = None) -> x509.Name:
    """``O=<org>, CN=meshbridge root CA[ <label>]``. Give each root a distinct ``label`` (an id or
    a date) so two roots in one trust bundle never share a subject."""
    common_name = "meshbridge root CA" + (f" {label}" if label else "")
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _dn_value(org, "organization")),
            x509.NameAttribute(NameOID.COMMON_NAME, _dn_value(common_name, "root label")),
        ]
    )


@functools.lru_cache(maxsize=4096)  # a pure function of its arguments; x509.Name is immutable
def intermediate_subject(cluster: str, trust_domain: str, org: str) -> x509.Name:
    """``O=<org>, OU=<trust domain>, CN=<cluster>`` (OU left out when the trust domain is too long)."""
    if not _DNS_LABEL.fullmatch(cluster):
        raise InvalidInput("cluster name must be a DNS label")
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, _dn_value(org, "organization"))]
    if len(validate_trust_domain(trust_domain)) <= _MAX_DN_VALUE:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cluster))
    return x509.Name(attributes)


def _require_aware(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value


def _validity_window(
    issuer: x509.Certificate, now: datetime, validity: timedelta, backdate: timedelta
) -> tuple[datetime, datetime]:
    """[now - backdate, now + validity], kept inside the issuer's own validity."""
    _require_aware(now, "now")
    not_before = max(now - backdate, issuer.not_valid_before_utc)
    not_after = min(now + validity, issuer.not_valid_after_utc)
    if not_after <= now or not_after <= not_before:
        raise Conflict("the issuing CA certificate has expired or is not yet valid")
    return not_before, not_after


@functools.lru_cache(maxsize=64)  # per issuing CA certificate (hashable, immutable)
def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_ca_public_key(issuer.public_key()))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_public_key(public_key: object) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """``public_key`` if it is acceptable for a CA certificate, else UnsupportedKey."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name in ("secp256r1", "secp384r1"):
            return public_key
    elif isinstance(public_key, rsa.RSAPublicKey):
        exponent_ok = public_key.public_numbers().e == RSA_EXPONENT
        if 2048 <= public_key.key_size <= 4096 and exponent_ok:
            return public_key
    raise UnsupportedKey(f"unsupported key {_describe_key(public_key)}; accepted: {ACCEPTED_CSR_KEYS}")


def _describe_key(public_key: object) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ECDSA {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        odd = public_key.public_numbers().e != RSA_EXPONENT
        return f"RSA {public_key.key_size} bits" + (" with a public exponent other than 65537" if odd else "")
    return type(public_key).__name__.removesuffix("PublicKey").removeprefix("_") or "of unknown type"


def _builder(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


# --- profiles ------------------------------------------------------------------------------


def build_root(
    signer: Signer,
    *,
    subject: x509.Name,
    now: datetime,
    validity: timedelta = ROOT_VALIDITY,
    backdate: timedelta = DEFAULT_BACKDATE,
) -> x509.Certificate:
    """Self-signed root: BC CA:TRUE (no pathlen), KU keyCertSign+cRLSign+digitalSignature, SKI."""
    _require_aware(now, "now")
    builder = (
        _builder(
            subject=subject,
            issuer=subject,
            public_key=signer.public_key(),
            not_before=now - backdate,
            not_after=now + validity,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
    )
    return signer.sign_certificate(builder)


def parse_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """A PKCS#10 CSR (PEM or DER) with a valid self-signature and an acceptable key."""
    return parse_csr_and_key(pem)[0]


def parse_csr_and_key(pem: str | bytes) -> tuple[x509.CertificateSigningRequest, PublicKeyTypes]:
    """``parse_csr``, and the CSR's public key it checked (each ``csr.public_key()`` parses it anew)."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError:
        raise BadCSR("not a PEM or DER PKCS#10 certificate signing request") from None
    try:
        public_key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError):
        raise UnsupportedKey(f"unsupported CSR key; accepted: {ACCEPTED_CSR_KEYS}") from None
    _ca_public_key(public_key)
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError):
        valid = False
    if not valid:
        raise BadCSR("the CSR's signature does not verify with its public key")
    return csr, public_key


def issue_intermediate(
    *,
    csr: x509.CertificateSigningRequest,
    issuer: x509.Certificate,
    signer: Signer,
    subject: x509.Name,
    trust_domain: str,
    now: datetime,
    validity: timedelta = INTERMEDIATE_VALIDITY,
    backdate: timedelta = DEFAULT_BACKDATE,
    csr_key: PublicKeyTypes | None = None,
    excluded_names: Sequence[str] = (),
) -> x509.Certificate:
    """A cluster intermediate for the CSR's key. Only the key is taken from the CSR: subject and
    extensions are the CA's (pathlen 0, nameConstraints permitting ``trust_domain`` and excluding
    ``excluded_names``, the CA service's own DNS names and IPs). ``csr_key``: the CSR's public key
    when the caller already holds it (each ``csr.public_key()`` parses it again)."""
    public_key = _ca_public_key(csr_key if csr_key is not None else csr.public_key())
    name_constraints = _intermediate_name_constraints(trust_domain, tuple(excluded_names))
    not_before, not_after = _validity_window(issuer, now, validity, backdate)
    builder = (
        _builder(
            subject=subject,
            issuer=issuer.subject,
            public_key=public_key,
            not_before=not_before,
            not_after=not_after,
        )
        .add_extension(_INTERMEDIATE_BASIC_CONSTRAINTS, critical=True)
        .add_extension(_CA_KEY_USAGE_ENCODED, critical=True)
        .add_extension(_encoded_authority_key_identifier(issuer), critical=False)
        .add_extension(name_constraints, critical=True)
    )
    return signer.sign_certificate(builder)


# A renewal's intermediate carries the same extensions as the cluster's last one, apart from its
# key identifier: they are encoded once (``_encoded``). Given typed, ``CertificateBuilder.sign``
# checked and encoded them at every signing, with the trust domain validated and the CA service's
# names parsed again: 220 us per intermediate against 110 us encoded (this VM), all of it holding
# the interpreter lock that the renewals' event loop and group commit share (bench/RESULTS.md).
def _encoded(value: x509.ExtensionType) -> x509.UnrecognizedExtension:
    """``value`` as its DER encoding (``ExtensionType.public_bytes``), which the builder copies as is
    under the same OID: the certificate's bytes are those the typed value gives."""
    return x509.UnrecognizedExtension(value.oid, value.public_bytes())


_INTERMEDIATE_BASIC_CONSTRAINTS = _encoded(x509.BasicConstraints(ca=True, path_length=0))
_CA_KEY_USAGE_ENCODED = _encoded(_CA_KEY_USAGE)


@functools.lru_cache(maxsize=64)  # per issuing CA certificate
def _encoded_authority_key_identifier(issuer: x509.Certificate) -> x509.UnrecognizedExtension:
    return _encoded(_authority_key_identifier(issuer))


@functools.lru_cache(maxsize=16_384)  # per trust domain (a cluster's own, usually) and CA service names
def _intermediate_name_constraints(trust_domain: str, excluded_names: tuple[str, ...]) -> x509.UnrecognizedExtension:
    """nameConstraints permitting ``trust_domain`` and excluding ``excluded_names``, encoded;
    InvalidInput (not cached) for a bad trust domain or name."""
    return _encoded(
        x509.NameConstraints(
            permitted_subtrees=[x509.UniformResourceIdentifier(validate_trust_domain(trust_domain))],
            excluded_subtrees=excluded_subtrees(excluded_names) or None,
        )
    )


# Names the cluster intermediates must keep signing: istiod's serving certificate and the DNS
# certificates workloads ask for. An excluded subtree covering one of them would break the mesh.
_MESH_DNS_NAMES = (
    "istiod.istio-system.svc",
    "istiod.istio-system.svc.cluster.local",
    "x.x.svc",
    "x.x.svc.cluster.local",
)


def protectable_name(name: str) -> str:
    """``name`` (a DNS name or an IP address) in the canonical form kept in the store: lowercase,
    no trailing dot, IPs compressed. InvalidInput for anything else, and for a DNS name whose
    excluded subtree would also exclude istiod's or workloads' names (e.g. ``svc`` or
    ``cluster.local``)."""
    try:
        return str(ip_address(name))
    except ValueError:
        pass
    dns_name = name.rstrip(".").lower()
    if len(dns_name) > 253 or not _DNS_NAME.fullmatch(dns_name) or dns_name.startswith("*"):
        raise InvalidInput(f"not a DNS name or IP address: {name[:64]!r}")
    for mesh_name in _MESH_DNS_NAMES:
        if mesh_name == dns_name or mesh_name.endswith("." + dns_name):
            raise InvalidInput(
                f"the CA service's name {dns_name!r} would exclude {mesh_name!r} from every cluster "
                "intermediate; serve the CA under a name of its own"
            )
    return dns_name


def excluded_subtrees(names: Sequence[str]) -> list[x509.GeneralName]:
    """The excluded subtrees that keep ``names`` (DNS names or IPs) out of an intermediate's reach:
    a DNSName subtree per name (the name and its subdomains), an address/32 or /128 per IP."""
    subtrees: list[x509.GeneralName] = []
    for name in sorted(dict.fromkeys(protectable_name(n) for n in names)):
        try:
            address = ip_address(name)
        except ValueError:
            subtrees.append(x509.DNSName(name))
            continue
        network: IPv4Network | IPv6Network = ip_network(address)
        subtrees.append(x509.IPAddress(network))
    return subtrees


def build_endorsement(
    *,
    root: x509.Certificate,
    issuer: x509.Certificate,
    signer: Signer,
    now: datetime,
    backdate: timedelta = DEFAULT_BACKDATE,
) -> x509.Certificate:
    """A cross-certificate of ``root`` by ``issuer`` (the active root): the same subject, key and
    CA extensions as ``root``, valid at most as long as both, signed by ``signer``."""
    public_key = _ca_public_key(root.public_key())
    not_before = max(now - backdate, issuer.not_valid_before_utc, root.not_valid_before_utc)
    not_after = min(root.not_valid_after_utc, issuer.not_valid_after_utc)
    if not_after <= now:
        raise Conflict("the endorsing root has expired")
    builder = (
        _builder(
            subject=root.subject,
            issuer=issuer.subject,
            public_key=public_key,
            not_before=not_before,
            not_after=not_after,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(_authority_key_identifier(issuer), critical=False)
    )
    return signer.sign_certificate(builder)


def issue_server_cert(
    *,
    issuer: x509.Certificate,
    signer: Signer,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    dns_names: Sequence[str],
    ip_addresses: Sequence[IPv4Address | IPv6Address],
    now: datetime,
    validity: timedelta = SERVER_CERT_VALIDITY,
    backdate: timedelta = DEFAULT_BACKDATE,
) -> x509.Certificate:
    """The CA service's own TLS certificate: not a CA, EKU serverAuth, the given SANs."""
    names = _server_names(dns_names, ip_addresses)
    public_key = _ca_public_key(public_key)
    not_before, not_after = _validity_window(issuer, now, validity, backdate)
    key_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(public_key, rsa.RSAPublicKey),  # TLS 1.2 RSA key exchange
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        _builder(
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshbridge CA service")]),
            issuer=issuer.subject,
            public_key=public_key,
            not_before=not_before,
            not_after=not_after,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(_authority_key_identifier(issuer), critical=False)
    )
    return signer.sign_certificate(builder)


def _server_names(
    dns_names: Sequence[str], ip_addresses: Sequence[IPv4Address | IPv6Address]
) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for dns_name in dict.fromkeys(dns_names):
        if len(dns_name) > 253 or not _DNS_NAME.fullmatch(dns_name):
            raise InvalidInput(f"not a DNS name: {dns_name[:64]!r}")
        names.append(x509.DNSName(dns_name.rstrip(".").lower()))
    names.extend(x509.IPAddress(ip) for ip in dict.fromkeys(ip_addresses))
    if not names:
        raise InvalidInput("a server certificate needs at least one DNS name or IP address")
    return names


def build_crl(
    *,
    issuer: x509.Certificate,
    signer: Signer,
    revoked: Sequence[RevokedEntry],
    now: datetime,
    next_update: timedelta,
    crl_number: int,
) -> x509.CertificateRevocationList:
    """A CRL of ``revoked`` by ``issuer``: AKI, CRL number, a reasonCode per entry unless the
    reason is absent or ``unspecified`` (RFC 5280 5.3.1: omit rather than say unspecified)."""
    _require_aware(now, "now")
    if next_update <= timedelta(0):
        raise InvalidInput("next_update must be positive")
    if not 0 <= crl_number < 1 << 159:
        raise InvalidInput("CRL number must be a non-negative integer of at most 20 octets")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now)
        .next_update(now + next_update)
        .add_extension(_authority_key_identifier(issuer), critical=False)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(_revoked_certificate(entry))
    return signer.sign_crl(builder)


def _revoked_certificate(entry: RevokedEntry) -> x509.RevokedCertificate:
    if entry.serial <= 0:
        raise InvalidInput("revoked serial numbers must be positive")
    builder = (
        x509.RevokedCertificateBuilder()
        .serial_number(entry.serial)
        .revocation_date(_require_aware(entry.revoked_at, "revoked_at"))
    )
    if entry.reason is not None:
        flag = REVOCATION_REASONS[parse_revocation_reason(entry.reason)]
        if flag is not x509.ReasonFlags.unspecified:
            builder = builder.add_extension(x509.CRLReason(flag), critical=False)
    return builder.build()


# --- verification of what was signed -------------------------------------------------------


def _require_ca(_policy: Policy, _cert: x509.Certificate, value: x509.BasicConstraints) -> None:
    if not value.ca:
        raise ValueError("basicConstraints must assert CA:TRUE")


def _require_cert_sign(_policy: Policy, _cert: x509.Certificate, value: x509.KeyUsage) -> None:
    if not value.key_cert_sign:
        raise ValueError("keyUsage must include keyCertSign")


# The certificate under test is a CA, so the usual end-entity policy (which forbids CA:TRUE)
# does not fit: accept any extension, but demand the CA essentials.
_ISSUED_CA_POLICY = (
    ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, Criticality.CRITICAL, _require_ca)
    .require_present(x509.KeyUsage, Criticality.CRITICAL, _require_cert_sign)
)
_ISSUED_LEAF_POLICY = ExtensionPolicy.permit_all()
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()


class ChainVerifier:
    """Path validation against a fixed set of roots; build once per root set, reuse freely."""

    def __init__(self, roots: Sequence[x509.Certificate]) -> None:
        if not roots:
            raise ValueError("ChainVerifier needs at least one root")
        self._store = Store(list(roots))

    def verify(
        self,
        cert: x509.Certificate,
        now: datetime,
        intermediates: Sequence[x509.Certificate] = (),
        *,
        expect_ca: bool = True,
    ) -> list[x509.Certificate]:
        """The validated chain, ``cert`` first; SignedCertificateInvalid if there is none."""
        policy = _ISSUED_CA_POLICY if expect_ca else _ISSUED_LEAF_POLICY
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(_require_aware(now, "now"))
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=policy)
            .build_client_verifier()
        )
        try:
            chain = verifier.verify(cert, list(intermediates)).chain
            if cert.issuer == cert.subject and len(chain) == 1:
                cert.verify_directly_issued_by(cert)  # a trust anchor is not checked otherwise
        except (VerificationError, InvalidSignature, ValueError, TypeError) as exc:
            raise SignedCertificateInvalid(
                f"certificate {serial_hex(cert)} does not verify against the trusted roots: {exc}"
            ) from exc
        return chain


def verify_issued(
    cert: x509.Certificate,
    *,
    roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    now: datetime,
) -> None:
    """Check that a freshly signed CA certificate chains to one of ``roots`` at ``now``.
    For many checks against the same roots, keep a ``ChainVerifier`` instead."""
    ChainVerifier(roots).verify(cert, now, intermediates)
