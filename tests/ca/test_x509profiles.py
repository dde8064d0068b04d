"""The certificate profiles, judged by OpenSSL, Go and pkilint as well as by cryptography."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from ca_server.core import x509profiles as xp
from ca_server.core.errors import BadCSR, Conflict, InvalidInput, UnsupportedKey
from ca_server.core.keytypes import ROOT_KEY_TYPES, KeyType, LocalKeySigner, generate_private_key
from tests.ca import certcheck

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ORG = "Example Mesh"
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

requires_go = pytest.mark.skipif(certcheck.GO is None, reason="needs a Go toolchain")


@functools.cache
def signer_of(key_type: KeyType) -> LocalKeySigner:
    """One root key per type for the whole module (RSA 4096 generation is slow)."""
    return LocalKeySigner(generate_private_key(key_type))


@functools.cache
def root_of(key_type: KeyType) -> x509.Certificate:
    return xp.build_root(signer_of(key_type), subject=xp.default_root_subject(ORG, label=key_type), now=NOW)


@functools.cache
def csr_key(kind: str) -> PrivateKey:
    keys: dict[str, PrivateKey] = {
        "ecdsa-p256": ec.generate_private_key(ec.SECP256R1()),
        "ecdsa-p384": ec.generate_private_key(ec.SECP384R1()),
        "rsa-2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa-4096": rsa.generate_private_key(public_exponent=65537, key_size=4096),
    }
    return keys[kind]


def make_csr(
    key: PrivateKey | ed25519.Ed25519PrivateKey | dsa.DSAPrivateKey,
    *,
    subject: x509.Name | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "requested")])
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def issue(
    root_type: KeyType = KeyType.ECDSA_P256,
    csr_kind: str = "ecdsa-p256",
    *,
    trust_domain: str = "a.mesh",
    now: datetime = NOW,
    csr: x509.CertificateSigningRequest | None = None,
) -> x509.Certificate:
    return xp.issue_intermediate(
        csr=csr or make_csr(csr_key(csr_kind)),
        issuer=root_of(root_type),
        signer=signer_of(root_type),
        subject=xp.intermediate_subject("a", trust_domain, ORG),
        trust_domain=trust_domain,
        now=now,
    )


def workload_cert(
    intermediate: x509.Certificate,
    intermediate_key: PrivateKey,
    *,
    uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    now: datetime = NOW,
) -> x509.Certificate:
    """A leaf shaped like istiod's workload certificates (empty subject, critical SAN)."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns_names]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(intermediate.subject)
        .public_key(key.public_key())
        .serial_number(xp.random_serial())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=24))
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(intermediate_key.public_key()), False)
        .sign(intermediate_key, hashes.SHA256())
    )


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, cls: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(cls)


# --- roots -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", sorted(ROOT_KEY_TYPES))
def test_root_profile_passes_pkilint_openssl_and_go(key_type: KeyType, tmp_path: Path) -> None:
    root = root_of(key_type)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert ext(root, x509.BasicConstraints).value == x509.BasicConstraints(ca=True, path_length=None)
    ku = ext(root, x509.KeyUsage)
    assert ku.critical and ku.value == xp._CA_KEY_USAGE
    assert ext(root, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        signer_of(key_type).public_key()
    )
    with pytest.raises(x509.ExtensionNotFound):
        root.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert root.signature_hash_algorithm is not None and root.signature_hash_algorithm.name == "sha256"
    assert root.not_valid_after_utc - root.not_valid_before_utc == xp.ROOT_VALIDITY + xp.DEFAULT_BACKDATE
    root.verify_directly_issued_by(root)

    assert certcheck.pkilint_errors(certcheck.pem_of(root), f"{key_type} root") == []
    result = certcheck.openssl_verify_certs(tmp_path, root, roots=[root], attime=NOW)
    assert result.ok, result.output
    xp.verify_issued(root, roots=[root], now=NOW)


@requires_go
def test_root_verifies_with_go(tmp_path: Path) -> None:
    root = root_of(KeyType.ECDSA_P384)
    result = certcheck.go_verify(tmp_path, root, roots=[root], at=NOW)
    assert result.ok, result.output


# --- intermediates ---------------------------------------------------------------------------

