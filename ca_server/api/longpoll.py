"""The desired-state long-poll (``GET /v1/clusters/{name}/desired?revision=R&wait=S``): answer at
once when the cluster's desired state differs from revision R, else wait until it may have changed
(woken per cluster by ``DesiredWaiters``, or by the ``RevisionWatcher``) or the wait ends."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio

from ca_server.api import ratelimit
from ca_server.api.ratelimit import spending
from ca_server.api.watcher import RevisionWatcher, within
from ca_server.core.authority import Authority
from ca_server.core.errors import NotFound
from ca_server.core.fleet import FleetSnapshot, desired_state
from ca_server.core.models import Cluster

MAX_WAIT = 60.0  # seconds a long-poll waits at most, whatever it asks for
FRESH_WAIT = 5.0  # seconds a read waits for the watcher to reach the store's revision, then reads it itself


class DesiredWaiters:
    """Per-cluster wake-ups for waiting long-polls. The fleet revision moves with every change
    (each renewal that ends a rotation, for one); waking every waiting long-poll for each would
    cost O(waiting) per change, O(n²) through a fleet-wide rotation. As a watcher listener (in the
    event loop, once per new snapshot) this wakes only the clusters whose desired state may differ,
    and after renewals and rotations looks only at the clusters they changed (the snapshot's
    ``changed_since``): comparing every waiting cluster cost 23 ms per snapshot at 10,000."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}
        self._prev: FleetSnapshot | None = None

    def on_snapshot(self, snap: FleetSnapshot) -> None:
        prev, self._prev = self._prev, snap
        changed = snap.changed_since(prev) if prev is not None else None
        if changed is not None:  # a few renewals: look at those clusters only, not at every waiter
            names: Iterable[str] = [n for n in changed if n in self._events]
        else:
            names = [n for n in self._events if prev is None or not _same_desired_inputs(prev, snap, n)]
        for name in names:
            for ev in self._events[name]:
                ev.set()

    @contextlib.contextmanager
    def watch(self, name: str) -> Iterator[asyncio.Event]:
        ev = asyncio.Event()
        self._events.setdefault(name, set()).add(ev)
        try:
            yield ev
        finally:
            events = self._events.get(name)
            if events is not None:
                events.discard(ev)
                if not events:
                    del self._events[name]


def _same_desired_inputs(a: FleetSnapshot, b: FleetSnapshot, name: str) -> bool:
    """Whether ``name``'s desired state is necessarily the same in both snapshots, so a fleet-wide
    revision change (another cluster renewing) does not cost every waiting long-poll a rebuild.
    Snapshots built incrementally keep the Cluster objects of clusters that did not change."""
    return a is b or (
        a.clusters.get(name) is b.clusters.get(name)
        and a.trust_bundle == b.trust_bundle
        and a.crl_pem == b.crl_pem
        and a.imports_for.get(name) == b.imports_for.get(name)
        and a.peers_for.get(name) == b.peers_for.get(name)
    )


READ_THREADS = 6  # threads the agents' store reads may hold at once: fewer than the store's connections
WRITE_THREADS = 32  # threads the agents' renewals may hold at once (PostgreSQL's group commit joins them)


@dataclass(frozen=True)
class AgentThreads:
    """Thread limits of the agents' own, apart from the default one the operator API's routes
    share: a fleet re-polling at once (every long-poll of a fleet event ends within the same
    minute) queues its reads here, not ahead of ``root activate``. Reads get fewer threads than
    the store has connections (8 + 8 on SQLite, 10 + 10 on PostgreSQL): a read thread beyond them
    only waits in the connection pool, ahead of the revision watcher whose snapshot every waiting
    read needs (at 10,000 clusters 40 read threads held a 200-cluster delta back 12-18 s)."""

    reads: anyio.CapacityLimiter
    writes: anyio.CapacityLimiter


def agent_threads() -> AgentThreads:
    return AgentThreads(anyio.CapacityLimiter(READ_THREADS), anyio.CapacityLimiter(WRITE_THREADS))


