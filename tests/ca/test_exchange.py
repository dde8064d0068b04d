"""The fleet exchange: exports become imports and peers for their consumers only, revoked
clusters drop out, status is echoed, and the desired-state long-poll wakes on change."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ca_server.cli_views import cluster_table
from ca_server.core.authority import Authority
from ca_server.keys.file import FileKeyBackend
from ca_server.storage.repository import SqlStore
from tests.ca.conftest import PASSPHRASE, Agent, Harness, make_harness

RATINGS = {
    "name": "ratings.bookinfo",
    "namespace": "bookinfo",
    "service": "ratings",
    "ports": [{"number": 9080, "protocol": "HTTP"}],
    "consumers": ["b"],
}
REVIEWS = {
    "name": "reviews.bookinfo",
    "namespace": "bookinfo",
    "service": "reviews",
    "ports": [{"number": 9080, "protocol": "HTTP"}, {"number": 9443, "protocol": "TLS"}],
    "consumers": ["c", "b", "nobody"],
}


def imports(h: Harness, agent: Agent) -> list[dict[str, Any]]:
    r = h.client.get(f"/v1/clusters/{agent.name}/imports", headers=agent.headers)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    assert items == h.desired(agent)["imports"]
    return items


def test_exports_reach_their_consumers_only(harness: Harness) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    b = harness.enroll("b", trust_domain="b.mesh")
    c = harness.enroll("c", trust_domain="c.mesh")
    harness.add_cluster("d", trust_domain="d.mesh")  # never enrolls
    assert imports(harness, b) == []

    r = harness.publish(a, trust_domain="a.mesh", services=[RATINGS, REVIEWS], address="203.0.113.7")
    assert r.status_code == 200, r.text
    stored = r.json()
    assert stored["gateway"] == {
        "address": "203.0.113.7",
        "port": 15443,
        "tcp_port": None,
        "addresses": None,
    }  # echo: defaults filled in
    assert [s["name"] for s in stored["services"]] == ["ratings.bookinfo", "reviews.bookinfo"]
    assert stored["services"][1]["consumers"] == ["b", "c", "nobody"]
    assert harness.cluster("a")["gateway"] == {"address": "203.0.113.7", "port": 15443}  # replaces registration

    ingress_a = "spiffe://a.mesh/ns/istio-system/sa/ingress"
    assert imports(harness, b) == [
        {
            "name": "ratings.bookinfo",
            "cluster": "a",
            "ports": [{"number": 9080, "protocol": "HTTP"}],
            "gateway": {"address": "203.0.113.7", "port": 15443},
            "identity": ingress_a,
        },
        {
            "name": "reviews.bookinfo",
            "cluster": "a",
            "ports": [{"number": 9080, "protocol": "HTTP"}, {"number": 9443, "protocol": "TLS"}],
            "gateway": {"address": "203.0.113.7", "port": 15443},
            "identity": ingress_a,
        },
    ]
    assert [i["name"] for i in imports(harness, c)] == ["reviews.bookinfo"]
    assert imports(harness, a) == []
    # peers: those that consume my exports or export to me, once they have published
    assert [p["name"] for p in harness.desired(a)["peers"]] == []
    assert harness.desired(b)["peers"] == [
        {
            "name": "a",
            "trust_domain": "a.mesh",
            "identities": {"ingress": ingress_a, "egress": "spiffe://a.mesh/ns/istio-system/sa/egress"},
        }
    ]
    assert harness.publish(b, trust_domain="b.mesh").status_code == 200
    assert [p["name"] for p in harness.desired(a)["peers"]] == ["b"]
    assert harness.publish(c, trust_domain="c.mesh").status_code == 200
    assert [p["name"] for p in harness.desired(a)["peers"]] == ["b", "c"]
    assert [p["name"] for p in harness.desired(c)["peers"]] == ["a"]
    # publishing the same again changes nothing
    head = harness.audit_head()
    revision = harness.desired(b)["revision"]
    assert (
        harness.publish(a, trust_domain="a.mesh", services=[RATINGS, REVIEWS], address="203.0.113.7").json() == stored
    )
    assert harness.audit_head() == head and harness.desired(b)["revision"] == revision


def test_the_published_tcp_port_reaches_the_importers(harness: Harness) -> None:
    """Issue 11 item 11: an exporter's cross-cluster TCP port travels in `Import.gateway.tcp_port`
    (importers assumed their own before); an agent that does not send it publishes as before."""
    a = harness.enroll("a", trust_domain="a.mesh")
    b = harness.enroll("b", trust_domain="b.mesh")
    db = {**RATINGS, "ports": [{"number": 5432, "protocol": "TCP"}, {"number": 5433, "protocol": "TCP"}]}
    r = harness.publish(a, trust_domain="a.mesh", services=[db], tcp_port=31444)
    assert r.status_code == 200, r.text
    assert r.json()["gateway"] == {"address": "198.51.100.1", "port": 15443, "tcp_port": 31444, "addresses": None}
    assert harness.cluster("a")["gateway"] == {"address": "198.51.100.1", "port": 15443, "tcp_port": 31444}
    (entry,) = imports(harness, b)
    assert entry["gateway"] == {"address": "198.51.100.1", "port": 15443, "tcp_port": 31444}
    assert [p["number"] for p in entry["ports"]] == [5432, 5433]
    assert harness.publish(a, trust_domain="a.mesh", services=[db]).status_code == 200  # an older agent
    (entry,) = imports(harness, b)
    assert entry["gateway"] == {"address": "198.51.100.1", "port": 15443}
    assert harness.publish(a, trust_domain="a.mesh", tcp_port=0).status_code == 400


def test_every_exporter_of_a_name_reaches_the_consumer_and_the_fleet_view(harness: Harness) -> None:
    """Issue 13 items 4-6: two exporters of one name both reach its consumer (one entry each, with
    every gateway address), and the cluster list shows per name which exporters serve it."""
    a = harness.enroll("a", trust_domain="a.mesh")
    b = harness.enroll("b", trust_domain="b.mesh")
    c = harness.enroll("c", trust_domain="c.mesh")
    two = ["198.51.100.1", "gw2.a.example"]
    assert harness.publish(a, trust_domain="a.mesh", services=[RATINGS], addresses=two).status_code == 200
    assert harness.publish(c, trust_domain="c.mesh", services=[RATINGS], address="198.51.100.3").status_code == 200
    entries = imports(harness, b)
    assert [(e["name"], e["cluster"]) for e in entries] == [("ratings.bookinfo", "a"), ("ratings.bookinfo", "c")]
    assert entries[0]["gateway"]["addresses"] == two
    assert entries[1]["identity"] == "spiffe://c.mesh/ns/istio-system/sa/ingress"
    listed = {i["name"]: i for i in harness.client.get("/v1/clusters", headers=harness.admin).json()["items"]}
    assert listed["b"]["imports"] == {"ratings.bookinfo": ["a", "c"]}
    assert listed["a"]["imports"] == {}
    assert re.search(r"^b\s+ratings\.bookinfo\s+a, c$", cluster_table(list(listed.values())), re.MULTILINE)
    bad = harness.publish(a, trust_domain="a.mesh", addresses=["198.51.100.9"])  # not led by `address`
    assert bad.status_code == 400 and "addresses[0] must be address" in bad.text


def test_identities_outside_the_trust_domain_are_refused(harness: Harness) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    before = harness.state()
    r = harness.publish(a, trust_domain="b.mesh")
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    assert "spiffe://a.mesh/" in r.json()["detail"]
    assert harness.state() == before


def test_a_revoked_clusters_exports_leave_everyone_elses_imports(harness: Harness) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    b = harness.enroll("b", trust_domain="b.mesh")
    harness.publish(a, trust_domain="a.mesh", services=[RATINGS])
    harness.publish(b, trust_domain="b.mesh")
    assert [i["cluster"] for i in imports(harness, b)] == ["a"]
    revision = harness.desired(b)["revision"]
    r = harness.client.post("/v1/clusters/a/revoke", json={"reason": "keyCompromise"}, headers=harness.admin)
    assert r.status_code == 200
    d = harness.desired(b)
    assert d["imports"] == [] and d["peers"] == [] and d["revision"] != revision
    assert imports(harness, b) == []


def test_status_is_echoed_and_shown_with_the_cluster(harness: Harness) -> None:
    a = harness.enroll("a")
    body = {
        "installed_generation": 1,
        "installed_serial": a.serial,
        "last_reconcile_at": "2026-01-01T00:00:00Z",
        "imports_applied": 3,
        "errors": ["coredns: not found"],
    }
    r = harness.client.put("/v1/clusters/a/status", json=body, headers=a.headers)
    assert r.status_code == 200
    assert {k: r.json()[k] for k in body} == body
    shown = harness.cluster("a")["agent_status"]
    assert {k: shown[k] for k in body} == body
    listed = harness.client.get("/v1/clusters", headers=harness.admin).json()["items"]
    assert [c["agent_status"]["installed_serial"] for c in listed] == [a.serial]


def test_long_poll_answers_on_change(harness: Harness) -> None:
    a = harness.enroll("a")
    first = harness.desired(a)
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        waiting = pool.submit(harness.desired, a, revision=first["revision"], wait=20)
        time.sleep(0.5)
        assert not waiting.done()
        harness.rotate("a")
        changed = waiting.result(timeout=10)
        elapsed = time.monotonic() - started
    assert changed["revision"] != first["revision"] and changed["rotate_required"] is True
    assert elapsed < 5


def test_long_poll_answers_after_the_wait_without_change(harness: Harness) -> None:
    a = harness.enroll("a")
    first = harness.desired(a)
    started = time.monotonic()
    harness.add_cluster("unrelated")  # moves the fleet revision, not a's desired state
    same = harness.desired(a, revision=first["revision"], wait=1.5)
    elapsed = time.monotonic() - started
    assert same == first
    assert 1.4 <= elapsed < 6
    # a stale revision is answered at once
    started = time.monotonic()
    assert harness.desired(a, revision="stale", wait=1000) == first  # above 60 counts as 60, not as an error
    assert time.monotonic() - started < 3


def test_long_poll_never_answers_with_an_older_state(database_url: str, tmp_path: Path) -> None:
    """A change made on another replica reaches this one's watcher only at its next poll; meanwhile
    an agent that has already read the newer state (the first look reads the store) must not be
    handed the older one back, neither at once nor when its wait ends."""
    for h in make_harness(database_url, tmp_path / "ca", watch_interval=30):
        a = h.enroll("a")
        time.sleep(0.3)  # the local change reached this replica's watcher
        other_store = SqlStore(h.database_url)
        try:
            Authority(other_store, FileKeyBackend(h.data_dir, PASSPHRASE)).rotate("a", actor="test")
        finally:
            other_store.dispose()
        newer = h.desired(a)
        assert newer["rotate_required"] is True
        started = time.monotonic()
        again = h.desired(a, revision=newer["revision"], wait=1)
        assert again == newer
        assert time.monotonic() - started >= 0.9
