"""The Go checkers (tests/e2e/go, prebuilt by `make testbin`) work and catch what they should.

The cacerts bundles here are made with ``cryptography`` in the API.md profile (root without
pathlen, intermediate pathlen:0 with a critical URI name constraint on its trust domain); the
simulation runs on the hand-written fixture in tests/e2e/go/testdata until the renderer exists.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cluster_agent.render.cacerts import sign_final_crl, sign_intermediate_crl
from tests.e2e.gocheck import GoCheckFailed, run_cacerts_check, run_simulation
from tests.e2e.testbin import GO_CHECKER_DIR

NOW = dt.datetime.now(dt.UTC)
KU_CA = x509.KeyUsage(
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshbridge-e2e"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _pem(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def _ca(
    subject: str,
    key: Any,
    issuer: x509.Certificate | None,
    issuer_key: Any,
    pathlen: int | None,
    trust_domain: str | None = None,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=30 if issuer else 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
        .add_extension(KU_CA, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if trust_domain:
        b = b.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)], excluded_subtrees=None
            ),
            critical=True,
        )
    return b.sign(issuer_key, hashes.SHA256())


def _crl(issuer: x509.Certificate, key: Any) -> bytes:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(NOW - dt.timedelta(minutes=5))
        .next_update(NOW + dt.timedelta(days=7))
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM)


def _workload(uri: str, issuer: x509.Certificate, issuer_key: Any) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    return _pem(cert)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca("root", root_key, None, root_key, None)
    int_key = ec.generate_private_key(ec.SECP256R1())
    inter = _ca("cluster a", int_key, root, root_key, 0, trust_domain="a.mesh")
    return {
        "root": root,
        "root_key": root_key,
        "inter": inter,
        "int_key": int_key,
        "tmp": tmp_path_factory.mktemp("cacerts"),
    }


def _write_cacerts(d: Path, b: dict[str, Any], crl: bytes | None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca-cert.pem").write_bytes(_pem(b["inter"]))
    (d / "ca-key.pem").write_bytes(
        b["int_key"].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (d / "cert-chain.pem").write_bytes(_pem(b["inter"]) + _pem(b["root"]))
    (d / "root-cert.pem").write_bytes(_pem(b["root"]))
    if crl is not None:
        (d / "ca-crl.pem").write_bytes(crl)
    return d


def test_cacerts_accepted_with_full_crl_set(bundle: dict[str, Any]) -> None:
    crl = _crl(bundle["root"], bundle["root_key"]) + _crl(bundle["inter"], bundle["int_key"])
    d = _write_cacerts(bundle["tmp"] / "ok", bundle, crl)
    out = run_cacerts_check(d)
    assert "istiod accepts the bundle" in out
    assert "spiffe://a.mesh/ns/default/sa/default" in out  # trust domain taken from the name constraint


def test_cacerts_root_crl_alone_rejected(bundle: dict[str, Any]) -> None:
    d = _write_cacerts(bundle["tmp"] / "rootcrl", bundle, _crl(bundle["root"], bundle["root_key"]))
    with pytest.raises(GoCheckFailed, match="missing CRL signed by certificates"):
        run_cacerts_check(d)


def test_cacerts_incomplete_rejected(bundle: dict[str, Any]) -> None:
    d = _write_cacerts(bundle["tmp"] / "incomplete", bundle, None)
    (d / "cert-chain.pem").unlink()
    with pytest.raises(GoCheckFailed, match="incomplete signing CA bundle"):
        run_cacerts_check(d)


def test_cacerts_accepted_with_a_superseded_intermediates_final_crl(bundle: dict[str, Any]) -> None:
    """After a renewal the agent's ca-crl.pem also holds the final CRL of the superseded
    intermediate (same subject, another key): istiod's "CRL signed by every certificate of the
    chain" check must still pass, and must not count that CRL for the new intermediate."""
    old_key = ec.generate_private_key(ec.SECP256R1())
    old = _ca("cluster a", old_key, bundle["root"], bundle["root_key"], 0, trust_domain="a.mesh")
    assert old.subject == bundle["inter"].subject
    final = sign_final_crl(old, old_key, now=NOW, keep_until=NOW + dt.timedelta(hours=25)).encode()
    own = sign_intermediate_crl(bundle["inter"], bundle["int_key"], now=NOW).encode()
    root_crl = _crl(bundle["root"], bundle["root_key"])
    out = run_cacerts_check(_write_cacerts(bundle["tmp"] / "superseded", bundle, root_crl + own + final))
    assert "istiod accepts the bundle" in out
    with pytest.raises(GoCheckFailed, match="missing CRL signed by certificates"):
        run_cacerts_check(_write_cacerts(bundle["tmp"] / "final-only", bundle, root_crl + final))


def test_name_constraints_enforced(bundle: dict[str, Any]) -> None:
    d = _write_cacerts(bundle["tmp"] / "nc", bundle, None)
    chain_tail = _pem(bundle["inter"])
    own = bundle["tmp"] / "own.pem"
    own.write_bytes(
        _workload("spiffe://a.mesh/ns/bookinfo/sa/ratings", bundle["inter"], bundle["int_key"]) + chain_tail
    )
    run_cacerts_check(d, workload_chain=own)
    foreign = bundle["tmp"] / "foreign.pem"
    foreign.write_bytes(
        _workload("spiffe://b.mesh/ns/bookinfo/sa/ratings", bundle["inter"], bundle["int_key"]) + chain_tail
    )
    out = run_cacerts_check(d, workload_chain=foreign, expect_fail=True)
    assert "fails verification as expected" in out
    with pytest.raises(GoCheckFailed):
        run_cacerts_check(d, workload_chain=foreign)


def test_simulation_on_fixture() -> None:
    out = run_simulation(GO_CHECKER_DIR / "testdata" / "a", GO_CHECKER_DIR / "testdata" / "b")
    assert "--- PASS: TestSimulation" in out


def _mutated(tmp_path: Path, side: str, file: str, old: str, new: str) -> tuple[Path, Path]:
    dirs = {}
    for name in ("a", "b"):
        d = tmp_path / name
        shutil.copytree(GO_CHECKER_DIR / "testdata" / name, d)
        dirs[name] = d
    f = dirs[side] / file
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new))
    return dirs["a"], dirs["b"]


@pytest.mark.parametrize(
    ("side", "file", "old", "new", "message"),
    [
        (
            "a",
            "destinationrule-istio-system-meshbridge-import-ratings-bookinfo.yaml",
            "      sni: ratings.bookinfo.remote\n",
            "",
            'SNI "outbound_.9080_._.ratings.bookinfo.remote", want "ratings.bookinfo.remote"',
        ),
        (
            "b",
            "gateway-istio-system-meshbridge-ingress.yaml",
            "hosts: [ratings.bookinfo.remote]",
            'hosts: ["*"]',
            "must list only the exported names",
        ),
        (
            "b",
            "authorizationpolicy-istio-system-meshbridge-ingress.yaml",
            "action: DENY",
            "action: ALLOW",
            "blocks ordinary ingress traffic",
        ),
    ],
    ids=["no-sni-to-remote", "ingress-hosts-wildcard", "allow-policy"],
)
def test_simulation_catches_broken_shapes(
    tmp_path: Path, side: str, file: str, old: str, new: str, message: str
) -> None:
    a, b = _mutated(tmp_path, side, file, old, new)
    with pytest.raises(GoCheckFailed) as e:
        run_simulation(a, b)
    assert message in e.value.output
