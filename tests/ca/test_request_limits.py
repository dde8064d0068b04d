"""Request size limits: a body over 64 KiB gets 413 (how long a body may take is the listener's
concern: tests/ca/test_listener_hardening.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from starlette.types import Receive, Scope, Send

from ca_server.api.guards import BodyLimit


async def _echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def _run(
    middleware: BodyLimit, chunks: Sequence[tuple[float, bytes, bool]], headers: list[tuple[bytes, bytes]]
) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    queue = list(chunks)

    async def receive() -> dict[str, Any]:
        if not queue:
            await asyncio.sleep(3600)
        delay, body, more = queue.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": body, "more_body": more}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/v1/enroll", "headers": headers}
    asyncio.run(middleware(scope, receive, send))  # type: ignore[arg-type]
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_body_within_limits_passes() -> None:
    status, body = _run(BodyLimit(_echo_app), [(0, b"x" * 1000, True), (0.1, b"y", False)], [])
    assert (status, body) == (200, b"1001")


def test_streamed_body_over_the_limit_gets_413() -> None:
    chunks = [(0, b"x" * 40000, True), (0, b"x" * 40000, False)]
    status, body = _run(BodyLimit(_echo_app), chunks, [])
    assert status == 413 and json.loads(body)["status"] == 413


def test_declared_length_over_the_limit_gets_413_unread() -> None:
    status, _ = _run(BodyLimit(_echo_app), [], [(b"content-length", b"70000")])
    assert status == 413
