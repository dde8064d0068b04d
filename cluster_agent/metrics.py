"""Prometheus metrics and the /healthz, /readyz, /metrics endpoints of the agent."""

from __future__ import annotations

import math
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from cluster_agent.reconcile import ReconcileResult


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cacerts_not_after = Gauge(
            "meshbridge_agent_cacerts_not_after_seconds",
            "notAfter of the installed intermediate (Unix time)",
            registry=r,
        )
        self.last_success = Gauge(
            "meshbridge_agent_last_successful_reconcile_seconds",
            "Unix time of the last successful reconcile",
            registry=r,
        )
        self.imports = Gauge("meshbridge_agent_imports_applied", "Imported services laid down", registry=r)
        self.errors = Counter("meshbridge_agent_errors_total", "Failed passes by kind", ["kind"], registry=r)
        self.writes = Counter(
            "meshbridge_agent_api_writes_total", "Objects created, updated or pruned", ["op"], registry=r
        )
        self.ca_reachable = Gauge(
            "meshbridge_agent_ca_reachable", "1 when the CA service answered last time", registry=r
        )
        self.renewals = Counter("meshbridge_agent_renewals_total", "Intermediate renewals", registry=r)
        # Envoy fails every chain whose CRL is past nextUpdate (default_validator.cc, envoy#31320):
        # alert well before (docs/agent-config.md, "Alerts"). NaN while no ca-crl.pem is installed.
        self.ca_crl_next_update = Gauge(
            "meshbridge_agent_ca_crl_next_update_seconds",
            "Earliest nextUpdate of the CRLs in the installed ca-crl.pem (Unix time; NaN: none installed)",
            registry=r,
        )
        self.ca_crl_next_update.set(math.nan)
        self.ca_crl_expires_in = Gauge(
            "meshbridge_agent_ca_crl_expires_in_seconds",
            "Seconds until the earliest nextUpdate of the CRLs in the installed ca-crl.pem (NaN: none installed)",
            registry=r,
        )
        self._ca_crl_next = math.nan
        self.ca_crl_expires_in.set_function(lambda: self._ca_crl_next - time.time())

        self.istio_problems = Gauge(
            "meshbridge_agent_istio_problems",
            "Problems the last check of Istio's preconditions and the gateways found (listed in the status)",
            registry=r,
        )

    def ca_crl_installed(self, next_update: datetime | None) -> None:
        """The ca-crl.pem just applied: the earliest nextUpdate in it (None: none installed)."""
        self._ca_crl_next = next_update.timestamp() if next_update is not None else math.nan
        self.ca_crl_next_update.set(self._ca_crl_next)

    def reconciled(self, result: ReconcileResult) -> None:
        self.last_success.set(time.time())
        self.imports.set(result.imports_applied)
        for op, items in (
            ("create", result.report.created),
            ("update", result.report.updated),
            ("prune", result.report.pruned),
        ):
            if items:
                self.writes.labels(op).inc(len(items))
        self.istio_problems.set(len(result.istio_problems))
        if result.renewed:
            self.renewals.inc()
        if result.cacerts_not_after is not None:
            self.cacerts_not_after.set(result.cacerts_not_after.timestamp())
        self.ca_crl_installed(result.ca_crl_next_update)


def serve_health(
    metrics: AgentMetrics, *, ready: threading.Event, host: str = "127.0.0.1", port: int = 9090
) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif self.path == "/readyz":
                ok = ready.is_set()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
            elif self.path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="health").start()
    return server
