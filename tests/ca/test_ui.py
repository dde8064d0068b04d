"""The fleet dashboard (/ui/) over HTTP: refused without an operator token (a problem document for
scripts, the sign-in page for browsers, no fleet data either way), the pages with a viewer token
(numbers checked in the markup), the sign-in cookie's attributes and life, the security headers,
escaping, the audit filters, and that no page writes."""

from __future__ import annotations

import re
from typing import Any

import pytest

from ca_server.ui import pages, svg
from ca_server.ui.view import Edge
from tests.ca.conftest import Harness
from tests.ca.test_http import check_problem
from tests.support.uifleet import UIFleet, build

PAGES = ["/ui/", "/ui/roots", "/ui/graph", "/ui/graph?cluster=a", "/ui/audit"]
HTML = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture
def fleet(harness: Harness) -> UIFleet:
    return build(harness.authority)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cookie(token: str) -> dict[str, str]:
    # the test client speaks plain HTTP, where a client keeps no Secure cookie: sent by hand
    return {"Cookie": f"meshbridge_ui={token}"}


def row(page: str, cluster: str) -> str:
    m = re.search(rf'<tr data-cluster="{cluster}">(.*?)</tr>', page, re.S)
    assert m, cluster
    return m.group(1)


def field(row_html: str, name: str) -> str:
    m = re.search(rf'<td data-field="{name}"[^>]*>(.*?)</td>', row_html, re.S)
    assert m, name
    return m.group(1)


def check_headers(r: Any) -> None:
    assert r.headers["content-security-policy"].startswith("default-src 'self';")
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"


def test_no_token_or_a_wrong_one_gets_401_and_no_data(harness: Harness, fleet: UIFleet) -> None:
    agent = harness.enroll("d")
    for path in PAGES:
        for headers in ({}, agent.headers, bearer("mbadmin.x.y"), cookie("nonsense")):
            check_problem(harness.client.get(path, headers=headers), 401)
            r = harness.client.get(path, headers={**headers, **HTML})
            assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
            check_headers(r)
            assert 'action="/ui/login"' in r.text
            assert 'data-cluster="' not in r.text and "trust_domain" not in r.text and "reviews" not in r.text


def test_the_fleet_page_shows_the_fleet_to_a_viewer(harness: Harness, fleet: UIFleet) -> None:
    r = harness.client.get("/ui/", headers=bearer(fleet.viewer_token))
    assert r.status_code == 200, r.text
    check_headers(r)
    page = r.text
    counts = dict(re.findall(r'<dd data-count="(\w+)">(\d+)</dd>', page))
    assert counts == {"clusters": "3", "active": "2", "pending": "1", "revoked": "0", "failing": counts["failing"]}
    a = row(page, "a")
    left = (fleet.a_not_after - harness.clock()).total_seconds() / 86400
    assert abs(float(field(a, "days")) - left) < 0.05
    assert field(a, "desired") == field(a, "installed") == field(a, "served") == str(fleet.a_generation)
    b = row(page, "b")
    assert field(b, "served") == "—"  # b's agent reports no istiod: nothing served is known
    assert "agent-errors: 1 error(s): kube: 503" in field(b, "problems")
    assert field(row(page, "c"), "report") == "never"
    # the expiry timeline: one bar per active cluster's intermediate and per root not retired
    bars = re.findall(r'<g class="bar (\w+) ([\w ]+)" data-label="([^"]+)" data-days="([\d.-]+)"', page)
    labels = {label: (kind, float(days)) for kind, _, label, days in bars}
    assert labels["a"][0] == "intermediate" and abs(labels["a"][1] - left) < 0.05
    assert sum(1 for k, _ in labels.values() if k == "root") == 2
    assert set(labels) - {k for k in labels if k.startswith("root ")} == {"a", "b"}


def test_a_short_intermediate_is_flagged(harness: Harness, fleet: UIFleet) -> None:
    harness.clock.advance(seconds=(fleet.a_not_after - harness.clock()).total_seconds() - 3 * 86400)  # 3 days left
    page = harness.client.get("/ui/", headers=bearer(fleet.viewer_token)).text
    assert re.search(r'<td data-field="days" class="short">(3\.0|2\.9)</td>', row(page, "a"))
    assert "intermediate: intermediate" in field(row(page, "a"), "problems")  # fleet check's minimum (14 days)


