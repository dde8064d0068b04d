"""The fleet dashboard's routes (/ui/): authenticate the operator token (from the Authorization
header, else the session cookie), gather the data with the admin API's and `fleet check`'s own
functions, render with ca_server.ui. Read-only: the sign-in form is the only POST, and it writes
nothing but a cookie.

The cookie holds the operator token itself, not a server-side session id: replicas share only the
database, so a session would need a table (and a migration) to survive a request landing on another
replica, and holding the token keeps revocation and expiry immediate (every page checks it, as the
API does). It is `HttpOnly` (no script reads it; the pages run none), `Secure` (the listener is
HTTPS), `SameSite=Strict` (no cross-site request carries it: the pages are GETs that change nothing
anyway) and `Path=/ui/` (the API never sees it: API calls need the Authorization header)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Scope

from ca_server import fleetcheck
from ca_server.api import routes
from ca_server.api.problems import problem_for
from ca_server.api.ratelimit import spending
from ca_server.core.authority import Authority
from ca_server.core.errors import InvalidInput, Unauthenticated
from ca_server.core.operators import VIEWER
from ca_server.ui import pages
from ca_server.ui.view import AuditFilter, AuditView, Edge, FleetView
from meshbridge_wire.pem import certificate_fingerprints

COOKIE = "meshbridge_ui"
AUDIT_WINDOW = 1000  # entries the audit filter looks through per page (the store's page limit)
HEADERS = {
    # no script, style, font or image from anywhere but this origin; no framing; forms post here only
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}  # Cache-Control: no-store and X-Content-Type-Options: nosniff are on every response (server.RESPONSE_HEADERS)
STATIC = {  # the dashboard's only files: read once, served from memory
    name: (resources.files("ca_server.ui").joinpath(f"static/{name}").read_bytes(), media)
    for name, media in (("ui.css", "text/css; charset=utf-8"), ("favicon.svg", "image/svg+xml"))
}

ui = APIRouter(prefix="/ui", include_in_schema=False)


def html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        body, status_code=status, media_type="text/html; charset=utf-8", headers={**HEADERS, **(headers or {})}
    )


def presented_token(request: Request) -> str | None:
    """The Authorization header's bearer token if the header is there, else the session cookie's."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        return authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    return request.cookies.get(COOKIE)


def operator(request: Request) -> str:
    """The actor of the request's operator token (any role: a viewer is enough); Unauthenticated
    otherwise. Spends the token's rate budget as the API's reads do."""
    token = presented_token(request)
    if not token:
        raise Unauthenticated(
            "the dashboard needs an operator token: sign in at /ui/login or send 'Authorization: Bearer <token>'"
        )
    what = f"GET {request.url.path}"
    return spending(lambda: routes.authority(request).authorize_operator(token, role=VIEWER, what=what))


def refused(request: Request, exc: Unauthenticated) -> Response:
    """The 401: logged and counted like the API's (the app's error responder); a browser (Accept:
    text/html) gets the sign-in page and its stale cookie cleared, anything else the problem document.
    Either way no fleet data."""
    answer = logged_refusal(request, exc)
    if "text/html" not in request.headers.get("accept", ""):
        return answer
    page = html(pages.login_page(exc.detail), 401)
    if request.cookies.get(COOKIE) is not None:
        page.delete_cookie(COOKIE, path="/ui/", secure=True, httponly=True, samesite="strict")
    return page


def logged_refusal(request: Request, exc: Unauthenticated) -> Response:
    """The problem document of ``exc``, logged and counted by the app's error responder (app.py)."""
    respond: Callable[[Exception, Scope], Response] | None = getattr(request.app.state, "error_response", None)
    return respond(exc, request.scope) if respond is not None else problem_for(exc)


def page(request: Request, render: Callable[[Authority], str]) -> Response:
    try:
        operator(request)
    except Unauthenticated as exc:
        return refused(request, exc)
    return html(render(routes.authority(request)))


