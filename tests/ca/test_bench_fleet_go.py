"""bench/fleetagents, the fleet event's simulated agents in Go (issue 15: the Python client took
0.65-0.8 of the machine's 2 cores at 10,000 agents, so the bench measured itself).

Against a real `meshbridge-ca serve`: a small fleet event run with it passes, every cluster renewed.
Against a scripted HTTPS server (a stand-in for the CA, unavoidable for a 429 on demand and a
server certificate the agents must refuse): what an agent sends and records, that a refused renewal
is retried and counted, and that a server its anchors do not vouch for is refused, not retried.
"""

from __future__ import annotations

import hashlib
import json
import queue
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.ca.test_bench_fleet_counts import fleet_event
from tests.support.tlsfiles import loopback_cert_files


def self_signed(dir: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own root, and its key."""
    cert_path, key_path = dir / f"{name}.pem", dir / f"{name}.key"
    loopback_cert_files(cert_path, key_path, name=name, ca=True)
    return cert_path, key_path


class ScriptedCA:
    """One agent's conversation with a CA, scripted: first desired state (revision 1), a long-poll
    refused once (503), then answered with rotate_required (revision 2), the renewal refused once with 429 then issued, the
    desired state after it (revision 3, rotation done), and a last long-poll held until stopped."""

    def __init__(self, anchor: str) -> None:
        self.anchor = anchor
        self.requests: list[tuple[str, str, Any]] = []
        self.renewals = 0
        self.stopped = threading.Event()

    def desired(self, revision: str, rotate: bool, generation: int) -> dict[str, Any]:
        return {"revision": revision, "trust_bundle": self.anchor, "rotate_required": rotate, "generation": generation}

    def answer(self, method: str, path: str, body: Any) -> tuple[int, dict[str, str], Any]:
        self.requests.append((method, path, body))
        if method == "PUT" and path == "/v1/clusters/a1/status":
            return 204, {}, None
        if method == "POST" and path == "/v1/clusters/a1/intermediate":
            self.renewals += 1
            if self.renewals == 1:
                return 429, {"Retry-After": "0"}, {"title": "Too many requests"}
            return 201, {}, {"generation": 2}
        if path == "/v1/clusters/a1/desired":
            return 200, {}, self.desired("3" if self.renewals else "1", False, 2 if self.renewals else 1)
        if path == "/v1/clusters/a1/desired?wait=60&revision=1":
            if sum(1 for r in self.requests if r[1] == path) == 1:  # the first long-poll: refused
                return 503, {"Retry-After": "0"}, {"title": "Overloaded"}
            return 200, {}, self.desired("2", True, 2)
        if path == "/v1/clusters/a1/desired?wait=60&revision=3":
            self.stopped.wait(30)
            return 200, {}, self.desired("3", False, 2)
        return 404, {}, {"title": "not scripted", "path": path}


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[tuple[str, ScriptedCA, Path]]:
    cert, key = self_signed(tmp_path, "server")
    script = ScriptedCA(cert.read_text())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def _serve(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(size)) if size else None
            headers: dict[str, str] = {}
            if self.headers.get("Authorization") != "Bearer tok-a1":
                status, answer = 401, {"title": "bad token"}
            else:
                status, headers, answer = script.answer(self.command, self.path, body)
            data = b"" if answer is None else json.dumps(answer).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = _serve

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", script, cert
    finally:
        script.stopped.set()
        server.shutdown()
        server.server_close()


def run_agent(tmp_path: Path, url: str, anchor: Path, until: str) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    """One Go agent (a1) against ``url`` until it reports ``until``; its events and record."""
    module = fleet_event()
    spec = {"name": "a1", "token": "tok-a1", "csr": "CSR", "proof": "PROOF", "generation": 1, "serial": "ab"}
    events: queue.Queue[tuple[Any, ...]] = queue.Queue()
    out: queue.Queue[list[dict[str, Any]]] = queue.Queue()
    stop = threading.Event()
    client = module.GoClient(module.build_go_client(), tmp_path, url, str(anchor), [spec], events, out, stop)
    client.start()
    seen: list[tuple[Any, ...]] = []
    try:
        while not seen or seen[-1][0] != until:
            seen.append(events.get(timeout=60))
    finally:
        stop.set()
    records = out.get(timeout=30)
    client.join(10)
    assert not client.is_alive()
    assert len(records) == 1
    return seen, records[0]


def test_a_go_agent_renews_with_proof_retries_refusals_and_records_what_it_saw(
    tmp_path: Path, scripted: tuple[str, ScriptedCA, Path]
) -> None:
    url, script, anchor = scripted
    before = time.monotonic()
    events, rec = run_agent(tmp_path, url, anchor, "renewed")
    assert events == [("polling", "a1", "1"), ("renewed", "a1", 200)]
    # what it sent: the status report of the bundle it was handed, the renewal twice (429 first)
    (_, _, status), *_ = [r for r in script.requests if r[0] == "PUT"]
    der = ssl.PEM_cert_to_DER_cert(script.anchor)
    assert status["served"]["bundle"] == [hashlib.sha256(der).hexdigest()]
    assert (status["installed_generation"], status["installed_serial"]) == (1, "ab")
    assert [r[2] for r in script.requests if r[0] == "POST"] == [{"csr": "CSR", "proof": "PROOF"}] * 2
    # what it recorded, in the keys and clock of the Python client
    assert rec["renew_status"] == 201 and rec["renew_refused"] == 1 and rec["reads_refused"] == 1
    assert rec["polls"] == 2  # the refused long-poll was sent again, and counted once
    assert (rec["want_generation"], rec["renewed_generation"]) == (2, 2)
    assert rec["after_renewal"] == {"status": 200, "rotate_required": False, "generation": 2}
    assert "error" not in rec
    assert before <= rec["rotate_at"] <= rec["renewed_at"] <= time.monotonic()
    assert len(rec["answers"]) == 1 and before <= rec["answers"][0] <= rec["rotate_at"]
    assert fleet_event().tally([rec])["failures"] == 0


def test_a_go_agent_refuses_a_server_its_anchor_does_not_vouch_for(
    tmp_path: Path, scripted: tuple[str, ScriptedCA, Path]
) -> None:
    url, script, _ = scripted
    stranger, _ = self_signed(tmp_path, "stranger")
    started = time.monotonic()
    events, rec = run_agent(tmp_path, url, stranger, "error")
    assert "certificate is not trusted" in rec["error"] and "unknown authority" in rec["error"]
    assert time.monotonic() - started < 20  # refused at once, not retried as an unreachable CA
    assert script.requests == []  # nothing was sent to it, not even the token
    assert events[-1][:2] == ("error", "a1")


def test_a_fleet_event_with_the_go_agents_renews_every_cluster(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    rc = fleet_event().main(["--agents", "30", "--client", "go", "--json", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["pass"] is True
    assert report["client"] == "go" and report["client_procs"] == 1
    ev = report["event"]
    assert ev["renew_statuses"] == {"201": 30} and ev["failures"] == 0
    assert ev["all_answered_s"] is not None and ev["all_renewed_s"] is not None
    assert report["checks"]["clusters_on_new_root"] == 30 and report["checks"]["audit_verify"] is True
    assert report["group_commit"] == [{"transactions": 0, "writes": 0, "replays": 0}]  # SQLite: no group commit


def test_two_postgresql_replicas_renew_a_fleet_without_running_a_batch_twice(tmp_path: Path) -> None:
    """Each renewal that ends a rotation on one replica moves the fleet revision; the other
    replica's batches used to find their cached roots stale, read them with their writes
    deferred and run again (a third of the batches of a 1,000-agent event, bench/RESULTS.md).
    The report counts those runs per replica, from each one's /metrics (fails before: one batch of
    a replica ran twice, in 2 of 2 runs of 300 agents; 40 were too few to show it)."""
    out = tmp_path / "report.json"
    argv = ["--agents", "300", "--client", "go", "--engine", "postgres", "--replicas", "2", "--json", "--out", str(out)]
    rc = fleet_event().main(argv)
    report = json.loads(out.read_text())
    assert rc == 0 and report["pass"] is True
    assert report["event"]["renew_statuses"] == {"201": 300}
    commits = report["group_commit"]
    assert len(commits) == 2 and sum(g["writes"] for g in commits) == 300
    assert all(g["transactions"] >= 1 for g in commits)
    assert [g["replays"] for g in commits] == [0, 0]


def test_times_move_from_the_unix_clock_to_the_monotonic_one() -> None:
    rec = {"name": "a", "answers": [100.5, 101.0], "rotate_at": 101.0, "renewed_at": 102.0, "polls": 2}
    moved = fleet_event().monotonic_times(rec, 100.0)
    assert moved == {"name": "a", "answers": [0.5, 1.0], "rotate_at": 1.0, "renewed_at": 2.0, "polls": 2}
