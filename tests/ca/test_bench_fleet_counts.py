"""bench/fleet_event.py counts honestly (issue 15, item 3): a renewal answered 2xx is a success,
whatever happens to the agent afterwards, and the statuses it saw are reported."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parents[2] / "bench"


def fleet_event() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # it imports its sibling ``common``
    spec = importlib.util.spec_from_file_location("fleet_event_under_test", BENCH / "fleet_event.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def agent(name: str, status: int | None = 201, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": name, "polls": 3, "answers": [1.0], "want_generation": 2}
    if status is not None:
        rec |= {"renew_status": status, "after_renewal": {"status": 200, "rotate_required": False}}
        if status == 201:
            rec["renewed_generation"] = 2
    return rec | extra


def test_a_2xx_renewal_is_no_failure_and_what_came_after_is_counted_apart() -> None:
    results = [
        agent("ok"),
        # renewed, then a later long-poll failed: the old count called this a failed renewal
        agent("later-error", error="ReadTimeout: after 4 long-poll(s)"),
        # renewed, then read a desired state still asking for rotation
        agent("stale", after_renewal={"status": 200, "rotate_required": True, "generation": 2}),
        agent("refused", 409),
        agent("never", None, error="ConnectError: handshake closed"),
    ]
    t = fleet_event().tally(results)
    assert t["renew_statuses"] == {"201": 3, "409": 1, "none": 1}
    assert t["failures"] == 2
    assert {s["name"] for s in t["failure_samples"]} == {"refused", "never"}
    assert t["errors_after_renewal"] == 1
    assert t["pending_after_renewal"] == 1
    assert t["other_generation"] == 0
    assert {s["name"] for s in t["after_renewal_samples"]} == {"later-error", "stale"}


def test_every_agent_renewed_is_zero_failures() -> None:
    t = fleet_event().tally([agent(f"a{i}") for i in range(1000)])
    assert t["renew_statuses"] == {"201": 1000}
    assert (t["failures"], t["errors_after_renewal"], t["pending_after_renewal"]) == (0, 0, 0)


def test_a_read_after_renewal_cut_short_by_the_deadline_is_unfinished_not_an_error() -> None:
    """At 10,000 agents the bench's 60 s deadline stopped the agents while their reads after a 201
    renewal were still waiting: all 10,000 were reported as errors after renewal, none had one."""
    unanswered = agent("cut-short")
    del unanswered["after_renewal"]
    t = fleet_event().tally([agent("ok"), unanswered, agent("broken", error="ReadTimeout")])
    assert (t["failures"], t["errors_after_renewal"], t["unfinished_after_renewal"]) == (0, 1, 1)


def test_the_deadline_grows_with_the_fleet() -> None:
    module = fleet_event()
    assert module.event_deadline(None, 1000) == 60.0
    assert module.event_deadline(None, 10000) == 150.0
    assert module.event_deadline(30.0, 10000) == 30.0


def test_the_cpu_of_a_process_tree_keeps_what_its_ended_children_used() -> None:
    """A PostgreSQL backend whose connection closed during a measurement took its CPU out of
    ``proc_tree_cpu``'s total (only live descendants were summed), and the database's CPU came out
    negative in the report: the ended children's CPU, reaped into the parent's ``cutime``, counts."""
    import multiprocessing
    import os

    sys.path.insert(0, str(BENCH))
    import common

    before, own_before = common.proc_tree_cpu(os.getpid()), _own_cpu()
    child = multiprocessing.get_context("fork").Process(target=_burn, args=(0.3,))
    child.start()
    child.join()  # reaped: its CPU now shows in this process's cutime, not under a live child
    children = common.proc_tree_cpu(os.getpid()) - before - (_own_cpu() - own_before)
    assert children >= 0.25


def _burn(seconds: float) -> None:
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def _own_cpu() -> float:
    import os

    t = os.times()
    return t.user + t.system


def test_a_renewal_pushed_back_is_retried_as_the_agent_would_and_counted() -> None:
    """The agent retries a renewal the CA answered 429 or 503 (``CAUnreachable``): the bench does
    too, after the ``Retry-After`` given, and reports how many refusals it met. A 10,000-agent
    PostgreSQL run counted 1,701 renewals as failed that a real agent would have retried."""
    module = fleet_event()
    answers = iter([429, 503, 201])
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        status = next(answers)
        body = {"generation": 2} if status == 201 else {"title": "slow down"}
        return httpx.Response(status, json=body, headers={"Retry-After": "0"})

    async def run() -> tuple[int, dict[str, Any]]:
        rec: dict[str, Any] = {"name": "a"}
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://ca") as client:
            r = await module.renewed(client, {"name": "a", "csr": "c", "proof": "p"}, {}, rec)
        return r.status_code, rec

    status, rec = asyncio.run(run())
    assert status == 201 and rec["renew_refused"] == 2
    assert seen == ["/v1/clusters/a/intermediate"] * 3
    t = module.tally([agent("a", renew_refused=2), agent("b")])
    assert t["renewals_refused_then_retried"] == 2 and t["failures"] == 0


def test_a_renewal_refused_every_time_is_a_failure() -> None:
    module = fleet_event()

    async def run() -> int:
        transport = httpx.MockTransport(lambda _: httpx.Response(429, headers={"Retry-After": "0"}))
        async with httpx.AsyncClient(transport=transport, base_url="http://ca") as client:
            r: httpx.Response = await module.renewed(client, {"name": "a", "csr": "c", "proof": "p"}, {}, {})
        return r.status_code

    assert asyncio.run(run()) == 429
    assert module.tally([agent("a", 429)])["failures"] == 1
