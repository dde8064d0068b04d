"""The request guards every request passes before the app: body size (413), the rate limits
(429), the operator endpoints' token (401), and the response counts. Plain ASGI middleware:
Starlette's BaseHTTPMiddleware costs a task and a memory stream per request. How long a head or a
body may take to arrive is the listener's concern (ca_server/listener.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ca_server.api.metrics import Metrics
from ca_server.api.problems import problem
from ca_server.api.ratelimit import RateLimit, RateLimiter

log = logging.getLogger("meshbridge.ca.http")

BODY_LIMIT = 64 * 1024


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, whether declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int = BODY_LIMIT) -> None:
        self.app = app
        self.limit = limit

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
                    await self._refuse(scope, receive, send)
                    return
        seen = 0
        failed = False  # once the body crossed the limit

        async def limited() -> Message:
            nonlocal seen, failed
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    failed = True
                    raise _TooLarge()
            return msg

        refused = False

        async def guarded(msg: Message) -> None:
            # FastAPI turns any error while reading the body into its own 400: once the limit was
            # crossed, whatever the app answers is replaced by the 413
            nonlocal refused
            if not failed:
                await send(msg)
            elif not refused:
                refused = True
                await self._refuse(scope, receive, send)

        try:
            await self.app(scope, limited, guarded)
        except _TooLarge:
            if not refused:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = problem(
            413, "Payload too large", f"request bodies are limited to {self.limit} bytes", type_="payloadtoolarge"
        )
        await resp(scope, receive, send)


class _TooLarge(Exception):
    pass


class CountResponses:
    """Counts responses by status class (and logs each request at DEBUG)."""

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
                log.debug(
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )


class OperatorOnly:
    """The operator endpoints (``PATHS``) answer only a request whose ``Authorization`` header
    ``authorize(path, authorization)`` accepts; it raises the CAError that ``on_error(exc, scope)``
    turns into the refusal. Any other request passes after one set lookup."""

    PATHS = frozenset({"/metrics", "/openapi.json"})

    def __init__(
        self,
        app: ASGIApp,
        *,
        authorize: Callable[[str, str | None], None],
        on_error: Callable[[Exception, Scope], Response],
    ) -> None:
        self.app = app
        self.authorize = authorize
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        authorization = Headers(scope=scope).get("authorization")
        try:  # the admin token is looked up in the store: off the event loop
            await run_in_threadpool(self.authorize, scope["path"], authorization)
        except Exception as exc:
            await self.on_error(exc, scope)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def request_guards(
    app: ASGIApp,
    *,
    metrics: Metrics,
    limiter: RateLimiter | None = None,
    operator: Callable[[ASGIApp], ASGIApp] | None = None,
) -> ASGIApp:
    """``app`` behind the guards, outermost first: body limit, rate limit (when ``limiter``), response
    count, operator endpoints (when ``operator``, e.g. a partial of OperatorOnly). Also a Starlette
    middleware factory (``app.add_middleware(request_guards, ...)``)."""
    outer: ASGIApp = CountResponses(operator(app) if operator is not None else app, metrics=metrics)
    if limiter is not None:
        # Refused here before any handler: counted like the 429 of ``authenticated()``.
        outer = RateLimit(outer, limiter=limiter, on_refusal=metrics.errors.labels("RateLimited").inc)
    return BodyLimit(outer)
