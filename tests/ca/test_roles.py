"""Operator roles (issue 14): the authorisation matrix of the admin API (no token, an agent token,
a viewer token, an admin token), a viewer's refused write answered 403 and audited, token expiry
and revocation, the list that shows no secret, and the last admin token that cannot be revoked."""

from __future__ import annotations

import re
from typing import Any

from fastapi.routing import APIRoute
from starlette.applications import Starlette

from ca_server.core import tokens
from tests.ca.conftest import Harness
from tests.ca.test_http import check_problem

# every operation a token of the operator API may call, with a body it accepts
MATRIX: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/clusters", None),
    ("POST", "/v1/clusters", {"name": "new", "trust_domain": "new.test"}),
    ("GET", "/v1/clusters/{name}", None),
    ("POST", "/v1/clusters/{name}/bootstrap-token", None),
    ("POST", "/v1/clusters/{name}/rotate", {}),
    ("POST", "/v1/clusters/{name}/revoke", {}),
    ("POST", "/v1/certificates/{serial}/revoke", {}),
    ("GET", "/v1/roots", None),
    ("POST", "/v1/roots", {}),
    ("GET", "/v1/roots/status", None),
    ("POST", "/v1/roots/{root}/activate", {}),
    ("POST", "/v1/roots/{root}/retire", {}),
    ("GET", "/v1/audit", None),
    ("GET", "/v1/admin-tokens", None),
    ("POST", "/v1/admin-tokens", {"name": "spare", "role": "viewer"}),
    ("POST", "/v1/admin-tokens/{ref}/revoke", {}),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    # the dashboard's pages (tests/ca/test_ui.py: a browser's refusal is the sign-in page instead)
    ("GET", "/ui/", None),
    ("GET", "/ui/roots", None),
    ("GET", "/ui/graph", None),
    ("GET", "/ui/audit", None),
]
AGENT_OR_PUBLIC = {
    "/healthz",
    "/readyz",
    "/v1/trust-bundle",
    "/v1/crl",
    "/v1/enroll",
    "/v1/clusters/{name}/intermediate",
    "/v1/clusters/{name}/desired",
    "/v1/clusters/{name}/exports",
    "/v1/clusters/{name}/imports",
    "/v1/clusters/{name}/status",
    "/ui/login",  # the sign-in form and its POST: they take the token
    "/ui/logout",
    "/ui/static/ui.css",
    "/ui/static/favicon.svg",
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_token(h: Harness, name: str, role: str, *, by: str | None = None, **extra: Any) -> dict[str, Any]:
    headers = bearer(by) if by else h.admin
    r = h.client.post("/v1/admin-tokens", json={"name": name, "role": role, **extra}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def call(h: Harness, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]) -> Any:
    return h.client.request(method, path, json=body, headers=headers)


def audit(h: Harness) -> list[dict[str, Any]]:
    r = h.client.get("/v1/audit", params={"limit": 1000}, headers=h.admin)
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


def test_the_matrix_covers_every_operation_of_the_app(harness: Harness) -> None:
    app = harness.client.app
    assert isinstance(app, Starlette)
    served = {
        (m, re.sub(r"\{[^}]+\}", "{}", r.path))
        for r in app.routes
        if isinstance(r, APIRoute) and r.path not in AGENT_OR_PUBLIC
        for m in r.methods or ()
    }
    listed = {(m, re.sub(r"\{[^}]+\}", "{}", p)) for m, p, _ in MATRIX}
    assert served - listed == set()


def test_authorisation_matrix_with_the_viewer_column(harness: Harness) -> None:
    agent = harness.enroll("a")
    serial = agent.serial
    root = harness.roots()[0]["id"]
    viewer = new_token(harness, "oncall", "viewer")
    new_token(harness, "throwaway", "viewer")
    rows = [(m, p.format(name="a", serial=serial, root=root, ref="throwaway"), b) for m, p, b in MATRIX]
    columns = {"none": {}, "agent": agent.headers, "viewer": bearer(viewer["token"])}
    for method, path, body in rows:
        for column, headers in columns.items():
            r = call(harness, method, path, body, headers)
            if column in ("none", "agent"):
                check_problem(r, 401)
            elif method == "GET":
                assert r.status_code == 200, (column, method, path, r.text)
            else:
                assert "needs the admin role" in check_problem(r, 403)["detail"], (method, path)
    for method, path, body in rows:  # the admin column last: its writes change the state
        r = call(harness, method, path, body, harness.admin)
        assert r.status_code not in (401, 403), (method, path, r.text)
        assert r.status_code < 500, r.text


def test_a_viewers_write_is_403_and_audited_with_its_name_never_its_secret(harness: Harness) -> None:
    viewer = new_token(harness, "oncall", "viewer")
    r = harness.client.post(
        "/v1/clusters", json={"name": "x", "trust_domain": "x.test"}, headers=bearer(viewer["token"])
    )
    body = check_problem(r, 403)
    assert body["type"].endswith("/forbidden")
    assert harness.client.get("/v1/clusters/x", headers=harness.admin).status_code == 404  # nothing happened
    denied = [e for e in audit(harness) if e["action"] == "authz.denied"]
    assert len(denied) == 1
    assert denied[0]["actor"] == f"viewer:oncall/{viewer['id']}"
    assert denied[0]["subject"] == "POST /v1/clusters"
    assert denied[0]["details"] == {"role": "viewer", "needs": "admin"}
    secret = viewer["token"].split(".")[2]
    assert secret not in str(audit(harness))
    # a viewer reads: the dashboard's lists, the audit, the metrics
    for path in ("/v1/clusters", "/v1/roots/status", "/v1/audit", "/metrics"):
        assert harness.client.get(path, headers=bearer(viewer["token"])).status_code == 200, path


def test_expiry_is_honoured(harness: Harness) -> None:
    short = new_token(harness, "short", "admin", expires_in_s=60)
    assert short["expires_at"] and short["state"] == "live"
    assert harness.client.get("/v1/clusters", headers=bearer(short["token"])).status_code == 200
    harness.clock.advance(seconds=61)
    assert "expired" in check_problem(harness.client.get("/v1/clusters", headers=bearer(short["token"])), 401)["detail"]
    listed = {t["name"]: t for t in harness.client.get("/v1/admin-tokens", headers=harness.admin).json()["items"]}
    assert listed["short"]["state"] == "expired"
    check_problem(
        harness.client.post(
            "/v1/admin-tokens", json={"name": "n", "role": "viewer", "expires_in_s": 5}, headers=harness.admin
        ),
        400,
    )
    check_problem(
        harness.client.post("/v1/admin-tokens", json={"name": "n", "role": "root"}, headers=harness.admin), 400
    )


def test_revoked_token_is_401_and_the_last_admin_token_cannot_be_revoked(harness: Harness) -> None:
    listed = harness.client.get("/v1/admin-tokens", headers=harness.admin).json()["items"]
    assert [(t["name"], t["role"], t["state"]) for t in listed] == [("initial", "admin", "live")]
    r = harness.client.post("/v1/admin-tokens/initial/revoke", json={}, headers=harness.admin)
    assert "last admin token" in check_problem(r, 409)["detail"]
    # a viewer does not count as an admin: still refused
    first = new_token(harness, "oncall", "viewer")
    check_problem(harness.client.post("/v1/admin-tokens/initial/revoke", json={}, headers=harness.admin), 409)
    # rotate the init token: a new admin token, then the old one revoked (by id) with the new one
    fresh = new_token(harness, "ops", "admin")
    initial_id = listed[0]["id"]
    r = harness.client.post(f"/v1/admin-tokens/{initial_id}/revoke", json={}, headers=bearer(fresh["token"]))
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "revoked" and r.json()["revoked_at"]
    assert "revoked" in check_problem(harness.client.get("/v1/clusters", headers=harness.admin), 401)["detail"]
    check_problem(harness.client.get("/metrics", headers=harness.admin), 401)
    # by name; a new token may then take the revoked token's name, and revoke by name finds the live one
    r = harness.client.post("/v1/admin-tokens/oncall/revoke", json={}, headers=bearer(fresh["token"]))
    assert r.status_code == 200 and r.json()["id"] == first["id"]
    check_problem(harness.client.get("/v1/roots", headers=bearer(first["token"])), 401)
    again = new_token(harness, "oncall", "viewer", by=fresh["token"])
    r = harness.client.post("/v1/admin-tokens/oncall/revoke", json={}, headers=bearer(fresh["token"]))
    assert r.status_code == 200 and r.json()["id"] == again["id"]
    r = harness.client.post(f"/v1/admin-tokens/{again['id']}/revoke", json={}, headers=bearer(fresh["token"]))
    assert "already revoked" in check_problem(r, 409)["detail"]
    check_problem(harness.client.post("/v1/admin-tokens/nosuch/revoke", json={}, headers=bearer(fresh["token"])), 404)
    revoked = [e for e in audit_with(harness, fresh["token"]) if e["action"] == "admin_token.revoke"]
    assert [e["subject"] for e in revoked] == [initial_id, first["id"], again["id"]]
    assert revoked[0]["actor"] == f"admin:ops/{fresh['id']}"


def audit_with(h: Harness, token: str) -> list[dict[str, Any]]:
    r = h.client.get("/v1/audit", params={"limit": 1000}, headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


def test_a_live_name_is_unique_and_the_list_shows_no_secret(harness: Harness) -> None:
    made = new_token(harness, "oncall", "viewer")
    assert made["token"].startswith(f"mbadmin.{made['id']}.")
    check_problem(
        harness.client.post("/v1/admin-tokens", json={"name": "oncall", "role": "admin"}, headers=harness.admin), 409
    )
    text = harness.client.get("/v1/admin-tokens", headers=bearer(made["token"])).text
    secrets_ = [made["token"].split(".")[2], harness.admin_token.split(".")[2]]
    for secret in secrets_:
        assert secret not in text and tokens.hash_secret(secret) not in text
    items = harness.client.get("/v1/admin-tokens", headers=harness.admin).json()["items"]
    assert all(set(t) == {"id", "name", "role", "created_at", "expires_at", "revoked_at", "state"} for t in items)
