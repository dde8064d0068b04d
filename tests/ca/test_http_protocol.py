"""The serving protocol: uvicorn's httptools protocol whose transport sends a response's status line,
headers and body in one write (ca_server/http_protocol.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from ca_server.http_protocol import CoalescingHttpToolsProtocol, CoalescingTransport


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8443), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_writes_of_one_loop_step_leave_as_one_and_close_flushes_first() -> None:
    asyncio.run(_one_step())


async def _one_step() -> None:
    raw = RecordingTransport()
    t = CoalescingTransport(raw, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(memoryview(b"body"))
    assert raw.writes == []  # nothing sent inside the step
    await asyncio.sleep(0)
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    t.write(b"last")
    t.close()
    assert raw.writes[-1] == b"last" and raw.closed
    t.write(b"after close")
    await asyncio.sleep(0)
    assert raw.writes[-1] == b"last"  # a closing transport gets nothing more
    assert t.get_extra_info("peername") == ("127.0.0.1", 50000)  # everything else is forwarded


def test_uvicorn_protocol_answers_each_request_with_one_write() -> None:
    asyncio.run(_protocol())


async def _protocol() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await receive()
        body = b'{"ok":true}'
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(app, http=CoalescingHttpToolsProtocol, log_config=None, access_log=False, lifespan="off")
    config.load()
    proto = CoalescingHttpToolsProtocol(config=config, server_state=ServerState(), app_state={},
                                        _loop=asyncio.get_running_loop())
    raw = RecordingTransport()
    proto.connection_made(raw)
    for _ in range(2):  # keep-alive: each response is one write
        proto.data_received(b"POST /v1/x HTTP/1.1\r\nHost: ca\r\nContent-Length: 2\r\n\r\n{}")
        for _ in range(50):
            await asyncio.sleep(0.01)
            if raw.writes and raw.writes[-1].endswith(b'{"ok":true}'):
                break
    assert len(raw.writes) == 2
    for w in raw.writes:
        assert w.startswith(b"HTTP/1.1 201 ") and w.endswith(b'{"ok":true}')
    proto.connection_lost(None)
