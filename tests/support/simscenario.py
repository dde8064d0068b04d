"""The two clusters of tests/e2e/go's TestSimulation, rendered by the agent's own renderer.

Cluster a (a.mesh) imports `ratings.bookinfo` (HTTP 9080, VIP 240.240.0.1) and `mongodb.bookinfo`
(TCP 27017) from b; cluster b (b.mesh) exports both to a through its ingress gateway at
198.51.100.20:15443 (TCP: 15444). The CA's desired state is fed in by hand, as in the golden tests,
so the simulation runs without a CA service or an API server.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster_agent.config import parse_config
from cluster_agent.render import file_name, render_all, to_yaml

INGRESS = "spiffe://{td}/ns/istio-system/sa/istio-ingressgateway-service-account"
EGRESS = "spiffe://{td}/ns/istio-system/sa/istio-egressgateway-service-account"
GATEWAY_B = "198.51.100.20"


def _config(cluster: str, **istio: Any) -> dict[str, Any]:
    return {
        "cluster": cluster,
        "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/etc/meshbridge/ca-root.pem"},
        "istio": {"trust_domain": f"{cluster}.mesh", "ingress_gateway": {"address": GATEWAY_B}, **istio},
    }


def _import(name: str, ports: list[tuple[int, str]]) -> dict[str, Any]:
    return {
        "name": name,
        "cluster": "b",
        "ports": [{"number": n, "protocol": p} for n, p in ports],
        "gateway": {"address": GATEWAY_B, "port": 15443},
        "identity": INGRESS.format(td="b.mesh"),
    }


def _peer(name: str) -> dict[str, Any]:
    td = f"{name}.mesh"
    return {
        "name": name,
        "trust_domain": td,
        "identities": {"ingress": INGRESS.format(td=td), "egress": EGRESS.format(td=td)},
    }


def write_objects(directory: Path, objects: Sequence[dict[str, Any]]) -> Path:
    """One YAML file per object, as render mode names them."""
    directory.mkdir(parents=True, exist_ok=True)
    for obj in objects:
        (directory / file_name(obj)).write_text(to_yaml(obj))
    return directory


def render_importer(
    directory: Path,
    extra_imports: int = 0,
    consumer_namespaces: list[str] | None = None,
    e2e_details: bool = False,
) -> Path:
    """Cluster a's objects: the two scenario imports plus `extra_imports` HTTP names
    `svc<i>.bookinfo` (each its own ServiceEntry), with `imports[0].consumer_namespaces`;
    `e2e_details`: details.bookinfo imported end to end too."""
    data = _config("a")
    rule: dict[str, Any] = {"from": "b", "names": ["*"]}
    if consumer_namespaces is not None:
        rule["consumer_namespaces"] = consumer_namespaces
    data["imports"] = [rule]
    imports = [_import("ratings.bookinfo", [(9080, "HTTP")]), _import("mongodb.bookinfo", [(27017, "TCP")])]
    imports += [_import(f"svc{i}.bookinfo", [(8080, "HTTP")]) for i in range(extra_imports)]
    if e2e_details:
        imports.append(_e2e_import("details.bookinfo", [(9080, "HTTP")], E2E_DETAILS))
    vips = {"ratings.bookinfo": "240.240.0.1", "mongodb.bookinfo": "240.240.0.2"}
    result = render_all(parse_config(data), imports=imports, peers=[_peer("b")], vips=vips)
    return write_objects(directory, result.objects)


def render_exporter(directory: Path, e2e_details: bool = False, **istio: Any) -> Path:
    """Cluster b's objects: ratings.bookinfo (HTTP 9080) and mongodb.bookinfo (TCP 27017) for a;
    `e2e_details`: details.bookinfo exported end to end to a too (on the same gateway ports)."""
    data = _config("b", **istio)
    data["exports"] = [
        {"service": "ratings", "namespace": "bookinfo", "ports": [9080], "consumers": ["a"]},
        {
            "service": "mongodb",
            "namespace": "bookinfo",
            "ports": [{"number": 27017, "protocol": "TCP"}],
            "consumers": ["a"],
        },
    ]
    if e2e_details:
        data["exports"].append(
            {
                "service": "details",
                "namespace": "bookinfo",
                "ports": [9080],
                "mode": "end-to-end",
                "service_accounts": ["bookinfo-details"],
                "consumers": ["a"],
            }
        )
    result = render_all(parse_config(data), imports=[], peers=[_peer("a")], vips={})
    return write_objects(directory, result.objects)


# End-to-end mode (tests/e2e/go TestEndToEnd): b exports ratings.bookinfo (HTTP 9080) and
# mongodb.bookinfo (TCP 27017) end to end; a's bookinfo-productpage workload is the one consumer
# workload admitted for ratings, the whole of a for mongodb.
E2E_WORKLOADS = {
    "ratings.bookinfo": "spiffe://b.mesh/ns/bookinfo/sa/bookinfo-ratings",
    "mongodb.bookinfo": "spiffe://b.mesh/ns/bookinfo/sa/bookinfo-mongodb",
}
E2E_DETAILS = "spiffe://b.mesh/ns/bookinfo/sa/bookinfo-details"


def _e2e_import(name: str, ports: list[tuple[int, str]], workload: str) -> dict[str, Any]:
    return {
        **_import(name, ports),
        "gateway": {"address": GATEWAY_B, "port": 15443, "tcp_port": 15444},
        "mode": "end-to-end",
        "workload_identities": [workload],
    }


def render_e2e_importer(directory: Path) -> Path:
    """Cluster a's objects for the two end-to-end imports."""
    data = _config("a")
    data["imports"] = [{"from": "b", "names": ["*"]}]
    imports = [
        _e2e_import(name, ports, E2E_WORKLOADS[name])
        for name, ports in (("ratings.bookinfo", [(9080, "HTTP")]), ("mongodb.bookinfo", [(27017, "TCP")]))
    ]
    vips = {"ratings.bookinfo": "240.240.0.1", "mongodb.bookinfo": "240.240.0.2"}
    result = render_all(parse_config(data), imports=imports, peers=[_peer("b")], vips=vips)
    return write_objects(directory, result.objects)


def render_e2e_exporter(directory: Path, ratings_consumers: list[Any] | None = None, **istio: Any) -> Path:
    """Cluster b's objects: both exports end to end to a (ratings: a's productpage workload only,
    unless `ratings_consumers` says otherwise)."""
    data = _config("b", **istio)
    consumers = ratings_consumers or [{"cluster": "a", "principals": ["ns/bookinfo/sa/bookinfo-productpage"]}]
    data["exports"] = [
        {
            "service": "ratings",
            "namespace": "bookinfo",
            "ports": [9080],
            "mode": "end-to-end",
            "service_accounts": ["bookinfo-ratings"],
            "consumers": consumers,
        },
        {
            "service": "mongodb",
            "namespace": "bookinfo",
            "ports": [{"number": 27017, "protocol": "TCP"}],
            "mode": "end-to-end",
            "service_accounts": ["bookinfo-mongodb"],
            "consumers": ["a"],
        },
    ]
    result = render_all(parse_config(data), imports=[], peers=[_peer("a")], vips={})
    return write_objects(directory, result.objects)
