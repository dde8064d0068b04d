"""Bad input gets a clear 4xx problem and changes nothing: the same audit head, no new
certificate, the bootstrap token still unused."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from cluster_agent import pki
from tests.ca.conftest import Harness, both_speedup_modes

pytestmark = both_speedup_modes


def assert_problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"].startswith("https://")
    return body


@pytest.fixture
def pending(harness: Harness) -> Iterator[tuple[Harness, str]]:
    """A registered cluster ``a`` with its bootstrap token; afterwards the token must still enroll."""
    token = harness.add_cluster("a", trust_domain="a.mesh")["bootstrap_token"]
    before = harness.state()
    yield harness, token
    assert harness.state() == before, "a refused request changed something"
    agent = harness.enroll("a", token=token)  # the token was not consumed
    assert agent.generation == 1


def enroll(h: Harness, token: str, csr: str, cluster: str = "a") -> Any:
    return h.client.post("/v1/enroll", json={"cluster": cluster, "bootstrap_token": token, "csr": csr})


def csr_with(key: Any, algorithm: Any = None) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_malformed_pem(pending: tuple[Harness, str]) -> None:
    h, token = pending
    for csr in [
        "-----BEGIN CERTIFICATE REQUEST-----\nnot base64 at all\n-----END CERTIFICATE REQUEST-----\n",
        "hello",
        pki.make_csr(pki.new_key(), "a")[:200],
    ]:
        body = assert_problem(enroll(h, token, csr), 400)
        assert "signing request" in body["detail"]


def test_csr_whose_signature_fails(pending: tuple[Harness, str]) -> None:
    h, token = pending
    der = bytearray(
        x509.load_pem_x509_csr(pki.make_csr(pki.new_key(), "a").encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # last byte of the ECDSA s value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    body = assert_problem(enroll(h, token, tampered), 400)
    assert "signature" in body["detail"]


def test_rsa_below_2048(pending: tuple[Harness, str]) -> None:
    h, token = pending
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (the point)
    body = assert_problem(enroll(h, token, csr_with(small, hashes.SHA256())), 400)
    assert "RSA 1024" in body["detail"] and "2048" in body["detail"]


@functools.cache
def unsupported_csrs() -> list[str]:
    """Made once per run: RSA above 4096 bits and DSA keys are slow to generate."""
    return [
        csr_with(ed25519.Ed25519PrivateKey.generate()),
        csr_with(ed448.Ed448PrivateKey.generate()),
        csr_with(ec.generate_private_key(ec.SECP521R1()), hashes.SHA256()),
        csr_with(rsa.generate_private_key(public_exponent=65537, key_size=4104), hashes.SHA256()),
        csr_with(dsa.generate_private_key(2048), hashes.SHA256()),
    ]


def test_ed25519_and_other_key_types(pending: tuple[Harness, str]) -> None:
    h, token = pending
    for csr in unsupported_csrs():
        body = assert_problem(enroll(h, token, csr), 400)
        assert "accepted" in body["detail"]


def test_body_over_64_kib(pending: tuple[Harness, str]) -> None:
    h, token = pending
    huge = "x" * (64 * 1024 + 1)
    r = h.client.post("/v1/enroll", json={"cluster": "a", "bootstrap_token": token, "csr": huge})
    assert_problem(r, 413)
    r = h.client.post(
        "/v1/clusters",
        content=b"{" + b" " * (70 * 1024) + b"}",
        headers={**h.admin, "content-type": "application/json"},
    )
    assert_problem(r, 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds on the stream too
        yield b'{"name": "zz", "trust_domain": "'
        for _ in range(80):
            yield b"a" * 1024
        yield b'"}'

    r = h.client.post("/v1/clusters", content=chunks(), headers={**h.admin, "content-type": "application/json"})
    assert_problem(r, 413)
    # just under the limit is parsed (and refused for what it says, not for its size)
    r = h.client.post("/v1/enroll", json={"cluster": "a", "bootstrap_token": token, "csr": "x" * 60000})
    assert_problem(r, 400)


def test_cluster_names_that_are_not_dns_labels(harness: Harness) -> None:
    before = harness.state()
    for name in ["A", "a_b", "-a", "a-", "a.b", "a" * 64, "", "ä", "a b"]:
        r = harness.client.post("/v1/clusters", json={"name": name}, headers=harness.admin)
        assert_problem(r, 400)
    assert harness.state() == before


def test_names_that_are_not_dns_labels_elsewhere(pending: tuple[Harness, str]) -> None:
    h, token = pending
    assert_problem(enroll(h, token, pki.make_csr(pki.new_key(), "a"), cluster="A"), 400)
    assert_problem(h.client.get("/v1/clusters/Bad_Name", headers=h.admin), 400)
    assert_problem(h.client.post("/v1/clusters/Bad_Name/rotate", json={}, headers=h.admin), 400)
    assert_problem(h.client.get("/v1/clusters/Bad_Name/desired", headers={"Authorization": "Bearer x"}), 400)


def test_bad_cluster_registrations(harness: Harness) -> None:
    before = harness.state()
    for body in [
        {"name": "b", "trust_domain": "Not A Domain"},
        {"name": "b", "trust_domain": "a..mesh"},
        {"name": "b", "gateway": {"address": "203.0.113.1", "port": 70000}},
        {"name": "b", "gateway": {"address": "bad address!", "port": 15443}},
        {"name": "b", "surprise": True},
        {"trust_domain": "b.mesh"},
        {"name": 7},
    ]:
        assert_problem(harness.client.post("/v1/clusters", json=body, headers=harness.admin), 400)
    assert harness.state() == before


def test_malformed_json(pending: tuple[Harness, str]) -> None:
    h, _ = pending
    r = h.client.post("/v1/enroll", content=b'{"cluster": "a", ', headers={"content-type": "application/json"})
    assert_problem(r, 400)
    r = h.client.post("/v1/enroll", json=["not", "an", "object"])
    assert_problem(r, 400)


def test_unknown_clusters(pending: tuple[Harness, str]) -> None:
    h, token = pending
    for method, path in [
        ("GET", "/v1/clusters/nope"),
        ("POST", "/v1/clusters/nope/bootstrap-token"),
        ("POST", "/v1/clusters/nope/rotate"),
        ("POST", "/v1/clusters/nope/revoke"),
    ]:
        assert_problem(h.client.request(method, path, json={}, headers=h.admin), 404)
    # a's token does not enroll a cluster that does not exist
    assert_problem(enroll(h, token, pki.make_csr(pki.new_key(), "nope"), cluster="nope"), 401)


def test_existing_cluster_name(pending: tuple[Harness, str]) -> None:
    h, _ = pending
    assert_problem(h.client.post("/v1/clusters", json={"name": "a"}, headers=h.admin), 409)


def test_reused_bootstrap_token(harness: Harness) -> None:
    token = harness.add_cluster("a")["bootstrap_token"]
    harness.enroll("a", token=token)
    before = harness.state()
    body = assert_problem(enroll(harness, token, pki.make_csr(pki.new_key(), "a")), 401)
    assert "already used" in body["detail"]
    assert harness.state() == before


def test_expired_bootstrap_token(harness: Harness) -> None:
    token = harness.add_cluster("a")["bootstrap_token"]
    harness.clock.advance(hours=1, seconds=1)
    before = harness.state()
    body = assert_problem(enroll(harness, token, pki.make_csr(pki.new_key(), "a")), 401)
    assert "expired" in body["detail"]
    assert harness.state() == before


def test_another_clusters_bootstrap_token(harness: Harness) -> None:
    token = harness.add_cluster("a")["bootstrap_token"]
    harness.add_cluster("b")
    before = harness.state()
    assert_problem(enroll(harness, token, pki.make_csr(pki.new_key(), "b"), cluster="b"), 401)
    assert harness.state() == before
    harness.enroll("a", token=token)


def test_forged_bootstrap_tokens(pending: tuple[Harness, str]) -> None:
    h, token = pending
    csr = pki.make_csr(pki.new_key(), "a")
    assert_problem(enroll(h, "", csr), 400)
    wrong_secret = token.rsplit(".", 1)[0] + ".not-the-secret"
    for forged in [
        "garbage",
        "mbboot.0123456789abcdef.nope",
        "mbadmin.x.y",
        wrong_secret,
        token.replace("mbboot.", "mbagent."),
    ]:
        assert_problem(enroll(h, forged, csr), 401)


def test_another_clusters_agent_token(harness: Harness) -> None:
    a = harness.enroll("a")
    harness.enroll("b")
    before = harness.state()
    r = harness.client.post("/v1/clusters/b/rotate", json={}, headers=a.headers)
    assert_problem(r, 401)  # agent tokens are not admin tokens
    new = pki.new_key()
    csr = pki.make_csr(new, "b")
    r = harness.client.post(
        "/v1/clusters/b/intermediate", json={"csr": csr, "proof": pki.prove(a.key, csr)}, headers=a.headers
    )
    assert_problem(r, 403)
    assert harness.state() == before


def test_wrong_proof(harness: Harness) -> None:
    a = harness.enroll("a")
    before = harness.state()
    csr = pki.make_csr(pki.new_key(), "a")
    for proof in [pki.prove(pki.new_key(), csr), "not base64 !!", "", "AAAA"]:
        r = harness.client.post("/v1/clusters/a/intermediate", json={"csr": csr, "proof": proof}, headers=a.headers)
        assert "proof" in assert_problem(r, 403)["detail"]
    assert harness.state() == before


def test_bad_csr_on_renewal(harness: Harness) -> None:
    a = harness.enroll("a")
    before = harness.state()
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (the point)
    csr = csr_with(small, hashes.SHA256())
    r = harness.client.post(
        "/v1/clusters/a/intermediate", json={"csr": csr, "proof": pki.prove(a.key, csr)}, headers=a.headers
    )
    assert_problem(r, 400)
    r = harness.client.post("/v1/clusters/a/intermediate", json={"csr": "nope", "proof": "AAAA"}, headers=a.headers)
    assert_problem(r, 400)
    assert harness.state() == before


def test_admin_authentication_failures(harness: Harness) -> None:
    before = harness.state()
    wrong_secret = harness.admin_token.rsplit(".", 1)[0] + ".wrongsecret"
    for authorization in [
        None,
        "Basic YWRtaW46YWRtaW4=",
        "Bearer",
        "Bearer nonsense",
        "Bearer mbadmin.0123456789abcdef.wrongsecret",
        f"Bearer {wrong_secret}",
    ]:
        headers = {"Authorization": authorization} if authorization is not None else {}
        r = harness.client.post("/v1/clusters", json={"name": "a"}, headers=headers)
        assert_problem(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
    assert harness.state() == before


def test_bad_query_parameters(harness: Harness) -> None:
    a = harness.enroll("a")
    for params in ({"wait": -1}, {"wait": "soon"}, {"revision": "x" * 100}):
        assert_problem(harness.client.get("/v1/clusters/a/desired", params=params, headers=a.headers), 400)
    assert_problem(harness.client.get("/v1/crl", params={"format": "xml"}), 400)


def test_bad_status_and_exports_bodies(harness: Harness) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    before = harness.state()
    bad_status = [{"installed_generation": -1}, {"errors": "not a list"}, {"unknown": 1}]
    for body in bad_status:
        assert_problem(harness.client.put("/v1/clusters/a/status", json=body, headers=a.headers), 400)
    ident = {"ingress": "spiffe://a.mesh/ns/i/sa/in", "egress": "spiffe://a.mesh/ns/i/sa/eg"}
    gw = {"address": "198.51.100.1", "port": 15443}
    svc = {
        "name": "ratings.bookinfo",
        "namespace": "bookinfo",
        "service": "ratings",
        "ports": [{"number": 9080, "protocol": "HTTP"}],
        "consumers": ["b"],
    }
    bad_exports: list[dict[str, Any]] = [
        {"gateway": gw, "identities": ident, "services": [{**svc, "consumers": ["Not_A_Label"]}]},
        {"gateway": gw, "identities": ident, "services": [{**svc, "ports": []}]},
        {"gateway": gw, "identities": ident, "services": [{**svc, "ports": [{"number": 0}]}]},
        {"gateway": gw, "identities": ident, "services": [{**svc, "ports": [{"number": 80, "protocol": "SMTP"}]}]},
        {"gateway": gw, "identities": ident, "services": [svc, svc]},
        {"gateway": gw, "identities": {**ident, "ingress": "spiffe://b.mesh/ns/i/sa/in"}},
        {"gateway": gw, "identities": {**ident, "egress": "spiffe://a.mesh.evil/ns/i/sa/eg"}},
        {"gateway": gw, "identities": {**ident, "egress": "https://a.mesh/x/y/z"}},
        {"identities": ident},
    ]
    for body in bad_exports:
        assert_problem(harness.client.put("/v1/clusters/a/exports", json=body, headers=a.headers), 400)
    assert harness.state() == before
