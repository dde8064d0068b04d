"""Rate limits per credential and per source address, shared by every replica, and the local
budgets of failed authentications and of writes that grow the database.

Each replica counts requests locally for the current window and, every ``sync_interval``
seconds, adds its counts to a shared table and reads back the fleet-wide totals (one upsert and
one select for all active keys, not one per request). A request is refused with 429 and
``Retry-After`` when the fleet-wide total plus what this replica has not yet shared would pass
the limit. The credential key is the token's public id (``mbagent.<id>``), never its secret.

A credential's budget is spent only once the credential authenticated (the routes call
``authenticated()``): a wrong secret sent with a real token id spends nothing of that token's
budget. Every 401 spends the source address's budget of failures instead (a token bucket per
replica), and an address without any left is refused before its request is looked at. The writes
that grow the database (``PUT .../exports`` and ``PUT .../status``) have a small token bucket per
credential of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ca_server.api.problems import problem
from ca_server.core.errors import CAError, RateLimited, Unauthenticated

T = TypeVar("T")

log = logging.getLogger("meshbridge.ca.ratelimit")

EXEMPT = ("/healthz", "/readyz", "/metrics")
GROWING_WRITES = re.compile(r"/v1/clusters/[^/]+/(exports|status)")  # with PUT: per-credential write budget


@dataclass(frozen=True)
class Limits:
    per_credential: int = 300  # requests per window for one token (0: no limit)
    per_address: int = 3000  # requests per window from one source address (0: no limit)
    window: float = 1.0  # seconds
    failures_per_second: float = 10.0  # failed authentications from one address (per replica; 0: no limit)
    failures_burst: int = 50
    writes_per_second: float = 1.0  # PUT exports/status for one credential (per replica; 0: no limit)
    writes_burst: int = 10


class SharedCounters(Protocol):
    def add_and_read(self, window: int, deltas: dict[str, int]) -> dict[str, int]:
        """Add this replica's counts for ``window`` and return the fleet-wide totals of those keys."""
        ...


class TokenBuckets:
    """Token buckets of ``burst`` tokens refilled at ``rate`` per second, one per key, in this
    replica's memory (full buckets are forgotten once there are many)."""

    _PRUNE_AT = 10_000

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def wait(self, key: str) -> int | None:
        """Seconds until ``key`` has a token again; None when it has one now (nothing taken)."""
        if not self.rate:
            return None
        now = self.clock()
        with self._lock:
            level = self._level(key, now)
        return None if level >= 1 else max(1, math.ceil((1 - level) / self.rate))

    def take(self, key: str) -> int | None:
        """Take a token of ``key``; seconds to wait instead when it has none."""
        if not self.rate:
            return None
        now = self.clock()
        with self._lock:
            level = self._level(key, now)
            if level < 1:
                return max(1, math.ceil((1 - level) / self.rate))
            if len(self._buckets) >= self._PRUNE_AT:
                self._buckets = {k: v for k, v in self._buckets.items() if self._level(k, now) < self.burst}
            self._buckets[key] = (level - 1, now)
        return None


