"""Wakes long-polls when the fleet revision changes, on this replica or any other.

Local changes poke it at once; other replicas' changes are seen by polling the store's revision
counter (a one-row read) every ``interval`` seconds. The fleet snapshot is rebuilt once per
revision here, so a thousand waiting agents cost one database read, not a thousand.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ca_server.core.authority import Authority, FleetSnapshot

log = logging.getLogger("meshbridge.ca.watcher")


class RevisionWatcher:
    def __init__(self, authority: Authority, *, interval: float = 0.25) -> None:
        self.authority = authority
        self.interval = interval
        self.snapshot: FleetSnapshot | None = None
        self._cond: asyncio.Condition | None = None
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
        self._cond = asyncio.Condition()
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
                    async with self._cond:
                        self._cond.notify_all()
            except Exception as exc:  # the store is down: keep serving what we have, retry
                if self.healthy:
                    log.warning("cannot read the fleet revision: %s", type(exc).__name__)
                self.healthy = False
            try:
                await asyncio.wait_for(self._poke.wait(), timeout=self.interval)
            except TimeoutError:
                pass
            self._poke.clear()

    async def at_least(self, revision: int, *, timeout: float) -> FleetSnapshot | None:
        """The watcher's snapshot once it reflects ``revision`` (poked to look now), or None when it
        did not within ``timeout`` (the store is slow or down) or the watcher does not run. Requests
        that must see the store's revision wait here instead of each building a snapshot: in a
        renewal wave every read after a renewal found the revision moved and built its own."""
        snap = self.snapshot
        if snap is not None and snap.revision >= revision:
            return snap
        if self._cond is None or self._poke is None:
            return None
        self._poke.set()

        def reached() -> bool:
            return self.snapshot is not None and self.snapshot.revision >= revision

        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(reached), timeout=timeout)
            except TimeoutError:
                return None
        return self.snapshot

    async def wait_for_change(self, revision: int, *, timeout: float) -> bool:
        """True once the watcher holds a snapshot newer than ``revision``. Newer, not merely
        different: a caller may already have read a newer revision from the store than the watcher
        has seen yet (a change made on another replica), and must not be woken by the older one."""
        if self._cond is None:
            await asyncio.sleep(min(timeout, self.interval))
            return False

        def moved() -> bool:
            return self.snapshot is not None and self.snapshot.revision > revision

        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(moved), timeout=timeout)
            except TimeoutError:
                return False
        return True
