"""The renewal route without FastAPI's per-request layers (``create_app(renewal_shortcut=True)``,
the default; ``serve --no-renewal-shortcut`` turns it off).

``POST /v1/clusters/{name}/intermediate`` is the hot path of a fleet-wide rotation. A well-formed
request (a DNS-label name, a JSON body that ``RenewIn`` accepts, sent as ``application/json`` or
``application/*+json``) is answered here by the same ``routes.renewal_answer`` the FastAPI route
uses, and errors become the same problem responses as the app's exception handlers give. Anything
else — a malformed body, a bad name, another method — is handed to the FastAPI app with the body
replayed, so its validation and 4xx answers stay the only ones. The FastAPI route stays declared:
it documents the operation in /openapi.json and serves the requests handed over.

It relies on one framework internal: ``ShortcutApp`` overrides ``FastAPI.build_middleware_stack``
to put the shortcut (and the request guards) outside the stack FastAPI builds.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshbridge_wire import models as w
from meshbridge_wire.names import DNS_LABEL

_PATH = re.compile(rf"/v1/clusters/(?P<name>{DNS_LABEL})/intermediate")


class ShortcutApp(FastAPI):
    """FastAPI with ``outer_layers`` wrapped around its whole middleware stack: a renewal answered
    by the shortcut passes through no layer that does nothing for it."""

    outer_layers: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        inner = super().build_middleware_stack()
        return self.outer_layers(inner) if self.outer_layers is not None else inner


class RenewalShortcut:
    def __init__(
        self,
        app: ASGIApp,
        *,
        answer: Callable[[str, str | None, w.RenewIn], Awaitable[Response]],
        on_error: Callable[[Exception, Scope], Response],
    ) -> None:
        """``answer(name, authorization, body)``: awaitable giving the Response; ``on_error(exc,
        scope)``: the app's problem response for an exception (CAError or unexpected)."""
        self.app = app
        self.answer = answer
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        headers = Headers(scope=scope) if match is not None else None
        if match is None or headers is None or not _json(headers.get("content-type")):
            await self.app(scope, receive, send)
            return
        body, more = await _read_body(receive)
        try:
            parsed = w.RenewIn.model_validate_json(body) if not more else None
        except ValidationError:
            parsed = None
        if parsed is None:  # FastAPI gives its own answer, from the same bytes
            await self.app(scope, _replay(body, more, receive), send)
            return
        try:
            response = await self.answer(match.group("name"), headers.get("authorization"), parsed)
        except Exception as exc:  # CAError or unexpected: the app's own problem response
            response = self.on_error(exc, scope)
        await response(scope, receive, send)


def _json(content_type: str | None) -> bool:
    """The content types FastAPI always reads a JSON body from: ``application/json`` and
    ``application/*+json``. A body without one is handed over: whether FastAPI parses it depends on
    its version and ``strict_content_type`` (0.165 refuses it), and the answers must not differ."""
    if not content_type:
        return False
    maintype, _, subtype = content_type.split(";", 1)[0].strip().lower().partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request body; ``more`` is True when the client disconnected before it ended."""
    chunks: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return b"".join(chunks), True
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, more: bool, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if more:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
