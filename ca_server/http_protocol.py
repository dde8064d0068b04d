"""uvicorn's httptools protocol with one write per response instead of two.

uvicorn writes the status line and headers as soon as the app sends ``http.response.start`` and
the body when it sends ``http.response.body``: two TLS records and two ``write`` calls, each waking
the client. On a 2-core machine that second system call is several percent of a renewal's cost.
Here the transport gathers the writes made in one event-loop step and sends them together at the
end of that step (a response's start and body are sent in the same step), so nothing waits longer
than the step that produced it.

It relies on uvicorn internals: ``HttpToolsProtocol.connection_made`` keeps the transport it is
given and writes every response through its ``write``. It extends the listener's guarded protocol
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
        coalescing: Any = CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(coalescing)
