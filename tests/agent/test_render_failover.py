"""Several exporters of one name, several gateway addresses per exporter (render/failover.py)."""

from __future__ import annotations

from typing import Any

import pytest

from cluster_agent.config import AgentConfig, ConfigError, parse_config
from cluster_agent.render import render_all, to_yaml
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


# ------------------------------------------------------------------------------------------------
# Aliases (issue 13 item 5)


def _by_kind(cfg: AgentConfig, imports: list[dict[str, Any]]) -> tuple[dict[tuple[str, str], Any], Any]:
    out = render_all(cfg, imports=imports, peers=[], vips={})
    return {(o["kind"], o["metadata"]["name"]): o.get("spec") for o in out.objects}, out


def test_an_alias_is_the_local_host_and_the_exported_name_goes_on_to_the_exporter() -> None:
    cfg = config(a={"aliases": {"ratings.bookinfo": "stars.shop"}})
    tcp = [(9080, "HTTP"), (5432, "TCP"), (5433, "TCP")]
    by, out = _by_kind(cfg, [imp("a", {"address": "203.0.113.10", "port": 15443}, tcp)])
    name = "meshbridge-import-stars-shop"
    se, vs, dr = by[("ServiceEntry", name)], by[("VirtualService", name)], by[("DestinationRule", name)]
    assert se["hosts"] == ["stars.shop.remote"] and dr["host"] == "stars.shop.remote"
    assert set(out.vips) == {"stars.shop"}
    assert se["exportTo"] == ["istio-system", "shop"]  # the alias's namespace calls it
    assert vs["hosts"] == ["stars.shop.remote"]
    (onward,) = [r for r in vs["http"] if r["name"] == "egress-9080"]
    assert onward["rewrite"] == {"authority": "ratings.bookinfo.remote:9080"}
    assert onward["route"][0]["destination"]["host"] == "stars.shop.remote"
    # to the exporter: the exported name's SNIs, per TCP port too
    assert dr["trafficPolicy"]["tls"]["sni"] == "ratings.bookinfo.remote"
    assert [p["tls"]["sni"] for p in dr["trafficPolicy"]["portLevelSettings"]] == [
        "5432.ratings.bookinfo.remote",
        "5433.ratings.bookinfo.remote",
    ]
    # inside this cluster: the alias's SNIs (sidecar → egress gateway → its TLS servers)
    egress = by[("Gateway", "meshbridge-egress")]
    tls_hosts = [s["hosts"] for s in egress["servers"] if s["port"]["protocol"] == "TLS"]
    assert tls_hosts == [["istio-system/5432.stars.shop.remote"], ["istio-system/5433.stars.shop.remote"]]
    assert ("ServiceEntry", "meshbridge-import-ratings-bookinfo") not in by


def test_without_alias_the_egress_route_does_not_rewrite() -> None:
    by, _ = _by_kind(config(), [imp("a", {"address": "203.0.113.10", "port": 15443})])
    vs = by[("VirtualService", "meshbridge-import-ratings-bookinfo")]
    assert all("rewrite" not in r for r in vs["http"] if r["name"].startswith("egress-"))


def test_an_alias_taken_by_a_name_imported_through_star_is_dropped_with_a_warning() -> None:
    cfg = parse_config(
        {
            "cluster": "b",
            "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/ca-root.pem"},
            "istio": {"trust_domain": "b.mesh", "ingress_gateway": {"address": "198.51.100.20"}},
            "imports": [
                {"from": "a", "names": ["ratings.bookinfo"], "aliases": {"ratings.bookinfo": "stars.shop"}},
                {"from": "c", "names": ["*"]},
            ],
        }
    )
    other = {**imp("c", {"address": "203.0.113.30", "port": 15443}), "name": "stars.shop"}
    by, out = _by_kind(cfg, [imp("a", {"address": "203.0.113.10", "port": 15443}), other])
    assert by[("ServiceEntry", "meshbridge-import-stars-shop")]["endpoints"][0]["address"] == "203.0.113.30"
    assert by[("ServiceEntry", "meshbridge-import-ratings-bookinfo")]["hosts"] == ["ratings.bookinfo.remote"]
    assert any(
        w.startswith("imports: alias stars.shop of ratings.bookinfo is itself imported (from c)") for w in out.warnings
    )


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            {"a": {"aliases": {"ratings.bookinfo": "ratings.bookinfo"}}},
            "imports[0].aliases.ratings.bookinfo: the alias is the name itself",
        ),
        (
            {"a": {"aliases": {"details.bookinfo": "x.shop"}}},
            "imports[0].aliases.details.bookinfo: 'details.bookinfo' is not among imports[0].names",
        ),
        (
            {"a": {"aliases": {"ratings.bookinfo": "x.shop"}}, "c": {"aliases": {"ratings.bookinfo": "y.shop"}}},
            "imports[1].aliases.ratings.bookinfo: 'ratings.bookinfo' already has the alias 'x.shop'",
        ),
        (
            {
                "a": {
                    "names": ["ratings.bookinfo", "reviews.bookinfo"],
                    "aliases": {"ratings.bookinfo": "x.shop", "reviews.bookinfo": "x.shop"},
                }
            },
            "alias 'x.shop' is already the alias of 'ratings.bookinfo'",
        ),
        (
            {
                "a": {
                    "names": ["ratings.bookinfo", "reviews.bookinfo"],
                    "aliases": {"ratings.bookinfo": "reviews.bookinfo"},
                }
            },
            "alias 'reviews.bookinfo' collides with an imported name",
        ),
        ({"a": {"aliases": {"ratings.bookinfo": "not a name"}}}, "imports[0].aliases"),
    ],
)
def test_bad_aliases_are_config_errors_naming_the_key(rules: dict[str, dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(**rules)
    assert message in str(err.value)


def test_render_shows_each_imports_mode_and_exporters_with_their_priorities() -> None:
    cfg = config(a={"priority": 3, "aliases": {"ratings.bookinfo": "stars.bookinfo"}}, c={"priority": 1})
    two = {"address": "203.0.113.10", "addresses": ["203.0.113.10", "gw2.a.example"], "port": 15443}
    out = render_all(
        cfg, imports=[imp("a", two), imp("c", {"address": "203.0.113.30", "port": 15443})], peers=[], vips={}
    )
    assert out.imports == {
        "stars.bookinfo.remote": (
            "hop-by-hop (alias of ratings.bookinfo.remote): c@0 [203.0.113.30], a@1 [203.0.113.10, gw2.a.example]"
        )
    }


def test_a_priority_for_a_source_that_exports_nothing_here_is_reported() -> None:
    cfg = config(c={"names": ["*"], "priority": 2})
    _, _, warnings = objects(cfg, [imp("a", {"address": "203.0.113.10", "port": 15443})])
    assert any(
        w.startswith("imports[1].priority: c exports nothing to b, so its priority orders nothing") for w in warnings
    )
    _, _, listed = objects(config(c={"priority": 2}), [imp("a", {"address": "203.0.113.10", "port": 15443})])
    assert "imports: ratings.bookinfo from c is configured but not offered by the CA service" in " ".join(listed)


def test_rendered_yaml_has_no_anchors_shared_between_endpoints_or_ports() -> None:
    ports = [(5432, "TCP"), (5433, "TCP")]
    two = {"address": "203.0.113.10", "addresses": ["203.0.113.10", "203.0.113.11"], "port": 15443}
    out = render_all(config(a={"priority": 1}), imports=[imp("a", two, ports), imp("c", two, ports)], peers=[], vips={})
    text = "".join(to_yaml(o) for o in out.objects)
    assert "&id" not in text and "*id" not in text
