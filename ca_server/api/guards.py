"""The request guards every request passes before the app: body size and arrival time (413/408),
the rate limits (429), and the response counts. Plain ASGI middleware: Starlette's
BaseHTTPMiddleware costs a task and a memory stream per request."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ca_server.api.metrics import Metrics
from ca_server.api.problems import problem
from ca_server.api.ratelimit import RateLimit, RateLimiter

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
                log.debug("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                            "ms": round((time.perf_counter() - started) * 1000, 2)})


def request_guards(app: ASGIApp, *, metrics: Metrics, limiter: RateLimiter | None = None) -> ASGIApp:
    """``app`` behind the guards, outermost first: body limit, rate limit (when ``limiter``), response
    count. Also a Starlette middleware factory (``app.add_middleware(request_guards, ...)``)."""
    outer: ASGIApp = CountResponses(app, metrics=metrics)
    if limiter is not None:
        outer = RateLimit(outer, limiter=limiter)
    return BodyLimit(outer)
