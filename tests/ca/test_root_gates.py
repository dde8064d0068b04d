"""Root phases 3 and 4 gated on what every active cluster's istiod serves (issue 12, items 4 and 5):
refusals that list the lagging clusters, readiness from the agents' `served` reports, `force`
audited, the agents' times read on the CA's clock, and the served view of each cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ca_server.core.gates import parse_time
from tests.ca.conftest import WORKLOAD_CERT_LIFETIME, Agent, Harness, both_speedup_modes
from tests.ca.test_http import check_problem
from tests.e2e.foreign import foreign_cacerts
from tests.support.served import fingerprints, rfc3339

WAIT = WORKLOAD_CERT_LIFETIME * 1.1  # the short-lived harness's retirement wait: lifetime + 10 %


def post(h: Harness, path: str, body: dict[str, Any] | None = None) -> Any:
    return h.client.post(path, json=body, headers=h.admin)


def add_root(h: Harness) -> dict[str, Any]:
    r = post(h, "/v1/roots", {})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def root_bundle(root: dict[str, Any]) -> str:
    return root["certificate"]  # type: ignore[no-any-return]


def last_audit(h: Harness, action: str) -> dict[str, Any]:
    items = h.client.get("/v1/audit", params={"limit": 1000}, headers=h.admin).json()["items"]
    return [e for e in items if e["action"] == action][-1]  # type: ignore[no-any-return]


def lagging(r: Any) -> dict[str, str]:
    body = check_problem(r, 409)
    assert body["type"] == "https://meshbridge.dev/problems/fleetnotready" and body["title"] == "Fleet not ready"
    return {x["cluster"]: x["waiting_for"] for x in body["lagging"]}


def gate(h: Harness, root_id: str, phase: str) -> dict[str, Any]:
    r = h.client.get("/v1/roots/status", headers=h.admin)
    assert r.status_code == 200, r.text
    [g] = [g for g in r.json()["gates"] if g["root_id"] == root_id and g["phase"] == phase]
    return g  # type: ignore[no-any-return]


def to_phase_4(h: Harness, a: Agent, b: Agent) -> tuple[dict[str, Any], dict[str, Any]]:
    """Roots A (trusted, retiring) and B (active); a and b renewed under B and reporting it."""
    [root_a] = h.roots()
    root_b = add_root(h)
    for agent in (a, b):
        h.report_served(agent)
    h.clock.advance(seconds=WAIT.total_seconds())
    assert post(h, f"/v1/roots/{root_b['id']}/activate").status_code == 200
    for agent in (a, b):
        h.renew(agent)
    return root_a, root_b


# ----------------------------------------------------------------------------- phase 3
@both_speedup_modes
def test_activate_waits_until_every_active_istiod_serves_the_new_root(short_lived: Harness) -> None:
    harness = short_lived
    a = harness.enroll("a")
    b = harness.enroll("b")
    c = harness.enroll("c")
    harness.add_cluster("pending")  # never enrolled: no istiod of ours to wait for
    assert post(harness, "/v1/clusters/c/revoke", {"reason": "keyCompromise"}).status_code == 200
    [root_a] = harness.roots()
    root_b = add_root(harness)
    harness.report_served(a, bundle=root_bundle(root_a))  # istiod still serves A alone
    r = harness.client.put("/v1/clusters/b/status", json={"installed_generation": 1}, headers=b.headers)
    assert r.status_code == 200  # b's agent reports no `served`

    before = harness.state()
    waits = lagging(post(harness, f"/v1/roots/{root_b['id']}/activate"))
    assert sorted(waits) == ["a", "b"]  # revoked c and pending are ignored
    assert f"istiod to serve root {root_b['id']}" in waits["a"] and "ISTIO_MULTIROOT_MESH" in waits["a"]
    assert "what istiod serves" in waits["b"]
    detail = post(harness, f"/v1/roots/{root_b['id']}/activate").json()["detail"]
    assert "2 active cluster(s) not ready to activate" in detail and "a waits for" in detail
    assert harness.state() == before  # nothing written
    g = gate(harness, root_b["id"], "activate")
    assert not g["ready"] and [(x["name"], x["ready"]) for x in g["clusters"]] == [("a", False), ("b", False)]

    harness.report_served(a)  # a's istiod now serves A+B
    waits = lagging(post(harness, f"/v1/roots/{root_b['id']}/activate"))
    assert sorted(waits) == ["a", "b"] and f"workloads to take root {root_b['id']}" in waits["a"]
    harness.clock.advance(seconds=WAIT.total_seconds() / 2)
    harness.report_served(b)  # b's istiod serves A+B from half the wait later
    g = gate(harness, root_b["id"], "activate")
    ready_at = {x["name"]: parse_time(x["ready_at"]) for x in g["clusters"]}
    assert ready_at["a"] is not None and ready_at["b"] is not None
    # ready_at is written to the second: two truncations can differ from the exact gap by up to 1 s
    assert abs((ready_at["b"] - ready_at["a"]) - WAIT / 2) <= timedelta(seconds=1)
    harness.clock.advance(seconds=WAIT.total_seconds() / 2 + 1)
    assert sorted(lagging(post(harness, f"/v1/roots/{root_b['id']}/activate"))) == ["b"]
    harness.clock.advance(seconds=WAIT.total_seconds() / 2)
    assert gate(harness, root_b["id"], "activate")["ready"] is True
    r = post(harness, f"/v1/roots/{root_b['id']}/activate")
    assert r.status_code == 200 and r.json()["status"] == "active"
    entry = last_audit(harness, "root.activate")
    assert "forced" not in entry["details"] and entry["details"]["rotated"] == ["a", "b"]
    assert c.name not in entry["details"]["rotated"]


def test_forced_activation_is_audited_with_the_lagging_clusters(harness: Harness) -> None:
    a = harness.enroll("a")
    harness.enroll("b")  # no status at all
    root_b = add_root(harness)
    harness.report_served(a)
    assert post(harness, f"/v1/roots/{root_b['id']}/activate", {"force": "yes"}).status_code == 400
    assert post(harness, f"/v1/roots/{root_b['id']}/activate", {"forse": True}).status_code == 400
    r = post(harness, f"/v1/roots/{root_b['id']}/activate", {"force": True})
    assert r.status_code == 200 and r.json()["status"] == "active"
    details = last_audit(harness, "root.activate")["details"]
    assert details["forced"] is True and details["lagging"] == ["a", "b"]
    assert "none yet" in details["waiting_for"]["b"]
    assert "workloads to take root" in details["waiting_for"]["a"]  # 24 h + 10 % from now
    assert harness.chain_ok()


def test_activation_reads_bundle_times_on_the_ca_clock(short_lived: Harness) -> None:
    h = short_lived
    a = h.enroll("a")
    root_b = add_root(h)
    activate = f"/v1/roots/{root_b['id']}/activate"
    created = h.clock()
    h.clock.advance(seconds=WAIT.total_seconds() + 5)
    now = h.clock()
    # a clock running ahead: on its own clock istiod has served A+B for 200 s
    h.report_served(a, observed_at=now + timedelta(seconds=1000), since=now + timedelta(seconds=800))
    assert "ahead of the CA's clock" in lagging(post(h, activate))["a"]
    # served since before the root existed: read as the root's creation, whose wait is over
    h.report_served(a, since=datetime(1970, 1, 1, tzinfo=UTC))
    ready_at = parse_time(gate(h, root_b["id"], "activate")["clusters"][0]["ready_at"])
    assert ready_at is not None and abs(ready_at - created - WAIT) < timedelta(seconds=2)
    assert post(h, activate).status_code == 200


# ----------------------------------------------------------------------------- phase 4
def test_retire_waits_the_workload_certificate_lifetime_on_the_ca_clock(short_lived: Harness) -> None:
    h = short_lived
    a = h.enroll("a")
    b = h.enroll("b")
    root_a, root_b = to_phase_4(h, a, b)
    waits = lagging(post(h, f"/v1/roots/{root_a['id']}/retire"))
    # their last reports predate the renewals: istiod still signs with generation 1, under A
    assert sorted(waits) == ["a", "b"] and f"generation 1, under root {root_a['id']}" in waits["a"]
    h.report_served(a)
    h.report_served(b)
    start = h.clock()
    waits = lagging(post(h, f"/v1/roots/{root_a['id']}/retire"))
    assert sorted(waits) == ["a", "b"] and f"workload certificates under root {root_a['id']} to expire" in waits["a"]
    g = gate(h, root_a["id"], "retire")
    ready_at = parse_time(g["clusters"][0]["ready_at"])
    assert ready_at is not None and abs((ready_at - start) - WAIT) < timedelta(seconds=2)
    h.clock.advance(seconds=WAIT.total_seconds() - 2)
    assert sorted(lagging(post(h, f"/v1/roots/{root_a['id']}/retire"))) == ["a", "b"]
    h.clock.advance(seconds=3)
    assert gate(h, root_a["id"], "retire")["ready"] is True
    r = post(h, f"/v1/roots/{root_a['id']}/retire")
    assert r.status_code == 200 and r.json()["status"] == "retired"
    assert "forced" not in last_audit(h, "root.retire")["details"]
    assert {x["id"]: x["status"] for x in h.roots()} == {root_a["id"]: "retired", root_b["id"]: "active"}


def test_retire_treats_a_serial_the_ca_did_not_issue_to_the_cluster_as_lagging(short_lived: Harness) -> None:
    h = short_lived
    a = h.enroll("a")
    b = h.enroll("b")
    old_a_serial = a.serial
    root_a, _ = to_phase_4(h, a, b)
    h.report_served(b)
    long_ago = h.clock() - timedelta(days=1)
    cases = {
        "ffff0000ffff": "this CA issued to this cluster",  # unknown serial
        b.serial: "this CA issued to this cluster",  # another cluster's intermediate
        old_a_serial: f"it signs with generation 1, under root {root_a['id']}",  # still the old one
    }
    for serial, why in cases.items():
        h.report_served(a, signing_serial=serial, since=long_ago)
        waits = lagging(post(h, f"/v1/roots/{root_a['id']}/retire"))
        assert why in waits["a"], (serial, waits)
    h.report_served(a, signing=False)
    assert "which intermediate istiod signs with" in lagging(post(h, f"/v1/roots/{root_a['id']}/retire"))["a"]
    h.report_served(a, signing_serial=a.serial.upper().rjust(40, "0"))  # the same serial, written otherwise
    h.clock.advance(seconds=WAIT.total_seconds() + 1)
    assert post(h, f"/v1/roots/{root_a['id']}/retire").status_code == 200


def test_agent_times_do_not_make_a_cluster_ready_early(short_lived: Harness) -> None:
    """A report read on the agent's clock alone would pass in each case below."""
    h = short_lived
    a = h.enroll("a")
    b = h.enroll("b")
    root_a, _ = to_phase_4(h, a, b)
    h.report_served(b)
    h.clock.advance(seconds=WAIT.total_seconds() + 1)  # b is ready from here on
    retire = f"/v1/roots/{root_a['id']}/retire"
    now = h.clock()

    # a clock running ahead: by its own observation time istiod has signed under B for 200 s
    h.report_served(a, observed_at=now + timedelta(seconds=1000), since=now + timedelta(seconds=800))
    waits = lagging(post(h, retire))
    assert list(waits) == ["a"] and "ahead of the CA's clock" in waits["a"]
    h.clock.advance(seconds=WAIT.total_seconds() + 1)  # wall time since the report: past the wait
    assert list(lagging(post(h, retire))) == ["a"]

    # a clock running behind by 1000 s: 1050 s ago on its clock is 50 s ago on the CA's
    now = h.clock()
    h.report_served(a, observed_at=now - timedelta(seconds=1000), since=now - timedelta(seconds=1050))
    assert list(lagging(post(h, retire))) == ["a"]

    # a signing time before the CA issued the intermediate: read as its issuance
    h.renew(a)
    h.report_served(a, since=datetime(1970, 1, 1, tzinfo=UTC))
    ready_at = parse_time(gate(h, root_a["id"], "retire")["clusters"][0]["ready_at"])
    issued = parse_time(h.cluster("a")["intermediate"]["not_before"])
    assert ready_at is not None and issued is not None
    assert abs(ready_at - (issued + timedelta(minutes=5)) - WAIT) < timedelta(seconds=2)  # notBefore: 5 min back
    assert list(lagging(post(h, retire))) == ["a"]
    h.clock.advance(seconds=WAIT.total_seconds())
    assert post(h, retire).status_code == 200


