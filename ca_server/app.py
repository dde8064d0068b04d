"""The composition root: wires the core, the store, the key backend and the HTTP surface."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ca_server.api import routes
from ca_server.api.fastpath import RenewalShortcut
from ca_server.api.metrics import Metrics
from ca_server.api.problems import problem, problem_for, problem_responses
from ca_server.api.ratelimit import Limits, RateLimit, RateLimiter
from ca_server.api.watcher import RevisionWatcher
from ca_server.core.authority import Authority
from ca_server.core.errors import CAError, Unavailable

log = logging.getLogger("meshbridge.ca.http")

BODY_LIMIT = 64 * 1024


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, whether declared or streamed, and bodies
    that take longer than ``body_timeout`` seconds to arrive with 408 (a slow client holds no worker)."""

    def __init__(self, app: ASGIApp, limit: int = BODY_LIMIT, body_timeout: float = 10.0) -> None:
        self.app = app
        self.limit = limit
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = self.limit + 1
                if declared > self.limit:
                    await self._refuse(scope, receive, send, 413)
                    return
        seen = 0
        failed: int | None = None  # 413 or 408 once the body broke a limit
        body_done = False

        async def limited() -> Message:
            nonlocal seen, failed, body_done
            if body_done:
                return await receive()  # after the body: disconnect notices, no time limit
            try:
                async with asyncio.timeout(self.body_timeout):  # no task per message, unlike wait_for
                    msg = await receive()
            except TimeoutError:
                failed = 408
                raise _TooLarge() from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if seen > self.limit:
                    failed = 413
                    raise _TooLarge()
            return msg

        refused = False

        async def guarded(msg: Message) -> None:
            # FastAPI turns any error while reading the body into its own 400: once a limit was
            # crossed, whatever the app answers is replaced by the 413 or 408
            nonlocal refused
            if failed is None:
                await send(msg)
            elif not refused:
                refused = True
                await self._refuse(scope, receive, send, failed)

        try:
            await self.app(scope, limited, guarded)
        except _TooLarge:
            if not refused:
                await self._refuse(scope, receive, send, failed or 413)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int) -> None:
        if status == 408:
            resp = problem(408, "Request timeout", f"the request body did not arrive within {self.body_timeout:g} s",
                           type_="requesttimeout")
        else:
            resp = problem(413, "Payload too large", f"request bodies are limited to {self.limit} bytes",
                           type_="payloadtoolarge")
        await resp(scope, receive, send)


class _TooLarge(Exception):
    pass


class CountResponses:
    """Counts responses by status class (and logs each request at DEBUG). Plain ASGI: Starlette's
    BaseHTTPMiddleware (``@app.middleware("http")``) costs a task and a memory stream per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(f"{status // 100}xx").inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                            "ms": round((time.perf_counter() - started) * 1000, 2)})


class _CAApp(FastAPI):
    """FastAPI with this service's request guards (body limits, rate limits, response counts) and
    the renewal shortcut wrapped around its whole middleware stack: a renewal, the hot path,
    passes through no layer that does nothing for it."""

    outer_layers: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        inner = super().build_middleware_stack()
        return self.outer_layers(inner) if self.outer_layers is not None else inner


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")  # never echo the input: it may be a token
    return "; ".join(parts)


def create_app(
    authority: Authority,
    *,
    ready_check: Callable[[], None] | None = None,
    background: list[Callable[[], Coroutine[Any, Any, None]]] | None = None,
    watch_interval: float = 0.25,
    rate_limits: Limits | None = None,
) -> FastAPI:
    limiter: RateLimiter | None = None
    if rate_limits is not None:
        shared = getattr(authority.store, "rate_counters", None)
        limiter = RateLimiter(rate_limits, shared() if shared is not None else None)
        background = [*(background or []), limiter.sync_forever]
    watcher = RevisionWatcher(authority, interval=watch_interval)
    authority.on_change.append(watcher.poke)
    metrics = Metrics(not_after_source=authority.intermediate_not_after)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(watcher.run())]
        tasks += [asyncio.create_task(fn()) for fn in background or []]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    app = _CAApp(
        title="meshbridge CA service",
        version="1.0.0",
        description="Shared root of trust for separate Istio meshes: enrollment, intermediate issuance, "
        "rotation, revocation, audit, and the exchange of exports between clusters.",
        lifespan=lifespan,
        responses=problem_responses(),
    )
    app.state.authority = authority
    app.state.metrics = metrics
    app.state.watcher = watcher
    app.state.desired_waiters = routes.DesiredWaiters()
    watcher.listeners.append(app.state.desired_waiters.on_snapshot)

    def check_ready() -> None:
        try:
            authority.store.ping()
            authority.check_signing_key()
        except CAError:
            metrics.up.set(0)
            raise
        except Exception as exc:
            metrics.up.set(0)
            raise Unavailable("not ready") from exc
        metrics.up.set(1)
        if ready_check is not None:
            ready_check()

    app.state.check_ready = check_ready

    def error_response(exc: Exception, path: str) -> Response:
        if not isinstance(exc, CAError):
            log.error("unexpected error", exc_info=exc, extra={"path": path})
            return problem(500, "Internal error", "the CA service failed; see its log", type_="internal")
        metrics.errors.labels(type(exc).__name__).inc()
        if isinstance(exc, Unavailable):
            log.warning("unavailable: %s", exc.detail, extra={"path": path})
        return problem_for(exc)

    @app.exception_handler(CAError)
    async def _ca_error(request: Request, exc: CAError) -> Response:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        metrics.errors.labels("InvalidInput").inc()
        return problem(400, "Invalid input", _validation_detail(exc), type_="invalidinput")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return problem(exc.status_code, str(exc.detail) if exc.status_code != 404 else "Not found",
                       "no such resource" if exc.status_code == 404 else str(exc.detail),
                       headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return error_response(exc, request.url.path)

    def guards(inner: ASGIApp) -> ASGIApp:
        outer: ASGIApp = RenewalShortcut(inner, answer=functools.partial(routes.renewal_answer, app.state),
                                         on_error=error_response)
        outer = CountResponses(outer, metrics=metrics)
        if limiter is not None:
            outer = RateLimit(outer, limiter=limiter)
        return BodyLimit(outer)

    app.outer_layers = guards
    app.include_router(routes.public)
    app.include_router(routes.admin_api)
    app.include_router(routes.agent_api)
    return app
