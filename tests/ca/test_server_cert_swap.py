"""The CA service's own TLS certificate is swapped atomically (issue 15, item 4): while it is
re-issued again and again, handshakes on real loopback sockets from several threads never fail,
and every handshake that starts after a swap meets the new certificate."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from ca_server.keys.base import KeyType
from tests.support.caservice import CAService

HANDSHAKE_THREADS = 4
REFRESHES = 150
ACTIVATIONS = 30


@pytest.fixture
def ca_service(tmp_path: Path) -> Iterator[CAService]:
    svc = CAService(tmp_path / "ca").start()
    yield svc
    svc.stop()


def client_context(svc: CAService) -> ssl.SSLContext:
    """What an agent does: trust the CA's root bundle and check the server's IP address."""
    return ssl.create_default_context(cafile=str(svc.write_trust_anchor()))


def handshake(ctx: ssl.SSLContext, port: int) -> int:
    """One full TLS handshake on a new connection; the serial of the certificate it met."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@dataclass
class Load:
    """Threads doing handshakes back to back until ``stop`` is set."""

    ctx: ssl.SSLContext
    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    serials: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                serial = handshake(self.ctx, self.port)
            except (OSError, ssl.SSLError) as exc:
                with self.lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with self.lock:
                self.ok += 1
                self.serials.add(serial)


def test_no_handshake_fails_while_the_server_certificate_is_swapped(ca_service: CAService) -> None:
    ctx = client_context(ca_service)
    load = Load(ctx, ca_service.port)
    threads = [threading.Thread(target=load.run, daemon=True) for _ in range(HANDSHAKE_THREADS)]
    for t in threads:
        t.start()
    stale: list[str] = []
    try:
        for i in range(REFRESHES):
            ca_service.server_cert.refresh()
            assert ca_service.server_cert.cert is not None
            met = handshake(ctx, ca_service.port)  # a handshake that starts after the swap
            if met != ca_service.server_cert.cert.serial_number:
                stale.append(f"refresh {i}: met serial {met:x}, issued {ca_service.server_cert.cert.serial_number:x}")
    finally:
        load.stop.set()
        for t in threads:
            t.join(15)
    assert load.failures == [], f"{len(load.failures)} of {load.ok + len(load.failures)} handshakes failed"
    assert stale == []
    assert load.ok >= REFRESHES  # the load really ran alongside the swaps
    assert len(load.serials) > REFRESHES // 4  # and met many of the certificates in turn


def test_no_handshake_fails_across_repeated_root_activations(ca_service: CAService) -> None:
    """As ``serve`` does after ``root activate``: the certificate is due and re-issued under the
    root just activated; handshakes keep succeeding, and the next one meets that root's
    certificate. Two roots take turns; the clients trust both (as agents do after ``root add``)."""
    auth = ca_service.authority
    first = auth.list_roots()[0]
    second = auth.add_root(key_type=KeyType.ECDSA_P256, actor="test")
    ctx = client_context(ca_service)  # the bundle now holds both roots
    load = Load(ctx, ca_service.port)
    threads = [threading.Thread(target=load.run, daemon=True) for _ in range(HANDSHAKE_THREADS)]
    for t in threads:
        t.start()
    wrong: list[str] = []
    try:
        for i in range(ACTIVATIONS):
            root = (second, first)[i % 2]
            auth.activate_root(root.id, actor="test")
            assert ca_service.server_cert.due(None)  # another root is active
            ca_service.server_cert.refresh()
            assert ca_service.server_cert.root_id == root.id
            served = ca_service.server_cert.cert
            assert served is not None
            if handshake(ctx, ca_service.port) != served.serial_number:
                wrong.append(f"activation {i} of {root.id}: a new handshake met an older certificate")
    finally:
        load.stop.set()
        for t in threads:
            t.join(15)
    assert load.failures == [], f"{len(load.failures)} of {load.ok + len(load.failures)} handshakes failed"
    assert wrong == []
    assert load.ok >= ACTIVATIONS
