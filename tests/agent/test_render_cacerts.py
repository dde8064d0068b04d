"""Secret `cacerts` and istiod's bundle check, on real certificates built here."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cluster_agent.render import (
    BundleError,
    check_cacerts_bundle,
    compose_ca_crl,
    crl_needs_resign,
    render_cacerts_secret,
    sign_intermediate_crl,
)
from cluster_agent.render.cacerts import earliest_next_update, sign_final_crl

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(
    key: CertificateIssuerPrivateKeyTypes,
    fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
    password: bytes | None = None,
) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption).decode()


def make_cert(
    cn: str,
    key: CertificateIssuerPrivateKeyTypes,
    *,
    issuer: tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes] | None = None,
    ca: bool = True,
    path_length: int | None = None,
    key_cert_sign: bool = True,
    eku: list[x509.ObjectIdentifier] | None = None,
    not_before: datetime = NOW - timedelta(days=30),
    not_after: datetime = NOW + timedelta(days=60),
    hash_algorithm: hashes.HashAlgorithm | None = None,
) -> x509.Certificate:
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshbridge test"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    algorithm = hash_algorithm or (None if isinstance(signing_key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    return builder.sign(signing_key, algorithm)  # type: ignore[arg-type]


def make_crl(
    issuer: x509.Certificate,
    key: CertificateIssuerPrivateKeyTypes,
    revoked: list[int] = (),  # type: ignore[assignment]
    next_update: datetime = NOW + timedelta(days=7),
) -> str:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(NOW - timedelta(hours=1))
        .next_update(next_update)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(hours=1)).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class PKI:
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate
    ca_key: CertificateIssuerPrivateKeyTypes

    def files(self, **overrides: str | None) -> dict[str, str | None]:
        files: dict[str, str | None] = {
            "ca_cert_pem": pem(self.ca),
            "ca_key_pem": key_pem(self.ca_key),
            "cert_chain_pem": pem(self.ca) + pem(self.root),
            "root_cert_pem": pem(self.root),
            "crl_pem": None,
        }
        files.update(overrides)
        return files

    def crls(self) -> str:
        return make_crl(self.root, self.root_key) + make_crl(self.ca, self.ca_key)


def new_pki(ca_key: CertificateIssuerPrivateKeyTypes | None = None, **ca_options: object) -> PKI:
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = make_cert("root", root_key)
    key = ca_key or ec.generate_private_key(ec.SECP256R1())
    options: dict[str, object] = {"path_length": 0, **ca_options}
    ca = make_cert("cluster b", key, issuer=(root, root_key), **options)  # type: ignore[arg-type]
    return PKI(root, root_key, ca, key)


@pytest.fixture(scope="module")
def pki() -> PKI:
    return new_pki()


def check(files: dict[str, str | None], now: datetime | None = None) -> None:
    check_cacerts_bundle(
        ca_cert_pem=files["ca_cert_pem"] or "",
        ca_key_pem=files["ca_key_pem"] or "",
        cert_chain_pem=files["cert_chain_pem"] or "",
        root_cert_pem=files["root_cert_pem"] or "",
        crl_pem=files["crl_pem"],
        now=now,
    )


# ------------------------------------------------------------------------------------------------
# Bundles istiod accepts


def test_good_bundle_passes(pki: PKI) -> None:
    check(pki.files())
    check(pki.files(crl_pem=pki.crls()), now=NOW)


def test_chain_without_the_root_and_a_multi_root_bundle_pass(pki: PKI) -> None:
    other = new_pki()
    check(pki.files(cert_chain_pem=pem(pki.ca), root_cert_pem=pem(other.root) + pem(pki.root)))


@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL])
def test_key_formats_istiod_parses(fmt: serialization.PrivateFormat) -> None:
    for key in (ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)):
        bundle = new_pki(ca_key=key)
        check(bundle.files(ca_key_pem=key_pem(key, fmt)))


def test_eku_with_server_auth_passes() -> None:
    bundle = new_pki(eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    check(bundle.files())


def test_three_level_chain_passes_when_path_lengths_allow_it() -> None:
    root_key, mid_key, ca_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = make_cert("root", root_key)
    mid = make_cert("mid", mid_key, issuer=(root, root_key), path_length=1)
    ca = make_cert("ca", ca_key, issuer=(mid, mid_key), path_length=0)
    check(
        {
            "ca_cert_pem": pem(ca),
            "ca_key_pem": key_pem(ca_key),
            "cert_chain_pem": pem(ca) + pem(mid) + pem(root),
            "root_cert_pem": pem(root),
            "crl_pem": None,
        }
    )


# ------------------------------------------------------------------------------------------------
# Bundles istiod (or Envoy) refuses


def test_wrong_key(pki: PKI) -> None:
    with pytest.raises(BundleError, match=r"ca-key.pem: does not match ca-cert.pem"):
        check(pki.files(ca_key_pem=key_pem(ec.generate_private_key(ec.SECP256R1()))))


def test_encrypted_or_garbage_key(pki: PKI) -> None:
    with pytest.raises(BundleError, match=r"ca-key.pem: the key is encrypted"):
        check(pki.files(ca_key_pem=key_pem(pki.ca_key, password=b"secret")))
    with pytest.raises(BundleError, match=r"ca-key.pem: not a PKCS#1, SEC1 or PKCS#8 private key"):
        check(pki.files(ca_key_pem="-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))


def test_chain_not_starting_with_ca_cert(pki: PKI) -> None:
    with pytest.raises(
        BundleError, match=r"cert-chain.pem: must start with ca-cert.pem \(.*CN=cluster b.*\) but starts with .*CN=root"
    ):
        check(pki.files(cert_chain_pem=pem(pki.root) + pem(pki.ca)))


def test_chain_out_of_order() -> None:
    root_key, mid_key, ca_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = make_cert("root", root_key)
    mid = make_cert("mid", mid_key, issuer=(root, root_key), path_length=1)
    ca = make_cert("ca", ca_key, issuer=(mid, mid_key), path_length=0)
    files: dict[str, str | None] = {
        "ca_cert_pem": pem(ca),
        "ca_key_pem": key_pem(ca_key),
        "cert_chain_pem": pem(ca) + pem(root) + pem(mid),
        "root_cert_pem": pem(root),
        "crl_pem": None,
    }
    with pytest.raises(BundleError, match=r"certificate 1 \(.*CN=ca.*\) is not signed by certificate 2 .*out of order"):
        check(files)
    files["cert_chain_pem"] = pem(ca)  # the intermediate "mid" is missing
    with pytest.raises(BundleError, match=r"last certificate \(.*CN=ca.*\) is not issued by any root"):
        check(files)


def test_chain_to_an_untrusted_root(pki: PKI) -> None:
    other = new_pki()
    with pytest.raises(BundleError, match=r"ends with the root .*CN=root.*, which root-cert.pem does not hold"):
        check(pki.files(root_cert_pem=pem(other.root)))
    with pytest.raises(BundleError, match=r"is not issued by any root in root-cert.pem"):
        check(pki.files(cert_chain_pem=pem(pki.ca), root_cert_pem=pem(other.root)))


def test_eku_client_auth_only_is_refused() -> None:
    bundle = new_pki(eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(BundleError, match=r"ca-cert.pem: extendedKeyUsage \(clientAuth\) excludes serverAuth"):
        check(bundle.files())


def test_not_a_ca_and_no_key_cert_sign() -> None:
    with pytest.raises(BundleError, match=r"ca-cert.pem: not a CA certificate"):
        check(new_pki(ca=False).files())
    with pytest.raises(BundleError, match=r"ca-cert.pem: keyUsage lacks keyCertSign"):
        check(new_pki(key_cert_sign=False).files())


def test_root_with_path_length_zero_breaks_workload_chains() -> None:
    root_key, ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = make_cert("root", root_key, path_length=0)
    ca = make_cert("ca", ca_key, issuer=(root, root_key), path_length=0)
    files: dict[str, str | None] = {
        "ca_cert_pem": pem(ca),
        "ca_key_pem": key_pem(ca_key),
        "cert_chain_pem": pem(ca) + pem(root),
        "root_cert_pem": pem(root),
        "crl_pem": None,
    }
    with pytest.raises(BundleError, match=r"pathLen 0 allows fewer than the 1 CA certificate\(s\) below it"):
        check(files)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (rsa.generate_private_key(65537, 1024), "RSA key of 1024 bits"),  # noqa: S505
        (ec.generate_private_key(ec.SECP521R1()), "ECDSA curve secp521r1"),
        (ed25519.Ed25519PrivateKey.generate(), "Ed25519PublicKey keys are not supported"),
    ],
)
def test_key_types_istiod_cannot_use(key: CertificateIssuerPrivateKeyTypes, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        check(new_pki(ca_key=key).files())


def test_validity_is_checked_only_with_now(pki: PKI) -> None:
    expired = new_pki(not_before=NOW - timedelta(days=100), not_after=NOW - timedelta(days=1))
    check(expired.files())
    with pytest.raises(BundleError, match=r"ca-cert.pem: expired at 2026-05-31"):
        check(expired.files(), now=NOW)
    future = new_pki(not_before=NOW + timedelta(days=1))
    with pytest.raises(BundleError, match=r"ca-cert.pem: not valid before 2026-06-02"):
        check(future.files(), now=NOW)


def test_missing_intermediate_crl(pki: PKI) -> None:
    with pytest.raises(BundleError, match=r"ca-crl.pem: missing CRL signed by .*CN=cluster b"):
        check(pki.files(crl_pem=make_crl(pki.root, pki.root_key)))
    with pytest.raises(BundleError, match=r"ca-crl.pem: missing CRL signed by .*CN=root"):
        check(pki.files(crl_pem=make_crl(pki.ca, pki.ca_key)))
    # A root-signed CRL is not required when the chain stops below the root (istiod checks the chain).
    check(pki.files(cert_chain_pem=pem(pki.ca), crl_pem=make_crl(pki.ca, pki.ca_key)))


def test_crl_that_revokes_the_intermediate(pki: PKI) -> None:
    crls = make_crl(pki.root, pki.root_key, revoked=[pki.ca.serial_number]) + make_crl(pki.ca, pki.ca_key)
    with pytest.raises(BundleError, match=rf"CN=cluster b.*\(serial {pki.ca.serial_number:x}\) is revoked"):
        check(pki.files(crl_pem=crls))


def test_expired_crl_with_now(pki: PKI) -> None:
    crls = make_crl(pki.root, pki.root_key) + make_crl(pki.ca, pki.ca_key, next_update=NOW - timedelta(minutes=1))
    check(pki.files(crl_pem=crls))
    with pytest.raises(BundleError, match=r"the CRL signed by .*CN=cluster b.* expired"):
        check(pki.files(crl_pem=crls), now=NOW)


def test_empty_or_garbage_files(pki: PKI) -> None:
    with pytest.raises(BundleError, match=r"root-cert.pem: holds no certificate"):
        check(pki.files(root_cert_pem=""))
    with pytest.raises(BundleError, match=r"cert-chain.pem: not PEM certificates"):
        check(pki.files(cert_chain_pem="-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
    with pytest.raises(BundleError, match=r"ca-crl.pem: holds no CRL"):
        check(pki.files(crl_pem="nothing here"))


# ------------------------------------------------------------------------------------------------
# The intermediate's own CRL


def test_sign_intermediate_crl(pki: PKI) -> None:
    text = sign_intermediate_crl(pem(pki.ca), key_pem(pki.ca_key), [5, 3], now=NOW, validity=timedelta(days=2))
    crl = x509.load_pem_x509_crl(text.encode())
    assert crl.is_signature_valid(pki.ca.public_key())  # type: ignore[arg-type]
    assert crl.issuer == pki.ca.subject
    assert crl.last_update_utc == NOW - timedelta(minutes=5)
    assert crl.next_update_utc == NOW + timedelta(days=2)
    assert sorted(r.serial_number for r in crl) == [3, 5]
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = pki.ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    later = x509.load_pem_x509_crl(sign_intermediate_crl(pki.ca, pki.ca_key, now=NOW + timedelta(hours=1)).encode())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert later.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    # With the roots' CRLs it completes what istiod wants.
    check(pki.files(crl_pem=compose_ca_crl(make_crl(pki.root, pki.root_key), text)), now=NOW)


def test_sign_intermediate_crl_refuses_bad_inputs(pki: PKI) -> None:
    with pytest.raises(ValueError, match="at most 7 days"):
        sign_intermediate_crl(pki.ca, pki.ca_key, now=NOW, validity=timedelta(days=8))
    with pytest.raises(ValueError, match="timezone-aware"):
        sign_intermediate_crl(pki.ca, pki.ca_key, now=datetime(2026, 1, 1))
    with pytest.raises(BundleError, match="does not belong"):
        sign_intermediate_crl(pki.ca, ec.generate_private_key(ec.SECP256R1()), now=NOW)


def test_final_crl_of_a_superseded_intermediate(pki: PKI) -> None:
    """Signed once before the key is dropped; nextUpdate is the end of its keep period, which may be
    longer than the 7 days of the re-signed CRL (Istio's MAX_WORKLOAD_CERT_TTL is 90 days)."""
    old_key = ec.generate_private_key(ec.SECP256R1())
    old = make_cert("cluster b", old_key, issuer=(pki.root, pki.root_key), path_length=0)
    keep_until = NOW + timedelta(days=30)
    final = x509.load_pem_x509_crl(sign_final_crl(old, old_key, now=NOW, keep_until=keep_until).encode())
    assert final.is_signature_valid(old.public_key()) and final.next_update_utc == keep_until  # type: ignore[arg-type]
    assert list(final) == []
    aki = final.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == old.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    with pytest.raises(ValueError, match="after now"):
        sign_final_crl(old, old_key, now=NOW, keep_until=NOW)
    # beside the current intermediate's CRL it passes istiod's check; expired, it is refused
    own = sign_intermediate_crl(pki.ca, pki.ca_key, now=NOW)
    root_crl = make_crl(pki.root, pki.root_key)
    ca_crl = compose_ca_crl(root_crl, own + final.public_bytes(serialization.Encoding.PEM).decode())
    check(pki.files(crl_pem=ca_crl), now=NOW + timedelta(days=6))
    assert earliest_next_update(ca_crl) == NOW + timedelta(days=7)  # the root's and the own CRL's, not the final's
    short = sign_final_crl(old, old_key, now=NOW, keep_until=NOW + timedelta(days=1))
    with pytest.raises(BundleError, match=r"CRL 3 \(issuer .*cluster b.*\) expired"):
        check(pki.files(crl_pem=compose_ca_crl(root_crl, own + short)), now=NOW + timedelta(days=2))


def test_crl_needs_resign_at_half_its_validity(pki: PKI) -> None:
    text = sign_intermediate_crl(pki.ca, pki.ca_key, now=NOW, validity=timedelta(days=4))
    assert not crl_needs_resign(text, now=NOW + timedelta(days=1))
    assert crl_needs_resign(text, now=NOW + timedelta(days=2))
    assert crl_needs_resign(None, now=NOW)
    assert crl_needs_resign("garbage", now=NOW)


def test_compose_ca_crl_orders_and_deduplicates(pki: PKI) -> None:
    root_crl = make_crl(pki.root, pki.root_key)
    other = new_pki()
    roots = root_crl + make_crl(other.root, other.root_key)
    mine = make_crl(pki.ca, pki.ca_key)
    composed = compose_ca_crl(roots + root_crl, mine)
    crls = [
        x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + block.encode())
        for block in composed.split("-----BEGIN X509 CRL-----")[1:]
    ]
    assert [c.issuer for c in crls] == [pki.root.subject, other.root.subject, pki.ca.subject]
    assert compose_ca_crl("", mine) == mine
    with pytest.raises(BundleError, match="intermediate CRL: holds no CRL"):
        compose_ca_crl(roots, "")


