"""`meshbridge-ca serve`: HTTPS with a server certificate from the active root, kept fresh.

The certificate and its key live in memory (the key is written only to a private temporary
directory long enough for the ssl module to load it, then removed). A background task re-issues it
before expiry and as soon as another root becomes active; ``D/root-cert.pem`` follows the trust
bundle, and CRLs are re-signed before their nextUpdate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_server import allocator, gcsettings, runtime
from ca_server.app import create_app
from ca_server.core.authority import Authority, FleetSnapshot
from ca_server.listener import GuardedHttpToolsProtocol, ListenerLimits
from ca_server.speedups import Speedups
from ca_server.storage.capabilities import Checkpoints, Disposable
from meshbridge_wire import logs

log = logging.getLogger("meshbridge.ca.server")


class ListenError(Exception):
    """``--listen`` cannot be bound (taken, not an address of this host, not permitted)."""


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host:port``, one per address it resolves to, as uvicorn's own bind
    would make them (asyncio ``BaseEventLoop.create_server``, Lib/asyncio/base_events.py: getaddrinfo
    with AI_PASSIVE, SO_REUSEADDR, IPV6_V6ONLY on IPv6 sockets; ``socket.create_server`` sets the
    same options). Bound here, before uvicorn starts, so that a taken port is one clear error and
    ``D/server-url`` is written only for a server that listens. None is left open on failure."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    socks: list[socket.socket] = []
    try:
        for family, addr in dict.fromkeys((fam, sa[:2]) for fam, _, _, _, sa in infos):
            socks.append(socket.create_server(addr, family=family, backlog=4096))
    except OSError as exc:
        for sock in socks:
            sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ListenError(f"cannot listen on {shown}: {exc.strerror or exc}") from exc
    return socks


class AnnouncingServer(uvicorn.Server):
    """uvicorn's server calling ``on_listening`` once its startup is complete: the app's lifespan
    has started and every socket is serving (uvicorn ``Server.startup``, uvicorn/server.py, sets
    ``started`` last, after ``loop.create_server`` for each socket; a failed lifespan exits before)."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_listening()


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host, int(port)


