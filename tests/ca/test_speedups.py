"""The switches of the speed-ups that rely on framework internals (ca_server/speedups.py): on by
default, each reachable from `serve`'s flags, and off, the framework's own path. What the service
answers in both modes is covered by the renewal, bad-input, storage and fast-path tests, which run
with the speed-ups on and off."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import event
from starlette.middleware.errors import ServerErrorMiddleware

from ca_server.api.fastpath import AgentShortcut
from ca_server.api.guards import BodyLimit
from ca_server.cli import build_parser
from ca_server.http_protocol import CoalescingHttpToolsProtocol
from ca_server.listener import GuardedHttpToolsProtocol
from ca_server.server import http_protocol, speedups_of
from ca_server.speedups import ALL_OFF, ALL_ON, Speedups
from cluster_agent import pki
from tests.ca.conftest import make_harness
from tests.ca.test_cli import ok, serve

SERVE = ["serve", "--data-dir", "d"]
FLAGS = ["--no-agent-shortcut", "--no-joined-writes", "--no-prepared-statements"]


def test_serve_flags_turn_each_speedup_off(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert speedups_of(parser.parse_args(SERVE)) == ALL_ON
    assert speedups_of(parser.parse_args([*SERVE, *FLAGS])) == ALL_OFF
    for flag, name in zip(FLAGS, ["agent_shortcut", "joined_writes", "prepared_statements"], strict=True):
        assert speedups_of(parser.parse_args([*SERVE, flag])).off() == [name]
    # the shortcut's older name, from when it answered renewals only
    assert speedups_of(parser.parse_args([*SERVE, "--no-renewal-shortcut"])).off() == ["agent_shortcut"]
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    usage = capsys.readouterr().out
    assert all(flag in usage for flag in FLAGS)


def _layers(app: Any) -> list[type]:
    """The classes of an ASGI middleware chain, outermost first."""
    out = []
    while app is not None:
        out.append(type(app))
        app = getattr(app, "app", None)
    return out


@pytest.mark.parametrize("speedups", [ALL_ON, ALL_OFF], ids=["on", "off"])
def test_agent_shortcut_switch(tmp_path: Path, speedups: Speedups) -> None:
    for h in make_harness(f"sqlite:///{tmp_path / 'ca.db'}", tmp_path / "ca", speedups=speedups):
        app = h.client.app
        assert isinstance(app, FastAPI)
        layers = _layers(app.build_middleware_stack())
        if speedups.agent_shortcut:  # guards and shortcut outside FastAPI's stack
            assert layers.index(BodyLimit) < layers.index(AgentShortcut) < layers.index(ServerErrorMiddleware)
        else:  # FastAPI as it comes, the guards added as its middleware
            assert type(app) is FastAPI and AgentShortcut not in layers
            assert layers.index(ServerErrorMiddleware) < layers.index(BodyLimit)


def test_a_renewal_without_content_type_gets_one_answer_either_way(tmp_path: Path) -> None:
    """Whether FastAPI reads a JSON body sent without a content type depends on its version; the
    shortcut leaves such bodies to it, so both modes answer alike."""
    answers = []
    for mode, speedups in (("on", ALL_ON), ("off", ALL_OFF)):
        for h in make_harness(f"sqlite:///{tmp_path / mode}.db", tmp_path / mode, speedups=speedups):
            a = h.enroll("a")
            csr = pki.make_csr(pki.new_key(), "a")
            body = json.dumps({"csr": csr, "proof": pki.prove(a.key, csr)}).encode()
            r = h.client.post("/v1/clusters/a/intermediate", content=body, headers=a.headers)
            assert "content-type" not in r.request.headers
            answers.append((r.status_code, r.headers["content-type"], r.json().get("type")))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("prepared", [True, False])
def test_prepared_statements_switch(tmp_path: Path, prepared: bool) -> None:
    """On, the hot statements bypass SQLAlchemy's execution (no Core event); off, they go through it."""
    seen: list[str] = []
    me = threading.get_ident()

    def through_core(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if threading.get_ident() == me:  # not the revision watcher's snapshots, which run in threads
            seen.append(statement)

    for h in make_harness(
        f"sqlite:///{tmp_path / 'ca.db'}", tmp_path / "ca", speedups=Speedups(prepared_statements=prepared)
    ):
        h.enroll("a")
        event.listen(h.store.engine, "before_cursor_execute", through_core)
        with h.store.read() as tx:
            assert tx.get_cluster("a") is not None
    assert len([sql for sql in seen if "FROM clusters" in sql]) == (0 if prepared else 1)


def test_joined_writes_switch() -> None:
    assert issubclass(http_protocol(joined_writes=True), CoalescingHttpToolsProtocol)
    off = http_protocol(joined_writes=False)  # the listener's guards, which the speed-up extends
    assert issubclass(off, GuardedHttpToolsProtocol) and not issubclass(off, CoalescingHttpToolsProtocol)


def test_serve_with_every_speedup_off(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ok("init", "--data-dir", str(d))
    for s in serve(d, *FLAGS):
        token = json.loads(s.op("cluster", "add", "a", "--json"))["bootstrap_token"]
        key = pki.new_key()
        with s.http() as http:
            r = http.post("/v1/enroll", json={"cluster": "a", "bootstrap_token": token, "csr": pki.make_csr(key, "a")})
            assert r.status_code == 201, r.text
            csr = pki.make_csr(pki.new_key(), "a")
            r = http.post(
                "/v1/clusters/a/intermediate",
                json={"csr": csr, "proof": pki.prove(key, csr)},
                headers={"Authorization": f"Bearer {r.json()['agent_token']}"},
            )
            assert r.status_code == 201, r.text
        assert "speed-ups turned off: agent_shortcut, joined_writes, prepared_statements" in s.log.read_text()
