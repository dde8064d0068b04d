"""The serving protocol: uvicorn's httptools protocol whose transport sends a response's status line,
headers and body in one write (ca_server/http_protocol.py)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from uvicorn.server import ServerState

from ca_server.http_protocol import CoalescingHttpToolsProtocol, CoalescingTransport
from ca_server.speedups import ALL_OFF, ALL_ON, Speedups
from cluster_agent import pki
from tests.support.caservice import CAService


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
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(app, http=CoalescingHttpToolsProtocol, log_config=None, access_log=False, lifespan="off")
    config.load()
    proto = CoalescingHttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
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


def test_a_whole_response_is_sent_before_the_next_request_of_the_same_loop_step_runs() -> None:
    """A response leaves when it is whole, not at the end of the loop step that produced it: a
    step runs every request that arrived in one poll, and a renewal answered inline (SQLite, key
    in memory) is milliseconds of CPU each. When the joined write waited for the step's end, a
    10,000-agent fleet event on SQLite had its renewal answers' median at 28.9 s of 29.6 s: they
    left together, after the step's last renewal."""
    asyncio.run(_same_step())


async def _same_step() -> None:
    raws = [RecordingTransport(), RecordingTransport()]
    sent_before: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        sent_before.append(len(raws[0].writes))  # what the first connection has been sent so far
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    config = uvicorn.Config(app, http=CoalescingHttpToolsProtocol, log_config=None, access_log=False, lifespan="off")
    config.load()
    protos = [
        CoalescingHttpToolsProtocol(
            config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
        )
        for _ in raws
    ]
    for proto, raw in zip(protos, raws, strict=True):
        proto.connection_made(raw)
    for proto in protos:  # both requests arrive in one poll: both run in the next loop step
        proto.data_received(b"POST /v1/x HTTP/1.1\r\nHost: ca\r\nContent-Length: 2\r\n\r\n{}")
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(sent_before) == 2 and all(raw.writes for raw in raws):
            break
    assert sent_before == [0, 1]  # the second request ran after the first's answer had left
    assert [len(raw.writes) for raw in raws] == [1, 1]  # still one write per response
    assert all(raw.writes[0].startswith(b"HTTP/1.1 201 ") and raw.writes[0].endswith(b"{}") for raw in raws)
    for proto in protos:
        proto.connection_lost(None)


@pytest.mark.parametrize("speedups", [ALL_ON, ALL_OFF], ids=["speedups-on", "speedups-off"])
def test_a_served_enrollment_and_renewals_on_one_connection(tmp_path: Path, speedups: Speedups) -> None:
    """Through uvicorn over TLS on loopback, with this protocol or uvicorn's stock httptools one."""
    svc = CAService(tmp_path / "ca", speedups=speedups).start()
    try:
        made = svc.authority.create_cluster(name="a", trust_domain="a.mesh", gateway=None, actor="test")
        trust = ssl.create_default_context(cafile=str(svc.write_trust_anchor()))
        with httpx.Client(base_url=svc.url, verify=trust, timeout=30) as http:
            key = pki.new_key()
            r = http.post(
                "/v1/enroll",
                json={"cluster": "a", "bootstrap_token": made.bootstrap_token, "csr": pki.make_csr(key, "a")},
            )
            assert r.status_code == 201, r.text
            auth = {"Authorization": f"Bearer {r.json()['agent_token']}"}
            for _ in range(2):  # keep-alive: each answer whole, in order
                new = pki.new_key()
                csr = pki.make_csr(new, "a")
                r = http.post(
                    "/v1/clusters/a/intermediate", json={"csr": csr, "proof": pki.prove(key, csr)}, headers=auth
                )
                assert r.status_code == 201, r.text
                issued = x509.load_pem_x509_certificate(r.json()["bundle"]["ca-cert.pem"].encode())
                assert issued.public_key() == new.public_key()
                key = new
    finally:
        svc.stop()