def fleet_view(a: Authority) -> FleetView:
    """The fleet as GET /v1/clusters, /v1/roots and /v1/roots/status show it, `fleet check`'s results
    over the same data, and the import edges of the CA's fleet index (what agents are told to import)."""
    snap = a.snapshot()
    clusters = routes.clusters_out(a, a.list_clusters())
    data = fleetcheck.FleetData(
        clusters=[c.model_dump() for c in clusters],
        trust_bundle=frozenset(certificate_fingerprints(snap.trust_bundle)),
        crls=fleetcheck.crl_next_updates(snap.crl_pem),
    )
    now = a.now()
    edges = [
        Edge(exporter=i["cluster"], consumer=consumer, service=i["name"])
        for consumer, imports in sorted(snap.imports_for.items())
        for i in imports
    ]
    return FleetView(
        now=now,
        clusters=clusters,
        results=fleetcheck.check_fleet(data, now=now, limits=fleetcheck.Limits()),
        roots=[routes.root_out(r) for r in a.list_roots()],
        root_status=routes.root_status_out(a.root_status()),
        edges=edges,
    )


def audit_view(a: Authority, f: AuditFilter) -> AuditView:
    """The entries matching ``f`` among the AUDIT_WINDOW entries before ``f.before``, newest first."""
    head = a.store.audit_head()
    end = min(f.before, head[0] + 1) if f.before is not None and head else (head[0] + 1 if head else 1)
    start = max(0, end - 1 - AUDIT_WINDOW)
    scanned = [e for e in a.audit(after=start, limit=AUDIT_WINDOW) if e.id < end]
    out = [routes.audit_out(e) for e in reversed(scanned)]
    return AuditView(
        entries=[e for e in out if f.matches(e)][: f.limit],
        filter=f,
        scanned_from=start + 1,
        actions=sorted({e.action for e in out}),
    )


@ui.get("/")
def fleet(request: Request) -> Response:
    return page(request, lambda a: pages.fleet_page(fleet_view(a)))


@ui.get("/roots")
def roots(request: Request) -> Response:
    return page(request, lambda a: pages.roots_page(fleet_view(a)))


@ui.get("/graph")
def graph(request: Request, cluster: Annotated[str | None, Query(max_length=63)] = None) -> Response:
    return page(request, lambda a: pages.graph_page(fleet_view(a), cluster))


@ui.get("/audit")
def audit(
    request: Request,
    action: Annotated[str, Query(max_length=64)] = "",
    actor: Annotated[str, Query(max_length=200)] = "",
    subject: Annotated[str, Query(max_length=200)] = "",
    before: Annotated[int | None, Query(ge=1, le=2**53)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    f = AuditFilter(action=action, actor=actor, subject=subject, before=before, limit=limit)
    return page(request, lambda a: pages.audit_page(audit_view(a, f)))


@ui.get("/login")
def login_form() -> Response:
    return html(pages.login_page())


@ui.post("/login")
async def login(request: Request) -> Response:
    """The sign-in form's POST: a valid operator token sets the cookie and sends the browser to the
    fleet; anything else is the form again with why (401). A cross-site form post is refused (403):
    the browser says where the form came from in Sec-Fetch-Site."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return html(pages.login_page("sign in from this dashboard's own form"), 403)
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise InvalidInput("POST /ui/login takes the sign-in form (application/x-www-form-urlencoded, field 'token')")
    fields = parse_qs((await request.body()).decode("utf-8", errors="replace"))
    token = (fields.get(pages.TOKEN_FIELD) or [""])[0].strip()
    try:
        if not token:
            raise Unauthenticated("enter an operator token")
        await run_in_threadpool(
            spending,
            lambda: routes.authority(request).authorize_operator(token, role=VIEWER, what="POST /ui/login"),
        )
    except Unauthenticated as exc:
        logged_refusal(request, exc)
        return html(pages.login_page(exc.detail), 401)
    done = html("", 303, {"Location": "/ui/"})
    done.set_cookie(COOKIE, token, path="/ui/", secure=True, httponly=True, samesite="strict")
    return done


@ui.get("/logout")
def logout() -> Response:
    done = html("", 303, {"Location": "/ui/login"})
    done.delete_cookie(COOKIE, path="/ui/", secure=True, httponly=True, samesite="strict")
    return done


@ui.get("/static/ui.css")
def stylesheet() -> Response:
    return static("ui.css")


@ui.get("/static/favicon.svg")
def favicon() -> Response:
    return static("favicon.svg")


def static(name: str) -> Response:
    body, media = STATIC[name]
    return Response(body, media_type=media, headers=HEADERS)