# every root type, and every accepted CSR key type at least once
INTERMEDIATE_CASES = [
    (KeyType.ECDSA_P256, "ecdsa-p256"),
    (KeyType.ECDSA_P384, "ecdsa-p384"),
    (KeyType.RSA_3072, "rsa-2048"),
    (KeyType.RSA_4096, "rsa-4096"),
    (KeyType.ECDSA_P256, "rsa-2048"),
    (KeyType.RSA_3072, "ecdsa-p384"),
]


@pytest.mark.parametrize(("root_type", "csr_kind"), INTERMEDIATE_CASES)
def test_intermediate_profile_passes_pkilint_and_openssl(root_type: KeyType, csr_kind: str, tmp_path: Path) -> None:
    root = root_of(root_type)
    inter = issue(root_type, csr_kind)

    assert ext(inter, x509.BasicConstraints).critical
    assert ext(inter, x509.BasicConstraints).value == x509.BasicConstraints(ca=True, path_length=0)
    assert ext(inter, x509.KeyUsage).critical and ext(inter, x509.KeyUsage).value == xp._CA_KEY_USAGE
    nc = ext(inter, x509.NameConstraints)
    assert nc.critical
    assert nc.value == x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier("a.mesh")], excluded_subtrees=None
    )
    assert ext(inter, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        csr_key(csr_kind).public_key()
    )
    aki = ext(inter, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(root, x509.SubjectKeyIdentifier).value.digest
    assert {e.oid for e in inter.extensions} == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.NAME_CONSTRAINTS,
    }
    assert inter.signature_hash_algorithm is not None and inter.signature_hash_algorithm.name == "sha256"
    assert inter.issuer == root.subject
    inter.verify_directly_issued_by(root)

    assert certcheck.pkilint_errors(certcheck.pem_of(inter), f"intermediate {csr_kind} under {root_type}") == []
    result = certcheck.openssl_verify_certs(tmp_path, inter, roots=[root], attime=NOW)
    assert result.ok, result.output
    xp.verify_issued(inter, roots=[root], now=NOW)


@requires_go
@pytest.mark.parametrize(("root_type", "csr_kind"), INTERMEDIATE_CASES[:3])
def test_intermediate_passes_go_verify_like_istiod(root_type: KeyType, csr_kind: str, tmp_path: Path) -> None:
    result = certcheck.go_verify(tmp_path, issue(root_type, csr_kind), roots=[root_of(root_type)], at=NOW)
    assert result.ok, result.output


def test_intermediate_default_validity_and_backdate() -> None:
    inter = issue()
    assert inter.not_valid_before_utc == NOW - xp.DEFAULT_BACKDATE
    assert inter.not_valid_after_utc == NOW + timedelta(days=90)


def test_intermediate_validity_is_capped_at_the_issuer_not_after(tmp_path: Path) -> None:
    root = root_of(KeyType.ECDSA_P256)
    near_expiry = root.not_valid_after_utc - timedelta(days=30)
    inter = issue(now=near_expiry)
    assert inter.not_valid_after_utc == root.not_valid_after_utc
    assert inter.not_valid_before_utc == near_expiry - xp.DEFAULT_BACKDATE
    result = certcheck.openssl_verify_certs(tmp_path, inter, roots=[root], attime=near_expiry)
    assert result.ok, result.output
    xp.verify_issued(inter, roots=[root], now=near_expiry)
    # one second past the root, the chain is dead for every verifier
    after = certcheck.openssl_verify_certs(
        tmp_path, inter, roots=[root], attime=root.not_valid_after_utc + timedelta(seconds=1)
    )
    assert not after.ok and "expired" in after.output


def test_intermediate_never_starts_before_the_issuer() -> None:
    root = root_of(KeyType.ECDSA_P256)
    inter = issue(now=root.not_valid_before_utc + timedelta(minutes=1))
    assert inter.not_valid_before_utc == root.not_valid_before_utc


def test_issuing_from_an_expired_root_is_refused() -> None:
    root = root_of(KeyType.ECDSA_P256)
    with pytest.raises(Conflict, match="expired"):
        issue(now=root.not_valid_after_utc + timedelta(seconds=1))


