"""The agents' reads on a busy server (issue 15, item 2): a long-poll with nothing new to answer
waits without touching the store, the agents' thread work never holds the threads the operator API
needs (10,000 long-polls ending within one minute queued `root activate` behind them for 16 s), a
long-poll woken after its cluster was revoked is refused rather than answered, and a renewal storm
at fleet scale keeps its snapshots deltas."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

from ca_server.api import longpoll
from ca_server.api.watcher import RevisionWatcher
from ca_server.core.fleet import Fleet, FleetSnapshot
from tests.ca.conftest import Harness
from tests.ca.test_fleet_scale import seed_clusters, speedups_off

WATCHER = "asyncio_"  # the revision watcher reads from asyncio's executor, whose threads are named so


@contextmanager
def store_reads_on_workers(h: Harness) -> Iterator[list[str]]:
    """The store reads opened inside the block by any thread but the revision watcher's."""
    seen: list[str] = []
    real = h.store.read

    def read() -> Any:
        name = threading.current_thread().name
        if not name.startswith(WATCHER):
            seen.append(name)
        return real()

    h.store.read = read  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        h.store.read = real  # type: ignore[method-assign]


def test_a_long_poll_with_nothing_new_waits_without_reading_the_store(harness: Harness) -> None:
    agent = harness.enroll("a")
    current = harness.desired(agent)
    with store_reads_on_workers(harness) as reads:
        again = harness.desired(agent, revision=current["revision"], wait=0.3)
    assert again["revision"] == current["revision"]
    assert reads == []  # it was two: the token's row and the store's revision


def test_a_long_poll_behind_the_store_is_answered_with_the_newer_state_promptly(harness: Harness) -> None:
    agent = harness.enroll("a")
    before = harness.desired(agent)["revision"]
    harness.rotate("a")  # the watcher may not have seen it yet: then the long-poll waits for it
    started = time.monotonic()
    after = harness.desired(agent, revision=before, wait=30)
    assert after["rotate_required"] is True and after["revision"] != before
    assert time.monotonic() - started < 5


def test_a_wrong_agent_token_is_still_refused_with_its_reason(harness: Harness) -> None:
    a, b = harness.enroll("a"), harness.enroll("b")
    revision = harness.desired(a)["revision"]
    r = harness.client.get("/v1/clusters/a/desired", params={"revision": revision, "wait": 1}, headers=b.headers)
    assert r.status_code == 403 and "another cluster" in r.json()["detail"]
    bad = {"Authorization": a.headers["Authorization"][:-4] + "AAAA"}
    r = harness.client.get("/v1/clusters/a/desired", params={"revision": revision, "wait": 1}, headers=bad)
    assert r.status_code == 401


def test_a_long_poll_admitted_from_the_snapshot_and_woken_by_revocation_answers_the_revoked_state(
    harness: Harness,
) -> None:
    """docs/api.md: a long-poll waiting when its cluster is revoked answers with ``status: revoked``
    and no imports or peers; the next request is refused."""
    agent = harness.enroll("a")
    revision = harness.desired(agent)["revision"]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            harness.client.get,
            "/v1/clusters/a/desired",
            params={"revision": revision, "wait": 20},
            headers=agent.headers,
        )
        threading.Event().wait(0.5)  # the long-poll is waiting
        r = harness.client.post("/v1/clusters/a/revoke", json={"reason": "keyCompromise"}, headers=harness.admin)
        assert r.status_code == 200, r.text
        answer = waiting.result(timeout=20)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "revoked" and answer.json()["imports"] == answer.json()["peers"] == []
    again = harness.client.get(
        "/v1/clusters/a/desired", params={"revision": revision, "wait": 1}, headers=agent.headers
    )
    assert again.status_code == 401


def _blocking(monkeypatch: pytest.MonkeyPatch, h: Harness, gate: threading.Event, entered: list[int]) -> None:
    """Make every store-side step of an agent read (before and since reads wait for the watcher) wait
    for ``gate``."""

    def hold(real: Callable[..., Any]) -> Callable[..., Any]:
        def held(*args: Any, **kw: Any) -> Any:
            entered.append(1)
            gate.wait(30)
            return real(*args, **kw)

        return held

    for attr in ("revision", "agent_view", "authenticate_agent"):
        if hasattr(h.authority, attr):
            monkeypatch.setattr(h.authority, attr, hold(getattr(h.authority, attr)))


