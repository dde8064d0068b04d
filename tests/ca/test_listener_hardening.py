"""Attacks on the open listener of a real `meshbridge-ca serve` (issue 10, items 5 and 11), each
of which worked before the listener was hardened: slow and huge requests, too many connections,
the operator endpoints open to anyone, scripts from a CDN, redirects built from the Host header,
responses a cache may keep, CBC suites, failed logins nobody hears of, a /readyz that costs a
database round trip per request.

The server runs with small limits (a 1.5 s head deadline, a 2 s body deadline, 8 connections) so
the attacks end quickly. The listener's attacks run against both protocols ``serve`` can use:
with the joined-writes speed-up and without it.
"""

from __future__ import annotations

import json
import re
import select
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ca_server.api.problems import PROBLEM_BASE
from cluster_agent import pki
from tests.ca.conftest import Harness
from tests.ca.test_cli import CLI, Served, ok, serve
from tests.support.pgserver import free_port
from tests.support.tlsfiles import loopback_cert_files

HEAD_TIMEOUT = 1.5
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 8
METRICS_TOKEN = "metrics-scraper-token-0123456789abcdef"


@pytest.fixture(scope="module", params=["joined-writes", "no-joined-writes"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    d = tmp_path_factory.mktemp("listener") / "ca"
    ok("init", "--data-dir", str(d))
    token_file = d.parent / "metrics-token"
    token_file.write_text(METRICS_TOKEN + "\n")
    flags = [
        "--head-timeout",
        str(HEAD_TIMEOUT),
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--metrics-token-file",
        str(token_file),
        "--rate-limit-address",
        "0",
        "--rate-limit-credential",
        "0",
    ]
    if request.param == "no-joined-writes":
        flags.append("--no-joined-writes")
    yield from serve(d, *flags)


def admin(s: Served) -> dict[str, str]:
    return {"Authorization": f"Bearer {(s.data_dir / 'admin-token').read_text().strip()}"}


def tls_socket(s: Served) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(s.data_dir / "root-cert.pem"))
    host, port = s.url.removeprefix("https://").rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=host)


