"""The agents' hot routes answered by api/fastpath.AgentShortcut: a well-formed long-poll, status
report or renewal is answered by the shortcut, with the same bytes FastAPI's route gives for it;
anything else is handed to FastAPI, whose answer is the only one."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from fastapi import FastAPI

from ca_server.api.fastpath import AgentShortcut
from cluster_agent import pki
from tests.ca.conftest import Agent, Harness
from tests.support.asgi import http_scope, request

STATUS = {"installed_generation": 1, "errors": ["x"], "ca_reachable": True}


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


def _shortcut(h: Harness) -> AgentShortcut:
    app = h.client.app
    assert isinstance(app, FastAPI)
    layer: Any = app.middleware_stack
    while not isinstance(layer, AgentShortcut):
        layer = layer.app
    return layer


def _call(h: Harness, app: Callable[..., Awaitable[None]], method: str, target: str, **kw: Any) -> Answer:
    """One request to the ASGI ``app``, run in the test client's event loop (where the revision
    watcher runs). ``kw``: ``headers`` (dict), ``body`` (bytes)."""
    scope = http_scope(method, target, kw.get("headers", {}), app=h.client.app)
    assert h.client.portal is not None
    sent = h.client.portal.call(request, app, scope, kw.get("body", b""))
    head = dict(sent[0]["headers"])
    return Answer(sent[0]["status"], head[b"content-type"].decode(), b"".join(m.get("body", b"") for m in sent[1:]))


def _spied(shortcut: AgentShortcut, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The routes the shortcut answers itself from now on (not those it hands to FastAPI)."""
    answered: list[str] = []
    answers = shortcut.answers

    def spy(route: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(*args: Any) -> Any:
            answered.append(route)
            return await fn(*args)

        return wrapped

    spied = replace(
        answers,
        renewal=spy("renewal", answers.renewal),
        status=spy("status", answers.status),
        desired=spy("desired", answers.desired),
    )
    monkeypatch.setattr(shortcut, "answers", spied)
    return answered


def _status_request(agent: Agent, body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    return {"headers": {**agent.headers, "content-type": content_type}, "body": body}


def test_well_formed_requests_are_answered_by_the_shortcut_as_by_the_route(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = harness.enroll("a")
    shortcut = _shortcut(harness)
    answered = _spied(shortcut, monkeypatch)
    first = _call(harness, shortcut, "GET", "/v1/clusters/a/desired?wait=0", headers=a.headers)
    assert first.status == 200 and first.content_type == "application/json"
    revision = json.loads(first.body)["revision"]
    requests = [
        ("GET", "/v1/clusters/a/desired", {"headers": a.headers}),
        ("GET", "/v1/clusters/a/desired?revision=stale&wait=0", {"headers": a.headers}),
        ("GET", f"/v1/clusters/a/desired?revision={revision}&wait=0.05", {"headers": a.headers}),
        ("PUT", "/v1/clusters/a/status", _status_request(a, json.dumps(STATUS).encode())),
        ("PUT", "/v1/clusters/a/status", _status_request(a, b'{"errors": []}', "application/merge+json")),
    ]
    for method, target, kw in requests:
        answered.clear()
        by_shortcut = _call(harness, shortcut, method, target, **kw)
        assert answered == [("desired" if method == "GET" else "status")], target
        by_route = _call(harness, shortcut.app, method, target, **kw)
        assert by_shortcut == by_route, target
        assert by_shortcut.status == 200 and by_shortcut.content_type == "application/json"
    assert harness.cluster("a")["agent_status"]["errors"] == []
    # a renewal, answered once (it changes the state): by the shortcut
    csr = pki.make_csr(pki.new_key(), "a")
    body = json.dumps({"csr": csr, "proof": pki.prove(a.key, csr)}).encode()
    answered.clear()
    renewed = _call(harness, shortcut, "POST", "/v1/clusters/a/intermediate", **_status_request(a, body))
    assert answered == ["renewal"] and renewed.status == 201


def test_refusals_by_the_shortcut_are_the_routes_refusals(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = harness.enroll("a"), harness.enroll("b")
    shortcut = _shortcut(harness)
    answered = _spied(shortcut, monkeypatch)
    status = json.dumps(STATUS).encode()
    cases: list[tuple[str, str, dict[str, Any], int]] = [
        ("GET", "/v1/clusters/a/desired?wait=0", {}, 401),
        ("GET", "/v1/clusters/a/desired?wait=0", {"headers": b.headers}, 403),
        ("GET", "/v1/clusters/nobody/desired?wait=0", {"headers": a.headers}, 403),
        ("PUT", "/v1/clusters/a/status", {"headers": {"content-type": "application/json"}, "body": status}, 401),
        ("PUT", "/v1/clusters/a/status", _status_request(b, status), 403),
    ]
    for method, target, kw, expected in cases:
        answered.clear()
        by_shortcut = _call(harness, shortcut, method, target, **kw)
        assert answered, target
        by_route = _call(harness, shortcut.app, method, target, **kw)
        assert by_shortcut == by_route, target
        assert by_shortcut.status == expected and by_shortcut.content_type == "application/problem+json", target
    assert harness.cluster("a")["agent_status"] is None


@pytest.mark.parametrize(
    ("method", "target", "body", "content_type", "status"),
    [
        # queries the shortcut does not read: FastAPI's validation answers, or it reads them itself
        ("GET", "/v1/clusters/a/desired?revision=" + "r" * 65, b"", None, 400),
        ("GET", "/v1/clusters/a/desired?wait=-1", b"", None, 400),
        ("GET", "/v1/clusters/a/desired?wait=soon", b"", None, 400),
        ("GET", "/v1/clusters/a/desired?wait=1e400", b"", None, 200),
        ("GET", "/v1/clusters/a/desired?wait=0&unknown=1", b"", None, 200),
        ("GET", "/v1/clusters/a/desired?wait=5&wait=0", b"", None, 200),
        ("GET", "/v1/clusters/a/desired?revision=a%20b&wait=0", b"", None, 200),
        ("GET", "/v1/clusters/A_B/desired?wait=0", b"", None, 400),
        # bodies the shortcut does not accept
        ("PUT", "/v1/clusters/a/status", b"{not json", "application/json", 400),
        ("PUT", "/v1/clusters/a/status", b'{"errors": [], "extra": 1}', "application/json", 400),
        ("PUT", "/v1/clusters/a/status", b'{"installed_generation": -1}', "application/json", 400),
        ("PUT", "/v1/clusters/a/status", json.dumps(STATUS).encode(), "text/plain", 400),
        ("PUT", "/v1/clusters/a/status", json.dumps(STATUS).encode(), None, 400),
        # other methods
        ("POST", "/v1/clusters/a/status", json.dumps(STATUS).encode(), "application/json", 405),
        ("PUT", "/v1/clusters/a/desired", b"", None, 405),
    ],
)
def test_anything_else_is_handed_to_fastapi(
    harness: Harness,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    target: str,
    body: bytes,
    content_type: str | None,
    status: int,
) -> None:
    a = harness.enroll("a")
    shortcut = _shortcut(harness)
    answered = _spied(shortcut, monkeypatch)
    headers = {**a.headers, **({"content-type": content_type} if content_type else {})}
    by_shortcut = _call(harness, shortcut, method, target, headers=headers, body=body)
    assert answered == []
    assert by_shortcut == _call(harness, shortcut.app, method, target, headers=headers, body=body)
    assert by_shortcut.status == status, by_shortcut.body
    if status == 400:
        assert by_shortcut.content_type == "application/problem+json"
    assert harness.cluster("a")["agent_status"] is None
