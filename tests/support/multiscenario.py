"""Cluster a of tests/e2e/go's TestMultiExport, rendered by the agent's own renderer: imports served
by several exporters and several gateway addresses (issue 13 items 4 and 5).

- `ratings.bookinfo` from b (addresses 198.51.100.20 and 198.51.100.21) and from c
  (198.51.100.30): every address an IP, so a STATIC ServiceEntry (EDS cluster);
- `details.bookinfo` from b (gw.b.example, a DNS name) and c (198.51.100.30): a DNS ServiceEntry
  (STRICT_DNS cluster with the endpoints inline).
`imports[].priority` is per source cluster (default b 0, c 1), so it orders both names alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster_agent.config import parse_config
from cluster_agent.render import render_all
from tests.support.simscenario import INGRESS, write_objects

PRIORITY = {"b": 0, "c": 1}
GATEWAYS: dict[tuple[str, str], dict[str, Any]] = {
    ("ratings.bookinfo", "b"): {"address": "198.51.100.20", "addresses": ["198.51.100.20", "198.51.100.21"]},
    ("ratings.bookinfo", "c"): {"address": "198.51.100.30"},
    ("details.bookinfo", "b"): {"address": "gw.b.example"},
    ("details.bookinfo", "c"): {"address": "198.51.100.30"},
}


TCP_PORT = {"b": 15444, "c": 15446}  # what each exporter publishes as `Gateway.tcp_port`


def workload(cluster: str, name: str) -> str:
    """The destination workload identity an end-to-end exporter publishes for `name`."""
    service, namespace = name.split(".")
    return f"spiffe://{cluster}.mesh/ns/{namespace}/sa/bookinfo-{service}"


def _import(name: str, cluster: str, mode: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "cluster": cluster,
        "ports": [{"number": 9080, "protocol": "HTTP"}],
        "gateway": {**GATEWAYS[(name, cluster)], "port": 15443, "tcp_port": TCP_PORT[cluster]},
        "identity": INGRESS.format(td=f"{cluster}.mesh"),
    }
    if mode == "end-to-end":
        entry |= {"mode": mode, "workload_identities": [workload(cluster, name)]}
    return entry


def render_multi_importer(
    directory: Path,
    priorities: dict[str, int] | None = None,
    aliases: dict[str, str] | None = None,
    localities: dict[str, str] | None = None,
    mode: str = "hop-by-hop",
) -> Path:
    """Cluster a's objects; `priorities`: `imports[].priority` per source cluster (default
    PRIORITY); `aliases`: `imports[].aliases` of every rule; `localities`: `imports[].locality`;
    `mode`: how both exporters export both names (`end-to-end` adds their workload identities)."""
    chosen = PRIORITY if priorities is None else priorities
    names = ["ratings.bookinfo", "details.bookinfo"]
    rules: list[dict[str, Any]] = [
        {"from": c, "names": names, "priority": p, "aliases": aliases or {}} for c, p in chosen.items()
    ]
    for rule in rules:
        if localities and rule["from"] in localities:
            rule["locality"] = localities[rule["from"]]
    data = {
        "cluster": "a",
        "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/etc/meshbridge/ca-root.pem"},
        "istio": {"trust_domain": "a.mesh", "ingress_gateway": {"address": "198.51.100.10"}},
        "imports": rules,
    }
    imports = [_import(name, cluster, mode) for name, cluster in GATEWAYS]
    vips = {"ratings.bookinfo": "240.240.0.1", "details.bookinfo": "240.240.0.3"}
    result = render_all(parse_config(data), imports=imports, peers=[], vips=vips)
    return write_objects(directory, result.objects)
