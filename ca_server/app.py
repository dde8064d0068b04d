"""The composition root of the HTTP service: the authority, the routes, the request guards, the
error handlers and the background tasks put together into one FastAPI app."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Scope

from ca_server.api import routes
from ca_server.api.fastpath import AgentAnswers, AgentShortcut, ShortcutApp
from ca_server.api.guards import OperatorOnly, request_guards
from ca_server.api.longpoll import agent_threads
from ca_server.api.metrics import Metrics
from ca_server.api.problems import problem, problem_for, problem_responses, status_of
from ca_server.api.ratelimit import Limits, RateLimiter
from ca_server.api.ui import ui
from ca_server.api.watcher import RevisionWatcher
from ca_server.core import tokens
from ca_server.core.authority import Authority
from ca_server.core.errors import CAError, Forbidden, Unauthenticated, Unavailable
from ca_server.core.operators import VIEWER
from ca_server.storage.capabilities import SharesRateCounters

log = logging.getLogger("meshbridge.ca.http")

Background = Callable[[], Coroutine[Any, Any, None]]
ErrorResponse = Callable[[Exception, Scope], Response]

READY_CACHE_SECONDS = 1.0


def create_app(
    authority: Authority,
    *,
    ready_check: Callable[[], None] | None = None,
    background: list[Background] | None = None,
    watch_interval: float = 0.25,
    rate_limits: Limits | None = None,
    agent_shortcut: bool = True,
    metrics_token: str | None = None,
) -> FastAPI:
    """``agent_shortcut``: well-formed renewals, status reports and desired-state long-polls are
    answered by api/fastpath.py outside FastAPI's middleware stack (the default); False: by the
    FastAPI routes, with the guards added as FastAPI middleware — the framework's own path, for
    when an upgrade breaks the shortcut.

    /metrics and /openapi.json answer an operator token, admin or viewer (/metrics also ``metrics_token``); there
    is no /docs or /redoc (they load their scripts from a CDN), and no redirect to the same path
    with or without a trailing slash (it would be built from the Host header)."""
    limiter = _rate_limiter(authority, rate_limits)
    tasks = [*(background or []), *([limiter.sync_forever] if limiter is not None else [])]
    watcher = RevisionWatcher(authority, interval=watch_interval)
    authority.on_change.append(watcher.poke)
    metrics = Metrics(
        not_after_source=authority.intermediate_not_after,
        roots_source=authority.list_roots,
        group_commit_source=lambda: (*authority.store.group_commit_stats(), authority.store.group_commit_replays()),
    )

    app_class = ShortcutApp if agent_shortcut else FastAPI
    app = app_class(
        title="meshbridge CA service",
        version="1.0.0",
        description="Shared root of trust for separate Istio meshes: enrollment, intermediate issuance, "
        "rotation, revocation, audit, and the exchange of exports between clusters.",
        lifespan=_lifespan(watcher, tasks),
        responses=problem_responses(),
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
    )
    app.state.authority = authority
    app.state.metrics = metrics
    app.state.watcher = watcher
    app.state.desired_waiters = routes.DesiredWaiters()
    app.state.agent_threads = agent_threads()
    watcher.listeners.append(app.state.desired_waiters.on_snapshot)
    app.state.check_ready = _readiness(authority, metrics, ready_check)

    error_response = _error_responder(metrics)
    app.state.error_response = error_response  # the dashboard's refusals are logged and counted alike
    _handle_errors(app, metrics, error_response)
    operator = functools.partial(
        OperatorOnly, authorize=_operator_check(authority, metrics_token), on_error=error_response
    )
    if isinstance(app, ShortcutApp):
        answers = AgentAnswers(
            renewal=functools.partial(routes.renewal_answer, app.state),
            status=functools.partial(routes.status_answer, app.state),
            desired=functools.partial(routes.desired_answer, app.state),
        )

        def outer_layers(inner: ASGIApp) -> ASGIApp:
            shortcut = AgentShortcut(inner, answers=answers, on_error=error_response)
            return request_guards(shortcut, metrics=metrics, limiter=limiter, operator=operator)

        app.outer_layers = outer_layers
    else:
        app.add_middleware(request_guards, metrics=metrics, limiter=limiter, operator=operator)
    app.include_router(routes.public)
    app.include_router(routes.admin_api)
    app.include_router(routes.agent_api)
    app.include_router(ui)
    return app


def _rate_limiter(authority: Authority, limits: Limits | None) -> RateLimiter | None:
    """The limiter, sharing its counts through the store when the store can (every replica on one
    database then sees the fleet-wide totals)."""
    if limits is None:
        return None
    store = authority.store
    return RateLimiter(limits, store.rate_counters() if isinstance(store, SharesRateCounters) else None)


def _lifespan(
    watcher: RevisionWatcher, background: list[Background]
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Runs the revision watcher and the background tasks while the app serves."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(watcher.run())]
        tasks += [asyncio.create_task(fn()) for fn in background]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return lifespan


def _operator_check(authority: Authority, metrics_token: str | None) -> Callable[[str, str | None], None]:
    """Whether ``authorization`` opens the operator endpoint ``path``: an operator token (admin or
    viewer: both documents are read-only) opens all, ``metrics_token`` /metrics. Raises
    Unauthenticated otherwise."""
    metrics_hash = tokens.hash_secret(metrics_token) if metrics_token else None

    def authorize(path: str, authorization: str | None) -> None:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthenticated(f"{path} needs an 'Authorization: Bearer <token>' header")
        presented = authorization[7:].strip()
        if (
            metrics_hash is not None
            and path == "/metrics"
            and hmac.compare_digest(tokens.hash_secret(presented), metrics_hash)
        ):
            return
        # read-only documents: a viewer token opens them too (docs/api.md, "Roles")
        authority.authorize_operator(presented, role=VIEWER, what=f"GET {path}")

    return authorize


def _readiness(authority: Authority, metrics: Metrics, ready_check: Callable[[], None] | None) -> Callable[[], None]:
    """/readyz: the store answers and the signing key signs (then ``ready_check``); sets the gauge.
    The outcome is kept for READY_CACHE_SECONDS, and concurrent probes wait for one check: a flood
    of /readyz costs the database and the key one check a second."""
    lock = threading.Lock()
    checked_at = -READY_CACHE_SECONDS
    failure: Exception | None = None

    def check() -> Exception | None:
        try:
            authority.store.ping()
            authority.check_signing_key()
        except CAError as exc:
            return exc
        except Exception as exc:
            unavailable = Unavailable("not ready")
            unavailable.__cause__ = exc
            return unavailable
        return None

    def check_ready() -> None:
        nonlocal checked_at, failure
        with lock:
            if time.monotonic() - checked_at >= READY_CACHE_SECONDS:
                failure = check()
                checked_at = time.monotonic()
                metrics.up.set(0 if failure else 1)
            if failure is not None:
                raise failure.with_traceback(None)  # the same exception each time: keep its traceback short
        if ready_check is not None:
            ready_check()

    return check_ready


def _error_responder(metrics: Metrics) -> ErrorResponse:
    """The problem response for an exception: a CAError's own, any other a 500 that names nothing."""

    def error_response(exc: Exception, scope: Scope) -> Response:
        path = scope["path"]
        if not isinstance(exc, CAError):
            log.error("unexpected error", exc_info=exc, extra={"path": path})
            return problem(500, "Internal error", "the CA service failed; see its log", type_="internal")
        metrics.errors.labels(type(exc).__name__).inc()
        if isinstance(exc, Unavailable):
            log.warning("unavailable: %s", exc.detail, extra={"path": path})
        elif isinstance(exc, Unauthenticated | Forbidden):
            _log_refused(exc, scope)
        return problem_for(exc)

    return error_response