class RateLimiter:
    def __init__(
        self, limits: Limits, shared: SharedCounters | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.limits = limits
        self.shared = shared
        self.clock = clock
        self._lock = threading.Lock()
        self._window = -1
        self._pending: dict[str, int] = {}
        self._fleet: dict[str, int] = {}
        self.failures = TokenBuckets(limits.failures_per_second, limits.failures_burst, clock)
        self.writes = TokenBuckets(limits.writes_per_second, limits.writes_burst, clock)

    def _roll(self, now: float) -> int:
        w = int(now // self.limits.window)
        if w != self._window:
            self._window, self._pending, self._fleet = w, {}, {}
        return w

    def hit(self, keys: list[tuple[str, int]]) -> int | None:
        """Count one request against each (key, limit); seconds to wait when over a limit."""
        now = self.clock()
        with self._lock:
            self._roll(now)
            for key, limit in keys:
                if limit and self._fleet.get(key, 0) + self._pending.get(key, 0) + 1 > limit:
                    rest = self.limits.window - (now % self.limits.window)
                    return max(1, math.ceil(rest))
            for key, _ in keys:
                self._pending[key] = self._pending.get(key, 0) + 1
        return None

    def over(self, key: str, limit: int) -> int | None:
        """Seconds to wait when ``key`` has no request left in this window (nothing counted)."""
        now = self.clock()
        with self._lock:
            self._roll(now)
            if limit and self._fleet.get(key, 0) + self._pending.get(key, 0) >= limit:
                return max(1, math.ceil(self.limits.window - (now % self.limits.window)))
        return None

    def sync(self) -> None:
        """Share this replica's counts and learn the fleet's (call every ``sync_interval``)."""
        if self.shared is None:
            return
        with self._lock:
            window, deltas = self._window, self._pending
            self._pending = {}
            for key in self._fleet:  # refresh what the other replicas did with keys seen here
                deltas.setdefault(key, 0)
        if window < 0 or not deltas:
            return
        try:
            totals = self.shared.add_and_read(window, deltas)
        except Exception as exc:  # the store is down: limits stay local until it is back
            log.warning("rate-limit counters not shared: %s", type(exc).__name__)
            with self._lock:
                if self._window == window:
                    for k, v in deltas.items():
                        self._pending[k] = self._pending.get(k, 0) + v
            return
        with self._lock:
            if self._window == window:
                self._fleet.update(totals)

    async def sync_forever(self, interval: float = 0.2) -> None:
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.sync)


def credential_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for k, v in headers:
        if k == b"authorization":
            parts = v.decode("latin-1").split(" ", 1)
            if len(parts) == 2 and parts[0].lower() == "bearer":
                pieces = parts[1].strip().split(".")
                if len(pieces) == 3 and pieces[0].startswith("mb") and len(pieces[1]) == 16:
                    return f"cred:{pieces[0]}.{pieces[1]}"  # kind and public id only
            return "cred:malformed"
    return None


@dataclass
class _Request:
    """What ``authenticated()`` needs of the request being served (set by ``RateLimit``)."""

    limiter: RateLimiter
    credential: str | None
    growing_write: bool
    spent: bool = False


_CURRENT: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("meshbridge_rate_request", default=None)


def authenticated() -> None:
    """Spend the request's credential budget, once its credential authenticated; RateLimited when
    the credential (or, for a growing write, its write budget) has none left. Once per request;
    nothing without a limiter."""
    request = _CURRENT.get()
    if request is None or request.spent or request.credential is None:
        return
    request.spent = True
    limiter = request.limiter
    retry = limiter.hit([(request.credential, limiter.limits.per_credential)])
    if retry is None and request.growing_write:
        retry = limiter.writes.take(request.credential)
    if retry is not None:
        raise RateLimited(f"rate limit of this token reached; retry in {retry} s", retry_after=retry)


def spending(call: Callable[[], T]) -> T:
    """``call()``, which authenticates the request's token first; the token's rate budget is
    spent unless it did not authenticate (a wrong secret spends only its address's failures)."""
    with budget_spent():
        return call()


@contextlib.contextmanager
def budget_spent() -> Iterator[None]:
    """``spending`` around a block (one that awaits): the block authenticates the request's token
    first; the budget is spent when it ends, unless the token did not authenticate."""
    try:
        yield
    except Unauthenticated:
        raise
    except CAError:
        authenticated()
        raise
    authenticated()


class RateLimit:
    """ASGI middleware answering 429 (problem details, Retry-After) over a limit: the address's
    request limit and budget of failures, and the credential's limit (checked here, spent by
    ``authenticated()``); a 401 answer spends one of the address's failures. ``on_refusal`` is
    called for each 429 answered here (the metrics count it)."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, on_refusal: Callable[[], None] | None = None) -> None:
        self.app = app
        self.limiter = limiter
        self.on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in EXEMPT:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = f"addr:{client[0]}" if client else None
        cred = credential_key(scope.get("headers", []))
        retry = self._refusal(address, cred)
        if retry is not None:
            if self.on_refusal is not None:
                self.on_refusal()
            resp = problem(
                429,
                "Too many requests",
                f"rate limit reached; retry in {retry} s",
                type_="ratelimited",
                headers={"Retry-After": str(retry)},
            )
            await resp(scope, receive, send)
            return
        growing = scope.get("method") == "PUT" and GROWING_WRITES.fullmatch(scope.get("path", "")) is not None
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = _CURRENT.set(_Request(self.limiter, cred, growing))
        try:
            await self.app(scope, receive, send_status)
        finally:
            _CURRENT.reset(token)
            if status == 401 and address is not None:
                self.limiter.failures.take(address)

    def _refusal(self, address: str | None, cred: str | None) -> int | None:
        """Seconds to wait when a limit refuses the request before it is looked at."""
        limits = self.limiter.limits
        if address is not None:
            retry = self.limiter.failures.wait(address) or self.limiter.hit([(address, limits.per_address)])
            if retry is not None:
                return retry
        return self.limiter.over(cred, limits.per_credential) if cred is not None else None