def test_csr_subject_and_extensions_are_ignored() -> None:
    key = csr_key("ecdsa-p256")
    csr = make_csr(
        key,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "please make me a root")]),
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=5), True),
            (
                x509.SubjectAlternativeName(
                    [x509.DNSName("evil.example"), x509.UniformResourceIdentifier("spiffe://b.mesh/x")]
                ),
                False,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
            (
                x509.NameConstraints(
                    permitted_subtrees=[x509.UniformResourceIdentifier("b.mesh")], excluded_subtrees=None
                ),
                True,
            ),
        ],
    )
    inter = issue(csr=xp.parse_csr(csr_pem(csr)))
    assert inter.subject == xp.intermediate_subject("a", "a.mesh", ORG)
    assert ext(inter, x509.BasicConstraints).value.path_length == 0
    for absent in (x509.SubjectAlternativeName, x509.ExtendedKeyUsage):
        with pytest.raises(x509.ExtensionNotFound):
            inter.extensions.get_extension_for_class(absent)
    assert ext(inter, x509.NameConstraints).value.permitted_subtrees == [x509.UniformResourceIdentifier("a.mesh")]
    assert inter.public_key() == key.public_key()


@pytest.mark.parametrize("root_type", [KeyType.ECDSA_P256, KeyType.RSA_3072])
def test_an_intermediate_is_byte_for_byte_what_its_typed_extensions_give(root_type: KeyType) -> None:
    """The intermediate's extensions are encoded once and copied (``_encoded``): its to-be-signed
    bytes must be exactly those the builder gives the typed extensions, each name constraint too,
    and another trust domain or excluded name must not be answered from the cache of the first."""
    key = csr_key("ecdsa-p256")
    issuer = root_of(root_type)
    for trust_domain, excluded in [("a.mesh", ()), ("a.mesh", ("ca.example.com", "10.0.0.7")), ("b.mesh", ("::1",))]:
        cert = xp.issue_intermediate(
            csr=make_csr(key),
            issuer=issuer,
            signer=signer_of(root_type),
            subject=xp.intermediate_subject("a", trust_domain, ORG),
            trust_domain=trust_domain,
            now=NOW,
            excluded_names=excluded,
        )
        constraints = x509.NameConstraints(
            permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
            excluded_subtrees=xp.excluded_subtrees(excluded) or None,
        )
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        typed = signer_of(root_type).sign_certificate(
            x509.CertificateBuilder()
            .subject_name(cert.subject)
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(cert.serial_number)
            .not_valid_before(cert.not_valid_before_utc)
            .not_valid_after(cert.not_valid_after_utc)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .add_extension(constraints, critical=True)
        )
        assert cert.tbs_certificate_bytes == typed.tbs_certificate_bytes, (trust_domain, excluded)
        assert ext(cert, x509.NameConstraints).value == constraints


def test_intermediate_rejects_a_bad_trust_domain() -> None:
    with pytest.raises(InvalidInput, match="trust domain"):
        issue(trust_domain="spiffe://a.mesh")
    with pytest.raises(InvalidInput, match="trust domain"):
        issue(trust_domain="A.Mesh")


def test_serials_are_random_positive_and_at_least_120_bits() -> None:
    serials = [xp.random_serial() for _ in range(5000)]
    assert all(0 < s < 1 << 159 for s in serials)
    assert min(s.bit_length() for s in serials) >= 120
    assert len(set(serials)) == len(serials)
    certs = [issue() for _ in range(100)]
    assert min(c.serial_number.bit_length() for c in certs) >= 120
    assert len({c.serial_number for c in certs}) == 100


# --- name constraints as real verifiers see them ---------------------------------------------