def test_roots_page_shows_the_phase_and_whom_it_waits_for(harness: Harness, fleet: UIFleet) -> None:
    page = harness.client.get("/ui/roots", headers=bearer(fleet.viewer_token)).text
    gate = re.search(
        rf'<section class="gate" data-root="{fleet.new_root}" data-phase="activate">(.*?)</section>', page, re.S
    )
    assert gate, page
    assert "waits for 2 cluster(s)" in gate.group(1)
    for name in ("a", "b"):
        cells = row(gate.group(1), name)
        assert field(cells, "ready") == "waiting" and field(cells, "waiting_for") != "—"
    status = harness.client.get("/v1/roots/status", headers=harness.admin).json()
    assert {(g["root_id"], g["phase"]) for g in status["gates"]} == set(
        re.findall(r'<section class="gate" data-root="(\w+)" data-phase="(\w+)">', page)
    )
    (activate,) = [g for g in status["gates"] if g["phase"] == "activate"]
    waits = {c["name"]: "; ".join(c["waiting_for"]) for c in activate["clusters"]}
    assert field(row(gate.group(1), "a"), "waiting_for") == waits["a"].replace("'", "&#x27;")


def test_the_graph_highlights_what_the_selected_cluster_exports_and_imports(harness: Harness, fleet: UIFleet) -> None:
    page = harness.client.get("/ui/graph?cluster=a", headers=bearer(fleet.viewer_token)).text
    edges = dict(
        ((src, dst), (cls, svcs))
        for cls, src, dst, svcs in re.findall(
            r'<g class="([\w ]+)" data-from="(\w+)" data-to="(\w+)" data-services="([^"]*)">', page
        )
    )
    assert edges == {
        ("a", "b"): ("edge out", "reviews"),
        ("a", "c"): ("edge out", "reviews"),
        ("b", "a"): ("edge in", "ratings"),
    }
    assert 'class="node selected" data-cluster="a"' in page
    page_b = harness.client.get("/ui/graph?cluster=b", headers=bearer(fleet.viewer_token)).text
    assert '<g class="edge dim" data-from="a" data-to="c"' in page_b
    # an unknown name selects nothing (and is not echoed)
    other = harness.client.get("/ui/graph?cluster=zz", headers=bearer(fleet.viewer_token)).text
    assert "edge out" not in other and ">zz<" not in other


def test_audit_filters(harness: Harness, fleet: UIFleet) -> None:
    v = bearer(fleet.viewer_token)
    page = harness.client.get("/ui/audit", params={"action": "cluster.create"}, headers=v).text
    assert re.findall(r'<td data-field="subject">(\w+)</td>', page) == ["c", "b", "a"]  # newest first
    page = harness.client.get("/ui/audit", params={"action": "intermediate.", "subject": "b"}, headers=v).text
    assert re.findall(r'<td data-field="action">([\w.]+)</td>', page) == ["intermediate.enroll"]
    page = harness.client.get("/ui/audit", params={"actor": "agent:b", "limit": 5}, headers=v).text
    assert set(re.findall(r'<td data-field="actor">([^<]+)</td>', page)) == {"agent:b"}
    check_problem(harness.client.get("/ui/audit", params={"limit": 0}, headers=v), 400)


def test_everything_from_the_request_is_escaped(harness: Harness, fleet: UIFleet) -> None:
    evil = '"><script>alert(1)</script>'
    page = harness.client.get("/ui/audit", params={"subject": evil}, headers=bearer(fleet.viewer_token)).text
    assert "<script>" not in page and "&lt;script&gt;" in page and 'value="&quot;&gt;' in page
    picture = svg.graph(['x"<y'], [Edge('x"<y', 'x"<y', "<s>")], selected=None)
    assert "<s>" not in picture and "&lt;s&gt;" in picture and 'data-cluster="x&quot;&lt;y"' in picture
    assert "<b>" not in pages.login_page("<b>")


