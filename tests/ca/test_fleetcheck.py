"""`meshbridge-ca fleet check` (issue 14, item 3): the checks against a real CA (the harness, whose
clock the tests move), and the command's output and exit status against a served CA."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ca_server import fleetcheck
from ca_server.fleetcheck import Limits, Result
from cluster_agent import pki
from tests.ca.conftest import Agent, Harness
from tests.ca.test_cli import cli, ok, serve
from tests.support.served import rfc3339, serial_of, served


def results(h: Harness, limits: Limits | None = None) -> list[Result]:
    def get_json(path: str) -> Any:
        r = h.client.get(path, headers=h.admin)
        assert r.status_code == 200, r.text
        return r.json()

    def get_text(path: str) -> str:
        r = h.client.get(path, headers=h.admin)
        assert r.status_code == 200, r.text
        return r.text

    data = fleetcheck.gather(get_json, get_text)
    return fleetcheck.check_fleet(data, now=h.clock(), limits=limits or Limits())


def of(rs: list[Result], cluster: str, check: str) -> list[Result]:
    return [r for r in rs if r.cluster == cluster and r.check == check]


def one(rs: list[Result], cluster: str, check: str) -> Result:
    found = of(rs, cluster, check)
    assert len(found) == 1, found
    return found[0]


def failed(rs: list[Result]) -> set[tuple[str, str]]:
    return {(r.cluster, r.check) for r in rs if r.status == "fail"}


def healthy(h: Harness, name: str) -> Agent:
    """``name`` enrolled, its agent reporting that istiod serves what it installed."""
    agent = h.enroll(name)
    h.report_served(agent)
    return agent


def test_a_healthy_fleet_passes_with_warnings_only(harness: Harness) -> None:
    healthy(harness, "a")
    healthy(harness, "b")
    harness.add_cluster("c")  # registered, never enrolled: a warning
    rs = results(harness)
    assert failed(rs) == set()
    assert fleetcheck.exit_code(rs) == 0
    for name in ("a", "b"):
        for check in ("agent-report", "generation", "intermediate", "istiod-signing", "trust-bundle", "agent-errors"):
            assert one(rs, name, check).status == "ok", one(rs, name, check)
        # the harness's report carries no istio-ca-crl: a warning, not a failure
        assert one(rs, name, "istiod-crl").status == "warn"
    assert one(rs, "c", "enrolled").status == "warn"
    assert one(rs, "*", "ca-crl").status == "ok"
    assert one(rs, "*", "gateway-reachability") == Result("*", "gateway-reachability", "skip", fleetcheck.NO_PEER_DATA)
    text = fleetcheck.render(rs)
    assert "OK: " in text.splitlines()[-1] and "0 failed" in text
    assert "✓ a" in text and "! c" in text and "- *" in text


def test_a_silent_agent_fails_once_its_report_is_older_than_the_limit(harness: Harness) -> None:
    healthy(harness, "a")
    harness.clock.advance(minutes=9)
    assert failed(results(harness)) == set()
    harness.clock.advance(minutes=2)
    rs = results(harness)
    assert failed(rs) == {("a", "agent-report")}
    assert "last report 11m ago (limit 10m)" in one(rs, "a", "agent-report").detail
    assert failed(results(harness, Limits(max_report_age=timedelta(minutes=15)))) == set()
    assert fleetcheck.exit_code(rs) == 1


def test_an_agent_that_never_reported_fails(harness: Harness) -> None:
    harness.enroll("a")
    rs = results(harness)
    assert ("a", "agent-report") in failed(rs) and ("a", "generation") in failed(rs)
    assert one(rs, "a", "generation").detail == "none reported, desired 1"
    assert one(rs, "a", "served").status == "warn"


def test_a_lagging_generation_and_an_istiod_that_did_not_load_it(harness: Harness) -> None:
    agent = healthy(harness, "a")
    old_serial = agent.serial
    harness.rotate("a")
    rs = results(harness)
    assert failed(rs) == {("a", "generation")}
    assert one(rs, "a", "generation").detail == "installed 1, desired 2"
    harness.renew(agent)  # the agent installs generation 2, istiod still signs with generation 1
    harness.report_served(agent, signing_serial=old_serial)
    rs = results(harness)
    assert failed(rs) == {("a", "istiod-signing")}
    assert f"istiod signs with {old_serial[:16]} (generation 1)" in one(rs, "a", "istiod-signing").detail


def test_an_intermediate_expiring_soon_fails(harness: Harness) -> None:
    healthy(harness, "a")
    harness.clock.advance(days=70)  # intermediates live 90 days: 20 left
    assert ("a", "intermediate") not in failed(results(harness))
    harness.clock.advance(days=7)
    rs = results(harness)
    assert ("a", "intermediate") in failed(rs)
    assert "13.0 days left (minimum 14)" in one(rs, "a", "intermediate").detail
    assert ("a", "intermediate") not in failed(results(harness, Limits(max_report_age=timedelta(days=99), min_days=7)))


def test_served_crls_near_their_next_update_fail(harness: Harness) -> None:
    agent = harness.enroll("a")
    now = harness.clock()
    body = served(bundle=harness.desired(agent)["trust_bundle"], ca_cert=agent.bundle["ca-cert.pem"], since=now)
    crl = {"issuer": "CN=root", "this_update": rfc3339(now), "next_update": rfc3339(now + timedelta(days=3))}
    status = {"installed_generation": 1, "installed_serial": agent.serial, "served": {**body, "crls": [crl]}}
    r = harness.client.put("/v1/clusters/a/status", json=status, headers=agent.headers)
    assert r.status_code == 200, r.text
    rs = results(harness)
    assert failed(rs) == {("a", "istiod-crl")}
    assert "istio-ca-crl of CN=root: 3.0 days left" in one(rs, "a", "istiod-crl").detail


def test_problems_observing_istiod_are_a_warning(harness: Harness) -> None:
    agent = harness.enroll("a")
    now = harness.clock()
    body = served(bundle=harness.desired(agent)["trust_bundle"], ca_cert=agent.bundle["ca-cert.pem"], since=now)
    body["problems"] = ["configmap istio-ca-crl not found"]
    status = {"installed_generation": 1, "installed_serial": agent.serial, "served": body}
    assert harness.client.put("/v1/clusters/a/status", json=status, headers=agent.headers).status_code == 200
    rs = results(harness)
    assert one(rs, "a", "served") == Result("a", "served", "warn", "observing istiod: configmap istio-ca-crl not found")
    assert fleetcheck.exit_code(rs) == 0


def test_an_istiod_without_the_new_root_fails_the_bundle_check(harness: Harness) -> None:
    healthy(harness, "a")
    r = harness.client.post("/v1/roots", json={}, headers=harness.admin)
    assert r.status_code == 201, r.text
    rs = results(harness)  # the agent still reports the one-root bundle
    assert failed(rs) == {("a", "trust-bundle")}
    assert one(rs, "a", "trust-bundle").detail.startswith("istiod's bundle (istio-ca-root-cert) lacks ")


def test_an_unknown_or_inactive_consumer_fails(harness: Harness) -> None:
    a = healthy(harness, "a")
    healthy(harness, "b")
    harness.add_cluster("c")
    svc = {"namespace": "shop", "service": "cart", "ports": [{"number": 8080}]}
    services = [
        {**svc, "name": "cart.shop", "consumers": ["b", "ghost", "c"]},
        {**svc, "name": "pay.shop", "consumers": ["b"]},
    ]
    assert harness.publish(a, trust_domain="a.test", services=services).status_code == 200
    rs = results(harness)
    assert failed(rs) == {("a", "exports")}
    exports = of(rs, "a", "exports")
    assert [r.status for r in exports] == ["fail", "ok"]
    assert exports[0].detail == "export cart.shop: consumers not active: c (pending), ghost (not registered)"


def test_agent_errors_fail(harness: Harness) -> None:
    agent = healthy(harness, "a")
    status = {"installed_generation": 1, "installed_serial": agent.serial, "errors": ["istio: no istiod"]}
    assert harness.client.put("/v1/clusters/a/status", json=status, headers=agent.headers).status_code == 200
    rs = results(harness)
    assert failed(rs) == {("a", "agent-errors")}
    assert one(rs, "a", "agent-errors").detail == "1 error(s): istio: no istiod"


def test_the_command_against_a_served_ca(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ok("init", "--data-dir", str(d))
    for s in serve(d):
        added = json.loads(s.op("cluster", "add", "a", "--trust-domain", "a.mesh", "--json"))
        key = pki.new_key()
        with s.http() as http:
            r = http.post(
                "/v1/enroll",
                json={"cluster": "a", "bootstrap_token": added["bootstrap_token"], "csr": pki.make_csr(key, "a")},
            )
            assert r.status_code == 201, r.text
            agent = {"Authorization": f"Bearer {r.json()['agent_token']}"}
            bundle = r.json()["bundle"]

        silent = cli("fleet", "check", "--data-dir", str(d), "--json")
        assert silent.returncode == 1, silent.stderr
        out = json.loads(silent.stdout)
        assert {"cluster": "a", "check": "agent-report", "status": "fail"}.items() <= next(
            x for x in out if x["check"] == "agent-report"
        ).items()

        with s.http() as http:
            body = {
                "installed_generation": 1,
                "installed_serial": serial_of(bundle["ca-cert.pem"]),
                "served": served(
                    bundle=bundle["root-cert.pem"], ca_cert=bundle["ca-cert.pem"], since=datetime.now(UTC)
                ),
            }
            assert http.put("/v1/clusters/a/status", json=body, headers=agent).status_code == 200
        good = cli("fleet", "check", "--data-dir", str(d))
        assert good.returncode == 0, good.stdout + good.stderr
        assert good.stdout.splitlines()[-1].startswith("OK: ")
        assert any(line.startswith("✓ a") and "istiod-signing" in line for line in good.stdout.splitlines())
        strict = cli("fleet", "check", "--data-dir", str(d), "--min-days", "100")  # intermediates live 90 days
        assert strict.returncode == 1 and "PROBLEMS: " in strict.stdout
        bad = cli("fleet", "check", "--data-dir", str(d), "--max-report-age", "soon")
        assert bad.returncode == 2 and "is not a duration" in bad.stderr


def test_root_activate_wait_shows_the_lagging_clusters_until_the_fleet_has_moved(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ok("init", "--data-dir", str(d))
    for s in serve(d, "--workload-cert-lifetime", "3s"):  # activation waits 3.3 s after istiod serves the root
        added = json.loads(s.op("cluster", "add", "a", "--trust-domain", "a.mesh", "--json"))
        key = pki.new_key()
        with s.http() as http:
            r = http.post(
                "/v1/enroll",
                json={"cluster": "a", "bootstrap_token": added["bootstrap_token"], "csr": pki.make_csr(key, "a")},
            )
            assert r.status_code == 201, r.text
            agent = {"Authorization": f"Bearer {r.json()['agent_token']}"}
            ca_cert = r.json()["bundle"]["ca-cert.pem"]
        new = json.loads(s.op("root", "add", "--json"))["id"]
        wait = ["root", "activate", new, "--data-dir", str(d), "--wait", "--interval", "1s"]

        gave_up = cli(*wait, "--timeout", "2s")  # the agent never reports what istiod serves
        assert gave_up.returncode == 1, gave_up.stdout + gave_up.stderr
        assert f"waiting to activate root {new}: 1 cluster(s) not ready" in gave_up.stderr
        assert "\n  a: waits for a status report from its agent (none yet)" in gave_up.stderr
        assert "gave up waiting after 2s: fleet not ready (409)" in gave_up.stderr.lower()

        with s.http() as http:
            bundle = http.get("/v1/clusters/a/desired", headers=agent).json()["trust_bundle"]
            body = {
                "installed_generation": 1,
                "served": served(bundle=bundle, ca_cert=ca_cert, since=datetime.now(UTC)),
            }
            assert http.put("/v1/clusters/a/status", json=body, headers=agent).status_code == 200
        moved = cli(*wait, "--timeout", "60s", "--json")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert "a: waits for workloads to take root" in moved.stderr
        assert json.loads(moved.stdout)["status"] == "active"

        both = cli(*wait, "--force")
        assert both.returncode == 2 and "not allowed with argument" in both.stderr