@pytest.fixture(scope="module")
def mesh_a() -> tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Root, cluster a's intermediate (trust domain a.mesh) and the intermediate's key."""
    key = ec.generate_private_key(ec.SECP256R1())
    inter = issue(csr=make_csr(key))
    return root_of(KeyType.ECDSA_P256), inter, key


WORKLOAD_CASES = [
    # (URI SANs, DNS SANs, accepted?)
    (["spiffe://a.mesh/ns/x/sa/y"], [], True),
    (["spiffe://b.mesh/ns/x/sa/y"], [], False),
    (["spiffe://a.mesh/ns/x/sa/y", "spiffe://b.mesh/ns/x/sa/y"], [], False),
    ([], ["istiod.istio-system.svc"], True),  # a URI-only constraint does not cover DNS SANs
    (["spiffe://a.mesh/ns/istio-system/sa/istiod"], ["istiod.istio-system.svc"], True),
]


@pytest.mark.parametrize(("uris", "dns_names", "accepted"), WORKLOAD_CASES)
def test_openssl_enforces_the_uri_name_constraint(
    mesh_a: tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey],
    uris: list[str],
    dns_names: list[str],
    accepted: bool,
    tmp_path: Path,
) -> None:
    root, inter, key = mesh_a
    leaf = workload_cert(inter, key, uris=uris, dns_names=dns_names)
    result = certcheck.openssl_verify_certs(tmp_path, leaf, roots=[root], intermediates=[inter], attime=NOW)
    assert result.ok is accepted, result.output
    if not accepted:
        assert "permitted subtree violation" in result.output


@requires_go
@pytest.mark.parametrize(("uris", "dns_names", "accepted"), WORKLOAD_CASES)
def test_go_enforces_the_uri_name_constraint(
    mesh_a: tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey],
    uris: list[str],
    dns_names: list[str],
    accepted: bool,
    tmp_path: Path,
) -> None:
    root, inter, key = mesh_a
    leaf = workload_cert(inter, key, uris=uris, dns_names=dns_names)
    result = certcheck.go_verify(tmp_path, leaf, roots=[root], intermediates=[inter], at=NOW)
    assert result.ok is accepted, result.output
    if not accepted:
        assert "not permitted by any constraint" in result.output


def test_subdomain_identities_differ_between_openssl_and_go(
    mesh_a: tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey], tmp_path: Path
) -> None:
    """RFC 5280: URI constraint ``a.mesh`` is that host only. OpenSSL (and BoringSSL, Envoy's
    library, which inherited this code) follow it; Go treats it like a DNS constraint and also
    accepts ``x.a.mesh``. So trust domains nested inside another cluster's are not isolated in Go."""
    root, inter, key = mesh_a
    leaf = workload_cert(inter, key, uris=["spiffe://x.a.mesh/ns/x/sa/y"])
    result = certcheck.openssl_verify_certs(tmp_path, leaf, roots=[root], intermediates=[inter], attime=NOW)
    assert not result.ok and "permitted subtree violation" in result.output
    if certcheck.GO is not None:
        assert certcheck.go_verify(tmp_path, leaf, roots=[root], intermediates=[inter], at=NOW).ok


# --- CSRs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-4096"])
def test_parse_csr_accepts_the_profile_keys_in_pem_der_and_str(kind: str) -> None:
    csr = make_csr(csr_key(kind))
    assert xp.parse_csr(csr_pem(csr)).public_key() == csr_key(kind).public_key()
    assert xp.parse_csr(csr_pem(csr).decode()) == csr
    assert xp.parse_csr(csr.public_bytes(serialization.Encoding.DER)) == csr


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        "not a csr at all",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        b"\x30\x03\x02\x01\x01",
    ],
)
def test_parse_csr_rejects_malformed_input(data: bytes | str) -> None:
    with pytest.raises(BadCSR, match="not a PEM or DER PKCS#10"):
        xp.parse_csr(data)


def test_parse_csr_rejects_a_certificate_in_place_of_a_csr() -> None:
    with pytest.raises(BadCSR, match="not a PEM or DER PKCS#10"):
        xp.parse_csr(certcheck.pem_of(root_of(KeyType.ECDSA_P256)))


def test_parse_csr_rejects_a_tampered_csr() -> None:
    csr = make_csr(csr_key("ecdsa-p256"), subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aaaaaaaa")]))
    der = csr.public_bytes(serialization.Encoding.DER)
    tampered = der.replace(b"aaaaaaaa", b"bbbbbbbb")
    assert tampered != der
    with pytest.raises(BadCSR, match="signature does not verify"):
        xp.parse_csr(tampered)


@pytest.mark.parametrize(
    ("make_key", "described"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "RSA 1024 bits"),  # noqa: S505
        (ed25519.Ed25519PrivateKey.generate, "Ed25519"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "ECDSA secp521r1"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "ECDSA secp256k1"),
        (lambda: dsa.generate_private_key(key_size=2048), "DSA"),
    ],
)
def test_parse_csr_rejects_keys_outside_the_profile(make_key: object, described: str) -> None:
    key = make_key()  # type: ignore[operator]
    with pytest.raises(UnsupportedKey, match=rf"{described}.*accepted: ECDSA P-256 or P-384, or RSA with 2048"):
        xp.parse_csr(csr_pem(make_csr(key)))