def test_sign_in_sets_a_strict_cookie_and_sign_out_clears_it(harness: Harness, fleet: UIFleet) -> None:
    form = {"token": fleet.viewer_token}
    r = harness.client.post("/ui/login", data=form, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    set_cookie = r.headers["set-cookie"]
    assert set_cookie.startswith(f"meshbridge_ui={fleet.viewer_token};")
    attrs = {a.strip().lower() for a in set_cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/ui/"} <= attrs
    page = harness.client.get("/ui/", headers=cookie(fleet.viewer_token))
    assert page.status_code == 200 and 'data-count="clusters">3<' in page.text
    # the cookie is for /ui/ only: the API needs the header
    check_problem(harness.client.get("/v1/clusters", headers=cookie(fleet.viewer_token)), 401)
    out = harness.client.get("/ui/logout", follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert re.match(r'meshbridge_ui="?"?;.*Max-Age=0', out.headers["set-cookie"])


def test_sign_in_refusals(harness: Harness, fleet: UIFleet) -> None:
    for token in ("", "mbadmin.nosuch.secret", harness.enroll("d").token):
        r = harness.client.post("/ui/login", data={"token": token}, follow_redirects=False)
        assert r.status_code == 401 and "set-cookie" not in r.headers
        assert 'class="error"' in r.text and 'data-cluster="' not in r.text
    # a form posted from another site (the browser says so) is refused
    r = harness.client.post(
        "/ui/login",
        data={"token": fleet.viewer_token},
        headers={"Sec-Fetch-Site": "cross-site"},
        follow_redirects=False,
    )
    assert r.status_code == 403 and "set-cookie" not in r.headers
    check_problem(harness.client.post("/ui/login", json={"token": fleet.viewer_token}), 400)


def test_a_revoked_or_expired_token_in_the_cookie_is_refused_and_cleared(harness: Harness, fleet: UIFleet) -> None:
    short = harness.client.post(
        "/v1/admin-tokens", json={"name": "brief", "role": "viewer", "expires_in_s": 60}, headers=harness.admin
    ).json()
    assert harness.client.get("/ui/", headers=cookie(short["token"])).status_code == 200
    harness.clock.advance(seconds=61)
    r = harness.client.get("/ui/", headers={**cookie(short["token"]), **HTML})
    assert r.status_code == 401 and "expired" in r.text
    assert re.match(r'meshbridge_ui="?"?;.*Max-Age=0', r.headers["set-cookie"])
    harness.client.post("/v1/admin-tokens/oncall/revoke", json={}, headers=harness.admin)
    check_problem(harness.client.get("/ui/", headers=cookie(fleet.viewer_token)), 401)


def test_the_pages_change_nothing(harness: Harness, fleet: UIFleet) -> None:
    before = harness.state()
    for path in [*PAGES, "/ui/roots", "/ui/audit?action=cluster.create", "/ui/login", "/ui/static/ui.css"]:
        r = harness.client.get(path, headers=bearer(fleet.viewer_token))
        assert r.status_code == 200, (path, r.text)
    harness.client.post("/ui/login", data={"token": fleet.viewer_token}, follow_redirects=False)
    assert harness.state() == before


def test_the_stylesheet_is_served_here_and_pages_reference_nothing_else(harness: Harness, fleet: UIFleet) -> None:
    css = harness.client.get("/ui/static/ui.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "url(" not in css.text and "@import" not in css.text
    for path in PAGES:
        page = harness.client.get(path, headers=bearer(fleet.viewer_token)).text
        refs = re.findall(r'(?:href|src|action)="([^"]*)"', page)
        assert refs and all(ref.startswith("/ui/") for ref in refs), refs
        assert "<script" not in page and "style=" not in page


def test_audit_window_pages_back(harness: Harness, fleet: UIFleet) -> None:
    head = harness.audit_head()
    assert head is not None
    page = harness.client.get("/ui/audit", params={"before": 6}, headers=bearer(fleet.viewer_token)).text
    assert re.findall(r'<tr data-id="(\d+)">', page) == ["5", "4", "3", "2", "1"]
    assert 'class="older"' not in page