def read_until_closed(sock: ssl.SSLSocket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (seconds
    from now); fails when it is still open after ``limit`` seconds."""
    started = time.monotonic()
    sock.settimeout(0.2)
    data = b""
    while time.monotonic() - started < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    else:
        pytest.fail(f"the connection was still open after {limit} s")
    return data, time.monotonic() - started


def read_ready(sock: ssl.SSLSocket) -> bytes:
    """What the server has sent so far, without waiting (a readable socket may hold only a TLS
    session ticket)."""
    if not select.select([sock], [], [], 0)[0]:
        return b""
    timeout = sock.gettimeout()
    sock.settimeout(0.05)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return b""
    finally:
        sock.settimeout(timeout)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# ----------------------------------------------------------------------------- item 5: slow and huge


def test_a_partial_head_is_cut_at_the_head_deadline(served: Served) -> None:
    with tls_socket(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: ca\r\nX-Slow: ")  # and never the rest
        response, took = read_until_closed(sock, HEAD_TIMEOUT + 5)
    assert status_of(response) == 408 and b"connection: close" in response.lower()
    assert took < HEAD_TIMEOUT + 2


def test_a_connection_that_sends_nothing_is_closed(served: Served) -> None:
    with tls_socket(served) as sock:
        response, took = read_until_closed(sock, HEAD_TIMEOUT + 5)
    assert response == b"" and took < HEAD_TIMEOUT + 2


def test_a_head_trickled_byte_by_byte_is_cut_at_its_deadline(served: Served) -> None:
    """The deadline is for the whole head, not for each byte."""
    with tls_socket(served) as sock:
        sock.sendall(b"G")
        started = time.monotonic()
        sock.settimeout(0.2)
        for byte in b"ET /healthz HTTP/1.1\r\nHost: ca\r\nX-Slow: " + b"x" * 100:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(65536):
                    break
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                break
            assert time.monotonic() - started < HEAD_TIMEOUT + 3, "the trickled head was never cut"
    assert time.monotonic() - started < HEAD_TIMEOUT + 3


def trickle_body(s: Served, path: str, headers: dict[str, str]) -> tuple[bytes, float, int]:
    """A POST whose 200-byte body comes one byte every 0.25 s (50 s in all): what the server
    answered, when it closed, and how many bytes of body it took."""
    head = f"POST {path} HTTP/1.1\r\nHost: ca\r\nContent-Type: application/json\r\nContent-Length: 200\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with tls_socket(s) as sock:
        sock.sendall(head.encode())
        started = time.monotonic()
        sock.settimeout(0.25)
        sent, response = 0, b""
        while sent < 200 and time.monotonic() - started < BODY_TIMEOUT + 10:
            try:
                sock.sendall(b" ")
                sent += 1
                response += sock.recv(65536)
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError, BrokenPipeError):
                break
            if response and b"\r\n\r\n" in response:
                rest, _ = read_until_closed(sock, BODY_TIMEOUT + 5)
                response += rest
                break
        return response, time.monotonic() - started, sent


def test_a_trickled_body_is_cut_at_the_total_body_deadline(served: Served) -> None:
    response, took, sent = trickle_body(served, "/v1/enroll", {})
    assert status_of(response) == 408, response
    assert b'"status":408' in response.replace(b" ", b"")  # a problem document, as every error
    assert took < BODY_TIMEOUT + 2 and sent < 200


def test_a_trickled_body_nobody_reads_is_cut_too(served: Served) -> None:
    """A body the app never reads (no such route: 404 at once) still holds no connection."""
    response, took, sent = trickle_body(served, "/no/such/path", {})
    assert status_of(response) == 404
    assert took < BODY_TIMEOUT + 2 and sent < 200


def test_a_huge_header_line_gets_431_without_being_read(served: Served) -> None:
    """The server answers once the head passes 16 KiB, and cuts the connection of a client that
    goes on sending its header line within a second (before, it read and kept all of it)."""
    with tls_socket(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: ca\r\nX-Huge: ")
        started, cut, response = time.monotonic(), False, b""
        sock.settimeout(5)
        try:
            while time.monotonic() - started < 10:
                sock.sendall(b"a" * 65536)
                response += read_ready(sock)  # the answer, read before the reset drops it
        except (ConnectionError, ssl.SSLError):
            cut = True
        took = time.monotonic() - started
    assert status_of(response) == 431
    assert cut and took < 5, took


def test_a_head_just_under_the_cap_is_served(served: Served) -> None:
    with served.http() as http:
        r = http.get("/healthz", headers={"X-Padding": "a" * 12000})
    assert r.status_code == 200


def test_connections_over_the_limit_are_refused(served: Served) -> None:
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(tls_socket(served))
        with tls_socket(served) as extra:
            response, took = read_until_closed(extra, 5)
        assert status_of(response) == 503 and took < 2
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)  # the server notices the closes
    with served.http() as http:
        assert http.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------- item 11: less on the listener


def test_metrics_and_openapi_need_a_token_and_there_are_no_docs(served: Served) -> None:
    metrics = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    with served.http() as http:
        for path in ("/metrics", "/openapi.json"):
            r = http.get(path)
            assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json", path
            assert http.get(path, headers=admin(served)).status_code == 200
        assert "meshbridge_ca_ready" in http.get("/metrics", headers=metrics).text
        assert http.get("/openapi.json", headers=metrics).status_code == 401  # the scraper's token opens /metrics only
        assert http.get("/v1/clusters", headers=metrics).status_code == 401
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert http.get(path).status_code == 404


def test_no_response_loads_anything_from_elsewhere(served: Served) -> None:
    """The CA often runs air-gapped: no page it serves points at a script, style or font elsewhere.
    The only absolute URLs in its answers are the problem type identifiers (never fetched)."""
    with served.http() as http:
        bodies = [
            http.get(p, headers=admin(served)).text
            for p in ("/", "/docs", "/redoc", "/openapi.json", "/metrics", "/healthz", "/readyz", "/v1/clusters")
        ]
    for body in bodies:
        assert "<script" not in body.lower() and "<link" not in body.lower()
        urls = re.findall(r"https?://[^\s\"'<>]+", body)
        assert all(u.startswith(PROBLEM_BASE) for u in urls), urls


def test_no_redirect_is_built_from_the_host_header(served: Served) -> None:
    with served.http() as http:
        r = http.get("/v1/clusters/", headers={**admin(served), "Host": "attacker.example"})
    assert r.status_code == 404 and "location" not in r.headers
    assert "attacker.example" not in r.text


def test_every_response_says_no_store_and_nosniff(served: Served) -> None:
    with served.http() as http:
        name = f"c{time.monotonic_ns() % 10**9}"
        made = http.post("/v1/clusters", json={"name": name}, headers=admin(served))
        key = pki.new_key()
        enrolled = http.post(
            "/v1/enroll",
            json={"cluster": name, "bootstrap_token": made.json()["bootstrap_token"], "csr": pki.make_csr(key, name)},
        )
        auth = {"Authorization": f"Bearer {enrolled.json()['agent_token']}"}
        csr = pki.make_csr(pki.new_key(), name)
        renewed = http.post(
            f"/v1/clusters/{name}/intermediate", json={"csr": csr, "proof": pki.prove(key, csr)}, headers=auth
        )
        token = http.post(f"/v1/clusters/{name}/bootstrap-token", headers=admin(served))
        responses = [
            made,
            enrolled,
            renewed,
            token,
            http.get("/healthz"),
            http.get("/v1/trust-bundle"),
            http.get("/no/such/path"),
            http.get("/v1/clusters"),
        ]
    assert [r.status_code for r in responses] == [201, 201, 201, 201, 200, 200, 404, 401]
    for r in responses:
        assert r.headers["cache-control"] == "no-store", r.request.url
        assert r.headers["x-content-type-options"] == "nosniff", r.request.url
        assert "server" not in r.headers  # nor does it name its software


def openssl_connects(s: Served, *args: str, cafile: Path | None = None) -> bool:
    port = s.url.rsplit(":", 1)[1]
    r = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            str(cafile or s.data_dir / "root-cert.pem"),
            "-verify_return_error",
            *args,
        ],
        input=b"",
        capture_output=True,
        timeout=30,
        check=False,
    )
    return r.returncode == 0


def test_tls_offers_no_cbc_suite_and_nothing_below_tls_1_2(served: Served) -> None:
    # Python's default server suites drop the SHA-1 CBC ones but kept these two (CBC with SHA-2)
    assert not openssl_connects(served, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256")
    assert not openssl_connects(served, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA384")
    assert not openssl_connects(served, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA")
    assert not openssl_connects(served, "-tls1_2", "-cipher", "AES128-GCM-SHA256")  # no forward secrecy
    assert not openssl_connects(served, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert openssl_connects(served, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert openssl_connects(served, "-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305")
    assert openssl_connects(served, "-tls1_3")


def test_a_given_certificate_gets_the_same_tls_settings(tmp_path: Path) -> None:
    """``serve --tls-cert``: uvicorn's own context offered its default suites ("TLSv1": CBC with
    SHA-1 included); the service's settings hold for it too."""
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    loopback_cert_files(cert_file, key_file)
    d = tmp_path / "ca"
    ok("init", "--data-dir", str(d))
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as out:
        proc = subprocess.Popen(
            [
                *CLI,
                "serve",
                "--data-dir",
                str(d),
                "--listen",
                f"127.0.0.1:{port}",
                "--tls-cert",
                str(cert_file),
                "--tls-key",
                str(key_file),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    s = Served(d, f"https://127.0.0.1:{port}", proc, tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 60
        while not openssl_connects(s, cafile=cert_file):
            assert proc.poll() is None and time.monotonic() < deadline, s.log.read_text()
            time.sleep(0.2)
        assert openssl_connects(s, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256", cafile=cert_file)
        for cbc in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384"):
            assert not openssl_connects(s, "-tls1_2", "-cipher", cbc, cafile=cert_file), cbc
    finally:
        proc.terminate()
        proc.wait(20)


def test_failed_authentications_are_logged_with_the_token_id_only(served: Served) -> None:
    good = admin(served)["Authorization"].removeprefix("Bearer ")
    kind, token_id, _ = good.split(".")
    forged = f"{kind}.{token_id}.{'x' * 43}"
    wrong_id = f"mbagent.{'0' * 16}.not-the-secret-{'y' * 30}"
    with served.http() as http:
        assert http.get("/v1/clusters", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
        r = http.post(
            "/v1/clusters/zz/intermediate",
            json={"csr": "x", "proof": ""},
            headers={"Authorization": f"Bearer {wrong_id}"},
        )
        assert r.status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer guessed-metrics-token"}).status_code == 401
    time.sleep(0.2)
    lines = [json.loads(line) for line in served.log.read_text().splitlines() if line.startswith("{")]
    refused = [x for x in lines if x["level"] == "warning" and x["msg"].startswith("authentication failed")]
    text = "\n".join(x["msg"] for x in refused)
    assert f"admin token {token_id}" in text and "GET /v1/clusters" in text
    assert f"agent token {'0' * 16}" in text and "POST /v1/clusters/zz/intermediate" in text
    assert "GET /metrics" in text and "a malformed token" in text
    log = served.log.read_text()
    for secret in (forged.rsplit(".", 1)[1], wrong_id.rsplit(".", 1)[1], "guessed-metrics-token", good):
        assert secret not in log


# ----------------------------------------------------------------------------- /readyz is cheap


def test_a_flood_of_readyz_checks_the_database_once_a_second(harness: Harness, monkeypatch: Any) -> None:
    calls = {"ping": 0, "sign": 0}
    ping, sign = harness.authority.store.ping, harness.authority.check_signing_key

    def counted_ping() -> None:
        calls["ping"] += 1
        ping()

    def counted_sign() -> None:
        calls["sign"] += 1
        sign()

    monkeypatch.setattr(harness.authority.store, "ping", counted_ping)
    monkeypatch.setattr(harness.authority, "check_signing_key", counted_sign)
    started = time.monotonic()
    for _ in range(200):
        assert harness.client.get("/readyz").status_code == 200
    seconds = time.monotonic() - started
    assert 1 <= calls["ping"] <= seconds + 1 and calls["sign"] == calls["ping"]
    time.sleep(1.0)
    harness.client.get("/readyz")
    assert calls["ping"] >= 2  # the outcome is kept a second, not for ever


def test_readyz_failure_is_kept_as_briefly(harness: Harness, monkeypatch: Any) -> None:
    def down() -> None:
        raise ConnectionError("database down")

    assert harness.client.get("/readyz").status_code == 200
    monkeypatch.setattr(harness.authority.store, "ping", down)
    time.sleep(1.0)
    assert harness.client.get("/readyz").status_code == 503
    monkeypatch.undo()
    time.sleep(1.0)
    assert harness.client.get("/readyz").status_code == 200


def test_metrics_token_opens_metrics_when_the_database_is_down(
    tmp_path: Path, harness: Harness, monkeypatch: Any
) -> None:
    """The scraper's token needs no database: /metrics tells of an outage while it lasts."""
    from fastapi.testclient import TestClient

    from ca_server.app import create_app
    from ca_server.core.errors import Unavailable

    def down(*_: Any, **__: Any) -> Any:
        raise Unavailable("database unavailable")  # what the store raises when it cannot connect

    app = create_app(harness.authority, metrics_token=METRICS_TOKEN)
    with TestClient(app) as client:
        monkeypatch.setattr(harness.authority.store, "ping", down)
        monkeypatch.setattr(harness.authority.store, "read", down)
        assert client.get("/readyz").status_code == 503
        r = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert r.status_code == 200 and "meshbridge_ca_ready 0.0" in r.text
        assert client.get("/metrics", headers=harness.admin).status_code == 503
