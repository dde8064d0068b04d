"""End-to-end exports (issue 13 items 1 and 6): the exporter publishes its destination workloads'
identities, the CA holds them to the exporter's trust domain, and consumers get them with the mode
in their import entries; hop-by-hop entries stay exactly as before."""

from __future__ import annotations

from typing import Any

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
