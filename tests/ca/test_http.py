"""The HTTP surface: RFC 9457 problems for every error, the OpenAPI document, health, readiness
and metrics."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url
from starlette.applications import Starlette

from ca_server.app import READY_CACHE_SECONDS
from cluster_agent import pki
from tests.ca.conftest import Harness, both_speedup_modes

# every path of API.md ("REST API"), with its methods
API_PATHS = {
    "/healthz": {"get"},
    "/readyz": {"get"},
    "/metrics": {"get"},
    "/v1/trust-bundle": {"get"},
    "/v1/crl": {"get"},
    "/v1/clusters": {"get", "post"},
    "/v1/clusters/{}": {"get"},
    "/v1/clusters/{}/bootstrap-token": {"post"},
    "/v1/clusters/{}/rotate": {"post"},
    "/v1/clusters/{}/revoke": {"post"},
    "/v1/certificates/{}/revoke": {"post"},
    "/v1/roots": {"get", "post"},
    "/v1/roots/status": {"get"},
    "/v1/roots/{}/activate": {"post"},
    "/v1/roots/{}/retire": {"post"},
    "/v1/audit": {"get"},
    "/v1/admin-tokens": {"get", "post"},
    "/v1/admin-tokens/{}/revoke": {"post"},
    "/v1/enroll": {"post"},
    "/v1/clusters/{}/intermediate": {"post"},
    "/v1/clusters/{}/desired": {"get"},
    "/v1/clusters/{}/exports": {"put"},
    "/v1/clusters/{}/imports": {"get"},
    "/v1/clusters/{}/status": {"put"},
}


def check_problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert {"type", "title", "status", "detail"} <= set(body)
    assert body["status"] == status
    assert body["type"].startswith("https://") and body["title"] and body["detail"]
    return body


def test_every_error_is_a_problem_document(harness: Harness) -> None:
    a = harness.enroll("a")
    harness.enroll("b")
    check_problem(harness.client.get("/v1/clusters"), 401)
    check_problem(harness.client.get("/v1/clusters/b/desired", headers=a.headers), 403)
    check_problem(harness.client.get("/v1/clusters/zz", headers=harness.admin), 404)
    check_problem(harness.client.get("/no/such/thing"), 404)
    check_problem(harness.client.post("/v1/clusters", json={"name": "a"}, headers=harness.admin), 409)
    check_problem(harness.client.post("/v1/clusters", content=b"x" * 70000, headers=harness.admin), 413)
    check_problem(harness.client.post("/v1/clusters", json={"name": "A"}, headers=harness.admin), 400)
    check_problem(harness.client.delete("/v1/clusters", headers=harness.admin), 405)
    types = {
        check_problem(harness.client.post("/v1/clusters", json=b, headers=harness.admin), 400)["type"]
        for b in ({"name": "A"}, {"nome": "a"})
    }
    assert types == {"https://meshbridge.dev/problems/invalidinput"}


def test_openapi_lists_every_path_of_the_contract(harness: Harness) -> None:
    r = harness.client.get("/openapi.json", headers=harness.admin)
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    served = {re.sub(r"\{[^}]+\}", "{}", p): {m for m in ops if m != "parameters"} for p, ops in doc["paths"].items()}
    missing = {p: ms - served.get(p, set()) for p, ms in API_PATHS.items() if ms - served.get(p, set())}
    assert missing == {}
    for phase in ("activate", "retire"):  # a gated root phase's 409 lists the lagging clusters
        conflict = doc["paths"][f"/v1/roots/{{root_id}}/{phase}"]["post"]["responses"]["409"]
        schema = conflict["content"]["application/problem+json"]["schema"]
        assert "lagging" in schema["properties"], schema


def test_health_and_public_documents(harness: Harness) -> None:
    assert harness.client.get("/healthz").status_code == 200
    r = harness.client.get("/readyz")
    assert r.status_code == 200
    r = harness.client.get("/v1/trust-bundle")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-pem-file")
    assert r.text.startswith("-----BEGIN CERTIFICATE-----")
    r = harness.client.get("/v1/crl", params={"format": "pem"})
    assert r.status_code == 200 and r.text.startswith("-----BEGIN X509 CRL-----")


def metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    for line in text.splitlines():
        m = re.match(pattern, line)
        if m:
            return float(m.group(1))
    return None


def test_metrics_count_issuances_and_show_each_clusters_not_after(harness: Harness) -> None:
    a = harness.enroll("a")
    harness.renew(a)
    harness.renew(a)
    b = harness.enroll("b")
    r = harness.client.get("/metrics", headers=harness.admin)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "meshbridge_ca_issuances_total", kind="enroll") == 2
    assert metric(text, "meshbridge_ca_issuances_total", kind="renew") == 2
    assert metric(text, "meshbridge_ca_issuance_seconds_count", kind="renew") == 2
    assert (metric(text, "meshbridge_ca_issuance_seconds_sum", kind="renew") or 0) > 0
    assert (
        metric(text, "meshbridge_ca_intermediate_not_after_seconds", cluster="a")
        == a.cert.not_valid_after_utc.timestamp()
    )
    assert (
        metric(text, "meshbridge_ca_intermediate_not_after_seconds", cluster="b")
        == b.cert.not_valid_after_utc.timestamp()
    )
    harness.client.post("/v1/clusters/b/revoke", json={}, headers=harness.admin)
    text = harness.client.get("/metrics", headers=harness.admin).text
    assert metric(text, "meshbridge_ca_intermediate_not_after_seconds", cluster="b") is None
    assert metric(text, "meshbridge_ca_intermediate_not_after_seconds", cluster="a") is not None


def test_metrics_count_the_group_commits_renewals_shared(harness: Harness) -> None:
    """meshbridge_ca_group_commit_{transactions,writes,replays}_total: how many renewals shared a
    commit and how many transactions ran again the slow way (PostgreSQL); always 0 where there is
    no group commit (SQLite). A replay is forced here by making the roots the authority caches
    claim a revision the store has not reached: the renewal's deferred job must read them."""

    def counts() -> tuple[float | None, float | None, float | None]:
        text = harness.client.get("/metrics", headers=harness.admin).text
        return (
            metric(text, "meshbridge_ca_group_commit_transactions_total"),
            metric(text, "meshbridge_ca_group_commit_writes_total"),
            metric(text, "meshbridge_ca_group_commit_replays_total"),
        )

    a = harness.enroll("a")
    harness.renew(a)  # the roots cached
    before = counts()
    harness.renew(harness.renew(a))
    cached = harness.authority.issuance._pki
    assert cached is not None
    harness.authority.issuance._pki = (cached[0] + 5, *cached[1:])
    harness.renew(a)
    transactions, writes, replays = (after - first for after, first in zip(counts(), before, strict=True))  # type: ignore[operator]
    if harness.postgres:
        assert writes == 3 and transactions == 3 and replays == 1  # one after the other: a commit each
    else:
        assert counts() == (0, 0, 0) and (transactions, writes, replays) == (0, 0, 0)


