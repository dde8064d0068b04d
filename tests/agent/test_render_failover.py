"""Several exporters of one name, several gateway addresses per exporter (render/failover.py)."""

from __future__ import annotations

from typing import Any

import pytest

from cluster_agent.config import AgentConfig, ConfigError, parse_config
from cluster_agent.render import render_all
from meshbridge_wire.models import PublishedGateway

INGRESS = "spiffe://{}.mesh/ns/istio-system/sa/istio-ingressgateway-service-account"


def config(**rules: dict[str, Any]) -> AgentConfig:
    """Cluster b importing ratings.bookinfo from a, c and d; `rules` adds keys to a source's rule."""
    imports = [{"from": c, "names": ["ratings.bookinfo"], **rules.get(c, {})} for c in ("a", "c", "d")]
    return parse_config(
        {
            "cluster": "b",
            "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/ca-root.pem"},
            "istio": {"trust_domain": "b.mesh", "ingress_gateway": {"address": "198.51.100.20"}},
            "imports": imports,
        }
    )


def imp(cluster: str, gateway: dict[str, Any], ports: list[tuple[int, str]] | None = None) -> dict[str, Any]:
    return {
        "name": "ratings.bookinfo",
        "cluster": cluster,
        "ports": [{"number": n, "protocol": p} for n, p in (ports or [(9080, "HTTP")])],
        "gateway": gateway,
        "identity": INGRESS.format(cluster),
    }


