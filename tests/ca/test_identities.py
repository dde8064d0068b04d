"""Issue 10 item 7: identities and names are exact.

Before: `identities.egress: spiffe://a.mesh/*` was accepted (a prefix check) and the exporter's
policy became `notPrincipals: ["a.mesh/*"]`; a consumer `"b\\n"` passed the `re.match(...$)` label check.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import event

from ca_server.core.authority import Authority
from ca_server.core.errors import Conflict
from ca_server.keys.file import FileKeyBackend
from meshbridge_wire.names import identity_in_trust_domain, workload_identity
from tests.ca.conftest import PASSPHRASE, Harness

IDENT = {"ingress": "spiffe://a.mesh/ns/istio-system/sa/in", "egress": "spiffe://a.mesh/ns/istio-system/sa/eg"}
GW = {"address": "198.51.100.1", "port": 15443}
SVC = {
    "name": "ratings.bookinfo",
    "namespace": "bookinfo",
    "service": "ratings",
    "ports": [{"number": 9080, "protocol": "HTTP"}],
    "consumers": ["b"],
}

NOT_WORKLOAD_IDENTITIES = [
    "spiffe://a.mesh/*",
    "spiffe://a.mesh/ns/*/sa/*",
    "spiffe://a.mesh/ns/istio-system/sa/eg/extra",
    "spiffe://a.mesh/ns/istio-system",
    "spiffe://a.mesh/sa/eg/ns/istio-system",
    "spiffe://a.mesh/ns/Istio-System/sa/eg",
    "spiffe://a.mesh/ns/istio-system/sa/eg\n",
    "spiffe://a.mesh//ns/istio-system/sa/eg",
]


@pytest.mark.parametrize("identity", NOT_WORKLOAD_IDENTITIES)
def test_only_exact_workload_identities_parse(identity: str) -> None:
    assert workload_identity(identity) is None
    assert not identity_in_trust_domain(identity, "a.mesh")


def test_workload_identities_parse() -> None:
    assert workload_identity("spiffe://a.mesh/ns/istio-system/sa/istio-egressgateway-service-account") == (
        "a.mesh",
        "istio-system",
        "istio-egressgateway-service-account",
    )
    assert workload_identity("spiffe://a.mesh/ns/gw/sa/egress.v2") == ("a.mesh", "gw", "egress.v2")


@pytest.mark.parametrize("identity", NOT_WORKLOAD_IDENTITIES)
def test_published_identities_must_be_exact(harness: Harness, identity: str) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    before = harness.state()
    body: dict[str, Any] = {"gateway": GW, "identities": {**IDENT, "egress": identity}, "services": [SVC]}
    r = harness.client.put("/v1/clusters/a/exports", json=body, headers=a.headers)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert harness.state() == before


@pytest.mark.parametrize("consumer", ["b\n", "b\r\n", " b"])
def test_consumers_are_checked_with_full_matches(harness: Harness, consumer: str) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    body = {"gateway": GW, "identities": IDENT, "services": [{**SVC, "consumers": [consumer]}]}
    r = harness.client.put("/v1/clusters/a/exports", json=body, headers=a.headers)
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("name", ["b\n", "b%0A"])
def test_cluster_names_are_checked_with_full_matches(harness: Harness, name: str) -> None:
    r = harness.client.post("/v1/clusters", json={"name": name, "trust_domain": "b.mesh"}, headers=harness.admin)
    assert r.status_code == 400, r.text


def test_a_trust_domain_held_by_another_cluster_is_refused(harness: Harness) -> None:
    """Before: `dup` registered with `a.mesh` was accepted, and its intermediate could mint a's gateway identities."""
    harness.add_cluster("a", trust_domain="a.mesh")
    before = harness.state()
    r = harness.client.post("/v1/clusters", json={"name": "dup", "trust_domain": "a.mesh"}, headers=harness.admin)
    assert r.status_code == 409, r.text
    assert "a.mesh is held by cluster(s) a" in r.json()["detail"]
    assert harness.state() == before


def test_a_second_cluster_local_needs_the_operators_word(harness: Harness) -> None:
    harness.client.post("/v1/clusters", json={"name": "a"}, headers=harness.admin).raise_for_status()
    r = harness.client.post("/v1/clusters", json={"name": "b"}, headers=harness.admin)
    assert r.status_code == 409, r.text
    r = harness.client.post("/v1/clusters", json={"name": "b", "share_trust_domain": True}, headers=harness.admin)
    assert r.status_code == 201, r.text
    entry = harness.client.get("/v1/audit", params={"limit": 1000}, headers=harness.admin).json()["items"]
    create_b = [e for e in entry if e["action"] == "cluster.create" and e["subject"] == "b"]
    assert create_b[0]["details"]["shares_trust_domain_with"] == ["a"]


def test_a_revoked_clusters_trust_domain_can_be_registered_again(harness: Harness) -> None:
    harness.add_cluster("a", trust_domain="a.mesh")
    r = harness.client.post("/v1/clusters/a/revoke", json={}, headers=harness.admin)
    assert r.status_code == 200, r.text
    r = harness.client.post("/v1/clusters", json={"name": "a2", "trust_domain": "a.mesh"}, headers=harness.admin)
    assert r.status_code == 201, r.text


def test_replicas_racing_for_one_trust_domain_register_one_cluster(harness: Harness) -> None:
    second = harness.replica_store()
    other = Authority(second, FileKeyBackend(harness.data_dir, PASSPHRASE))
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def add(authority: Authority, name: str) -> None:
        barrier.wait()
        try:
            authority.create_cluster(name=name, trust_domain="x.mesh", gateway=None, actor="test")
            outcomes.append("ok")
        except Conflict:
            outcomes.append("Conflict")

    threads = [threading.Thread(target=add, args=(harness.authority if i % 2 else other, f"n{i}")) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    second.dispose()
    assert sorted(outcomes) == ["Conflict"] * 5 + ["ok"]


def test_registering_a_cluster_asks_the_store_for_its_trust_domain_not_for_the_whole_fleet(harness: Harness) -> None:
    """The trust domain's holders are a query: registering read every cluster of the fleet (at
    10,000 clusters each registration converted 10,000 rows, and enrolling a fleet grew with its
    square). The holders are still the unrevoked ones, in name order."""
    for name in ("c", "b", "r"):
        r = harness.client.post(
            "/v1/clusters",
            json={"name": name, "trust_domain": "x.mesh", "share_trust_domain": True},
            headers=harness.admin,
        )
        assert r.status_code == 201, r.text
    harness.client.post("/v1/clusters/r/revoke", json={}, headers=harness.admin).raise_for_status()
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(harness.store.engine, "before_cursor_execute", record)
    try:
        r = harness.client.post("/v1/clusters", json={"name": "d", "trust_domain": "x.mesh"}, headers=harness.admin)
    finally:
        event.remove(harness.store.engine, "before_cursor_execute", record)
    assert r.status_code == 409, r.text
    assert "x.mesh is held by cluster(s) b, c:" in r.json()["detail"]
    fleet_reads = [s for s in sent if "FROM clusters" in s and "WHERE" not in s.split("FROM clusters")[1]]
    assert sent and fleet_reads == [], fleet_reads
