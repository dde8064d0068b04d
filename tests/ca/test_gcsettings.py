"""`serve`'s collector settings (ca_server/gcsettings.py), against CPython's own collector: a heap
that keeps growing with live objects (a fleet's connections and long-polls) gets full collections
over and over with the default thresholds, and next to none once tuned; garbage cycles still die."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ca_server import gcsettings
from ca_server import server as server_module
from ca_server.cli import build_parser
from tests.ca.conftest import Harness
from tests.ca.test_cli import ok


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def _full_collections_while_growing(objects: int) -> int:
    """Full collections CPython runs while ``objects`` live containers are made (kept, like a
    fleet's waiting requests), with nothing freed."""
    full = 0

    def count(phase: str, info: dict[str, Any]) -> None:
        nonlocal full
        if phase == "start" and info["generation"] == 2:
            full += 1

    kept: list[list[int]] = []
    gc.collect()
    gc.callbacks.append(count)
    try:
        for i in range(objects):
            kept.append([i])  # a list is always tracked (a dict of atoms is not)
    finally:
        gc.callbacks.remove(count)
    return full


@pytest.mark.usefixtures("restored_gc")
def test_a_growing_heap_gets_next_to_no_full_collections_once_tuned() -> None:
    gc.set_threshold(700, 10, 10)  # CPython's defaults
    grow = 3 * len(gc.get_objects())  # the heap four times its size: full collections at each quarter
    before = _full_collections_while_growing(grow)
    gcsettings.tune()
    assert gc.get_threshold() == (gcsettings.YOUNG, gcsettings.MIDDLE, gcsettings.OLD)
    assert gc.get_freeze_count() > 0  # what existed is out of every later collection
    after = _full_collections_while_growing(grow)
    assert before >= 3 and after <= 1, (before, after)


@pytest.mark.usefixtures("restored_gc")
def test_cycles_made_after_tuning_are_still_collected() -> None:
    gcsettings.tune()

    class Node:
        other: Any = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    held: list[list[int]] = [[] for _ in range(gcsettings.YOUNG * 2)]  # net new objects: young collections run
    assert gone() is None and len(held) == gcsettings.YOUNG * 2


@pytest.mark.usefixtures("restored_gc")
def test_serve_tunes_the_collector_before_it_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ca"
    ok("init", "--data-dir", str(d))
    for key in [k for k in os.environ if k.startswith("MESHBRIDGE_")]:
        monkeypatch.delenv(key)
    gc.set_threshold(700, 10, 10)
    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr(
        server_module.AnnouncingServer, "run", lambda self, sockets=None: seen.append(gc.get_threshold())
    )
    args = build_parser().parse_args(["serve", "--data-dir", str(d), "--listen", "127.0.0.1:0"])
    assert server_module._serve(args) == 0
    assert seen == [(gcsettings.YOUNG, gcsettings.MIDDLE, gcsettings.OLD)]


@pytest.mark.usefixtures("restored_gc")
def test_paused_keeps_the_collector_off_until_the_last_pause_ends() -> None:
    gc.enable()
    with gcsettings.paused():
        assert not gc.isenabled()
        with gcsettings.paused():  # nested, as two concurrent requests would be
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()  # turned off elsewhere: stays off
    try:
        with gcsettings.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.usefixtures("restored_gc")
def test_root_activate_runs_with_the_collector_off(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    real = harness.authority.activate_root

    def activate(*args: Any, **kw: Any) -> Any:
        seen.append(gc.isenabled())
        return real(*args, **kw)

    monkeypatch.setattr(harness.authority, "activate_root", activate)
    root = harness.client.post("/v1/roots", json={}, headers=harness.admin).json()
    r = harness.client.post(f"/v1/roots/{root['id']}/activate", json={"force": True}, headers=harness.admin)
    assert r.status_code == 200, r.text
    assert seen == [False] and gc.isenabled()