def _log_refused(exc: CAError, scope: Scope) -> None:
    """A failed authentication, at warning: who, where, which token id and why; never the secret
    (only a token of our shape gives an id; anything else is reported as such, not echoed)."""
    authorization = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
    presented = tokens.parse_token(authorization.decode("latin-1")[7:]) if authorization else None
    token = (
        f"{presented.kind} token {presented.token_id}"
        if presented
        else "a malformed token"
        if authorization
        else "no token"
    )
    client = scope.get("client")
    log.warning(
        "authentication failed: %s %s from %s with %s: %s",
        scope["method"],
        scope["path"],
        client[0] if client else "?",
        token,
        exc.detail,
        extra={"method": scope["method"], "path": scope["path"], "status": status_of(exc)},
    )


def _handle_errors(app: FastAPI, metrics: Metrics, error_response: ErrorResponse) -> None:
    """Every error FastAPI or the routes raise becomes a problem document (RFC 9457)."""

    @app.exception_handler(CAError)
    async def _ca_error(request: Request, exc: CAError) -> Response:
        return error_response(exc, request.scope)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        metrics.errors.labels("InvalidInput").inc()
        return problem(400, "Invalid input", _validation_detail(exc), type_="invalidinput")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return problem(
            exc.status_code,
            str(exc.detail) if exc.status_code != 404 else "Not found",
            "no such resource" if exc.status_code == 404 else str(exc.detail),
            headers=dict(exc.headers) if exc.headers is not None else None,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return error_response(exc, request.scope)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")  # never echo the input: it may be a token
    return "; ".join(parts)