def objects(cfg: AgentConfig, imports: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    out = render_all(cfg, imports=imports, peers=[], vips={})
    by: dict[tuple[str, str], Any] = {(o["kind"], o["metadata"]["name"]): o.get("spec") for o in out.objects}
    name = "meshbridge-import-ratings-bookinfo"
    return by[("ServiceEntry", name)], by[("DestinationRule", name)], out.warnings


def test_two_exporters_are_both_endpoints_with_all_sans_and_outlier_detection() -> None:
    se, dr, warnings = objects(
        config(),
        [imp("c", {"address": "203.0.113.30", "port": 15443}), imp("a", {"address": "203.0.113.10", "port": 15443})],
    )
    assert se["resolution"] == "STATIC"
    assert se["endpoints"] == [
        {"address": "203.0.113.10", "ports": {"http-9080": 15443}},
        {"address": "203.0.113.30", "ports": {"http-9080": 15443}},
    ]
    assert se["subjectAltNames"] == [INGRESS.format("a"), INGRESS.format("c")]
    policy = dr["trafficPolicy"]
    assert policy["tls"]["subjectAltNames"] == [INGRESS.format("a"), INGRESS.format("c")]
    assert policy["outlierDetection"] == {
        "consecutiveGatewayErrors": 3,
        "consecutive5xxErrors": 0,
        "interval": "5s",
        "baseEjectionTime": "30s",
        "maxEjectionPercent": 100,
    }
    assert "loadBalancer" not in policy  # equal priorities share the traffic
    assert not any("exported by" in w for w in warnings)


def test_priorities_become_ranks_and_failover_priority() -> None:
    cfg = config(a={"priority": 5}, c={"priority": 0, "locality": "eu-west1/b"}, d={"priority": 9})
    se, dr, _ = objects(
        cfg,
        [
            imp("a", {"address": "203.0.113.10", "port": 15443}),
            imp("c", {"address": "203.0.113.30", "port": 15443}),
            imp("d", {"address": "203.0.113.40", "port": 15443}),
        ],
    )
    # c (priority 0) first: rank 0 carries every rank label, d (rank 2) none
    assert se["endpoints"] == [
        {
            "address": "203.0.113.30",
            "ports": {"http-9080": 15443},
            "labels": {"meshbridge.io/rank-below-1": "true", "meshbridge.io/rank-below-2": "true"},
            "locality": "eu-west1/b",
        },
        {"address": "203.0.113.10", "ports": {"http-9080": 15443}, "labels": {"meshbridge.io/rank-below-2": "true"}},
        {"address": "203.0.113.40", "ports": {"http-9080": 15443}},
    ]
    assert dr["trafficPolicy"]["loadBalancer"] == {
        "localityLbSetting": {
            "enabled": True,
            "failoverPriority": ["meshbridge.io/rank-below-2=true", "meshbridge.io/rank-below-1=true"],
        }
    }


def _istio_priority(labels: dict[str, str], order: list[str]) -> int:
    """Istio's applyFailoverPriorityPerLocality for `key=value` entries (the proxy's labels unused)."""
    for j, entry in enumerate(order):
        key, value = entry.split("=")
        if labels.get(key) != value:
            return len(order) - j
    return 0


def test_rank_labels_give_the_envoy_priority_of_the_rank() -> None:
    cfg = config(a={"priority": 1}, c={"priority": 2}, d={"priority": 3})
    se, dr, _ = objects(cfg, [imp(c, {"address": f"203.0.113.{i}", "port": 15443}) for i, c in enumerate("acd", 1)])
    order = dr["trafficPolicy"]["loadBalancer"]["localityLbSetting"]["failoverPriority"]
    assert [_istio_priority(e.get("labels", {}), order) for e in se["endpoints"]] == [0, 1, 2]


def test_several_addresses_dns_and_ip_mixed() -> None:
    gateway = {"address": "203.0.113.10", "addresses": ["203.0.113.10", "GW2.a.example."], "port": 15443}
    se, dr, _ = objects(config(), [imp("a", gateway)])
    assert se["resolution"] == "DNS"  # one name among the addresses: STRICT_DNS resolves IPs too
    assert [e["address"] for e in se["endpoints"]] == ["203.0.113.10", "gw2.a.example"]
    assert "outlierDetection" in dr["trafficPolicy"]  # two endpoints: eject one, keep the other


def test_older_exporter_single_address_and_lone_endpoint_has_no_outlier_detection() -> None:
    se, dr, _ = objects(config(), [imp("a", {"address": "203.0.113.10", "port": 15443})])
    assert se["endpoints"] == [{"address": "203.0.113.10", "ports": {"http-9080": 15443}}]
    assert "outlierDetection" not in dr["trafficPolicy"]


def test_tcp_port_level_settings_repeat_the_failover_policy() -> None:
    ports = [(5432, "TCP"), (5433, "TCP")]
    cfg = config(a={"priority": 1})
    _, dr, _ = objects(
        cfg,
        [
            imp("a", {"address": "203.0.113.10", "port": 15443, "tcp_port": 15444}, ports),
            imp("c", {"address": "203.0.113.30", "port": 15443, "tcp_port": 16444}, ports),
        ],
    )
    policy = dr["trafficPolicy"]
    for level in policy["portLevelSettings"]:
        assert level["outlierDetection"] == policy["outlierDetection"]
        assert level["loadBalancer"] == policy["loadBalancer"]


def test_exporter_with_other_ports_is_left_out_with_a_warning() -> None:
    _, _, warnings = objects(
        config(),
        [
            imp("a", {"address": "203.0.113.10", "port": 15443}),
            imp("c", {"address": "203.0.113.30", "port": 15443}, [(80, "HTTP")]),
        ],
    )
    assert any(w.startswith("import ratings.bookinfo: c exports other ports than a") for w in warnings)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"priority": -1}, "imports[0].priority"),
        ({"priority": 16}, "imports[0].priority"),
        ({"locality": "eu/west/1/x"}, "imports[0].locality"),
        ({"locality": "eu//b"}, "imports[0].locality"),
    ],
)
def test_bad_priority_or_locality_names_the_key(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(a=rule)
    assert message in str(err.value)


def _istio(ingress: dict[str, Any]) -> AgentConfig:
    return parse_config(
        {
            "cluster": "b",
            "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/ca-root.pem"},
            "istio": {"trust_domain": "b.mesh", "ingress_gateway": ingress},
        }
    )


def test_several_ingress_addresses_are_published_with_address_first() -> None:
    cfg = _istio({"addresses": ["198.51.100.20", "gw.b.example"]})
    published = cfg.istio.published_gateway()
    assert published == {
        "address": "198.51.100.20",
        "addresses": ["198.51.100.20", "gw.b.example"],
        "port": 15443,
        "tcp_port": 15444,
    }
    PublishedGateway.model_validate(published)  # the CA service's model accepts it


def test_one_address_is_published_without_addresses_for_older_ca_services() -> None:
    assert "addresses" not in _istio({"address": "198.51.100.20"}).istio.published_gateway()


@pytest.mark.parametrize(
    ("ingress", "message"),
    [
        ({"address": "198.51.100.20", "addresses": ["198.51.100.21"]}, "either address or addresses"),
        ({"addresses": ["198.51.100.20", "198.51.100.20"]}, "198.51.100.20"),
        ({"addresses": ["not an address"]}, "istio.ingress_gateway.addresses"),
    ],
)
def test_bad_addresses_are_config_errors(ingress: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _istio(ingress)
    assert message in str(err.value)


def test_the_wire_gateway_keeps_address_the_first_of_addresses() -> None:
    with pytest.raises(ValueError, match="addresses\\[0\\] must be address"):
        PublishedGateway.model_validate({"address": "a.example", "addresses": ["b.example"], "port": 1})
