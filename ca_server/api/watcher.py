"""Wakes long-polls when the fleet revision changes, on this replica or any other.

Local changes poke it at once; other replicas' changes are seen by polling the store's revision
counter (a one-row read) every ``interval`` seconds. The fleet snapshot is rebuilt once per
revision here, so a thousand waiting agents cost one database read, not a thousand.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable

from ca_server.core.authority import Authority, FleetSnapshot

log = logging.getLogger("meshbridge.ca.watcher")

_COMPACT_MIN = 1024  # waiting futures at which finished ones are first dropped


async def within(aw: Awaitable[object], timeout: float) -> bool:
    """True once ``aw`` finished, False when ``timeout`` passed first. Not ``asyncio.wait_for``:
    Python 3.11's returns the inner result when the inner wait finishes in the loop iteration its
    caller is cancelled in (Lib/asyncio/tasks.py, ``wait_for``: ``except CancelledError: if
    fut.done(): return fut.result()``), and the cancellation is lost; ``asyncio.timeout`` tells
    its own cancellation from another's (``Timeout.__aexit__`` counts them with ``uncancel``)."""
    try:
        async with asyncio.timeout(timeout):
            await aw
    except TimeoutError:
        return False
    return True


class RevisionWatcher:
    def __init__(self, authority: Authority, *, interval: float = 0.25) -> None:
        self.authority = authority
        self.interval = interval
        self.snapshot: FleetSnapshot | None = None
        # futures of the reads waiting for a revision, by the revision each needs: a publish
        # resolves only those it satisfies, with no lock. An asyncio.Condition made every woken
        # waiter re-take its lock in turn, one loop iteration each, and the watcher's next notify
        # queued behind them all: with a few thousand reads waiting in a renewal wave it
        # published no snapshot for 40 s
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._compact_at = _COMPACT_MIN  # a read that timed out leaves its future until then
        self._poke: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.listeners: list[Callable[[FleetSnapshot], None]] = []
        self.healthy = True

    def poke(self) -> None:
        """Thread-safe: something changed here, look now."""
        loop, ev = self._loop, self._poke
        if loop is not None and ev is not None and not loop.is_closed():
            loop.call_soon_threadsafe(ev.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._poke = asyncio.Event()
        while True:
            try:
                snap = await asyncio.to_thread(self.authority.snapshot)
                self.healthy = True
                if self.snapshot is None or snap.revision != self.snapshot.revision:
                    self.snapshot = snap
                    for fn in self.listeners:
                        try:
                            fn(snap)
                        except Exception:
                            log.exception("snapshot listener failed")
                    self._resolve(snap.revision)
            except Exception as exc:  # the store is down: keep serving what we have, retry
                if self.healthy:
                    log.warning("cannot read the fleet revision: %s", type(exc).__name__)
                self.healthy = False
            await within(self._poke.wait(), self.interval)
            self._poke.clear()

    def _resolve(self, revision: int) -> None:
        while self._waiting and self._waiting[0][0] <= revision:
            waiter = heapq.heappop(self._waiting)[2]
            if not waiter.done():
                waiter.set_result(None)

    def _compact(self) -> None:
        """Drop the futures of reads that stopped waiting (timed out, or their client left): in a
        fleet that does not change they are not popped by a publish, and would pile up."""
        self._waiting = [w for w in self._waiting if not w[2].done()]
        heapq.heapify(self._waiting)
        self._compact_at = max(_COMPACT_MIN, 2 * len(self._waiting))

    async def at_least(self, revision: int, *, timeout: float) -> FleetSnapshot | None:
        """The watcher's snapshot once it reflects ``revision`` (poked to look now), or None when it
        did not within ``timeout`` (the store is slow or down) or the watcher does not run. Requests
        that must see the store's revision wait here instead of each building a snapshot: in a
        renewal wave every read after a renewal found the revision moved and built its own."""
        if self._poke is not None and (self.snapshot is None or self.snapshot.revision < revision):
            self._poke.set()
        return self.snapshot if await self._reaches(revision, timeout) else None

    async def wait_for_change(self, revision: int, *, timeout: float) -> bool:
        """True once the watcher holds a snapshot newer than ``revision``. Newer, not merely
        different: a caller may already have read a newer revision from the store than the watcher
        has seen yet (a change made on another replica), and must not be woken by the older one."""
        if self._loop is None:
            await asyncio.sleep(min(timeout, self.interval))
            return False
        return await self._reaches(revision + 1, timeout)

    async def _reaches(self, revision: int, timeout: float) -> bool:
        """Wait until the snapshot's revision is at least ``revision``; False when ``timeout``
        passed first or the watcher does not run."""
        if self.snapshot is not None and self.snapshot.revision >= revision:
            return True
        if self._loop is None:
            return False
        waiter: asyncio.Future[None] = self._loop.create_future()
        if len(self._waiting) >= self._compact_at:
            self._compact()
        heapq.heappush(self._waiting, (revision, next(self._order), waiter))
        return await within(waiter, timeout)