# --- server certificate ----------------------------------------------------------------------


def test_server_certificate(tmp_path: Path) -> None:
    root = root_of(KeyType.ECDSA_P256)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = xp.issue_server_cert(
        issuer=root,
        signer=signer_of(KeyType.ECDSA_P256),
        public_key=key.public_key(),
        dns_names=["ca.meshbridge.svc", "localhost", "localhost"],
        ip_addresses=[ip_address("127.0.0.1"), ip_address("::1")],
        now=NOW,
    )
    assert ext(cert, x509.BasicConstraints).value.ca is False
    assert ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ca.meshbridge.svc", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1"), ip_address("::1")]
    assert cert.not_valid_after_utc == NOW + timedelta(hours=24)
    # pkilint checks dNSName with the `validators` package, which wants a TLD: single-label
    # names such as "localhost" (a real listen host) are flagged although RFC 5280 allows them
    errors = certcheck.pkilint_errors(certcheck.pem_of(cert), "server certificate")
    assert [e for e in errors if '"localhost"' not in e] == []
    result = certcheck.openssl_verify_certs(
        tmp_path,
        cert,
        roots=[root],
        attime=NOW,
        extra=["-purpose", "sslserver", "-verify_hostname", "localhost"],
    )
    assert result.ok, result.output
    xp.ChainVerifier([root]).verify(cert, NOW, expect_ca=False)
    with pytest.raises(xp.SignedCertificateInvalid, match="CA:TRUE"):
        xp.verify_issued(cert, roots=[root], now=NOW)


def test_server_certificate_needs_a_name() -> None:
    with pytest.raises(InvalidInput, match="at least one"):
        xp.issue_server_cert(
            issuer=root_of(KeyType.ECDSA_P256),
            signer=signer_of(KeyType.ECDSA_P256),
            public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
            dns_names=[],
            ip_addresses=[],
            now=NOW,
        )
    with pytest.raises(InvalidInput, match="not a DNS name"):
        xp.issue_server_cert(
            issuer=root_of(KeyType.ECDSA_P256),
            signer=signer_of(KeyType.ECDSA_P256),
            public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
            dns_names=["bad name"],
            ip_addresses=[],
            now=NOW,
        )


# --- CRLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("root_type", [KeyType.ECDSA_P256, KeyType.RSA_3072])
def test_crl_is_signed_by_the_issuer_and_lists_entries_and_reasons(root_type: KeyType, tmp_path: Path) -> None:
    root = root_of(root_type)
    revoked_at = NOW - timedelta(hours=1)
    entries = [
        xp.RevokedEntry(0x1234, revoked_at, "keyCompromise"),
        xp.RevokedEntry(0xABCDEF, revoked_at, "superseded"),
        xp.RevokedEntry(0x42, revoked_at, "CessationOfOperation"),
        xp.RevokedEntry(0x43, revoked_at, "unspecified"),
        xp.RevokedEntry(0x44, revoked_at, None),
    ]
    crl = xp.build_crl(
        issuer=root,
        signer=signer_of(root_type),
        revoked=entries,
        now=NOW,
        next_update=timedelta(days=7),
        crl_number=17,
    )
    parsed = x509.load_der_x509_crl(crl.public_bytes(serialization.Encoding.DER))
    assert parsed.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    assert not parsed.is_signature_valid(root_of(KeyType.ECDSA_P384).public_key())  # type: ignore[arg-type]
    assert parsed.issuer == root.subject
    assert parsed.last_update_utc == NOW and parsed.next_update_utc == NOW + timedelta(days=7)
    assert parsed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 17
    aki = parsed.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(root, x509.SubjectKeyIdentifier).value.digest

    def reason(serial: int) -> x509.ReasonFlags | None:
        entry = parsed.get_revoked_certificate_by_serial_number(serial)
        assert entry is not None and entry.revocation_date_utc == revoked_at
        try:
            return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            return None

    assert reason(0x1234) is x509.ReasonFlags.key_compromise
    assert reason(0xABCDEF) is x509.ReasonFlags.superseded
    assert reason(0x42) is x509.ReasonFlags.cessation_of_operation
    assert reason(0x43) is None  # RFC 5280: omit rather than say "unspecified"
    assert reason(0x44) is None
    assert len(parsed) == 5

    assert certcheck.pkilint_crl_errors(certcheck.pem_of(crl), f"CRL by {root_type} root") == []
    proc_ok = certcheck.openssl_verify_certs(tmp_path, root, roots=[root], attime=NOW)
    assert proc_ok.ok, proc_ok.output