def test_unreadable_report_times_are_lagging(short_lived: Harness) -> None:
    h = short_lived
    a = h.enroll("a")
    b = h.enroll("b")
    root_a, _ = to_phase_4(h, a, b)
    h.report_served(b)
    body = {"served": {"observed_at": "yesterday", "bundle": fingerprints(h.desired(a)["trust_bundle"])}}
    body["served"] |= {"signing_serial": a.serial, "signing_since": "2026-01-01T00:00:00"}  # no offset
    assert h.client.put("/v1/clusters/a/status", json=body, headers=a.headers).status_code == 200
    h.clock.advance(seconds=WAIT.total_seconds() + 1)
    assert "readable times" in lagging(post(h, f"/v1/roots/{root_a['id']}/retire"))["a"]


def test_forced_retirement_is_audited_but_never_overrides_a_held_intermediate(short_lived: Harness) -> None:
    h = short_lived
    a = h.enroll("a")
    b = h.enroll("b")
    [root_a] = h.roots()
    root_b = add_root(h)
    assert post(h, f"/v1/roots/{root_b['id']}/activate", {"force": True}).status_code == 200
    h.renew(a)  # b keeps its intermediate under A
    r = post(h, f"/v1/roots/{root_a['id']}/retire", {"force": True})
    body = check_problem(r, 409)
    assert body["type"].endswith("/conflict") and "still hold intermediates under this root: b" in body["detail"]
    g = gate(h, root_a["id"], "retire")
    by_name = {x["name"]: x for x in g["clusters"]}
    assert by_name["b"]["overridable"] is False and "force cannot override" in by_name["b"]["waiting_for"][0]
    assert by_name["a"]["overridable"] is True and not by_name["a"]["ready"]
    h.renew(b)
    h.report_served(a)
    r = post(h, f"/v1/roots/{root_a['id']}/retire", {"force": True})
    assert r.status_code == 200 and r.json()["status"] == "retired"
    details = last_audit(h, "root.retire")["details"]
    assert details["forced"] is True and details["lagging"] == ["a", "b"]
    assert "to expire" in details["waiting_for"]["a"] and "none yet" in details["waiting_for"]["b"]


