"""One HTTP request to an ASGI app in-process: the scope uvicorn builds for it, a ``receive`` that
gives the body once and then a disconnect, and the messages the app sent back. Used by the agent
shortcut's tests and by ``bench/agent_routes.py``."""

from __future__ import annotations

from typing import Any


def http_scope(method: str, target: str, headers: dict[str, str], *, app: Any = None) -> dict[str, Any]:
    """The scope of ``method target`` (a path with an optional ``?query``) from a loopback client.
    ``app``: the FastAPI app, for a call to a layer inside it (``FastAPI.__call__`` sets it)."""
    path, _, query = target.partition("?")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8443),
        "state": {},
    }
    if app is not None:
        scope["app"] = app
    return scope


async def request(app: Any, scope: dict[str, Any], body: bytes = b"") -> list[dict[str, Any]]:
    """The messages ``app`` sends answering ``scope`` with ``body``."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent
