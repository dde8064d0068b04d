"""The agent's /healthz, /readyz and /metrics, and the metrics a reconcile sets."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from cluster_agent.metrics import AgentMetrics, serve_health
from tests.agent.test_agent_flow import make_agent, step
from tests.support.caservice import CAService


def test_health_endpoints_follow_readiness_and_expose_metrics(
    ca_service: CAService, two_clusters: dict[str, Path]
) -> None:
    metrics = AgentMetrics()
    ready = threading.Event()
    server = serve_health(metrics, ready=ready, host="127.0.0.1", port=0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 503  # nothing reconciled yet
        loop, _ = make_agent(two_clusters["b"])
        loop.metrics = metrics
        loop.ready = ready
        step(loop)
        assert httpx.get(f"{base}/readyz").status_code == 200
        text = httpx.get(f"{base}/metrics").text
        for name in (
            "meshbridge_agent_cacerts_not_after_seconds",
            "meshbridge_agent_last_successful_reconcile_seconds",
            "meshbridge_agent_imports_applied",
            "meshbridge_agent_ca_reachable 1.0",
            'meshbridge_agent_api_writes_total{op="create"}',
        ):
            assert name in text, name
        not_after = float(
            next(
                line.split()[1]
                for line in text.splitlines()
                if line.startswith("meshbridge_agent_cacerts_not_after_seconds ")
            )
        )
        assert not_after > 1.7e9
        assert httpx.get(f"{base}/nope").status_code == 404
    finally:
        server.shutdown()