def test_status_lists_both_gates_of_every_trusted_root(short_lived: Harness) -> None:
    h = short_lived
    a = h.enroll("a")
    r = h.client.get("/v1/roots/status", headers=h.admin)
    [root_a] = h.roots()
    assert r.json() == {"active_root": root_a["id"], "workload_cert_lifetime_s": 100, "margin_s": 10, "gates": []}
    root_b = add_root(h)
    h.report_served(a)
    gates = h.client.get("/v1/roots/status", headers=h.admin).json()["gates"]
    assert [(g["root_id"], g["phase"], g["ready"]) for g in gates] == [
        (root_b["id"], "activate", False),  # a's workloads take B as they renew
        (root_b["id"], "retire", False),  # and no workload certificate under B may be left
    ]
    h.clock.advance(seconds=WAIT.total_seconds())
    gates = h.client.get("/v1/roots/status", headers=h.admin).json()["gates"]
    assert [g["ready"] for g in gates] == [True, True]
    assert check_problem(h.client.get("/v1/roots/status"), 401)


# ----------------------------------------------------------------------------- the served view
def test_cluster_shows_desired_installed_and_served(short_lived: Harness) -> None:
    h = short_lived
    a = h.enroll("a")
    h.enroll("b")
    shown = h.cluster("a")
    assert shown["installed"] is None and shown["served"] is None
    [root_a] = h.roots()
    root_b = add_root(h)
    h.clock.advance(seconds=60)
    # after the intermediate's issuance, so taken as reported (a whole second: the view shows seconds)
    since = (h.clock() - timedelta(seconds=30)).replace(microsecond=0)
    h.report_served(a, since=since)
    h.clock.advance(seconds=7)
    shown = h.cluster("a")
    assert shown["generation"] == 1 and shown["installed"] == {"generation": 1, "serial": a.serial}
    served = shown["served"]
    assert served["bundle_roots"] == sorted([root_a["id"], root_b["id"]])
    assert served["bundle_since"] == served["signing_since"]
    assert served["signing_serial"] == a.serial and served["signing_generation"] == 1
    assert served["signing_root_id"] == root_a["id"] and served["problems"] == []
    assert served["signing_since"] == rfc3339(since)[:19] + "Z"
    assert 7 <= served["report_age_s"] <= 9
    assert shown["agent_status"]["served"]["signing_serial"] == a.serial  # the stored report, as sent
    h.report_served(a, bundle=root_bundle(root_a) + foreign_cacerts()["root-cert.pem"])  # a root the CA lacks
    listed = h.client.get("/v1/clusters", headers=h.admin).json()["items"]
    assert [c["name"] for c in listed] == ["a", "b"] and listed[1]["served"] is None
    assert listed[0]["served"]["bundle_roots"][0] == root_a["id"]
    assert listed[0]["served"]["bundle_roots"][1].startswith("unknown:")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-01T10:00:00Z", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01t10:00:00z", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01 12:30:00+02:30", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01T10:00:00.123456789-00:00", datetime(2026, 3, 1, 10, 0, 0, 123456, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2017, 1, 1, tzinfo=UTC)),  # a leap second
        ("2026-03-01T10:00:00", None),  # no offset: whose clock?
        ("2026-02-30T10:00:00Z", None),
        ("2026-03-01T10:00:00+24:00", None),
        ("0001-01-01T00:00:00+01:00", None),  # before year 1 in UTC
        ("yesterday", None),
        (1700000000, None),
    ],
)
def test_report_times_are_read_as_rfc_3339(text: object, expected: datetime | None) -> None:
    assert parse_time(text) == expected