def test_metrics_count_roots_by_status_through_a_rotation(harness: Harness) -> None:
    """meshbridge_ca_roots{status} follows the phases (read from the store at each scrape), so a
    rotation left half-way shows as a lasting trusted root (MeshbridgeRootRotationStuck)."""

    def roots() -> dict[str, float | None]:
        text = harness.client.get("/metrics", headers=harness.admin).text
        return {s: metric(text, "meshbridge_ca_roots", status=s) for s in ("trusted", "active", "retired")}

    assert roots() == {"trusted": 0, "active": 1, "retired": 0}
    (old,) = harness.client.get("/v1/roots", headers=harness.admin).json()["items"]
    new = harness.client.post("/v1/roots", json={}, headers=harness.admin).json()
    assert roots() == {"trusted": 1, "active": 1, "retired": 0}  # phase 2
    r = harness.client.post(f"/v1/roots/{new['id']}/activate", json={"force": True}, headers=harness.admin)
    assert r.status_code == 200
    assert roots() == {"trusted": 1, "active": 1, "retired": 0}  # phase 3: the old root still trusted
    r = harness.client.post(f"/v1/roots/{old['id']}/retire", json={"force": True}, headers=harness.admin)
    assert r.status_code == 200
    assert roots() == {"trusted": 0, "active": 1, "retired": 1}  # phase 4


def test_metrics_of_a_fresh_replica_show_every_cluster(harness: Harness) -> None:
    """Issued elsewhere (another replica, before a restart): the notAfter gauge comes from the store."""
    from tests.ca.test_revocation import _second_replica

    a = harness.enroll("a")
    for replica in _second_replica(harness):
        text = replica.get("/metrics", headers=harness.admin).text
        assert (
            metric(text, "meshbridge_ca_intermediate_not_after_seconds", cluster="a")
            == a.cert.not_valid_after_utc.timestamp()
        )


