"""The two clusters TestDataplane (tests/e2e/go/dataplane_test.go) simulates, rendered by the agent's
own renderers: a imports `ratings.bookinfo` (HTTP 9080) and `pg.data` (TCP 5432 and 5433) from b.

a's own `cross_cluster_tcp_port` (16000) differs from the TCP port b publishes (15444), so the
simulation shows which one a's egress gateway dials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster_agent.config import parse_config
from cluster_agent.render import file_name, render_all, to_yaml

INGRESS_B = "spiffe://b.mesh/ns/istio-system/sa/istio-ingressgateway-service-account"
EGRESS_A = "spiffe://a.mesh/ns/istio-system/sa/istio-egressgateway-service-account"
GATEWAY_B: dict[str, Any] = {"address": "198.51.100.20", "port": 15443, "tcp_port": 15444}
RATINGS = {"number": 9080, "protocol": "HTTP"}
PG = [{"number": 5432, "protocol": "TCP"}, {"number": 5433, "protocol": "TCP"}]


def _config(cluster: str, tcp_port: int, **extra: Any) -> dict[str, Any]:
    return {
        "cluster": cluster,
        "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/ca-root.pem"},
        "istio": {
            "trust_domain": f"{cluster}.mesh",
            "cross_cluster_tcp_port": tcp_port,
            "ingress_gateway": {"address": "198.51.100.20"},
        },
        "dns": {"mode": "none"},
        **extra,
    }


def _write(directory: Path, objects: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for obj in objects:
        (directory / file_name(obj)).write_text(to_yaml(obj))
    return directory


def render_clusters(root: Path) -> tuple[Path, Path]:
    """Render a (importer) and b (exporter) into root/a and root/b; returns both directories."""
    # the simulated client sidecar runs in bookinfo: it must see pg.data too
    a = parse_config(_config("a", 16000, imports=[{"from": "b", "names": ["*"], "consumer_namespaces": ["bookinfo"]}]))
    imports = [
        {"name": n, "cluster": "b", "ports": p, "gateway": GATEWAY_B, "identity": INGRESS_B}
        for n, p in (("ratings.bookinfo", [RATINGS]), ("pg.data", PG))
    ]
    out_a = render_all(a, imports=imports, peers=[], vips={})
    exports = [
        {"service": "ratings", "namespace": "bookinfo", "ports": [RATINGS], "consumers": ["a"]},
        {"service": "pg", "namespace": "data", "ports": PG, "consumers": ["a"]},
    ]
    b = parse_config(_config("b", GATEWAY_B["tcp_port"], exports=exports))
    peers = [{"name": "a", "trust_domain": "a.mesh", "identities": {"egress": EGRESS_A}}]
    out_b = render_all(b, imports=[], peers=peers, vips={})
    return _write(root / "a", out_a.objects), _write(root / "b", out_b.objects)
