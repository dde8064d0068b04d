"""Cluster rotation and the four phases of a root rotation, with Istio's superset rule."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.ca.certcheck import openssl_verify, pkilint_crl_errors, pkilint_errors
from tests.ca.conftest import Harness, pem_certs, pem_crls


def test_rotate_raises_the_generation_once_until_a_renewal_answers_it(harness: Harness) -> None:
    agent = harness.enroll("a")
    before = harness.desired(agent)
    assert before["generation"] == 1 and before["rotate_required"] is False
    assert harness.rotate("a") == 2
    d = harness.desired(agent)  # visible at once, without waiting for the watcher
    assert d["generation"] == 2 and d["rotate_required"] is True and d["revision"] != before["revision"]
    assert harness.cluster("a")["rotation_pending"] is True
    audit_head = harness.audit_head()
    assert harness.rotate("a") == 2  # idempotent while pending
    assert harness.audit_head() == audit_head
    assert harness.desired(agent)["revision"] == d["revision"]

    harness.renew(agent)
    assert agent.generation == 2
    after = harness.desired(agent)
    assert after["generation"] == 2 and after["rotate_required"] is False
    assert harness.cluster("a")["rotation_pending"] is False
    assert harness.rotate("a") == 3


def test_rotate_refuses_pending_revoked_and_unknown_clusters(harness: Harness) -> None:
    harness.add_cluster("p")
    harness.enroll("r")
    assert (
        harness.client.post(
            "/v1/clusters/r/revoke", json={"reason": "keyCompromise"}, headers=harness.admin
        ).status_code
        == 200
    )
    before = harness.state()
    for name, status in [("p", 409), ("r", 409), ("nope", 404)]:
        r = harness.client.post(f"/v1/clusters/{name}/rotate", json={}, headers=harness.admin)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/problem+json"
    assert harness.state() == before


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _verify(tmp: Path, bundle: dict[str, str], trust: str) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    res = openssl_verify(
        _write(tmp / "leaf.pem", bundle["ca-cert.pem"]),
        cafile=_write(tmp / "ca.pem", trust),
        untrusted=_write(tmp / "chain.pem", bundle["cert-chain.pem"]),
        crlfile=_write(tmp / "crl.pem", bundle["crl.pem"]),
    )
    assert res.ok, res.output


def test_root_rotation_in_four_phases(short_lived: Harness, tmp_path: Path) -> None:
    harness = short_lived
    a = harness.enroll("a", trust_domain="a.mesh")
    b = harness.enroll("b", trust_domain="b.mesh")
    bundle_a = harness.client.get("/v1/trust-bundle").text
    [root_a] = harness.roots()
    assert root_a["status"] == "active"
    assert pem_certs(bundle_a) == pem_certs(root_a["certificate"])

    # phase 2: B joins the trust bundle, A still signs
    r = harness.client.post("/v1/roots", json={"key_type": "ecdsa-p384"}, headers=harness.admin)
    assert r.status_code == 201, r.text
    root_b = r.json()
    assert root_b["status"] == "trusted" and root_b["id"] != root_a["id"]
    assert pkilint_errors(root_b["certificate"], "second root") == []
    cert_a, cert_b = pem_certs(root_a["certificate"])[0], pem_certs(root_b["certificate"])[0]
    assert cert_a.subject != cert_b.subject  # two roots in one bundle must be told apart by name
    bundle_ab = harness.client.get("/v1/trust-bundle").text
    assert bundle_ab.startswith(bundle_a) and bundle_ab != bundle_a  # Istio's byte-superset test
    assert pem_certs(bundle_ab) == [cert_a, cert_b]  # oldest first
    assert harness.client.get("/v1/trust-bundle").text == bundle_ab  # byte-stable
    d = harness.desired(a)
    assert d["trust_bundle"] == bundle_ab and d["generation"] == 1 and d["rotate_required"] is False
    crls = pem_crls(d["crl"])
    assert [c.issuer for c in crls] == [cert_a.subject, cert_b.subject]
    assert all(c.is_signature_valid(k.public_key()) for c, k in zip(crls, [cert_a, cert_b], strict=True))  # type: ignore[arg-type]
    harness.renew(a)  # renewals still come from A
    assert agent_root(a.bundle) == cert_a and a.bundle["root-cert.pem"] == bundle_ab

    # phase 3: B signs; every cluster under A must renew, once every istiod serves B
    for agent in (a, b):
        harness.report_served(agent)  # istiod serves A+B, signs under A
    harness.clock.advance(seconds=111)  # every workload took A+B with its next certificate
    r = harness.client.post(f"/v1/roots/{root_b['id']}/activate", headers=harness.admin)
    assert r.status_code == 200 and r.json()["status"] == "active"
    statuses = {x["id"]: x["status"] for x in harness.roots()}
    assert statuses == {root_a["id"]: "trusted", root_b["id"]: "active"}
    for agent in (a, b):
        d = harness.desired(agent)
        assert d["generation"] == 2 and d["rotate_required"] is True
        assert harness.cluster(agent.name)["rotation_pending"] is True
    head = harness.audit_head()
    assert harness.client.post(f"/v1/roots/{root_b['id']}/activate", headers=harness.admin).status_code == 200
    assert harness.audit_head() == head and harness.desired(a)["generation"] == 2  # idempotent

    r = harness.client.post(f"/v1/roots/{root_a['id']}/retire", headers=harness.admin)
    assert r.status_code == 409 and "a, b" in r.json()["detail"]
    old_a_key = a.key
    harness.renew(a)  # proved by the intermediate under A, issued under B
    assert a.generation == 2 and agent_root(a.bundle) == cert_b
    assert a.bundle["cert-chain.pem"].endswith(root_b["certificate"])
    _verify(tmp_path / "a", a.bundle, bundle_ab)
    assert harness.desired(a)["rotate_required"] is False
    r = harness.client.post(f"/v1/roots/{root_a['id']}/retire", headers=harness.admin)
    assert r.status_code == 409 and "b" in r.json()["detail"] and "a," not in r.json()["detail"]
    harness.renew(b)

    # phase 4: A leaves once no workload certificate under it is left: every istiod has signed
    # under B for the workload certificate lifetime plus the margin
    for agent in (a, b):
        harness.report_served(agent)
    r = harness.client.post(f"/v1/roots/{root_a['id']}/retire", headers=harness.admin)
    assert r.status_code == 409 and r.json()["type"].endswith("/fleetnotready")
    harness.clock.advance(seconds=111)
    r = harness.client.post(f"/v1/roots/{root_a['id']}/retire", headers=harness.admin)
    assert r.status_code == 200 and r.json()["status"] == "retired"
    bundle_b = harness.client.get("/v1/trust-bundle").text
    assert bundle_b == root_b["certificate"] and bundle_b in bundle_ab  # the byte-subset test holds too
    d = harness.desired(a)
    assert d["trust_bundle"] == bundle_b
    assert [c.issuer for c in pem_crls(d["crl"])] == [cert_b.subject]
    assert harness.client.get("/v1/crl", params={"format": "pem"}).text == d["crl"]
    assert pkilint_crl_errors(d["crl"]) == []
    # an intermediate under the retired root proves nothing any more, even though still unexpired
    r, _ = harness.renew_response(a, prover=old_a_key)
    assert r.status_code == 403
    harness.renew(a)
    assert a.bundle["root-cert.pem"] == bundle_b
    _verify(tmp_path / "a2", a.bundle, bundle_b)
    assert harness.chain_ok()


def agent_root(bundle: dict[str, str]) -> x509.Certificate:
    return pem_certs(bundle["cert-chain.pem"])[-1]


def test_root_phase_errors(harness: Harness) -> None:
    [root_a] = harness.roots()
    r = harness.client.post(f"/v1/roots/{root_a['id']}/retire", headers=harness.admin)
    assert r.status_code == 409 and "active" in r.json()["detail"]
    root_b = harness.client.post("/v1/roots", json={}, headers=harness.admin).json()
    assert harness.client.post(f"/v1/roots/{root_b['id']}/activate", headers=harness.admin).status_code == 200
    assert harness.client.post(f"/v1/roots/{root_a['id']}/retire", headers=harness.admin).status_code == 200
    before = harness.state()
    r = harness.client.post(f"/v1/roots/{root_a['id']}/activate", headers=harness.admin)
    assert r.status_code == 409
    assert harness.client.post("/v1/roots/00ff/activate", headers=harness.admin).status_code == 404
    assert harness.client.post("/v1/roots/00ff/retire", headers=harness.admin).status_code == 404
    r = harness.client.post("/v1/roots", json={"key_type": "rsa-1024"}, headers=harness.admin)
    assert r.status_code == 400
    assert harness.state() == before
    cn = pem_certs(root_b["certificate"])[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert str(cn).startswith("meshbridge root CA")