# ------------------------------------------------------------------------------------------------
# The Secret


def test_cacerts_secret(pki: PKI) -> None:
    files = pki.files()
    secret = render_cacerts_secret(
        "istio-system",
        ca_cert_pem=files["ca_cert_pem"] or "",
        ca_key_pem=files["ca_key_pem"] or "",
        cert_chain_pem=files["cert_chain_pem"] or "",
        root_cert_pem=files["root_cert_pem"] or "",
        cluster="b",
    )
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
    assert secret["metadata"]["name"] == "cacerts" and secret["metadata"]["namespace"] == "istio-system"
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "meshbridge"
    assert secret["metadata"]["labels"]["meshbridge.io/cluster"] == "b"
    assert sorted(secret["data"]) == ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
    assert "stringData" not in secret and "istio-generated" not in secret["data"]
    assert base64.b64decode(secret["data"]["ca-cert.pem"]).decode() == files["ca_cert_pem"]
    with_crl = render_cacerts_secret(
        "istio-system", ca_cert_pem="a", ca_key_pem="b", cert_chain_pem="c", root_cert_pem="d", crl_pem="e"
    )
    assert base64.b64decode(with_crl["data"]["ca-crl.pem"]) == b"e\n"
    assert "meshbridge.io/cluster" not in with_crl["metadata"]["labels"]