class _DesiredReads:
    """One long-poll's looks at a cluster's desired state. The first is authenticated and read at
    the store's revision (one thread hop to read that number, then the watcher's snapshot once it
    reaches it), so a client sees its own writes at once, unless the watcher's snapshot already
    gives the body the client holds: then there is nothing to answer yet, and the request waits
    without touching the store. Later looks take the watcher's
    snapshot, never one older than what this request already read, and rebuild the body only when
    its inputs may differ."""

    def __init__(
        self, authority: Authority, watcher: RevisionWatcher, name: str, threads: anyio.CapacityLimiter
    ) -> None:
        self.authority = authority
        self.watcher = watcher
        self.name = name
        self.threads = threads
        self.seen: FleetSnapshot | None = None
        self.body: dict[str, Any] = {}

    async def first(self, token: str, revision: str | None, waiting: bool) -> FleetSnapshot:
        """Authenticate ``token`` for this cluster (spending its rate budget) and read its state."""
        held = self.watcher.snapshot
        if waiting and revision is not None and held is not None and self._holds(held, token, revision):
            return held
        revision_now = await anyio.to_thread.run_sync(self.authority.revision, limiter=self.threads)
        fresh = await self.watcher.at_least(revision_now, timeout=FRESH_WAIT)
        admitted = self._admitted(fresh, token) if fresh is not None else None
        if fresh is not None and admitted is not None:
            view = (fresh, admitted)
        else:  # refused (the store names why), or no watcher to wait for: read it all here
            view = await anyio.to_thread.run_sync(self._view, token, limiter=self.threads)
        self.seen, self.body = view[0], desired_state(*view)
        return view[0]

    def _holds(self, snap: FleetSnapshot, token: str, revision: str) -> bool:
        """Whether ``snap`` admits ``token`` and gives the body the client holds (``revision``):
        then nothing is to be answered yet, and ``snap`` is this request's first look."""
        cluster = self._admitted(snap, token)
        if cluster is None:
            return False
        body = desired_state(snap, cluster)
        if body["revision"] != revision:
            return False
        self.seen, self.body = snap, body
        return True

    def _admitted(self, snap: FleetSnapshot, token: str) -> Cluster | None:
        """This cluster's row when ``snap`` admits ``token`` (its rate budget then spent), else None."""
        cluster = self.authority.agent_in(snap, token, self.name)
        if cluster is not None:
            ratelimit.authenticated()
        return cluster

    def _view(self, token: str) -> tuple[FleetSnapshot, Cluster]:
        return spending(lambda: self.authority.agent_view(token, self.name))

    def look(self) -> FleetSnapshot:
        """The watcher's snapshot (updating ``body``); never older than the last one seen. The
        token is not checked again: a cluster revoked while its long-poll waits is answered with
        its revoked state (docs/api.md), and its next request is refused."""
        seen = self.seen
        assert seen is not None
        held = self.watcher.snapshot
        # the watcher lags behind what this request read: never answer with older state
        snap = seen if held is None or held.revision < seen.revision else held
        if not _same_desired_inputs(seen, snap, self.name):
            current = snap.clusters.get(self.name)
            if current is None:
                raise NotFound(f"no cluster named {self.name}")
            self.body = desired_state(snap, current)
        self.seen = snap
        return snap


async def _woken(woken: asyncio.Event | None, watcher: RevisionWatcher, revision: int, timeout: float) -> bool:
    """Wait until this cluster's desired state may have changed (or the fleet moved past
    ``revision``, without per-cluster wake-ups); False when ``timeout`` passed first."""
    if woken is None:
        return await watcher.wait_for_change(revision, timeout=timeout)
    return await within(woken.wait(), timeout)


async def long_poll_desired(
    authority: Authority,
    watcher: RevisionWatcher,
    waiters: DesiredWaiters | None,
    name: str,
    *,
    token: str,
    revision: str | None,
    wait: float,
    is_disconnected: Callable[[], Awaitable[bool]],
    threads: anyio.CapacityLimiter,
) -> dict[str, Any]:
    """``name``'s desired state, for the agent token ``token``, once its revision differs from
    ``revision`` (at once when None), else after ``wait`` seconds (at most MAX_WAIT) or when the
    client went away."""
    deadline = time.monotonic() + min(wait, MAX_WAIT)
    reads = _DesiredReads(authority, watcher, name, threads)
    watching = waiters is not None and watcher.snapshot is not None and wait > 0  # the watcher runs
    with waiters.watch(name) if waiters is not None and watching else contextlib.nullcontext() as woken:
        snap = await reads.first(token, revision, waiting=wait > 0)
        while True:
            remaining = deadline - time.monotonic()
            if revision is None or reads.body["revision"] != revision or remaining <= 0:
                return reads.body
            if not await _woken(woken, watcher, snap.revision, remaining) and await is_disconnected():
                return reads.body
            if woken is not None:
                woken.clear()
            snap = reads.look()