class ServerCertificate:
    """Issues and re-issues the CA service's own TLS certificate, and swaps it atomically.

    ``ctx`` is the context the listener wraps every connection with; it gets the first certificate
    (before any connection exists) and is never loaded again. Each ``refresh`` builds a complete new
    context (certificate and key) and publishes it with one reference assignment; ``ctx``'s SNI
    callback moves every handshake onto the context published when its ClientHello arrives. So a
    handshake meets the old certificate and key or the new ones, never a certificate whose key is
    still being loaded (what ``load_cert_chain`` on the live context did: certificate first, key
    second).

    Why this is atomic: OpenSSL calls the servername callback for every ClientHello, with or
    without SNI (``ssl/statem/extensions.c`` ``final_server_name``, before the certificate and
    cipher are chosen; Python clients send no SNI for an IP address), and CPython's
    ``SSLObject.context`` setter (``Modules/_ssl.c``) calls ``SSL_set_SSL_CTX``, which gives the
    connection a copy of the new context's certificate and key together (``ssl/ssl_lib.c``
    ``SSL_set_SSL_CTX``, ``ssl_cert_dup``). Swapping the context uvicorn was given is not possible:
    asyncio and uvloop keep the one passed to ``create_server`` (uvicorn ``server.py``
    ``Server.startup``) and wrap every accepted connection with it.
    """

    def __init__(self, authority: Authority, *, names: list[str]) -> None:
        self.authority = authority
        self.names = names
        self.ctx = harden_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        self.ctx.sni_callback = self._select
        self._current: ssl.SSLContext | None = None  # the newest complete context
        self.cert: x509.Certificate | None = None
        self.root_id = ""

    def _select(self, conn: ssl.SSLObject, _server_name: str | None, _outer: ssl.SSLContext) -> None:
        """Per ClientHello: serve it from the newest complete context (one reference read)."""
        current = self._current
        if current is not None:
            conn.context = current

    def _split(self) -> tuple[list[str], list[str]]:
        dns, ips = [], []
        for n in self.names:
            try:
                ipaddress.ip_address(n)
                ips.append(n)  # parsed again below
            except ValueError:
                dns.append(n)
        return dns, ips

    def refresh(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        dns, ips = self._split()
        cert, root = self.authority.issue_server_certificate(key.public_key(), dns_names=dns, ip_addresses=ips)
        # the issuing CA below an offline root, and the active root's endorsement (see server_chain_pem)
        chain = self.authority.server_chain_pem(cert, root)
        with tempfile.TemporaryDirectory(prefix="meshbridge-tls-") as d:
            os.chmod(d, 0o700)
            cpath, kpath = Path(d) / "tls.crt", Path(d) / "tls.key"
            cpath.write_text(chain)
            fd = os.open(kpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(
                fd,
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
            )
            os.close(fd)
            fresh = harden_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
            fresh.load_cert_chain(cpath, kpath)
            if self._current is None:  # the first: no listener uses ``ctx`` yet
                self.ctx.load_cert_chain(cpath, kpath)
        self._current = fresh  # the swap: handshakes from now on are served from ``fresh``
        self.cert, self.root_id = cert, root.id
        log.info("server certificate issued", extra={"root": root.id})

    def due(self, snap: FleetSnapshot | None) -> bool:
        if self.cert is None:
            return True
        now = datetime.now(UTC)
        life = self.cert.not_valid_after_utc - self.cert.not_valid_before_utc
        if self.cert.not_valid_after_utc - now < life / 3:
            return True
        active = [r for r in self.authority.list_roots() if r.status.value == "active"]
        return bool(active) and active[0].id != self.root_id


def speedups_of(args: argparse.Namespace) -> Speedups:
    """The speed-ups ``serve``'s ``--no-…`` flags leave on."""
    return Speedups(
        agent_shortcut=args.agent_shortcut,
        joined_writes=args.joined_writes,
        prepared_statements=args.prepared_statements,
    )


def http_protocol(*, joined_writes: bool, limits: ListenerLimits | None = None) -> type[asyncio.Protocol]:
    """uvicorn's ``http`` setting: the listener's guarded httptools protocol with ``limits``,
    joining each response's writes when ``joined_writes`` (that speed-up's module is imported
    only when it is on)."""
    base: type[GuardedHttpToolsProtocol] = GuardedHttpToolsProtocol
    if joined_writes:
        from ca_server.http_protocol import CoalescingHttpToolsProtocol

        base = CoalescingHttpToolsProtocol
    return base.with_limits(limits or ListenerLimits())


def listener_limits_of(args: argparse.Namespace) -> ListenerLimits:
    """The limits ``serve``'s ``--head-timeout`` … ``--max-connections`` flags set."""
    return ListenerLimits(
        head_timeout=args.head_timeout,
        body_timeout=args.body_timeout,
        max_head_bytes=args.max_head_bytes,
        max_connections=args.max_connections,
    )


# TLS 1.2 suites: forward secret key exchange and AEAD only (no CBC, no RSA key exchange); TLS 1.3's
# suites are all AEAD and are not set by this string
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

# on every response: a token-carrying answer is never stored by a cache or a browser, and no
# client sniffs a type other than the one declared
RESPONSE_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]


def harden_tls(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2 at least, AEAD suites with ECDHE only, no renegotiation."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def serve(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    workers = int(getattr(args, "workers", 1) or 1)
    if workers > 1:
        return _serve_workers(args, workers)
    return _serve(args)


def _serve_workers(args: argparse.Namespace, workers: int) -> int:
    """``--workers N``: N forked processes accept on one listening socket. Each is a complete
    replica (its own store connections, watcher, background tasks and server certificate), as
    several replicas sharing a data dir already are; the parent only supervises."""
    host, port = split_listen(args.listen)
    # migrate once, before any worker starts; no threads or connections may cross the fork
    store = runtime.build_authority(
        Path(args.data_dir),
        database_url_override=args.database_url,
        passphrase_file=Path(args.passphrase_file) if args.passphrase_file else None,
    ).store
    if isinstance(store, Disposable):
        store.dispose()
    socks = bind_listeners(host, port)
    for sock in socks:
        sock.set_inheritable(True)
    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the worker
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                code = _serve(args, socks)
            except BaseException:
                log.exception("worker failed")
            finally:
                os._exit(code)
        children[pid] = slot

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for slot in range(workers):
        spawn(slot)
    log.info("serving with %d worker processes", workers)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        slot_or_none = children.pop(pid, None)
        if slot_or_none is not None and not stopping:
            log.warning("worker %d exited with status %d; starting another", pid, os.waitstatus_to_exitcode(status))
            time.sleep(1)
            if not stopping:
                spawn(slot_or_none)
    for sock in socks:
        sock.close()
    return 0


def _metrics_token(args: argparse.Namespace) -> str | None:
    """``--metrics-token-file``: a token that opens /metrics only (for a scraper)."""
    if not args.metrics_token_file:
        return None
    token = Path(args.metrics_token_file).read_text().strip()
    if len(token) < 32:
        raise SystemExit("--metrics-token-file must hold a token of at least 32 characters")
    return token


async def keep_wal_small(store: Checkpoints) -> None:
    """SQLite: checkpoint here, every second, so no renewal pays for copying the WAL back."""
    while True:
        await asyncio.sleep(1)
        try:
            await asyncio.to_thread(store.checkpoint)
        except Exception as exc:
            log.warning("WAL checkpoint failed: %s", type(exc).__name__)


def _serve(args: argparse.Namespace, socks: list[socket.socket] | None = None) -> int:
    """Serve until stopped; ``socks``: the listening sockets (``--workers``: the parent's), else
    bound here once the authority and the server certificate are ready."""
    data_dir = Path(args.data_dir)
    speedups = speedups_of(args)
    authority = runtime.build_authority(
        data_dir,
        database_url_override=args.database_url,
        passphrase_file=Path(args.passphrase_file) if args.passphrase_file else None,
        prepared_statements=speedups.prepared_statements,
        workload_cert_lifetime=args.workload_cert_lifetime,
    )
    host, port = split_listen(args.listen)
    names = list(dict.fromkeys([*args.server_name, host]))
    server_cert: ServerCertificate | None = None
    if not args.insecure_http and not args.tls_cert:
        server_cert = ServerCertificate(authority, names=names)
        server_cert.refresh()

    def write_trust_bundle(snap: FleetSnapshot) -> None:
        path = data_dir / "root-cert.pem"
        if not path.exists() or path.read_text() != snap.trust_bundle:
            runtime.write_public(path, snap.trust_bundle)
            log.info("trust bundle written to root-cert.pem")

    async def keep_crls_fresh() -> None:
        while True:
            try:
                n = await asyncio.to_thread(authority.refresh_crls)
                if n:
                    log.info("re-signed %d CRL(s)", n)
            except Exception as exc:
                log.warning("CRL refresh failed: %s", type(exc).__name__)
            await asyncio.sleep(60)

    async def keep_server_cert_fresh() -> None:
        while server_cert is not None:
            await asyncio.sleep(5)
            try:
                if await asyncio.to_thread(server_cert.due, None):
                    await asyncio.to_thread(server_cert.refresh)
            except Exception as exc:
                log.warning("server certificate refresh failed: %s", type(exc).__name__)

    async def warm_proof_keys() -> None:
        """Once, at start: every cluster's newest intermediate key, so that a root rotation's renewals
        do not each read and parse it (``Issuance.warm_proof_keys``; the cache is only a hint)."""
        started = time.monotonic()
        try:
            n = await asyncio.to_thread(authority.warm_proof_keys)
        except Exception as exc:
            log.warning("proof keys not learnt ahead: %s", type(exc).__name__)
            return
        log.info("learnt %d cluster(s)' newest intermediate key in %.1f s", n, time.monotonic() - started)

    from ca_server.api.ratelimit import Limits

    limits = Limits(per_credential=args.rate_limit_credential, per_address=args.rate_limit_address)
    background = [keep_crls_fresh, keep_server_cert_fresh, warm_proof_keys]
    background.append(runtime.audit_anchoring(data_dir, authority.store))  # D/audit-anchors
    if isinstance(authority.store, Checkpoints):
        background.append(functools.partial(keep_wal_small, authority.store))
    app = create_app(
        authority,
        background=background,
        rate_limits=limits,
        agent_shortcut=speedups.agent_shortcut,
        metrics_token=_metrics_token(args),
    )
    app.state.watcher.listeners.append(write_trust_bundle)
    scheme = "http" if args.insecure_http else "https"
    url_host = args.server_name[0] if args.server_name else host
    if ":" in url_host:
        url_host = f"[{url_host}]"
    write_trust_bundle(authority.snapshot())
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
        ssl_ciphers=TLS12_CIPHERS,
        timeout_keep_alive=75,
        backlog=4096,
        timeout_graceful_shutdown=5,
        headers=RESPONSE_HEADERS,
        server_header=False,
        ws="none",
        http=http_protocol(joined_writes=speedups.joined_writes, limits=listener_limits_of(args)),
    )
    config.load()
    if server_cert is not None:
        config.ssl = server_cert.ctx
    elif config.ssl is not None:
        harden_tls(config.ssl)
    if speedups.off():
        log.warning("speed-ups turned off: %s", ", ".join(speedups.off()))
    listening = socks if socks is not None else bind_listeners(host, port)

    def announce() -> None:  # only now does D/server-url name a server that answers (atomic write)
        runtime.write_public(data_dir / "server-url", f"{scheme}://{url_host}:{port}\n")
        log.info("serving", extra={"path": f"{scheme}://{host}:{port}"})

    gcsettings.tune()  # after start-up: what it built is never garbage
    allocator.keep_large_buffers_mapped()  # before the first connection's TLS buffer
    AnnouncingServer(config, announce).run(sockets=listening)
    return 0