def test_openssl_refuses_an_intermediate_listed_in_the_root_crl(tmp_path: Path) -> None:
    root = root_of(KeyType.ECDSA_P256)
    inter = issue()
    crl = xp.build_crl(
        issuer=root,
        signer=signer_of(KeyType.ECDSA_P256),
        revoked=[xp.RevokedEntry(inter.serial_number, NOW, "keyCompromise")],
        now=NOW,
        next_update=timedelta(days=1),
        crl_number=1,
    )
    at = NOW + timedelta(minutes=1)
    result = certcheck.openssl_verify_certs(tmp_path, inter, roots=[root], attime=at, crls=[crl])
    assert not result.ok and "certificate revoked" in result.output
    empty = xp.build_crl(
        issuer=root,
        signer=signer_of(KeyType.ECDSA_P256),
        revoked=[],
        now=NOW,
        next_update=timedelta(days=1),
        crl_number=2,
    )
    result = certcheck.openssl_verify_certs(tmp_path, inter, roots=[root], attime=at, crls=[empty])
    assert result.ok, result.output


def test_crl_rejects_unknown_reasons_and_bad_numbers() -> None:
    root, signer = root_of(KeyType.ECDSA_P256), signer_of(KeyType.ECDSA_P256)
    with pytest.raises(InvalidInput, match="unknown revocation reason; accepted: unspecified, keyCompromise"):
        xp.build_crl(
            issuer=root,
            signer=signer,
            revoked=[xp.RevokedEntry(1, NOW, "stolen")],
            now=NOW,
            next_update=timedelta(days=1),
            crl_number=1,
        )
    with pytest.raises(InvalidInput, match="unknown revocation reason"):
        xp.parse_revocation_reason("removeFromCRL")
    assert xp.parse_revocation_reason("KEYCOMPROMISE") == "keyCompromise"
    with pytest.raises(InvalidInput, match="CRL number"):
        xp.build_crl(issuer=root, signer=signer, revoked=[], now=NOW, next_update=timedelta(days=1), crl_number=-1)


# --- verification of what was signed ---------------------------------------------------------


def test_verify_issued_rejects_certificates_from_another_root_or_out_of_time() -> None:
    inter = issue(KeyType.ECDSA_P256)
    with pytest.raises(xp.SignedCertificateInvalid, match="does not verify"):
        xp.verify_issued(inter, roots=[root_of(KeyType.ECDSA_P384)], now=NOW)
    with pytest.raises(xp.SignedCertificateInvalid, match="not valid at validation time"):
        xp.verify_issued(inter, roots=[root_of(KeyType.ECDSA_P256)], now=NOW + timedelta(days=91))
    both = xp.ChainVerifier([root_of(KeyType.ECDSA_P384), root_of(KeyType.ECDSA_P256)])
    assert both.verify(inter, NOW) == [inter, root_of(KeyType.ECDSA_P256)]


def test_verify_issued_rejects_a_forged_signature() -> None:
    inter = issue(KeyType.ECDSA_P256)
    forger = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateBuilder()
        .subject_name(inter.subject)
        .issuer_name(inter.issuer)
        .public_key(inter.public_key())
        .serial_number(xp.random_serial())
        .not_valid_before(inter.not_valid_before_utc)
        .not_valid_after(inter.not_valid_after_utc)
    )
    for e in inter.extensions:
        forged = forged.add_extension(e.value, critical=e.critical)
    with pytest.raises(xp.SignedCertificateInvalid):
        xp.verify_issued(forged.sign(forger, hashes.SHA256()), roots=[root_of(KeyType.ECDSA_P256)], now=NOW)


def test_verify_issued_requires_an_aware_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        xp.verify_issued(issue(), roots=[root_of(KeyType.ECDSA_P256)], now=datetime(2026, 3, 1))


