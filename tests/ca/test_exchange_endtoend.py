"""End-to-end exports (issue 13 items 1 and 6): the exporter publishes its destination workloads'
identities, the CA holds them to the exporter's trust domain, and consumers get them with the mode
in their import entries; hop-by-hop entries stay exactly as before."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.ca.conftest import Harness

WORKLOAD = "spiffe://a.mesh/ns/bookinfo/sa/bookinfo-ratings"


def _export(**fields: Any) -> dict[str, Any]:
    return {
        "name": "ratings.bookinfo",
        "namespace": "bookinfo",
        "service": "ratings",
        "ports": [{"number": 9080, "protocol": "HTTP"}],
        "consumers": ["b"],
        **fields,
    }


def test_end_to_end_export_reaches_its_consumer_with_the_workload_identities(harness: Harness) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    b = harness.enroll("b", trust_domain="b.mesh")
    e2e = _export(
        mode="end-to-end",
        workload_identities=[WORKLOAD],
        consumer_principals={"b": ["ns/shop/sa/checkout"]},
    )
    details = {**_export(), "name": "details.bookinfo", "service": "details"}
    r = harness.publish(a, trust_domain="a.mesh", services=[e2e, details], tcp_port=15444)
    assert r.status_code == 200, r.text
    entries = {i["name"]: i for i in harness.desired(b)["imports"]}
    assert entries["ratings.bookinfo"]["mode"] == "end-to-end"
    assert entries["ratings.bookinfo"]["workload_identities"] == [WORKLOAD]
    assert "consumer_principals" not in entries["ratings.bookinfo"]  # the exporter's own policy
    assert "mode" not in entries["details.bookinfo"] and "workload_identities" not in entries["details.bookinfo"]
    items = harness.client.get("/v1/clusters/b/imports", headers=b.headers).json()["items"]
    assert {i["name"]: i.get("mode") for i in items} == {"details.bookinfo": None, "ratings.bookinfo": "end-to-end"}


def test_end_to_end_export_without_workload_identities_is_refused(harness: Harness) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    r = harness.publish(a, trust_domain="a.mesh", services=[_export(mode="end-to-end")])
    assert r.status_code == 400, r.text
    assert "services[0].workload_identities: an end-to-end export needs" in r.json()["detail"]


def test_workload_identities_outside_the_exporters_trust_domain_are_refused(harness: Harness) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    other = _export(mode="end-to-end", workload_identities=[WORKLOAD, "spiffe://b.mesh/ns/bookinfo/sa/x"])
    r = harness.publish(a, trust_domain="a.mesh", services=[other])
    assert r.status_code == 400, r.text
    assert "services[0].workload_identities[1] must be the SPIFFE ID of one workload" in r.json()["detail"]
    wildcard = _export(mode="end-to-end", workload_identities=["spiffe://a.mesh/ns/bookinfo/sa/x/extra"])
    r = harness.publish(a, trust_domain="a.mesh", services=[wildcard])
    assert r.status_code == 400 and "workload_identities[0]" in r.json()["detail"], r.text


def test_end_to_end_fields_need_the_mode_and_named_consumers(harness: Harness) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    r = harness.publish(a, trust_domain="a.mesh", services=[_export(workload_identities=[WORKLOAD])])
    assert r.status_code == 400 and "services[0].workload_identities: only for mode end-to-end" in r.json()["detail"]
    stranger = _export(mode="end-to-end", workload_identities=[WORKLOAD], consumer_principals={"c": ["ns/x/sa/y"]})
    r = harness.publish(a, trust_domain="a.mesh", services=[stranger])
    assert r.status_code == 400 and "services[0].consumer_principals.c: not one of" in r.json()["detail"], r.text
    bad = _export(mode="end-to-end", workload_identities=[WORKLOAD], consumer_principals={"b": ["shop/checkout"]})
    r = harness.publish(a, trust_domain="a.mesh", services=[bad])
    assert r.status_code in (400, 422) and "consumer_principals" in r.text, r.text


def _crl(issuer_pem: str, key: Any) -> str:
    """An empty CRL naming `issuer_pem`'s subject as issuer, signed with `key`."""
    issuer = x509.load_pem_x509_certificate(issuer_pem.encode())
    now = datetime.now(UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now)
        .next_update(now + timedelta(hours=12))
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM).decode()


def _publish_crl(harness: Harness, agent: Any, trust_domain: str, crl: str) -> Any:
    body = {
        "gateway": {"address": "198.51.100.1", "port": 15443, "tcp_port": 15444},
        "identities": {
            "ingress": f"spiffe://{trust_domain}/ns/istio-system/sa/ingress",
            "egress": f"spiffe://{trust_domain}/ns/istio-system/sa/egress",
        },
        "services": [_export(mode="end-to-end", workload_identities=[WORKLOAD])] if trust_domain == "a.mesh" else [],
        "crl": crl,
    }
    return harness.client.put(f"/v1/clusters/{agent.name}/exports", json=body, headers=agent.headers)


def test_an_end_to_end_peers_crl_is_relayed_to_its_peers(harness: Harness) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    b = harness.enroll("b", trust_domain="b.mesh")
    crl = _crl(a.bundle["ca-cert.pem"], a.key)
    assert _publish_crl(harness, a, "a.mesh", crl).status_code == 200
    [peer] = harness.desired(b)["peers"]
    assert peer["name"] == "a" and peer["crl"] == crl
    r = harness.publish(b, trust_domain="b.mesh")  # b publishes no CRL: its peer entry has none
    assert r.status_code == 200
    assert "crl" not in harness.desired(a)["peers"][0]


def test_a_crl_not_signed_by_the_clusters_own_intermediate_is_refused(harness: Harness) -> None:
    """A cluster could otherwise publish a CRL naming another cluster's intermediate as issuer: every
    peer would put it in its ca-crl.pem and fail that cluster's chains (CRL signature failure)."""
    a = harness.enroll("a", trust_domain="a.mesh")
    b = harness.enroll("b", trust_domain="b.mesh")
    forged = _crl(b.bundle["ca-cert.pem"], a.key)  # claims b's intermediate, signed with a's key
    r = _publish_crl(harness, a, "a.mesh", forged)
    assert r.status_code == 400 and "crl[0]: not signed by one of this cluster's intermediates" in r.text, r.text
    r = _publish_crl(harness, a, "a.mesh", "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    assert r.status_code == 400 and "crl: not PEM CRLs" in r.text, r.text
