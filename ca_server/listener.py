"""What the open listener allows a connection before the app sees it: a cap on connections, a
deadline for the request head, a cap on the head's size and a total deadline for the body.

uvicorn's httptools protocol has none of these: a client that sends half a head, or one byte of
body every few seconds, holds its connection for as long as it likes, and httptools buffers a
header line of any length. ``GuardedHttpToolsProtocol`` is the protocol ``serve`` always uses
(the joined-writes speed-up in http_protocol.py subclasses it). It relies on uvicorn internals:
the httptools parser callbacks ``on_message_begin``, ``on_headers_complete`` and
``on_message_complete`` and the ``connections``, ``transport`` and ``cycle`` attributes.

Per request it costs at most one timer, and none for a request whose head and body arrive in the
packet that starts it (the renewal path): timers are armed only when a packet leaves a head or a
body unfinished.
"""

from __future__ import annotations

import asyncio
import enum
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ca_server.api.problems import PROBLEM_BASE


@dataclass(frozen=True)
class ListenerLimits:
    """``serve --head-timeout / --body-timeout / --max-head-bytes / --max-connections``."""

    head_timeout: float = 10.0  # from connection (or a request's first byte) to the end of its head
    body_timeout: float = 30.0  # from the end of a request's head to the end of its body, in total
    max_head_bytes: int = 16 * 1024  # request line and headers together; over it: 431
    max_connections: int = 2048  # open connections per process; over it a new one is refused (503)


ABORT_AFTER = 0.5  # seconds a refused connection has to take its answer and go


class _Phase(enum.Enum):
    IDLE = 0  # between requests: uvicorn's keep-alive timeout applies
    HEAD = 1
    BODY = 2


# status: (reason phrase, problem type, detail)
_REFUSALS = {
    408: ("Request Timeout", "requesttimeout", "the request did not arrive in time"),
    431: ("Request Header Fields Too Large", "headerstoolarge", "the request head is over the size limit"),
    503: ("Service Unavailable", "toomanyconnections", "too many open connections; try again shortly"),
}


def refusal(status: int, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole ``Connection: close`` response with an RFC 9457 problem body."""
    reason, type_, detail = _REFUSALS[status]
    body = json.dumps({"type": PROBLEM_BASE + type_, "title": reason, "status": status, "detail": detail}).encode()
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason.encode())]
    lines += [name + b": " + value + b"\r\n" for name, value in default_headers]
    lines.append(b"content-type: application/problem+json\r\ncontent-length: %d\r\n" % len(body))
    lines.append(b"connection: close\r\n\r\n" + body)
    return b"".join(lines)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of ``limits`` (see ``with_limits``)."""

    limits: ClassVar[ListenerLimits] = ListenerLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _Phase.IDLE
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None

    @classmethod
    def with_limits(cls, limits: ListenerLimits) -> type[GuardedHttpToolsProtocol]:
        """This protocol class with ``limits`` (uvicorn builds protocols from a class)."""
        return type(cls.__name__, (cls,), {"limits": limits, "__module__": cls.__module__})

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503)
            return
        self._arm(self.limits.head_timeout)  # a connection that never sends a head is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._phase is _Phase.HEAD:
            # the head is still unfinished: every byte of this packet since it began is head (a
            # head that began mid-packet is counted whole, an upper bound)
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(431)
                return
        if self._phase is not _Phase.IDLE and self._deadline is None:
            self._arm(self.limits.head_timeout if self._phase is _Phase.HEAD else self.limits.body_timeout)

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _Phase.HEAD
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._disarm()  # the head deadline; the body's is armed if this packet leaves the body unfinished
        self._phase = _Phase.BODY
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._phase = _Phase.IDLE
        super().on_message_complete()

    # ------------------------------------------------------------------ deadlines
    def _arm(self, seconds: float) -> None:
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._phase is _Phase.IDLE:  # nothing was asked: nothing to answer
            self._close()
        else:
            self._refuse(408)

    def _close(self) -> None:
        """Close now, and abort if the peer still holds the connection after ``ABORT_AFTER``: a TLS
        close waits up to 30 s for the peer's close_notify, reading (and dropping) whatever it sends;
        nothing more is read here."""
        if not self.transport.is_closing():
            self.transport.pause_reading()
            self.transport.close()
        self.loop.call_later(ABORT_AFTER, self._abort)

    def _abort(self) -> None:
        if self.parser is not None:  # connection_lost clears the parser
            self.transport.abort()

    def _refuse(self, status: int) -> None:
        """Answer ``status`` unless this request's response has started, then close the connection."""
        in_body = self._phase is _Phase.BODY
        self._disarm()
        self._phase = _Phase.IDLE
        cycle = self.cycle if in_body else None  # in a head, ``cycle`` is the previous request's
        if (cycle is None or not cycle.response_started) and not self.transport.is_closing():
            self.transport.write(refusal(status, self.server_state.default_headers))
        if cycle is not None:  # the app still reading the body is told the client is gone
            cycle.keep_alive = False
            cycle.disconnected = True
            cycle.message_event.set()
        self._close()
