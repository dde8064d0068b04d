"""Several exporters (and gateway addresses) behind one imported host: the ServiceEntry endpoints
and the DestinationRule settings that order them and eject a dead one.

Reusable by every mode that sends an import to the exporters' ingress gateways: `import_endpoints`
gives one endpoint per exporter address, `failover_policy` the `outlierDetection` and
`loadBalancer` to merge into the DestinationRule of that hop.

Priority. `imports[].priority` ranks the exporters (0 = preferred). Istio turns a DestinationRule's
`localityLbSetting.failoverPriority` into Envoy priorities per endpoint
(pilot/pkg/networking/core/loadbalancer/loadbalancer.go `applyFailoverPriorityPerLocality`): it
walks the list and gives an endpoint priority `len(list) - j` at the first entry j whose label
differs from the client proxy's (0 when all match); an entry written `key=value` compares with that
value instead of the proxy's label (`priorityLabelOverrides`), so the ranks do not depend on the
egress gateway's own labels. With R ranks the list is `meshbridge.io/rank-below-K=true` for
K = R-1 … 1, and an endpoint of rank r carries that label for every K > r: it matches the first
R-1-r entries and so gets priority r. Priorities are then compacted to 0..N
(`applyFailoverPriorities`). `applyFailoverPriorities` does nothing for a proxy without labels;
gateway pods always have their selector labels.

Failover needs outlier detection: Istio applies `failoverPriority` (and its default locality
failover) only when the cluster has `outlierDetection` (`LocalityLBSettings.ApplyToCluster`:
"Failover should only be applied with outlier detection, or traffic will never failover"). The
settings, as `applyOutlierDetection` (core/cluster_traffic_policy.go) maps them:
- `consecutiveGatewayErrors: 3` → Envoy `consecutive_gateway_failure` enforced at 100 %: 502, 503,
  504 and, with local-origin errors not split (Istio's default), connection failures and timeouts
  to the remote gateway (Envoy source/common/upstream/outlier_detection_impl.cc
  `putResultNoLocalExternalSplit` → `resultToHttpCode`: LocalOriginConnectFailed is 503,
  LocalOriginTimeout 504, then `putHttpResponseCode` counts 502/503/504 as gateway failures; the
  tcp_proxy filter reports connect failures the same way, so TCP imports fail over too). A
  destination answering 503 itself counts as well: the price of one outlier setting per host;
- `consecutive5xxErrors: 0` → `consecutive_5xx` 0 with enforcement 0: Envoy's default (5, enforced)
  would otherwise eject a healthy exporter for its destination's HTTP 500s;
- `interval: 5s`, `baseEjectionTime: 30s` (an ejected exporter comes back after 30 s times the
  number of its ejections, and is ejected again at once if still dead), `maxEjectionPercent: 100`
  so every address of a dead exporter can go (Envoy's default, 10 %, would keep all but one of a
  dead exporter's addresses in the preferred priority);
- no `minHealthPercent`: Istio then sets `healthy_panic_threshold` 0 (panic off), so Envoy never
  sends to an ejected exporter because too few are healthy.
A lone endpoint gets none of this: with nowhere to fail over to, ejecting it only blackholes.

Locality. `imports[].locality` becomes each endpoint's `locality`. With equal priorities (no
`failoverPriority`) and outlier detection on, Istio's default locality failover ranks endpoints by
how much of region/zone/subzone they share with the egress gateway (`applyLocalityFailover`,
`util.LbPriority`; the mesh default `localityLbSetting.enabled` is on). Once priorities differ,
`failoverPriority` decides alone (`ApplyLocalityLoadBalancer` adds locality failover only with an
explicit `failover` list, which would need the gateway's region).

Addresses. Each published gateway address is an endpoint of its own: a cluster behind one address
is one endpoint, and ejecting it on a few errors takes the whole cluster out (Istio issue 52435,
whose answer is several addresses for the east-west gateway). A ServiceEntry has one `resolution`:
`STATIC` when every address is an IP, else `DNS` (Envoy STRICT_DNS: every endpoint resolved, IPs
included; ServiceEntry validation accepts an IP or an FQDN per endpoint under DNS,
pkg/config/validation/validation.go `ValidateServiceEntry`; `DNS_ROUND_ROBIN` would allow one
endpoint only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cluster_agent.render.inputs import Exporter, ImportSpec, PortSpec

__all__ = [
    "RANK_LABEL",
    "describe_exporters",
    "endpoint_count",
    "failover_policy",
    "import_endpoints",
    "ranks",
    "resolution",
]

RANK_LABEL = "meshbridge.io/rank-below-{}"
OUTLIER_DETECTION: dict[str, Any] = {
    "consecutiveGatewayErrors": 3,
    "consecutive5xxErrors": 0,
    "interval": "5s",
    "baseEjectionTime": "30s",
    "maxEjectionPercent": 100,
}


def ranks(spec: ImportSpec) -> dict[str, int]:
    """Each exporter's rank: the index of its priority among the distinct priorities."""
    distinct = sorted({e.priority for e in spec.exporters})
    return {e.cluster: distinct.index(e.priority) for e in spec.exporters}


def endpoint_count(spec: ImportSpec) -> int:
    return sum(len(e.addresses) for e in spec.exporters)


def resolution(spec: ImportSpec) -> str:
    return "STATIC" if spec.all_ips else "DNS"


def _rank_labels(rank: int, count: int) -> dict[str, str]:
    return {RANK_LABEL.format(k): "true" for k in range(rank + 1, count)}


def import_endpoints(
    spec: ImportSpec, port_of: Callable[[PortSpec, Exporter], int], ports: Sequence[PortSpec] | None = None
) -> list[dict[str, Any]]:
    """ServiceEntry `endpoints`: one per address of each exporter, preferred first, each port name
    (of `ports`, default the import's own) mapped to `port_of(port, exporter)`, with its rank labels
    and locality."""
    rank_of = ranks(spec)
    count = len(set(rank_of.values()))
    endpoints: list[dict[str, Any]] = []
    for exporter in spec.exporters:
        ports_of = {p.name: port_of(p, exporter) for p in (spec.ports if ports is None else ports)}
        for address in exporter.addresses:
            endpoint: dict[str, Any] = {"address": address, "ports": dict(ports_of)}  # unshared: no YAML anchors
            labels = _rank_labels(rank_of[exporter.cluster], count)
            if labels:
                endpoint["labels"] = labels
            if exporter.locality:
                endpoint["locality"] = exporter.locality
            endpoints.append(endpoint)
    return endpoints


def describe_exporters(spec: ImportSpec) -> str:
    """The exporters of an import for operators: `a@0 [203.0.113.10, gw2.a.example], c@1 [...]`
    (each with its Envoy priority, the rank, and its addresses)."""
    rank_of = ranks(spec)
    return ", ".join(f"{e.cluster}@{rank_of[e.cluster]} [{', '.join(e.addresses)}]" for e in spec.exporters)


def failover_policy(spec: ImportSpec) -> dict[str, Any]:
    """`trafficPolicy` keys for the hop to the exporters: none for a single endpoint; else outlier
    detection, and `failoverPriority` when the exporters' priorities differ."""
    if endpoint_count(spec) < 2:
        return {}
    policy: dict[str, Any] = {"outlierDetection": dict(OUTLIER_DETECTION)}
    count = len(set(ranks(spec).values()))
    if count > 1:
        order = [f"{RANK_LABEL.format(k)}=true" for k in range(count - 1, 0, -1)]
        policy["loadBalancer"] = {"localityLbSetting": {"enabled": True, "failoverPriority": order}}
    return policy
