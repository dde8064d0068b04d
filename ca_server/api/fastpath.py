"""The agents' hot routes without FastAPI's per-request layers (``create_app(agent_shortcut=True)``,
the default; ``serve --no-agent-shortcut`` turns it off).

A fleet-wide rotation is, per cluster, a long-poll answered, a renewal, a status report and a new
long-poll: ``GET /v1/clusters/{name}/desired``, ``POST …/intermediate`` and ``PUT …/status``. A
well-formed request to one of them (a DNS-label name; for the desired state a query of nothing but
``revision`` and ``wait`` in the shapes agents send; for the others a JSON body its model accepts,
sent as ``application/json`` or ``application/*+json``) is answered here by the same function the
FastAPI route calls (``routes.renewal_answer``, ``routes.desired_answer``, ``routes.status_answer``),
and errors become the same problem responses as the app's exception handlers give. Anything else —
a malformed body or query, a bad name, another method — is handed to the FastAPI app with the body
replayed, so its validation and 4xx answers stay the only ones. The FastAPI routes stay declared:
they document the operations in /openapi.json and serve the requests handed over.

It relies on one framework internal: ``ShortcutApp`` overrides ``FastAPI.build_middleware_stack``
to put the shortcut (and the request guards) outside the stack FastAPI builds.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshbridge_wire import models as w
from meshbridge_wire.names import DNS_LABEL

_PATH = re.compile(rf"/v1/clusters/(?P<name>{DNS_LABEL})/(?P<route>intermediate|desired|status)")
_METHOD = {"intermediate": "POST", "desired": "GET", "status": "PUT"}
# the query values agents send (a revision is 20 hex digits, a wait whole seconds); any other
# spelling is FastAPI's to read, so the two never parse one query differently
_REVISION = re.compile(r"[0-9A-Za-z._:-]{1,64}")
_WAIT = re.compile(r"[0-9]{1,7}(?:\.[0-9]{1,6})?")

Disconnected = Callable[[], Awaitable[bool]]


class ShortcutApp(FastAPI):
    """FastAPI with ``outer_layers`` wrapped around its whole middleware stack: a request answered
    by the shortcut passes through no layer that does nothing for it."""

    outer_layers: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        inner = super().build_middleware_stack()
        return self.outer_layers(inner) if self.outer_layers is not None else inner


@dataclass(frozen=True)
class AgentAnswers:
    """The routes' own answers, each called with the cluster name and the Authorization header:
    ``renewal(name, authorization, body)``, ``status(name, authorization, body)`` and
    ``desired(name, authorization, revision, wait, is_disconnected)``."""

    renewal: Callable[[str, str | None, w.RenewIn], Awaitable[Response]]
    status: Callable[[str, str | None, w.StatusIn], Awaitable[Response]]
    desired: Callable[[str, str | None, str | None, float, Disconnected], Awaitable[Response]]


class AgentShortcut:
    def __init__(
        self, app: ASGIApp, *, answers: AgentAnswers, on_error: Callable[[Exception, Scope], Response]
    ) -> None:
        """``on_error(exc, scope)``: the app's problem response for an exception (CAError or unexpected)."""
        self.app = app
        self.answers = answers
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] != _METHOD[match.group("route")]:
            await self.app(scope, receive, send)
            return
        name, route = match.group("name"), match.group("route")
        headers = Headers(scope=scope)
        authorization = headers.get("authorization")
        if route == "desired":
            query = _desired_query(scope["query_string"])
            if query is None:
                await self.app(scope, receive, send)
                return
            disconnected = Request(scope, receive).is_disconnected
            answer = functools.partial(self.answers.desired, name, authorization, *query, disconnected)
        else:
            renewal = route == "intermediate"
            body = await self._body(scope, receive, send, headers, w.RenewIn if renewal else w.StatusIn)
            if body is None:  # handed over, and answered by FastAPI
                return
            respond: Callable[..., Awaitable[Response]] = self.answers.renewal if renewal else self.answers.status
            answer = functools.partial(respond, name, authorization, body)
        try:
            response = await answer()
        except Exception as exc:  # CAError or unexpected: the app's own problem response
            response = self.on_error(exc, scope)
        await response(scope, receive, send)

    async def _body(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, model: type[BaseModel]
    ) -> BaseModel | None:
        """The request's body as ``model``; None once the request has been handed to FastAPI (not
        sent as JSON, not accepted by ``model``, or the client left before it ended)."""
        if not _json(headers.get("content-type")):
            await self.app(scope, receive, send)
            return None
        body, more = await _read_body(receive)
        try:
            parsed = model.model_validate_json(body) if not more else None
        except ValidationError:
            parsed = None
        if parsed is None:  # FastAPI gives its own answer, from the same bytes
            await self.app(scope, _replay(body, more, receive), send)
        return parsed


def _desired_query(raw: bytes) -> tuple[str | None, float] | None:
    """``revision`` and ``wait`` from a long-poll's query string (decoded as Starlette does), or
    None when it holds anything else: another key, a key twice, a value of another shape."""
    revision: str | None = None
    wait = 0.0
    seen: set[str] = set()
    for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if key in seen:
            return None
        seen.add(key)
        if key == "revision" and _REVISION.fullmatch(value):
            revision = value
        elif key == "wait" and _WAIT.fullmatch(value):
            wait = float(value)
        else:
            return None
    return revision, wait


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