# ------------------------------------------------------------------------------------------------
# Through render_all


def _render(pki: PKI, **kwargs: object) -> object:
    from cluster_agent.config import parse_config
    from cluster_agent.render import render_all

    config = parse_config(
        {
            "cluster": "b",
            "ca": {"url": "https://ca:8443", "trust_anchor": "/r.pem"},
            "istio": {"trust_domain": "b.mesh"},
            "dns": {"mode": "none"},
        }
    )
    bundle = {
        "ca-cert.pem": pem(pki.ca),
        "cert-chain.pem": pem(pki.ca) + pem(pki.root),
        "root-cert.pem": pem(pki.root),
        "crl.pem": make_crl(pki.root, pki.root_key),
    }
    options: dict[str, object] = {"bundle": bundle, "intermediate_key_pem": key_pem(pki.ca_key), **kwargs}
    return render_all(config, imports=[], peers=[], vips={}, **options)  # type: ignore[arg-type]


def _secret_files(result: object) -> dict[str, str]:
    (secret,) = [o for o in result.objects if o["kind"] == "Secret"]  # type: ignore[attr-defined]
    assert secret["metadata"]["name"] == "cacerts"
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_render_all_writes_cacerts_with_the_composed_crl(pki: PKI) -> None:
    own = sign_intermediate_crl(pki.ca, pki.ca_key, now=NOW)
    files = _secret_files(_render(pki, crl_pem=own, now=NOW))
    assert sorted(files) == ["ca-cert.pem", "ca-crl.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
    assert files["ca-crl.pem"].count("BEGIN X509 CRL") == 2
    assert files["ca-crl.pem"].endswith(own)


def test_render_all_leaves_ca_crl_out_when_a_part_is_missing(pki: PKI) -> None:
    result = _render(pki)
    assert "ca-crl.pem" not in _secret_files(result)
    assert any("no CRL signed by the intermediate" in w for w in result.warnings)  # type: ignore[attr-defined]
    bundle = {
        "ca-cert.pem": pem(pki.ca),
        "cert-chain.pem": pem(pki.ca) + pem(pki.root),
        "root-cert.pem": pem(pki.root),
        "crl.pem": "",
    }
    result = _render(pki, bundle=bundle, crl_pem=make_crl(pki.ca, pki.ca_key))
    assert "ca-crl.pem" not in _secret_files(result)
    assert any("no root CRLs" in w for w in result.warnings)  # type: ignore[attr-defined]


def test_render_all_refuses_a_bundle_istiod_would_refuse(pki: PKI) -> None:
    with pytest.raises(BundleError, match=r"ca-key\.pem: does not match"):
        _render(pki, intermediate_key_pem=key_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(BundleError, match="without intermediate_key_pem"):
        _render(pki, intermediate_key_pem=None)
    with pytest.raises(BundleError, match=r"bundle: cert-chain\.pem is missing"):
        _render(pki, bundle={"ca-cert.pem": pem(pki.ca), "root-cert.pem": pem(pki.root)})
    with pytest.raises(BundleError, match="expired"):
        _render(pki, now=NOW + timedelta(days=365))