def test_agents_holding_every_agent_thread_do_not_hold_up_the_operator_api(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = harness.enroll("a")
    gate, entered = threading.Event(), list[int]()
    _blocking(monkeypatch, harness, gate, entered)
    n = 45  # more than the default thread limiter's 40 tokens, which the operator API uses
    with ThreadPoolExecutor(n + 1) as pool:
        polls = [pool.submit(harness.client.get, "/v1/clusters/a/desired", headers=agent.headers) for _ in range(n)]
        try:
            for _ in range(100):
                if len(entered) >= longpoll.READ_THREADS:
                    break
                threading.Event().wait(0.05)
            threading.Event().wait(0.3)  # the rest queue (before: on the operator API's threads)
            assert len(entered) >= longpoll.READ_THREADS  # every agent read thread is taken
            listed = pool.submit(harness.client.get, "/v1/clusters", headers=harness.admin)
            # it waited for the agents' threads before (the operator API shared their 40)
            assert listed.result(timeout=10).status_code == 200
        finally:
            gate.set()
        assert all(p.result(timeout=30).status_code == 200 for p in polls)


@speedups_off
def test_a_renewal_wave_over_a_quarter_of_a_large_fleet_keeps_snapshots_deltas(harness: Harness) -> None:
    names = seed_clusters(harness, 2000)
    fleet = Fleet(harness.authority.ctx)  # its own: the app's watcher reads the harness's in another thread
    fleet.snapshot()
    for name in names[:300]:  # more than the 256 entries a delta covered whatever the fleet's size
        harness.authority.rotate(name, actor="test")
    snap = fleet.snapshot()
    assert snap.changes, "a full read of the fleet"
    assert snap.changes[-1][2] == frozenset(names[:300])
    assert all(snap.clusters[n].rotation_pending for n in names[:300])
    assert not any(snap.clusters[n].rotation_pending for n in names[300:])


def test_reads_after_changes_take_the_watchers_snapshot_instead_of_each_building_one(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = harness.enroll("a")
    built: list[str] = []
    for attr in ("_snapshot_delta", "_full_snapshot"):
        real = getattr(Fleet, attr)

        def counting(*args: Any, _real: Callable[..., Any] = real, **kw: Any) -> Any:
            if threading.current_thread().name.startswith(WATCHER):
                time.sleep(0.1)  # a busy watcher, as in a renewal wave: readers find it behind
            else:
                built.append(threading.current_thread().name)
            return _real(*args, **kw)

        monkeypatch.setattr(Fleet, attr, staticmethod(counting))
    for _ in range(5):
        generation = harness.rotate("a")
        desired = harness.desired(agent)  # what an agent reads right after a change: it must see it
        assert desired["generation"] == generation and desired["rotate_required"] is True
    assert built == []  # each read built the snapshot of the revision it found (5)


class _CountingAuthority:
    """Just enough of an Authority for a RevisionWatcher: every look finds the fleet moved on."""

    def __init__(self) -> None:
        self.revision = 0

    def snapshot(self) -> FleetSnapshot:
        self.revision += 1
        return FleetSnapshot(revision=self.revision, trust_bundle="", crl_pem="", clusters={})


def test_the_watcher_keeps_publishing_while_thousands_of_reads_wait_on_it() -> None:
    """Reads waiting for a revision the watcher has not reached yet do not hold it up: with an
    asyncio.Condition each publish waited for every waiter to re-take its lock in turn."""

    async def run() -> int:
        authority = _CountingAuthority()
        watcher = RevisionWatcher(authority, interval=0.001)  # type: ignore[arg-type]
        task = asyncio.create_task(watcher.run())
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(watcher.at_least(10**9, timeout=5)) for _ in range(3000)]
        await asyncio.sleep(0.05)
        start = authority.revision
        await asyncio.sleep(0.5)
        published = authority.revision - start
        task.cancel()
        for w in waiting:
            w.cancel()
        await asyncio.gather(task, *waiting, return_exceptions=True)
        return published

    published = asyncio.run(run())
    assert published >= 150, published  # it was 10-45


class _StillAuthority:
    """A fleet that does not change: every look finds revision 1."""

    def snapshot(self) -> FleetSnapshot:
        return FleetSnapshot(revision=1, trust_bundle="", crl_pem="", clusters={})


def test_reads_that_stopped_waiting_do_not_pile_up_in_a_fleet_that_does_not_change() -> None:
    async def run() -> int:
        watcher = RevisionWatcher(_StillAuthority(), interval=0.01)  # type: ignore[arg-type]
        task = asyncio.create_task(watcher.run())
        await asyncio.sleep(0.05)
        for _ in range(4):  # four rounds of long-polls that time out with nothing new
            assert not any(await asyncio.gather(*(watcher.wait_for_change(1, timeout=0.01) for _ in range(1000))))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return len(watcher._waiting)

    assert asyncio.run(run()) <= 1024  # it kept all 4,000


def test_the_watcher_stops_when_cancelled_however_a_poke_falls() -> None:
    """The app's shutdown cancels the watcher and waits for it: a poke landing in the same loop
    iteration as the cancellation must not swallow it. Python 3.11's ``asyncio.wait_for`` returns
    the inner result when the inner wait finished as the outer task was cancelled
    (Lib/asyncio/tasks.py, ``wait_for``: ``except CancelledError: if fut.done(): return
    fut.result()``), and the watcher's loop went on forever: a test's teardown hung on it."""

    async def stops(steps: int) -> bool:
        watcher = RevisionWatcher(_StillAuthority(), interval=60)  # type: ignore[arg-type]
        task = asyncio.create_task(watcher.run())
        while watcher.snapshot is None:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)  # waiting for a poke now
        watcher.poke()
        for _ in range(steps):  # the cancellation lands this many loop iterations after the poke
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=1)
        if not done:
            task.cancel()  # once more, so the test's loop can close
        return bool(done)

    assert [steps for steps in range(8) if not asyncio.run(stops(steps))] == []