def test_readyz_is_503_when_the_database_is_gone(harness: Harness, pg_server: Any = None) -> None:
    assert harness.client.get("/readyz").status_code == 200
    if harness.postgres:
        from sqlalchemy import create_engine, text

        # no DROP DATABASE: it forces a checkpoint, slow on a busy disk; refusing connections is enough
        db = make_url(harness.database_url).database
        admin = create_engine(make_url(harness.database_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"), {"db": db})
        admin.dispose()
    else:
        path = Path(str(make_url(harness.database_url).database))
        harness.store.engine.dispose()
        for _ in range(50):  # the revision watcher may reopen (and so recreate) the file in between
            for p in path.parent.glob(path.name + "*"):
                p.unlink()
            try:
                path.mkdir()  # nothing can open it as a database any more
                break
            except FileExistsError:
                time.sleep(0.01)
        assert path.is_dir()
    time.sleep(READY_CACHE_SECONDS)  # /readyz keeps its outcome that long
    r = harness.client.get("/readyz")
    body = check_problem(r, 503)
    assert "database" in body["detail"] or "not ready" in body["detail"]
    assert harness.client.get("/healthz").status_code == 200
    check_problem(harness.client.get("/v1/clusters", headers=harness.admin), 503)
    # the admin token cannot be checked now (/metrics answers it 503); a scraper uses the metrics
    # token, which needs no database (tests/ca/test_listener_hardening.py)
    app = harness.client.app
    assert isinstance(app, Starlette)
    assert b"meshbridge_ca_ready 0.0" in app.state.metrics.render()[0]
    if not harness.postgres:
        shutil.rmtree(path)


@both_speedup_modes
def test_renewal_shortcut_and_fastapi_route_give_the_same_answers(harness: Harness, monkeypatch: Any) -> None:
    """Well-formed renewals are answered by api/fastpath.RenewalShortcut, the rest by the FastAPI
    route; the answers must not tell which."""
    a = harness.enroll("a")
    path = "/v1/clusters/a/intermediate"
    # handed over to FastAPI: body not JSON, unknown field, name not a DNS label
    r = harness.client.post(path, content=b"{not json", headers={**a.headers, "content-type": "application/json"})
    check_problem(r, 400)
    r = harness.client.post(path, json={"csr": "x", "proof": "", "extra": 1}, headers=a.headers)
    assert "extra" in check_problem(r, 400)["detail"]
    r = harness.client.post("/v1/clusters/A_B/intermediate", json={"csr": "x", "proof": ""}, headers=a.headers)
    check_problem(r, 400)
    csr = pki.make_csr(pki.new_key(), "a")  # a renewal that would succeed, but not sent as JSON
    body = json.dumps({"csr": csr, "proof": pki.prove(a.key, csr)}).encode()
    r = harness.client.post(path, content=body, headers={**a.headers, "content-type": "text/plain"})
    check_problem(r, 400)  # FastAPI reads JSON bodies only when sent as JSON
    # answered by the shortcut: the same problem documents as the exception handlers give
    r = harness.client.post(path, json={"csr": "x", "proof": ""}, headers={})
    assert check_problem(r, 401)["title"] and r.headers["www-authenticate"] == "Bearer"
    r = harness.client.post(path, json={"csr": "not a pem", "proof": ""}, headers=a.headers)
    check_problem(r, 400)
    b = harness.enroll("b")
    r = harness.client.post(path, json={"csr": "x", "proof": ""}, headers=b.headers)
    check_problem(r, 403)

    # an unexpected failure is a 500 problem that says nothing about its cause
    def boom(**_: Any) -> Any:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(harness.authority, "renew", boom)  # SQLite's inline renewal
    monkeypatch.setattr(harness.authority, "draft_renewal", boom)  # PostgreSQL's, drafted then awaited
    # FastAPI's route (speed-ups off) re-raises after its 500 for the server to log, as uvicorn does
    client = TestClient(harness.client.app, raise_server_exceptions=False)
    r = client.post(path, json={"csr": "x", "proof": ""}, headers=a.headers)
    problem = check_problem(r, 500)
    assert "secret detail" not in r.text and problem["type"].endswith("/internal")
