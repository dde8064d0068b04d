"""A fleet of thousands on one replica (issue 15, item 2): activating a root costs a bounded number
of statements whatever the fleet size (one set-based update, not a locked read and write per
cluster), a new snapshot re-reads the clusters changed since the last in one query, and one
activation wakes the revision watcher once.

Statements are counted with a SQLAlchemy ``before_cursor_execute`` listener, so these tests run
with the speed-ups off: the prepared hot-path statements run on the DBAPI cursor and would not
be seen by it."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, insert, select

from ca_server.api import longpoll
from ca_server.api.longpoll import DesiredWaiters
from ca_server.core.fleet import Fleet, FleetSnapshot
from ca_server.speedups import ALL_OFF
from ca_server.storage import tables as t
from tests.ca.conftest import Harness

# the tests with a harness run with the speed-ups off
speedups_off = pytest.mark.parametrize("speedups", [pytest.param(ALL_OFF, id="speedups-off")], indirect=True)

STATEMENT_BOUND = 12  # one activation issues 8 (SQLite, speed-ups off), whatever the fleet size


@contextmanager
def counted(h: Harness) -> Iterator[list[str]]:
    """The SQL of every statement the harness's store issues inside the block, from this thread
    (the app's revision watcher reads the store from its own)."""
    seen: list[str] = []
    me = threading.get_ident()

    def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if threading.get_ident() == me:
            seen.append(statement)

    event.listen(h.store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(h.store.engine, "before_cursor_execute", record)


def seed_clusters(h: Harness, n: int, *, prefix: str = "s") -> list[str]:
    """``n`` active clusters, each holding a generation-1 intermediate under the active root, written
    straight into the tables (enrolling thousands through the API would only slow the test: the
    activation reads the rows, never the certificates' contents)."""
    [root] = [r for r in h.roots() if r["status"] == "active"]
    now = h.clock()
    names = [f"{prefix}{i:05d}" for i in range(n)]
    cluster_rows = [
        {
            "name": name,
            "trust_domain": f"{name}.test",
            "status": "active",
            "generation": 1,
            "rotation_pending": False,
            "gateway": None,
            "created_at": now,
            "agent_token_id": f"tok-{name}",
            "agent_token_hash": "x",
            "exports": None,
            "agent_status": None,
            "revoked_at": None,
            "proof_floor": 0,
        }
        for name in names
    ]
    cert_rows = [
        {
            "serial": hashlib.sha256(name.encode()).hexdigest()[:20],
            "cluster": name,
            "root_id": root["id"],
            "generation": 1,
            "cert_pem": "",
            "public_key_fp": f"fp-{name}",
            "unique_key_fp": f"fp-{name}",
            "not_before": now,
            "not_after": now + timedelta(days=90),
            "issued_at": now,
            "revoked_at": None,
            "revocation_reason": None,
        }
        for name in names
    ]
    with h.store.engine.begin() as conn:
        conn.execute(insert(t.clusters), cluster_rows)
        conn.execute(insert(t.certificates), cert_rows)
    return names


def new_root(h: Harness) -> str:
    r = h.client.post("/v1/roots", json={}, headers=h.admin)
    assert r.status_code == 201, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def activate_counted(h: Harness, root_id: str | None = None) -> tuple[list[str], str]:
    """Force the activation of ``root_id`` (a new root when None; no agent reports: every cluster
    lags); returns the statements the activation issued and the root's id."""
    root_id = root_id or new_root(h)
    with counted(h) as seen:
        h.authority.activate_root(root_id, actor="test", force=True)
    return seen, root_id


@speedups_off
def test_activation_issues_a_bounded_number_of_statements_whatever_the_fleet_size(harness: Harness) -> None:
    costs = {}
    for n, prefix in ((10, "a"), (1000, "b")):
        names = seed_clusters(harness, n, prefix=prefix)
        seen, _ = activate_counted(harness)
        costs[n] = len(seen)
        with harness.store.engine.connect() as conn:
            rows = {r.name: r for r in conn.execute(select(t.clusters).where(t.clusters.c.name.in_(names)))}
        assert all(r.generation == 2 and r.rotation_pending for r in rows.values()) and len(rows) == n
    # the per-cluster loop issued about one statement per cluster and more (1,000 clusters: > 1,000)
    assert costs[1000] == costs[10] <= STATEMENT_BOUND, costs
    rotated = [e for e in harness.authority.audit(after=0, limit=1000) if e.action == "root.activate"][-1]
    assert len(rotated.details["rotated"]) == 1010  # the 10 of the first round are still pending: named again


@speedups_off
def test_activation_moves_only_active_clusters_off_other_roots_and_never_twice(harness: Harness) -> None:
    a, b, c = seed_clusters(harness, 3)
    with harness.store.engine.begin() as conn:
        conn.execute(t.clusters.update().where(t.clusters.c.name == b).values(status="revoked"))
        conn.execute(t.clusters.update().where(t.clusters.c.name == c).values(generation=5, rotation_pending=True))
    _, root_id = activate_counted(harness)
    with harness.store.engine.connect() as conn:
        rows = {r.name: (r.generation, r.rotation_pending) for r in conn.execute(select(t.clusters))}
    assert rows[a] == (2, True)
    assert rows[b] == (1, False)  # revoked: left alone
    assert rows[c] == (5, True)  # already pending: not moved a second generation up
    entry = [e for e in harness.authority.audit(after=0, limit=1000) if e.action == "root.activate"][-1]
    assert entry.subject == root_id and entry.details["rotated"] == [a, c]


@speedups_off
def test_a_cluster_already_under_the_new_root_is_not_rotated(harness: Harness) -> None:
    agent = harness.enroll("x")
    r = harness.client.post("/v1/roots", json={}, headers=harness.admin)
    new_root = r.json()["id"]
    harness.authority.activate_root(new_root, actor="test", force=True)
    harness.renew(agent)  # now under the new root
    assert harness.cluster("x")["rotation_pending"] is False
    # activating the old root again moves x back; the new root's own holders are left alone
    [old] = [x["id"] for x in harness.roots() if x["id"] != new_root]
    gen = harness.cluster("x")["generation"]
    harness.authority.activate_root(new_root, actor="test", force=True)  # already active: nothing
    assert harness.cluster("x")["generation"] == gen and harness.cluster("x")["rotation_pending"] is False
    harness.authority.activate_root(old, actor="test", force=True)
    assert harness.cluster("x")["generation"] == gen + 1 and harness.cluster("x")["rotation_pending"] is True


@speedups_off
def test_a_new_snapshot_reads_the_changed_clusters_in_one_query(harness: Harness) -> None:
    agents = [harness.enroll(f"c{i}") for i in range(6)]
    fleet = Fleet(harness.authority.ctx)  # its own: the app's watcher reads the harness's in another thread
    fleet.snapshot()
    for agent in agents:
        harness.rotate(agent.name)  # one cluster.rotate entry each: the next snapshot is built as a delta
    with counted(harness) as seen:
        snap = fleet.snapshot()
    assert all(snap.clusters[a.name].rotation_pending for a in agents)
    reads = [s for s in seen if s.lstrip().upper().startswith("SELECT") and "FROM clusters" in s]
    assert len(reads) == 1, reads  # was one per changed cluster


@speedups_off
def test_one_activation_is_one_change_notification(harness: Harness) -> None:
    seed_clusters(harness, 50)
    root_id = new_root(harness)
    calls: list[int] = []
    harness.authority.on_change.append(lambda: calls.append(1))
    activate_counted(harness, root_id)
    assert len(calls) == 1  # one wake-up of this replica's watcher, not one per cluster


@speedups_off
def test_renewals_and_rotations_keep_the_fleet_index_and_name_what_changed(harness: Harness) -> None:
    a, b, c = (harness.enroll(n) for n in ("a", "b", "c"))
    service = {
        "name": "reviews.bookinfo",
        "namespace": "bookinfo",
        "service": "reviews",
        "ports": [{"number": 9080, "protocol": "HTTP"}],
        "consumers": ["a"],
    }
    assert harness.publish(b, trust_domain="b.test", services=[service]).status_code == 200
    fleet = Fleet(harness.authority.ctx)
    s1 = fleet.snapshot()
    assert s1.imports_for["a"][0]["cluster"] == "b"
    harness.rotate("c")
    s2 = fleet.snapshot()
    # was rebuilt from every cluster's exports on every change: O(fleet) per renewal
    assert s2.imports_for is s1.imports_for and s2.peers_for is s1.peers_for
    assert s2.changed_since(s1) == frozenset({"c"}) and s2.changed_since(s2) == frozenset()
    moved = {**service, "ports": [{"number": 9081, "protocol": "HTTP"}]}
    assert harness.publish(b, trust_domain="b.test", services=[moved]).status_code == 200
    s3 = fleet.snapshot()
    assert s3.imports_for["a"][0]["ports"][0]["number"] == 9081  # the exporter's change reaches the index
    assert s3.changed_since(s2) == frozenset({"a", "b"})  # a imports from b: its desired state differs too
    assert s3.changed_since(s1) == frozenset({"a", "b", "c"})
    del a, c
    harness.client.post("/v1/roots", json={}, headers=harness.admin)  # not a cluster's own change
    s4 = fleet.snapshot()
    assert s4.changed_since(s3) is None and s4.changes == ()


@speedups_off
def test_a_waiter_is_woken_only_when_its_cluster_changed_without_comparing_every_waiter(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in ("a", "b", "c"):
        harness.enroll(n)
    fleet = Fleet(harness.authority.ctx)
    waiters = DesiredWaiters()
    compared: list[str] = []
    real = longpoll._same_desired_inputs

    def counting(x: FleetSnapshot, y: FleetSnapshot, name: str) -> bool:
        compared.append(name)
        return real(x, y, name)

    monkeypatch.setattr(longpoll, "_same_desired_inputs", counting)

    async def run() -> dict[str, bool]:
        waiters.on_snapshot(fleet.snapshot())
        with waiters.watch("a") as ev_a, waiters.watch("b") as ev_b, waiters.watch("c") as ev_c:
            harness.rotate("b")
            waiters.on_snapshot(fleet.snapshot())
            return {"a": ev_a.is_set(), "b": ev_b.is_set(), "c": ev_c.is_set()}

    assert asyncio.run(run()) == {"a": False, "b": True, "c": False}
    assert compared == []  # the snapshot named b: no other waiter was looked at (was one comparison each)


def test_changes_older_than_the_deltas_kept_are_unknown() -> None:
    def snap(revision: int, changes: tuple[tuple[int, int, frozenset[str]], ...]) -> FleetSnapshot:
        return FleetSnapshot(revision=revision, trust_bundle="", crl_pem="", clusters={}, changes=changes)

    links = tuple((r, r + 1, frozenset({f"c{r}"})) for r in range(100, 164))  # 64 deltas: 100 → 164
    latest = snap(164, links)
    assert latest.changed_since(snap(100, ())) == frozenset(f"c{r}" for r in range(100, 164))
    assert latest.changed_since(snap(163, ())) == frozenset({"c163"})
    assert latest.changed_since(snap(99, ())) is None  # before the oldest delta kept: anything may differ
    assert latest.changed_since(snap(170, ())) is None  # a later snapshot than this one: not a delta of it
