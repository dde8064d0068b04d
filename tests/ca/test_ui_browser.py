"""The fleet dashboard in a real browser: Debian's Chromium, headless, driven by Playwright (never
its own browser download). A CA service on loopback HTTPS with a small fleet (tests/support/uifleet.py);
the pages refuse without a token, load with a viewer token (by header, and by the sign-in form's
cookie), show the fleet's numbers in the DOM, style themselves under the Content-Security-Policy,
and request nothing from anywhere but the CA's own address and port. Screenshots are written to
$MESHBRIDGE_ARTIFACTS/ui (default tests/.artifacts/ui)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, sync_playwright

from tests.support.caservice import CAService
from tests.support.uifleet import UIFleet, build

CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/sysdeps.sh)
# without these Chromium reaches for the network at start (updates, sync, field trials, QUIC probes)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]


def artifacts() -> Path:
    base = os.environ.get("MESHBRIDGE_ARTIFACTS") or str(Path(__file__).resolve().parents[1] / ".artifacts")
    out = Path(base) / "ui"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[tuple[CAService, UIFleet]]:
    svc = CAService(tmp_path / "ca").start()
    try:
        yield svc, build(svc.authority)
    finally:
        svc.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[tuple[BrowserContext, list[str], list[str]]]:
    """A fresh profile (its own user-data-dir) that accepts the CA's server certificate; with every
    URL it requested and every console message."""
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS, ignore_https_errors=True
        )
        requests: list[str] = []
        console: list[str] = []
        context.on("request", lambda r: requests.append(r.url))
        context.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        try:
            yield context, requests, console
        finally:
            context.close()


def text(page: Page, selector: str) -> str:
    return page.locator(selector).first.inner_text().strip()


def test_dashboard_in_chromium(
    ca: tuple[CAService, UIFleet], browser: tuple[BrowserContext, list[str], list[str]]
) -> None:
    svc, fleet = ca
    context, requests, console = browser
    shots = artifacts()
    page = context.new_page()

    # no token: the sign-in page, 401, and no fleet data
    r = page.goto(f"{svc.url}/ui/")
    assert r is not None and r.status == 401
    assert page.locator("form.login input#token").count() == 1
    assert page.locator("[data-cluster]").count() == 0
    page.screenshot(path=str(shots / "refused.png"), full_page=True)

    # a wrong token through the form: 401 again, no cookie
    page.fill("#token", "mbadmin.nosuch.secret")
    page.click("button[type=submit]")
    assert page.locator("p.error").count() == 1 and context.cookies() == []

    # the viewer token through the form: the cookie, then the fleet
    page.fill("#token", fleet.viewer_token)
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.url == f"{svc.url}/ui/"
    (cookie,) = context.cookies()
    assert (cookie["name"], cookie["path"], cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (
        "meshbridge_ui",
        "/ui/",
        True,
        True,
        "Strict",
    )
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read the token
    assert text(page, '[data-count="clusters"]') == "3"
    assert text(page, '[data-count="active"]') == "2"
    left = (fleet.a_not_after - svc.authority.now()).total_seconds() / 86400
    assert abs(float(text(page, 'tr[data-cluster="a"] td[data-field="days"]')) - left) < 0.05
    assert text(page, 'tr[data-cluster="a"] td[data-field="served"]') == str(fleet.a_generation)
    assert text(page, 'tr[data-cluster="c"] td[data-field="report"]') == "never"
    assert page.locator("svg.timeline g.bar.intermediate").count() == 2
    # the stylesheet applied (CSP `default-src 'self'` lets /ui/static/ui.css in)
    bg = page.evaluate("getComputedStyle(document.querySelector('header')).backgroundColor")
    assert bg == "rgb(29, 36, 48)"
    page.screenshot(path=str(shots / "fleet.png"), full_page=True)

    page.goto(f"{svc.url}/ui/roots")
    gate = page.locator(f'section.gate[data-root="{fleet.new_root}"][data-phase="activate"]')
    assert gate.locator("tr[data-cluster]").count() == 2
    assert "waits for 2 cluster(s)" in gate.locator("h4").inner_text()
    page.screenshot(path=str(shots / "roots.png"), full_page=True)

    # the graph: select a by clicking its node
    page.goto(f"{svc.url}/ui/graph")
    with page.expect_navigation():
        page.locator('a.node[data-cluster="a"] circle').click()
    assert page.url.endswith("/ui/graph?cluster=a")
    assert page.locator('g.edge.out[data-from="a"][data-to="b"]').count() == 1
    assert page.locator('g.edge.in[data-from="b"][data-to="a"]').get_attribute("data-services") == "ratings"
    stroke = page.evaluate("getComputedStyle(document.querySelector('g.edge.out line')).strokeWidth")
    assert stroke == "3px"
    page.screenshot(path=str(shots / "graph.png"), full_page=True)

    page.goto(f"{svc.url}/ui/audit")
    page.select_option("select[name=action]", "cluster.create")
    with page.expect_navigation():
        page.click("form.filters button")
    assert page.locator('td[data-field="subject"]').all_inner_texts() == ["c", "b", "a"]
    page.screenshot(path=str(shots / "audit.png"), full_page=True)

    # signed out: the cookie is gone and the pages refuse again
    page.goto(f"{svc.url}/ui/logout")
    assert page.url == f"{svc.url}/ui/login" and context.cookies() == []
    r = page.goto(f"{svc.url}/ui/")
    assert r is not None and r.status == 401

    # a script's way in: the Authorization header, no cookie
    scripted = context.new_page()
    scripted.set_extra_http_headers({"Authorization": f"Bearer {fleet.viewer_token}"})
    r = scripted.goto(f"{svc.url}/ui/graph?cluster=b")
    assert r is not None and r.status == 200
    assert scripted.locator('g.edge.dim[data-from="a"][data-to="c"]').count() == 1

    assert requests, "the browser requested nothing"
    origin = f"https://127.0.0.1:{svc.port}/"
    assert [u for u in requests if not u.startswith(origin)] == []
    assert {u for u in requests if u.endswith("/ui/static/ui.css")}, requests
    # no CSP violation, no failed load but the deliberate 401s
    assert [m for m in console if "Content Security Policy" in m] == []
    assert [m for m in console if m.startswith("error") and "status of 401" not in m] == []
