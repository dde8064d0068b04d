"""Rate limits per credential and per source address, shared by every replica.

Each replica counts requests locally for the current window and, every ``sync_interval``
seconds, adds its counts to a shared table and reads back the fleet-wide totals (one upsert and
one select for all active keys, not one per request). A request is refused with 429 and
``Retry-After`` when the fleet-wide total plus what this replica has not yet shared would pass
the limit. The credential key is the token's public id (``mbagent.<id>``), never its secret.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from ca_server.api.problems import problem

log = logging.getLogger("meshbridge.ca.ratelimit")

EXEMPT = ("/healthz", "/readyz", "/metrics")


@dataclass(frozen=True)
class Limits:
    per_credential: int = 300  # requests per window for one token (0: no limit)
    per_address: int = 3000  # requests per window from one source address (0: no limit)
    window: float = 1.0  # seconds


class SharedCounters(Protocol):
    def add_and_read(self, window: int, deltas: dict[str, int]) -> dict[str, int]:
        """Add this replica's counts for ``window`` and return the fleet-wide totals of those keys."""
        ...


class RateLimiter:
    def __init__(self, limits: Limits, shared: SharedCounters | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self.shared = shared
        self.clock = clock
        self._lock = threading.Lock()
        self._window = -1
        self._pending: dict[str, int] = {}
        self._fleet: dict[str, int] = {}

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


class RateLimit:
    """ASGI middleware answering 429 (problem details, Retry-After) over a limit."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in EXEMPT:
            await self.app(scope, receive, send)
            return
        limits = self.limiter.limits
        keys: list[tuple[str, int]] = []
        client = scope.get("client")
        if client:
            keys.append((f"addr:{client[0]}", limits.per_address))
        cred = credential_key(scope.get("headers", []))
        if cred:
            keys.append((cred, limits.per_credential))
        retry = self.limiter.hit(keys)
        if retry is not None:
            resp = problem(429, "Too many requests", f"rate limit reached; retry in {retry} s",
                           type_="ratelimited", headers={"Retry-After": str(retry)})
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)
