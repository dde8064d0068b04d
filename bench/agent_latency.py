"""Export change → importing agent's applied state, through the long-poll (issue 3, item 12).

A real CA service (HTTPS, in a thread) and two agents in render mode: cluster a changes its
exports N times; cluster b's agent loop (long-polling in its own thread) applies each change.
We time from a's PUT /exports returning to b's DirectoryWriter having written the new
ServiceEntry, and report p50/p99. A second figure: a reconcile with nothing changed makes zero
writes.

    .venv/bin/python bench/agent_latency.py [--changes 50] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster_agent.apply import ApplyReport
from cluster_agent.ca_client import CAClient
from cluster_agent.config import load_config
from cluster_agent.loop import AgentLoop
from cluster_agent.output import DirectoryWriter
from cluster_agent.reconcile import Reconciler
from cluster_agent.state import DirStateStore
from meshbridge_wire.models import ExportedService, Port
from tests.agent.conftest import agent_yaml
from tests.support.pgserver import free_port

BIN = Path(sys.executable).parent


class CAProcess:
    """`meshbridge-ca init` + `serve` as a separate process, as in production."""

    def __init__(self, data_dir: Path) -> None:
        import subprocess

        subprocess.run(
            [str(BIN / "meshbridge-ca"), "init", "--data-dir", str(data_dir)], check=True, capture_output=True
        )
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(BIN / "meshbridge-ca"),
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--log-level",
                "warning",
            ]
        )
        import httpx

        self.http = httpx.Client(
            base_url=self.url,
            verify=str(data_dir / "root-cert.pem"),
            headers={"Authorization": f"Bearer {(data_dir / 'admin-token').read_text().strip()}"},
        )
        for _ in range(100):
            try:
                self.http.get("/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.1)

    def start(self) -> CAProcess:
        return self

    def add_cluster(self, name: str, trust_domain: str, token_file: Path) -> None:
        r = self.http.post("/v1/clusters", json={"name": name, "trust_domain": trust_domain})
        r.raise_for_status()
        token_file.write_text(r.json()["bootstrap_token"] + "\n")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except Exception:
            self.proc.kill()


class TimedWriter(DirectoryWriter):
    """Records when each ServiceEntry first appeared in the applied state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[str, float] = {}
        self.cond = threading.Condition()

    def apply(self, objects: list[dict[str, Any]], *, corefile_block: str | None = None) -> ApplyReport:
        report = super().apply(objects, corefile_block=corefile_block)
        now = time.perf_counter()
        with self.cond:
            for o in objects:
                if o["kind"] == "ServiceEntry":
                    self.seen.setdefault(o["spec"]["hosts"][0], now)
            self.cond.notify_all()
        return report


def make(cfg_path: Path, writer_cls: type[DirectoryWriter] = DirectoryWriter) -> AgentLoop:
    cfg = load_config(cfg_path)
    out = cfg_path.parent / "out"
    client = CAClient(cfg.ca.url, trust_pem=Path(cfg.ca.trust_anchor).read_text(), cluster=cfg.cluster)
    writer = writer_cls(out, state_dir=out / ".meshbridge")
    return AgentLoop(
        Reconciler(cfg, client=client, applier=writer, state_store=DirStateStore(out / ".meshbridge")), poll_wait=30
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="meshbridge-bench-"))
    svc = CAProcess(tmp / "ca").start()
    try:
        paths = {}
        for name, td, addr, imp in (
            ("a", "a.mesh", "198.51.100.10", "[]"),
            ("b", "b.mesh", "198.51.100.20", '[{from: a, names: ["*"]}]'),
        ):
            d = tmp / name
            d.mkdir()
            svc.add_cluster(name, td, d / "bootstrap-token")
            exports = (
                "[{service: ratings, namespace: bookinfo, ports: [9080], consumers: [b]}]" if name == "a" else "[]"
            )
            (d / "agent.yaml").write_text(
                agent_yaml(name=name, td=td, url=svc.url, address=addr, exports=exports, imports=imp)
            )
            paths[name] = d / "agent.yaml"
        a = make(paths["a"])
        a.step()
        b = make(paths["b"], TimedWriter)
        writer = b.r.applier
        assert isinstance(writer, TimedWriter)
        b.step()
        b.revision = None  # force a full reconcile pass with nothing changed
        res = b.step()
        noop_writes = res.report.writes if res else -1
        thread = threading.Thread(target=b.run, daemon=True)
        thread.start()
        time.sleep(0.5)  # b is now parked in its long-poll
        body = a.r.exports_body()
        latencies = []
        for i in range(args.changes):
            host = f"svc{i}.bench.remote"
            body.services.append(
                ExportedService(
                    name=f"svc{i}.bench",
                    namespace="bench",
                    service=f"svc{i}",
                    ports=[Port(number=8080)],
                    consumers=["b"],
                )
            )
            a.r.client.put_exports(body)
            t0 = time.perf_counter()
            with writer.cond:
                ok = writer.cond.wait_for(functools.partial(writer.seen.__contains__, host), timeout=10)
            if not ok:
                raise SystemExit(f"change {i} did not reach b within 10 s")
            latencies.append(writer.seen[host] - t0)
        b.stop.set()
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
        out = {
            "changes": len(latencies),
            "p50_ms": round(p50, 1),
            "p99_ms": round(p99, 1),
            "max_ms": round(latencies[-1] * 1000, 1),
            "noop_reconcile_writes": noop_writes,
        }
        if args.json:
            print(json.dumps(out))
        else:
            print(
                f"export change → importing agent applied: n={out['changes']} p50={out['p50_ms']} ms "
                f"p99={out['p99_ms']} ms max={out['max_ms']} ms (target p99 < 1000 ms)"
            )
            print(f"reconcile with nothing changed: {noop_writes} writes (target 0)")
        return 0 if p99 < 1000 and noop_writes == 0 else 1
    finally:
        svc.stop()


if __name__ == "__main__":
    sys.exit(main())
