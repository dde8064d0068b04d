"""uvicorn's httptools protocol with one write per response instead of two.

uvicorn writes the status line and headers as soon as the app sends ``http.response.start`` and
the body when it sends ``http.response.body``: two TLS records and two ``write`` calls, each waking
the client. On a 2-core machine that second system call is several percent of a renewal's cost.
Here the transport gathers a response's writes and sends them together once the response is
whole (uvicorn calls the protocol's ``on_response_complete`` right after the last body write), and
whatever else is written in a loop step at the end of that step. Not only at the step's end: one
step runs every request that arrived in one poll, and with renewals answered inline (SQLite, key
in memory: milliseconds of CPU each) a step under a fleet-wide rotation lasted seconds, every
answer waiting for the last (a 10,000-agent event's renewal answers had their median at 28.9 s
of 29.6 s).

It relies on uvicorn internals: ``HttpToolsProtocol.connection_made`` keeps the transport it is
given and writes every response through its ``write``, and ``RequestResponseCycle.send`` calls
``on_response_complete`` after a response's last write. It extends the listener's guarded protocol
(ca_server/listener.py: connection cap, head and body deadlines, head size cap), which is used with
or without it. ``serve --no-joined-writes`` serves with that protocol alone, and does not import
this module.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ca_server.listener import GuardedHttpToolsProtocol


class CoalescingTransport:
    """Forwards everything to ``transport``; ``write`` calls made in one loop step are joined."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()  # a response written just before close still goes out first
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(GuardedHttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._coalescing = CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(self._coalescing)  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        self._coalescing.flush()  # the response is whole: send it now, not after the step's other requests
        super().on_response_complete()
