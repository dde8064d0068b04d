"""Revocation per certificate and per cluster; CRLs checked with cryptography, pkilint and
``openssl crl -verify`` / ``openssl verify -crl_check``."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from fastapi.testclient import TestClient

from ca_server.app import create_app
from ca_server.core.authority import Authority
from ca_server.keys.file import FileKeyBackend
from ca_server.storage.repository import SqlStore
from tests.ca.certcheck import OPENSSL, openssl_verify, pkilint_crl_errors
from tests.ca.conftest import PASSPHRASE, Agent, Harness, pem_certs, pem_crls


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def openssl_crl_verify(tmp: Path, der: bytes, root_pem: str) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "crl.der").write_bytes(der)
    (tmp / "root.pem").write_text(root_pem)
    assert OPENSSL is not None
    proc = subprocess.run(
        [
            OPENSSL,
            "crl",
            "-inform",
            "DER",
            "-in",
            str(tmp / "crl.der"),
            "-CAfile",
            str(tmp / "root.pem"),
            "-noout",
            "-verify",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"{proc.returncode} {proc.stdout}{proc.stderr}"


def fetch_crl(h: Harness) -> tuple[bytes, x509.CertificateRevocationList]:
    r = h.client.get("/v1/crl")
    assert r.status_code == 200 and r.headers["content-type"] == "application/pkix-crl"
    return r.content, x509.load_der_x509_crl(r.content)


def test_revoke_one_certificate_enters_the_signed_crl(harness: Harness, tmp_path: Path) -> None:
    agent = harness.enroll("a")
    old = agent.serial
    old_bundle = dict(agent.bundle)
    harness.renew(agent)
    _, before = fetch_crl(harness)
    assert len(list(before)) == 0

    r = harness.client.post(f"/v1/certificates/{old}/revoke", json={"reason": "keyCompromise"}, headers=harness.admin)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["serial"] == old and out["reason"] == "keyCompromise" and out["revoked_at"]
    again = harness.client.post(f"/v1/certificates/{old}/revoke", json={"reason": "superseded"}, headers=harness.admin)
    assert again.status_code == 200 and again.json() == out  # the same again

    der, crl = fetch_crl(harness)
    root_pem = harness.client.get("/v1/trust-bundle").text
    root = pem_certs(root_pem)[0]
    assert crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    assert crl.issuer == root.subject
    entry = crl.get_revoked_certificate_by_serial_number(int(old, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(int(agent.serial, 16)) is None
    assert crl.next_update_utc is not None and crl.last_update_utc is not None
    # past every intermediate the root may issue before the next re-sign (90 d + half of 7 d)
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=90) + timedelta(days=3.5)
    assert crl.next_update_utc >= agent.cert.not_valid_after_utc
    assert crl_number(crl) > crl_number(before)
    assert "verify OK" in openssl_crl_verify(tmp_path / "v", der, root_pem)
    assert pkilint_crl_errors(harness.client.get("/v1/crl?format=pem").text) == []

    # openssl refuses the revoked intermediate and accepts the current one with the published CRL
    (tmp_path / "crl.pem").write_text(harness.client.get("/v1/crl", params={"format": "pem"}).text)
    (tmp_path / "root.pem").write_text(root_pem)
    for bundle, ok in [(old_bundle, False), (agent.bundle, True)]:
        (tmp_path / "leaf.pem").write_text(bundle["ca-cert.pem"])
        res = openssl_verify(tmp_path / "leaf.pem", cafile=tmp_path / "root.pem", crlfile=tmp_path / "crl.pem")
        assert res.ok is ok, res.output
        if not ok:
            assert "revoked" in res.output
    # the same CRL reaches agents through desired state and the next bundle
    d = harness.desired(agent)
    assert d["crl"] == harness.client.get("/v1/crl?format=pem").text
    harness.renew(agent)
    assert agent.bundle["crl.pem"] == d["crl"]


def test_revoke_certificate_bad_input(harness: Harness) -> None:
    agent = harness.enroll("a")
    before = harness.state()
    cases = [
        (f"/v1/certificates/{'ab' * 10}/revoke", {"reason": "keyCompromise"}, 404),
        (f"/v1/certificates/{agent.serial.upper()}/revoke", {}, 400),
        ("/v1/certificates/not-hex/revoke", {}, 400),
        (f"/v1/certificates/{agent.serial}/revoke", {"reason": "because"}, 400),
        (f"/v1/certificates/{agent.serial}/revoke", {"reason": "keyCompromise", "extra": 1}, 400),
    ]
    for path, body, status in cases:
        r = harness.client.post(path, json=body, headers=harness.admin)
        assert r.status_code == status, (path, body, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    assert harness.state() == before


def test_revoke_cluster_kills_its_token_and_lists_all_its_intermediates(harness: Harness) -> None:
    agent = harness.enroll("a", trust_domain="a.mesh")
    first = agent.serial
    harness.renew(agent)
    other = harness.enroll("b", trust_domain="b.mesh")
    unused_boot = harness.bootstrap_token("a")

    r = harness.client.post("/v1/clusters/a/revoke", json={"reason": "keyCompromise"}, headers=harness.admin)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "revoked" and r.json()["name"] == "a"
    # its token stops working at once, everywhere
    for method, path, body in [
        ("GET", "/v1/clusters/a/desired", None),
        ("GET", "/v1/clusters/a/imports", None),
        ("PUT", "/v1/clusters/a/status", {"installed_generation": 1}),
    ]:
        resp = harness.client.request(method, path, json=body, headers=agent.headers)
        assert resp.status_code == 401, (path, resp.text)
    resp, _ = harness.renew_response(agent)
    assert resp.status_code == 401
    # every intermediate of the cluster is in the CRL
    _, crl = fetch_crl(harness)
    revoked = {format(e.serial_number, "x") for e in crl}
    assert {first, agent.serial} <= revoked
    assert other.serial not in revoked
    # no way back in: a bootstrap token made before does not enroll, no new one is given
    before = harness.state()
    from cluster_agent import pki

    key = pki.new_key()
    resp = harness.client.post(
        "/v1/enroll", json={"cluster": "a", "bootstrap_token": unused_boot, "csr": pki.make_csr(key, "a")}
    )
    assert resp.status_code == 401
    assert harness.client.post("/v1/clusters/a/bootstrap-token", headers=harness.admin).status_code == 409
    assert harness.client.post("/v1/clusters/a/revoke", json={}, headers=harness.admin).json()["status"] == "revoked"
    assert harness.state() == before
    assert harness.cluster("a")["status"] == "revoked"
    assert harness.desired(other)["generation"] == 1  # others unaffected


def _second_replica(h: Harness) -> Iterator[TestClient]:
    store = SqlStore(h.database_url)
    authority = Authority(store, FileKeyBackend(h.data_dir, PASSPHRASE), clock=h.clock)
    try:
        with TestClient(create_app(authority)) as client:
            yield client
    finally:
        store.dispose()


def test_crls_are_stored_so_every_replica_serves_the_same_bytes(harness: Harness) -> None:
    agent = harness.enroll("a")
    harness.client.post(f"/v1/certificates/{agent.serial}/revoke", json={"reason": "superseded"}, headers=harness.admin)
    ours = harness.client.get("/v1/crl").content
    assert harness.client.get("/v1/crl").content == ours  # not re-signed per request
    for replica in _second_replica(harness):
        assert replica.get("/v1/crl").content == ours
        assert replica.get("/v1/crl?format=pem").text == harness.client.get("/v1/crl?format=pem").text
        assert replica.get("/v1/trust-bundle").text == harness.client.get("/v1/trust-bundle").text


def test_crls_are_resigned_before_next_update_and_drop_expired_entries(harness: Harness) -> None:
    agent: Agent = harness.enroll("a")
    revoked_serial = agent.serial
    harness.client.post(
        f"/v1/certificates/{revoked_serial}/revoke", json={"reason": "superseded"}, headers=harness.admin
    )
    _, first = fetch_crl(harness)
    assert harness.authority.refresh_crls() == 0  # fresh: nothing to do
    harness.clock.advance(days=2)
    assert harness.authority.refresh_crls() == 0
    harness.clock.advance(days=2)  # past half of the 7 days
    assert harness.authority.refresh_crls() == 1
    _, second = fetch_crl(harness)
    assert crl_number(second) == crl_number(first) + 1
    assert second.next_update_utc is not None and first.next_update_utc is not None
    assert second.next_update_utc - first.next_update_utc >= timedelta(days=4) - timedelta(seconds=5)
    assert second.next_update_utc > datetime.now(UTC) + harness.clock.offset + timedelta(days=90)
    assert second.get_revoked_certificate_by_serial_number(int(revoked_serial, 16)) is not None
    # once the revoked certificate has expired its entry leaves the CRL (keeps ca-crl.pem small)
    harness.clock.advance(days=90)
    assert harness.authority.refresh_crls() == 1
    _, third = fetch_crl(harness)
    assert third.get_revoked_certificate_by_serial_number(int(revoked_serial, 16)) is None
    assert pem_crls(harness.client.get("/v1/crl?format=pem").text)[0] == third
    assert harness.chain_ok()


def test_root_crls_outlive_a_ca_outage_while_the_intermediates_beside_them_are_valid(
    harness: Harness, tmp_path: Path
) -> None:
    """Envoy fails every handshake once a CRL of the chain is past nextUpdate (default_validator.cc,
    CRL_CHECK|CRL_CHECK_ALL; envoyproxy/envoy#31320). A CA down for longer than the 7-day refresh
    period must not expire the root CRL the agents hold: it covers every intermediate the root issued."""
    agent = harness.enroll("a")
    harness.authority.refresh_crls()
    held = harness.client.get("/v1/crl", params={"format": "pem"}).text  # what the agent keeps
    crl = pem_crls(held)[0]
    assert crl.next_update_utc is not None and crl.next_update_utc >= agent.cert.not_valid_after_utc
    # the CA is down from now on (no refresh): eight days later the CRL still verifies the chain
    later = datetime.now(UTC) + timedelta(days=8)
    (tmp_path / "crl.pem").write_text(held)
    (tmp_path / "root.pem").write_text(harness.client.get("/v1/trust-bundle").text)
    (tmp_path / "leaf.pem").write_text(agent.bundle["ca-cert.pem"])
    res = openssl_verify(
        tmp_path / "leaf.pem", cafile=tmp_path / "root.pem", crlfile=tmp_path / "crl.pem", attime=later
    )
    assert res.ok, res.output
    # and until the intermediate's own notAfter
    last = agent.cert.not_valid_after_utc - timedelta(minutes=1)
    res = openssl_verify(tmp_path / "leaf.pem", cafile=tmp_path / "root.pem", crlfile=tmp_path / "crl.pem", attime=last)
    assert res.ok, res.output
    # once back, the CA still re-signs every half of crl_validity
    harness.clock.advance(days=3.6)
    assert harness.authority.refresh_crls() == 1