# --- helpers ---------------------------------------------------------------------------------


def test_verify_proof() -> None:
    data = b"DER bytes of a new CSR"
    ec_key, rsa_key = csr_key("ecdsa-p256"), csr_key("rsa-2048")
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey) and isinstance(rsa_key, rsa.RSAPrivateKey)
    ec_sig = ec_key.sign(data, ec.ECDSA(hashes.SHA256()))
    rsa_sig = rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    assert xp.verify_proof(ec_key.public_key(), data, ec_sig)
    assert xp.verify_proof(rsa_key.public_key(), data, rsa_sig)
    assert not xp.verify_proof(ec_key.public_key(), data + b"x", ec_sig)
    assert not xp.verify_proof(rsa_key.public_key(), data + b"x", rsa_sig)
    assert not xp.verify_proof(csr_key("ecdsa-p384").public_key(), data, ec_sig)
    assert not xp.verify_proof(ec_key.public_key(), data, b"")
    assert not xp.verify_proof(ec_key.public_key(), data, b"\x30\x02garbage")
    assert not xp.verify_proof(rsa_key.public_key(), data, b"\x00" * 300)
    assert not xp.verify_proof(ec_key.public_key(), data, ec_key.sign(data, ec.ECDSA(hashes.SHA384())))
    pss = rsa_key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    assert not xp.verify_proof(rsa_key.public_key(), data, pss)
    ed = ed25519.Ed25519PrivateKey.generate()
    assert not xp.verify_proof(ed.public_key(), data, ed.sign(data))
    assert not xp.verify_proof(None, data, ec_sig)


def test_serial_hex_and_pem_helpers() -> None:
    a, b = issue(), issue()
    assert xp.serial_hex(a) == format(a.serial_number, "x")
    assert xp.serial_hex(a) == xp.serial_hex(a).lower() and ":" not in xp.serial_hex(a)
    assert xp.serial_hex(0xABC) == "abc"
    assert xp.parse_serial_hex(xp.serial_hex(a)) == a.serial_number
    assert xp.parse_serial_hex("ABC") == 0xABC
    for bad in ("", "xyz", "0x12", "a" * 41, "12:34"):
        with pytest.raises(InvalidInput, match="hexadecimal"):
            xp.parse_serial_hex(bad)
    bundle = xp.cert_pem(a) + xp.cert_pem(b)
    assert xp.cert_pem(a).startswith("-----BEGIN CERTIFICATE-----\n")
    assert xp.load_pem_certificates(bundle) == [a, b]
    assert xp.load_pem_certificates(bundle.encode()) == [a, b]
    for bad_text in ("", "garbage", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        with pytest.raises(InvalidInput, match="PEM certificates"):
            xp.load_pem_certificates(bad_text)


def test_public_key_fingerprint_matches_spki_sha256() -> None:
    key = csr_key("ecdsa-p384")
    inter = issue(csr_kind="ecdsa-p384")
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    expected = hashlib.sha256(spki).hexdigest()
    assert xp.public_key_fingerprint(key.public_key()) == expected
    assert xp.public_key_fingerprint(inter.public_key()) == expected
    assert xp.public_key_fingerprint(csr_key("rsa-2048").public_key()) != expected


def test_subjects() -> None:
    root_subject = xp.default_root_subject("Acme")
    assert root_subject.rfc4514_string() == "CN=meshbridge root CA,O=Acme"
    assert xp.default_root_subject("Acme", label="2026-03") != root_subject
    assert xp.intermediate_subject("a", "a.mesh", "Acme").rfc4514_string() == "CN=a,OU=a.mesh,O=Acme"
    long_domain = ".".join(["x" * 30] * 4)
    assert xp.intermediate_subject("b", long_domain, "Acme").rfc4514_string() == "CN=b,O=Acme"
    with pytest.raises(InvalidInput, match="DNS label"):
        xp.intermediate_subject("Not_A_Label", "a.mesh", "Acme")
    with pytest.raises(InvalidInput, match="organization"):
        xp.default_root_subject("")
    with pytest.raises(InvalidInput, match="organization"):
        xp.default_root_subject("x" * 65)
    with pytest.raises(InvalidInput, match="organization"):
        xp.intermediate_subject("a", "a.mesh", "bad\norg")
