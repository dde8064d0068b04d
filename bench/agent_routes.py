#!/usr/bin/env python3
"""Server CPU per request of the agents' long-poll answer and status report, with the agent
shortcut (``api/fastpath.py``) and without it (FastAPI's routes and middleware stack).

A fleet event costs each cluster a long-poll answer, a renewal, a desired-state read, a status
report and a new long-poll; this measures the two routes the shortcut took over after renewals.
The app runs in this process, on SQLite (a file in a temporary directory) or a real PostgreSQL
(``tests/support/pgserver``), with its revision watcher running; each request is one ASGI call
(no TCP, no TLS, no HTTP client), so the CPU is the app's: its routes, the store and the
authority. Median of ``ROUNDS`` rounds over every enrolled cluster.

    python bench/agent_routes.py [--clusters 200] [--engine sqlite,postgres] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, save_report
from starlette.testclient import TestClient

from ca_server.app import create_app
from ca_server.core.authority import Authority
from ca_server.keys.base import KeyType
from ca_server.keys.file import FileKeyBackend
from ca_server.storage.migrate import upgrade
from ca_server.storage.repository import SqlStore
from cluster_agent import pki
from tests.support.asgi import http_scope, request

ROUNDS = 5
STATUS = json.dumps({"installed_generation": 1, "errors": []}).encode()


@contextmanager
def served(url: str, data_dir: Path, *, shortcut: bool) -> Iterator[tuple[TestClient, str]]:
    """The app on ``url`` and its admin token."""
    store = SqlStore(url)
    upgrade(store.engine)
    authority = Authority(store, FileKeyBackend(data_dir, b"bench-passphrase-not-secret"))
    _, admin = authority.init_root(key_type=KeyType.ECDSA_P256)
    try:
        with TestClient(create_app(authority, watch_interval=0.05, agent_shortcut=shortcut)) as client:
            yield client, admin
    finally:
        store.dispose()


def enroll(client: TestClient, admin: str, name: str) -> str:
    auth = {"Authorization": f"Bearer {admin}"}
    created = client.post("/v1/clusters", json={"name": name, "trust_domain": f"{name}.bench"}, headers=auth)
    token = created.json()["bootstrap_token"]
    body = {"cluster": name, "bootstrap_token": token, "csr": pki.make_csr(pki.new_key(), name)}
    r = client.post("/v1/enroll", json=body)
    if r.status_code != 201:
        raise SystemExit(f"enrolling {name}: {r.status_code} {r.text}")
    return str(r.json()["agent_token"])


def cpu_per_request(client: TestClient, agents: dict[str, str], route: str) -> float:
    """Median CPU ms per request over ROUNDS rounds of one request per agent."""
    method, query, body = ("GET", "?wait=0", b"") if route == "desired" else ("PUT", "", STATUS)

    async def one_round() -> float:
        cpu = time.process_time()
        for name, token in agents.items():
            headers = {"host": "ca", "authorization": f"Bearer {token}"}
            if body:
                headers |= {"content-type": "application/json", "content-length": str(len(body))}
            sent = await request(client.app, http_scope(method, f"/v1/clusters/{name}/{route}{query}", headers), body)
            status = sent[0]["status"]
            if status != 200:
                raise SystemExit(f"{method} {route} for {name} answered {status}")
        return (time.process_time() - cpu) * 1000 / len(agents)

    assert client.portal is not None
    return statistics.median(client.portal.call(one_round) for _ in range(ROUNDS))


def measure(url: str, data_dir: Path, clusters: int, *, shortcut: bool) -> dict[str, Any]:
    with served(url, data_dir, shortcut=shortcut) as (client, admin):
        agents = {f"c{i}": enroll(client, admin, f"c{i}") for i in range(clusters)}
        return {route: round(cpu_per_request(client, agents, route), 3) for route in ("desired", "status")}


def _engine_rows(name: str, clusters: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for shortcut in (True, False):
        with tempfile.TemporaryDirectory(prefix="meshbridge-bench-") as d:
            if name == "sqlite":
                url = f"sqlite:///{d}/ca.db"
                rows["shortcut" if shortcut else "fastapi"] = measure(url, Path(d), clusters, shortcut=shortcut)
            elif name == "postgres":
                from tests.support.pgserver import PgServer

                pg = PgServer().start()
                try:
                    url = pg.create_database("agent_routes")
                    rows["shortcut" if shortcut else "fastapi"] = measure(url, Path(d), clusters, shortcut=shortcut)
                finally:
                    pg.cleanup()
            else:
                raise SystemExit(f"unknown engine {name!r}: sqlite or postgres")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", type=int, default=200, help="enrolled clusters, one request each per round")
    p.add_argument("--engine", default="sqlite,postgres", help="comma-separated engines (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--out", help="also write the JSON report to this file")
    args = p.parse_args()
    report: dict[str, Any] = {"machine": machine(), "rounds": ROUNDS, "clusters": args.clusters, "results": {}}
    for name in args.engine.split(","):
        report["results"][name] = _engine_rows(name, args.clusters)
    if not save_report(report, args.out, args.json):
        print(f"{'engine':10} {'path':9} {'desired ms':>11} {'status ms':>10}  (server CPU per request)")
        for name, rows in report["results"].items():
            for path, r in rows.items():
                print(f"{name:10} {path:9} {r['desired']:>11} {r['status']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
