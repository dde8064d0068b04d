"""Istio objects: the hop-by-hop shape, policies, selection of imports, naming, schemas, speed."""

from __future__ import annotations

import copy
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster_agent.config import AgentConfig, parse_config
from cluster_agent.render import file_name, render_all, to_yaml
from cluster_agent.render.inputs import parse_imports
from cluster_agent.render.objects import object_names

CRDS = Path(__file__).resolve().parents[1] / "data" / "istio-crds-1.30.3.yaml"
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

INGRESS_A = "spiffe://a.mesh/ns/istio-system/sa/istio-ingressgateway-service-account"
INGRESS_C = "spiffe://c.mesh/ns/istio-system/sa/istio-ingressgateway-service-account"
EGRESS_A = "spiffe://a.mesh/ns/istio-system/sa/istio-egressgateway-service-account"


def config_dict() -> dict[str, Any]:
    return {
        "cluster": "b",
        "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/ca-root.pem"},
        "istio": {"trust_domain": "b.mesh", "ingress_gateway": {"address": "198.51.100.20", "port": 15443}},
        "dns": {"suffix": "remote", "mode": "coredns"},
        "exports": [
            {"service": "ratings", "namespace": "bookinfo", "ports": [9080], "consumers": ["a"]},
            {
                "service": "api",
                "namespace": "shop",
                "ports": [80, {"number": 9090, "protocol": "GRPC"}],
                "consumers": ["a", "c", "d"],
            },
        ],
        "imports": [
            {"from": "a", "names": ["*"]},
            {
                "from": "c",
                "names": ["reviews.bookinfo", "missing.bookinfo"],
                "egress_gateway": {
                    "selector": {"istio": "egress-to-c"},
                    "service": "egress-to-c",
                    "service_account": "istio-egressgateway-service-account",
                },
            },
        ],
    }


def config(**changes: Any) -> AgentConfig:
    data = config_dict()
    for path, value in changes.items():
        node = data
        keys = path.split("__")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return parse_config(data)


def imp(
    name: str, cluster: str, ports: list[tuple[int, str]], address: str = "203.0.113.10", identity: str = INGRESS_A
) -> dict[str, Any]:
    return {
        "name": name,
        "cluster": cluster,
        "ports": [{"number": n, "protocol": p} for n, p in ports],
        "gateway": {"address": address, "port": 15443},
        "identity": identity,
    }


IMPORTS = [
    imp("details.bookinfo", "a", [(9080, "HTTP")]),
    imp(
        "reviews.bookinfo",
        "c",
        [(9080, "HTTP"), (80, "HTTP2"), (5432, "TCP")],
        address="gw.c.example",
        identity=INGRESS_C,
    ),
    imp(
        "reviews.bookinfo", "a", [(9080, "HTTP")]
    ),  # the same name from a second cluster with other ports: c is left out
    imp("ignored.bookinfo", "e", [(80, "HTTP")]),  # e is not configured as a source
]
PEERS = [
    {"name": "a", "trust_domain": "a.mesh", "identities": {"ingress": INGRESS_A, "egress": EGRESS_A}},
    {
        "name": "c",
        "trust_domain": "a.mesh",
        "identities": {"ingress": INGRESS_C, "egress": ["spiffe://a.mesh/ns/istio-system/sa/other-egress"]},
    },
]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.fixture(scope="module")
def result() -> Any:
    return render_all(config(), imports=IMPORTS, peers=PEERS, vips={"details.bookinfo": "241.0.0.2"})


# ------------------------------------------------------------------------------------------------
# Every object


def test_every_object_is_labelled_named_and_placed(result: Any) -> None:
    for obj in result.objects:
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "meshbridge", obj
        assert meta["labels"]["meshbridge.io/cluster"] == "b"
        assert DNS1123_SUBDOMAIN.fullmatch(meta["name"]) and len(meta["name"]) <= 253
        expected_ns = "kube-system" if obj["kind"] == "ConfigMap" and "coredns" in meta["name"] else "istio-system"
        assert meta["namespace"] == expected_ns
        assert file_name(obj) == f"{obj['kind'].lower()}-{meta['namespace']}-{meta['name']}.yaml"


def test_output_is_sorted_unique_and_has_no_yaml_aliases(result: Any) -> None:
    keys = [(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in result.objects]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for obj in result.objects:
        text = yaml.safe_dump(obj, sort_keys=True)
        assert "&id" not in text and "*id" not in text
        assert yaml.safe_load(to_yaml(obj)) == obj


def test_rendering_is_deterministic_whatever_the_input_order() -> None:
    first = render_all(config(), imports=IMPORTS, peers=PEERS, vips={})
    shuffled_imports, shuffled_peers = IMPORTS[:], PEERS[:]
    random.Random(7).shuffle(shuffled_imports)
    shuffled_peers.reverse()
    second = render_all(config(), imports=shuffled_imports, peers=shuffled_peers, vips={})
    assert [to_yaml(o) for o in first.objects] == [to_yaml(o) for o in second.objects]
    assert first.warnings == second.warnings


# ------------------------------------------------------------------------------------------------
# Exporting side


def test_one_ingress_gateway_lists_only_exported_hosts(result: Any) -> None:
    gateways = by_kind(result.objects, "Gateway")
    ingress = gateways["meshbridge-ingress"]["spec"]
    assert ingress["selector"] == {"istio": "ingressgateway"}
    (server,) = ingress["servers"]
    assert server["port"] == {"number": 15443, "name": "https-meshbridge", "protocol": "HTTPS"}
    assert server["tls"] == {"mode": "ISTIO_MUTUAL"}
    assert server["hosts"] == ["istio-system/api.shop.remote", "istio-system/ratings.bookinfo.remote"]


def test_export_virtual_service_routes_each_port_by_authority(result: Any) -> None:
    services = by_kind(result.objects, "VirtualService")
    single = services["meshbridge-export-ratings-bookinfo"]["spec"]
    assert single["gateways"] == ["istio-system/meshbridge-ingress"]
    assert single["hosts"] == ["ratings.bookinfo.remote"]
    assert single["http"] == [
        {
            "name": "port-9080",
            "rewrite": {"authority": "ratings.bookinfo.svc.cluster.local:9080"},
            "route": [{"destination": {"host": "ratings.bookinfo.svc.cluster.local", "port": {"number": 9080}}}],
        }
    ]
    multi = services["meshbridge-export-api-shop"]["spec"]["http"]
    assert [r["match"] for r in multi] == [
        [{"authority": {"exact": "api.shop.remote:80"}}, {"authority": {"exact": "api.shop.remote"}}],
        [{"authority": {"exact": "api.shop.remote:9090"}}],
    ]
    assert [r["route"][0]["destination"]["port"]["number"] for r in multi] == [80, 9090]


def test_export_routes_rewrite_the_authority_to_the_destination_service(result: Any) -> None:
    """Issue 11 item 11: the destination saw `<name>.remote:<port>`, a Host it does not serve; now the
    Host an in-cluster client sends (no `:80` for the default port)."""
    multi = by_kind(result.objects, "VirtualService")["meshbridge-export-api-shop"]["spec"]["http"]
    assert [r["rewrite"] for r in multi] == [
        {"authority": "api.shop.svc.cluster.local"},
        {"authority": "api.shop.svc.cluster.local:9090"},
    ]


def test_only_the_exporters_ingress_route_retries(result: Any) -> None:
    """Issue 11 item 11: Istio's default retry policy (2 retries) applied on all three hops, up to 27
    attempts; the importer's sidecar and egress routes now disable it (`attempts: 0`)."""
    services = by_kind(result.objects, "VirtualService")
    imported = [
        r
        for o in services.values()
        if o["metadata"]["labels"]["meshbridge.io/component"] == "import"
        for r in o["spec"].get("http", [])
    ]
    exported = [
        r
        for o in services.values()
        if o["metadata"]["labels"]["meshbridge.io/component"] == "export"
        for r in o["spec"].get("http", [])
    ]
    assert len(imported) >= 4 and len(exported) >= 3
    assert all(r["retries"] == {"attempts": 0} for r in imported)
    assert not any("retries" in r for r in exported)  # Istio's default, once


def test_deny_policy_admits_only_published_consumers(result: Any) -> None:
    policies = by_kind(result.objects, "AuthorizationPolicy")
    ratings = policies["meshbridge-export-ratings-bookinfo"]
    assert ratings["apiVersion"] == "security.istio.io/v1"
    assert ratings["spec"] == {
        "selector": {"matchLabels": {"istio": "ingressgateway"}},
        "action": "DENY",
        "rules": [
            {
                "from": [
                    {"source": {"notPrincipals": ["a.mesh/ns/istio-system/sa/istio-egressgateway-service-account"]}}
                ],
                "to": [
                    {
                        "operation": {
                            "ports": ["15443"],
                            "hosts": ["ratings.bookinfo.remote", "ratings.bookinfo.remote:*"],
                        }
                    }
                ],
            }
        ],
    }
    api = policies["meshbridge-export-api-shop"]["spec"]["rules"][0]["from"][0]["source"]["notPrincipals"]
    assert api == [
        "a.mesh/ns/istio-system/sa/istio-egressgateway-service-account",
        "a.mesh/ns/istio-system/sa/other-egress",
    ]
    assert not any(p.startswith("spiffe://") for p in api)


def test_unpublished_consumers_and_shared_trust_domains_warn(result: Any) -> None:
    assert (
        "consumer d has not published its egress identity yet; left out of the policy for api.shop" in result.warnings
    )
    assert any(w.startswith("consumers a, c share the trust domain a.mesh") for w in result.warnings)


def test_export_without_any_published_consumer_is_denied_to_everyone() -> None:
    out = render_all(config(), imports=[], peers=[], vips={})
    spec = by_kind(out.objects, "AuthorizationPolicy")["meshbridge-export-ratings-bookinfo"]["spec"]
    assert spec["action"] == "DENY"
    assert spec["rules"] == [
        {"to": [{"operation": {"ports": ["15443"], "hosts": ["ratings.bookinfo.remote", "ratings.bookinfo.remote:*"]}}]}
    ]


def test_allow_mode() -> None:
    out = render_all(config(istio__authorization_mode="allow"), imports=[], peers=PEERS[:1], vips={})
    policies = by_kind(out.objects, "AuthorizationPolicy")
    assert policies["meshbridge-export-ratings-bookinfo"]["spec"] == {
        "selector": {"matchLabels": {"istio": "ingressgateway"}},
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"source": {"principals": ["a.mesh/ns/istio-system/sa/istio-egressgateway-service-account"]}}],
                "to": [
                    {
                        "operation": {
                            "ports": ["15443"],
                            "hosts": ["ratings.bookinfo.remote", "ratings.bookinfo.remote:*"],
                        }
                    }
                ],
            }
        ],
    }
    unpublished = render_all(config(istio__authorization_mode="allow"), imports=[], peers=[], vips={})
    spec = by_kind(unpublished.objects, "AuthorizationPolicy")["meshbridge-export-ratings-bookinfo"]["spec"]
    assert "rules" not in spec  # ALLOW without rules admits nobody


def test_published_exports_replace_the_config_ones() -> None:
    published = [
        {
            "name": "web.front",
            "namespace": "front",
            "service": "web",
            "ports": [{"number": 8080, "protocol": "HTTP"}, {"number": 5432, "protocol": "TCP"}],
            "consumers": ["a"],
        }
    ]
    out = render_all(config(), imports=[], peers=PEERS, vips={}, exports=published)
    assert set(by_kind(out.objects, "VirtualService")) == {"meshbridge-export-web-front"}
    spec = by_kind(out.objects, "VirtualService")["meshbridge-export-web-front"]["spec"]
    assert [r["route"][0]["destination"]["port"]["number"] for r in spec["http"]] == [8080]
    assert spec["tcp"] == [
        {
            "match": [{"port": 15444}],
            "route": [{"destination": {"host": "web.front.svc.cluster.local", "port": {"number": 5432}}}],
        }
    ]
    assert not any("5432" in w for w in out.warnings)


def test_no_exports_no_ingress_objects() -> None:
    out = render_all(config(exports=[]), imports=[], peers=[], vips={})
    assert "meshbridge-ingress" not in by_kind(out.objects, "Gateway")
    assert by_kind(out.objects, "AuthorizationPolicy") == {}


# ------------------------------------------------------------------------------------------------
# Importing side


def test_only_configured_imports_are_rendered(result: Any) -> None:
    entries = by_kind(result.objects, "ServiceEntry")
    assert set(entries) == {"meshbridge-import-details-bookinfo", "meshbridge-import-reviews-bookinfo"}
    assert (
        "imports: missing.bookinfo from c is configured but not offered by the CA service (not exported to b, "
        "or c has not published)" in result.warnings
    )
    # c publishes other ports for reviews.bookinfo than a (preferred: same priority, sorts first)
    assert any(
        w.startswith("import reviews.bookinfo: c exports other ports than a (the preferred exporter)")
        for w in result.warnings
    )
    assert result.vips["details.bookinfo"] == "241.0.0.2"
    assert set(result.vips) == {"details.bookinfo", "reviews.bookinfo"}


def test_service_entry(result: Any) -> None:
    entry = by_kind(result.objects, "ServiceEntry")["meshbridge-import-details-bookinfo"]
    assert entry["metadata"]["labels"]["meshbridge.io/source-cluster"] == "a"
    assert entry["spec"] == {
        "hosts": ["details.bookinfo.remote"],
        "addresses": ["241.0.0.2"],
        "exportTo": ["bookinfo", "istio-system"],
        "location": "MESH_EXTERNAL",
        "resolution": "STATIC",
        "ports": [{"number": 9080, "name": "http-9080", "protocol": "HTTP"}],
        "endpoints": [{"address": "203.0.113.10", "ports": {"http-9080": 15443}}],
        "subjectAltNames": [INGRESS_A],
    }


def test_hostname_gateway_resolves_by_dns_and_tcp_ports_reach_the_tcp_port() -> None:
    out = render_all(config(), imports=[IMPORTS[1]], peers=[], vips={})
    spec = by_kind(out.objects, "ServiceEntry")["meshbridge-import-reviews-bookinfo"]["spec"]
    assert spec["resolution"] == "DNS"
    assert [p["name"] for p in spec["ports"]] == ["http2-80", "tcp-5432", "http-9080"]
    assert spec["endpoints"] == [
        {"address": "gw.c.example", "ports": {"http2-80": 15443, "tcp-5432": 15444, "http-9080": 15443}}
    ]
    assert not any("5432" in w for w in out.warnings)


def test_import_virtual_service_hops_through_the_egress_gateway(result: Any) -> None:
    spec = by_kind(result.objects, "VirtualService")["meshbridge-import-details-bookinfo"]["spec"]
    assert spec["hosts"] == ["details.bookinfo.remote"]
    assert spec["gateways"] == ["mesh", "istio-system/meshbridge-egress"]
    mesh, egress = spec["http"]
    assert mesh["match"] == [{"gateways": ["mesh"], "port": 9080}]
    assert mesh["rewrite"] == {"authority": "details.bookinfo.remote:9080"}
    assert mesh["route"] == [
        {
            "destination": {
                "host": "istio-egressgateway.istio-system.svc.cluster.local",
                "subset": "meshbridge",
                "port": {"number": 443},
            }
        }
    ]
    assert egress["match"] == [{"gateways": ["istio-system/meshbridge-egress"]}]
    assert egress["route"] == [{"destination": {"host": "details.bookinfo.remote", "port": {"number": 9080}}}]


def test_multi_port_import_routes_on_the_authority_at_the_egress() -> None:
    out = render_all(config(), imports=[imp("api.shop", "a", [(80, "HTTP"), (9090, "GRPC")])], peers=[], vips={})
    spec = by_kind(out.objects, "VirtualService")["meshbridge-import-api-shop"]["spec"]
    gw = "istio-system/meshbridge-egress"
    assert [r["match"] for r in spec["http"]] == [
        [{"gateways": ["mesh"], "port": 80}],
        [{"gateways": ["mesh"], "port": 9090}],
        [
            {"authority": {"exact": "api.shop.remote:80"}, "gateways": [gw]},
            {"authority": {"exact": "api.shop.remote"}, "gateways": [gw]},
        ],
        [{"authority": {"exact": "api.shop.remote:9090"}, "gateways": [gw]}],
    ]
    assert [r.get("rewrite") for r in spec["http"][:2]] == [
        {"authority": "api.shop.remote:80"},
        {"authority": "api.shop.remote:9090"},
    ]


def test_import_destination_rule_per_api(result: Any) -> None:
    rules = by_kind(result.objects, "DestinationRule")
    assert rules["meshbridge-import-details-bookinfo"]["spec"] == {
        "host": "details.bookinfo.remote",
        "exportTo": ["bookinfo", "istio-system"],
        "trafficPolicy": {
            "tls": {"mode": "ISTIO_MUTUAL", "sni": "details.bookinfo.remote", "subjectAltNames": [INGRESS_A]}
        },
    }


def test_egress_gateway_and_its_destination_rule(result: Any) -> None:
    gateway = by_kind(result.objects, "Gateway")["meshbridge-egress"]["spec"]
    assert gateway["selector"] == {"istio": "egressgateway"}
    (server,) = gateway["servers"]
    assert server["port"] == {"number": 443, "name": "https-meshbridge", "protocol": "HTTPS"}
    assert server["tls"] == {"mode": "ISTIO_MUTUAL"}
    # reviews.bookinfo comes from a (the first of the two exporters), so it uses the default gateway too
    assert server["hosts"] == [
        "istio-system/details.bookinfo.remote",
        "istio-system/meshbridge-egress.remote",
        "istio-system/reviews.bookinfo.remote",
    ]
    rule = by_kind(result.objects, "DestinationRule")["meshbridge-egress"]["spec"]
    assert rule["host"] == "istio-egressgateway.istio-system.svc.cluster.local"
    assert "trafficPolicy" not in rule  # other users of the egress gateway keep auto mTLS
    assert rule["subsets"] == [
        {
            "name": "meshbridge",
            "trafficPolicy": {
                "tls": {"mode": "ISTIO_MUTUAL", "sni": "meshbridge-egress.remote"},
                "connectionPool": {"http": {"useClientProtocol": True}},
            },
        }
    ]


def test_dedicated_egress_gateway_per_source() -> None:
    out = render_all(config(), imports=[IMPORTS[1]], peers=[], vips={})
    gateways = by_kind(out.objects, "Gateway")
    assert set(gateways) == {"meshbridge-egress-egress-to-c", "meshbridge-ingress"}
    assert gateways["meshbridge-egress-egress-to-c"]["spec"]["selector"] == {"istio": "egress-to-c"}
    vs = by_kind(out.objects, "VirtualService")["meshbridge-import-reviews-bookinfo"]["spec"]
    assert vs["gateways"] == ["mesh", "istio-system/meshbridge-egress-egress-to-c"]
    assert vs["http"][0]["route"][0]["destination"]["host"] == "egress-to-c.istio-system.svc.cluster.local"
    assert (
        by_kind(out.objects, "DestinationRule")["meshbridge-egress-egress-to-c"]["spec"]["host"]
        == "egress-to-c.istio-system.svc.cluster.local"
    )


@pytest.mark.parametrize(
    ("change", "warning"),
    [
        ({"name": "Bad_Name"}, "malformed name or cluster"),
        ({"cluster": "A"}, "malformed name or cluster"),
        ({"identity": "a.mesh/ns/istio-system/sa/x"}, "is not a spiffe:// URI"),
        ({"identity": None}, "is not a spiffe:// URI"),
        ({"identity": "spiffe://a.mesh/*"}, "is not a spiffe:// URI of one workload"),
        ({"identity": "spiffe://a.mesh/ns/istio-system/sa/x/y"}, "is not a spiffe:// URI of one workload"),
        ({"gateway": {"address": "not an address!", "port": 15443}}, "no usable gateway address"),
        ({"gateway": {"address": "203.0.113.1", "port": 0}}, "no usable gateway address"),
        ({"ports": []}, "no ports"),
        ({"ports": [{"number": 5432, "protocol": "UDP"}]}, "speaks UDP"),
        ({"ports": [{"number": "80"}]}, "is not {number, protocol}"),
    ],
)
def test_bad_imports_are_left_out_with_a_warning(change: dict[str, Any], warning: str) -> None:
    bad = {**imp("details.bookinfo", "a", [(9080, "HTTP")]), **change}
    good = imp("ratings.bookinfo", "a", [(9080, "HTTP")])
    out = render_all(config(), imports=[bad, good], peers=[], vips={})
    assert set(by_kind(out.objects, "ServiceEntry")) == {"meshbridge-import-ratings-bookinfo"}
    assert any(warning in w for w in out.warnings), out.warnings


def test_imports_parse_dedupes_ports_and_protocol_spelling() -> None:
    specs, warnings = parse_imports([imp("a.b", "a", [(80, "http"), (80, "HTTP2"), (81, "grpc-web")])])
    assert warnings == []
    assert [(p.number, p.protocol, p.name) for p in specs[0].ports] == [
        (80, "HTTP", "http-80"),
        (81, "GRPC-Web", "grpc-web-81"),
    ]


def test_egress_gateway_in_another_namespace_and_other_cluster_domain() -> None:
    data = config_dict()
    data["istio"]["egress_gateway"] = {
        "selector": {"istio": "egress"},
        "service": "egress",
        "namespace": "istio-egress",
        "service_account": "egress",
        "port": 8443,
    }
    data["istio"]["cluster_domain"] = "corp.local"
    out = render_all(parse_config(data), imports=IMPORTS[:1], peers=[], vips={})
    vs = by_kind(out.objects, "VirtualService")["meshbridge-import-details-bookinfo"]["spec"]
    assert vs["http"][0]["route"][0]["destination"] == {
        "host": "egress.istio-egress.svc.corp.local",
        "subset": "meshbridge",
        "port": {"number": 8443},
    }
    assert by_kind(out.objects, "Gateway")["meshbridge-egress"]["spec"]["servers"][0]["port"]["number"] == 8443
    export_vs = by_kind(out.objects, "VirtualService")["meshbridge-export-ratings-bookinfo"]["spec"]
    assert export_vs["http"][0]["route"][0]["destination"]["host"] == "ratings.bookinfo.svc.corp.local"


@pytest.mark.parametrize("mode", ["istio", "none"])
def test_dns_modes_istio_and_none_render_no_coredns_objects(mode: str) -> None:
    data = config_dict()
    del data["dns"]["mode"]
    if mode == "none":
        data["dns"]["mode"] = "none"
    cfg = parse_config(data)
    assert cfg.dns.mode == mode  # istio is the default
    out = render_all(cfg, imports=IMPORTS, peers=[], vips={})
    assert not [o for o in out.objects if o["metadata"]["namespace"] == "kube-system"]
    assert out.server_block is None
    assert by_kind(out.objects, "ConfigMap")["meshbridge-state"]["data"]["vips"]
    # the sidecars' DNS proxy answers from the ServiceEntry's own addresses (name_table.go BuildNameTable)
    entry = by_kind(out.objects, "ServiceEntry")["meshbridge-import-details-bookinfo"]["spec"]
    # the DNS proxy answers for the ServiceEntries the sidecar sees (pkg/dns/server/name_table.go
    # BuildNameTable walks the SidecarScope's services): those of the namespaces it is exported to
    assert entry["addresses"] == [out.vips["details.bookinfo"]] and entry["exportTo"] == ["bookinfo", "istio-system"]


# ------------------------------------------------------------------------------------------------
# Names


def test_object_names_are_readable_unique_and_valid() -> None:
    keys = ["a-b.c", "a.b-c", "ratings.bookinfo", "x" * 63 + "." + "y" * 63]
    names = object_names(keys, prefix="meshbridge-import")
    assert names["ratings.bookinfo"] == "meshbridge-import-ratings-bookinfo"
    assert len(set(names.values())) == len(keys)
    assert names["a-b.c"] != names["a.b-c"] and names["a-b.c"].startswith("meshbridge-import-a-b-c-")
    short = object_names(keys, prefix="meshbridge-import", max_len=63)
    for name in short.values():
        assert DNS1123_LABEL.fullmatch(name) and len(name) <= 63
    assert object_names(keys, prefix="p") == object_names(list(reversed(keys)), prefix="p")


# ------------------------------------------------------------------------------------------------
# Istio's own schemas (structural part; the CEL rules need a real kube-apiserver)


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validators() -> dict[str, Any]:
    import jsonschema_rs  # a dependency of schemathesis (the test extra): missing means a broken venv, not a skip

    path = CRDS
    validators = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for doc in yaml.load_all(path.read_text(), Loader=loader):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
        for version in doc["spec"]["versions"]:
            if version["name"] == "v1":
                spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
                validators[f"{group}/v1/{kind}"] = jsonschema_rs.Draft4Validator(_strict(spec_schema))
    return validators


def test_objects_match_istio_1_30_crd_schemas() -> None:
    validators = _crd_validators()
    data = config_dict()
    data["istio"]["authorization_mode"] = "allow"
    objects = render_all(config(), imports=IMPORTS, peers=PEERS, vips={}).objects
    objects += render_all(parse_config(data), imports=IMPORTS, peers=PEERS, vips={}).objects
    checked = 0
    for obj in objects:
        key = f"{obj['apiVersion']}/{obj['kind']}"
        if obj["apiVersion"] == "v1":
            continue
        assert key in validators, key
        errors = [f"{e.instance_path}: {e.message}" for e in validators[key].iter_errors(obj["spec"])]
        assert errors == [], (obj["metadata"]["name"], errors)
        checked += 1
    assert checked >= 10


def test_objects_satisfy_the_crd_cel_rules_that_concern_them(result: Any) -> None:
    port_name = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")
    for entry in by_kind(result.objects, "ServiceEntry").values():
        spec = entry["spec"]
        numbers = [p["number"] for p in spec["ports"]]
        assert len(numbers) == len(set(numbers))
        assert "*" not in spec["hosts"]
        for endpoint in spec["endpoints"]:
            assert all(len(k) < 63 and port_name.match(k) for k in endpoint["ports"])
            assert all(0 < v <= 65535 for v in endpoint["ports"].values())
        assert len(spec["endpoints"]) <= 4096 and len(spec["ports"]) <= 256
    for policy in by_kind(result.objects, "AuthorizationPolicy").values():
        assert len(policy["spec"].get("rules", [])) <= 512
        assert all("*" not in k and "*" not in v for k, v in policy["spec"]["selector"]["matchLabels"].items())


# ------------------------------------------------------------------------------------------------
# Speed: 5,000 imports from 50 clusters in under a second


def _fleet(imports: int = 5000, clusters: int = 50) -> tuple[AgentConfig, list[dict[str, Any]], list[dict[str, Any]]]:
    sources = [f"c{i:02d}" for i in range(clusters)]
    data = copy.deepcopy(config_dict())
    data["dns"]["vip_range"] = "240.0.0.0/12"
    data["imports"] = [{"from": s, "names": ["*"]} for s in sources]
    data["exports"] = [
        {"service": f"svc{i}", "namespace": "shop", "ports": [8080], "consumers": sources} for i in range(200)
    ]
    fleet = [
        imp(
            f"svc{i}.ns{c}",
            source,
            [(8080, "HTTP"), (9090, "GRPC")],
            address=f"203.0.113.{c + 1}",
            identity=f"spiffe://{source}.mesh/ns/istio-system/sa/istio-ingressgateway-service-account",
        )
        for c, source in enumerate(sources)
        for i in range(imports // clusters)
    ]
    peers = [
        {
            "name": s,
            "trust_domain": f"{s}.mesh",
            "identities": {"egress": f"spiffe://{s}.mesh/ns/istio-system/sa/istio-egressgateway-service-account"},
        }
        for s in sources
    ]
    return parse_config(data), fleet, peers


def test_five_thousand_imports_render_in_under_a_second() -> None:
    cfg, fleet, peers = _fleet()
    best = float("inf")
    previous: dict[str, str] = {}
    for _ in range(3):
        start = time.process_time()
        out = render_all(cfg, imports=fleet, peers=peers, vips=previous)
        best = min(best, time.process_time() - start)
        previous = out.vips
    assert len(out.vips) == 5000
    assert len(by_kind(out.objects, "ServiceEntry")) == 5000
    assert best < 1.0, f"render_all took {best:.2f} s of CPU"


# ------------------------------------------------------------------------------------------------
# Plain TCP, hop by hop (ISTIO-NOTES: a distinct address per imported service)

TCP_IMPORT = imp("mongodb.bookinfo", "a", [(27017, "TCP")])
TCP_EXPORT = {
    "service": "mongodb",
    "namespace": "bookinfo",
    "ports": [{"number": 27017, "protocol": "TCP"}],
    "consumers": ["a"],
}


def tcp_config(**changes: Any) -> AgentConfig:
    data = config_dict()
    data["exports"].append(TCP_EXPORT)
    for key, value in changes.items():
        data["istio"][key] = value
    return parse_config(data)


@pytest.fixture(scope="module")
def tcp_result() -> Any:
    return render_all(
        tcp_config(),
        imports=[IMPORTS[0], TCP_IMPORT],
        peers=PEERS,
        vips={"details.bookinfo": "241.0.0.2", "mongodb.bookinfo": "241.0.0.3"},
    )


def test_tcp_import_keeps_its_own_vip_and_reaches_the_tcp_port(tcp_result: Any) -> None:
    spec = by_kind(tcp_result.objects, "ServiceEntry")["meshbridge-import-mongodb-bookinfo"]["spec"]
    assert spec["addresses"] == ["241.0.0.3"]
    assert spec["ports"] == [{"number": 27017, "name": "tcp-27017", "protocol": "TCP"}]
    assert spec["endpoints"] == [{"address": "203.0.113.10", "ports": {"tcp-27017": 15444}}]
    again = render_all(tcp_config(), imports=[TCP_IMPORT], peers=PEERS, vips=tcp_result.vips)
    assert again.vips["mongodb.bookinfo"] == "241.0.0.3"


def test_tcp_import_routes_mesh_to_egress_and_egress_to_remote(tcp_result: Any) -> None:
    spec = by_kind(tcp_result.objects, "VirtualService")["meshbridge-import-mongodb-bookinfo"]["spec"]
    assert "http" not in spec
    assert spec["gateways"] == ["mesh", "istio-system/meshbridge-egress"]
    assert spec["tcp"] == [
        {
            "match": [{"gateways": ["mesh"], "port": 27017}],
            "route": [
                {
                    "destination": {
                        "host": "istio-egressgateway.istio-system.svc.cluster.local",
                        "subset": "tcp-mongodb-bookinfo-remote",
                        "port": {"number": 15444},
                    }
                }
            ],
        },
        {
            "match": [{"gateways": ["istio-system/meshbridge-egress"], "port": 15444}],
            "route": [{"destination": {"host": "mongodb.bookinfo.remote", "port": {"number": 27017}}}],
        },
    ]
    dr = by_kind(tcp_result.objects, "DestinationRule")["meshbridge-import-mongodb-bookinfo"]["spec"]
    assert dr["trafficPolicy"]["tls"] == {
        "mode": "ISTIO_MUTUAL",
        "sni": "mongodb.bookinfo.remote",
        "subjectAltNames": [INGRESS_A],
    }


def test_tcp_import_has_its_own_egress_server_and_subset(tcp_result: Any) -> None:
    gw = by_kind(tcp_result.objects, "Gateway")["meshbridge-egress"]["spec"]
    https, tls = gw["servers"]
    assert https["port"]["protocol"] == "HTTPS" and "istio-system/mongodb.bookinfo.remote" not in https["hosts"]
    assert tls == {
        "name": "tcp-mongodb-bookinfo-remote",
        "port": {"number": 15444, "name": "tls-tcp-mongodb-bookinfo-remote", "protocol": "TLS"},
        "hosts": ["istio-system/mongodb.bookinfo.remote"],
        "tls": {"mode": "ISTIO_MUTUAL"},
    }
    subsets = by_kind(tcp_result.objects, "DestinationRule")["meshbridge-egress"]["spec"]["subsets"]
    assert subsets[1] == {
        "name": "tcp-mongodb-bookinfo-remote",
        "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL", "sni": "mongodb.bookinfo.remote"}},
    }


def test_tcp_export_has_its_own_ingress_server_route_and_policy(tcp_result: Any) -> None:
    servers = by_kind(tcp_result.objects, "Gateway")["meshbridge-ingress"]["spec"]["servers"]
    assert [s["port"]["protocol"] for s in servers] == ["HTTPS", "TLS"]
    assert "istio-system/mongodb.bookinfo.remote" not in servers[0]["hosts"]
    assert servers[1]["port"]["number"] == 15444 and servers[1]["hosts"] == ["istio-system/mongodb.bookinfo.remote"]
    assert servers[1]["tls"] == {"mode": "ISTIO_MUTUAL"}
    vs = by_kind(tcp_result.objects, "VirtualService")["meshbridge-export-mongodb-bookinfo"]["spec"]
    assert vs["gateways"] == ["istio-system/meshbridge-ingress"] and "http" not in vs
    assert vs["tcp"] == [
        {
            "match": [{"port": 15444}],
            "route": [{"destination": {"host": "mongodb.bookinfo.svc.cluster.local", "port": {"number": 27017}}}],
        }
    ]
    policies = by_kind(tcp_result.objects, "AuthorizationPolicy")
    assert policies["meshbridge-export-mongodb-bookinfo"]["spec"]["rules"] == [
        {
            "to": [{"operation": {"ports": ["15444"]}}],
            "when": [{"key": "connection.sni", "values": ["mongodb.bookinfo.remote"]}],
            "from": [{"source": {"notPrincipals": [EGRESS_A[len("spiffe://") :]]}}],
        }
    ]
    # HTTP rules hold to the HTTP port: Istio drops `hosts` from DENY rules on TCP chains.
    http_rule = policies["meshbridge-export-ratings-bookinfo"]["spec"]["rules"][0]
    assert http_rule["to"][0]["operation"] == {
        "ports": ["15443"],
        "hosts": ["ratings.bookinfo.remote", "ratings.bookinfo.remote:*"],
    }


def test_tcp_export_allow_mode_and_custom_port() -> None:
    out = render_all(
        tcp_config(authorization_mode="allow", cross_cluster_tcp_port=16000), imports=[], peers=PEERS, vips={}
    )
    spec = by_kind(out.objects, "AuthorizationPolicy")["meshbridge-export-mongodb-bookinfo"]["spec"]
    assert spec["action"] == "ALLOW"
    assert spec["rules"] == [
        {
            "from": [{"source": {"principals": [EGRESS_A[len("spiffe://") :]]}}],
            "to": [{"operation": {"ports": ["16000"]}}],
            "when": [{"key": "connection.sni", "values": ["mongodb.bookinfo.remote"]}],
        }
    ]
    servers = by_kind(out.objects, "Gateway")["meshbridge-ingress"]["spec"]["servers"]
    assert servers[1]["port"]["number"] == 16000


def test_several_tcp_ports_per_name_are_kept() -> None:
    specs, warnings = parse_imports([imp("a.b", "a", [(5432, "TCP"), (5433, "TCP"), (80, "HTTP")])])
    assert [(p.number, p.protocol) for p in specs[0].ports] == [(80, "HTTP"), (5432, "TCP"), (5433, "TCP")]
    assert warnings == []


MULTI_TCP_IMPORT = {
    **imp("pg.data", "a", [(80, "HTTP"), (5432, "TCP"), (5433, "TCP")]),
    "gateway": {"address": "203.0.113.10", "port": 15443, "tcp_port": 31444},
}
MULTI_TCP_EXPORT = {
    "service": "pg",
    "namespace": "data",
    "ports": [80, {"number": 5432, "protocol": "TCP"}, {"number": 5433, "protocol": "TCP"}],
    "consumers": ["a"],
}


@pytest.fixture(scope="module")
def multi_tcp() -> Any:
    data = config_dict()
    data["exports"] = [MULTI_TCP_EXPORT]
    return render_all(parse_config(data), imports=[MULTI_TCP_IMPORT], peers=PEERS, vips={"pg.data": "240.240.0.9"})


def test_each_tcp_port_has_its_own_sni_server_and_route_at_the_ingress(multi_tcp: Any) -> None:
    """Issue 11 item 11: several TCP ports per name, each on the SNI `<port>.<host>` (before: one TCP
    port per name, its SNI the host)."""
    servers = by_kind(multi_tcp.objects, "Gateway")["meshbridge-ingress"]["spec"]["servers"]
    assert [(s["port"]["number"], s["hosts"]) for s in servers] == [
        (15443, ["istio-system/pg.data.remote"]),
        (15444, ["istio-system/5432.pg.data.remote"]),
        (15444, ["istio-system/5433.pg.data.remote"]),
    ]
    services = by_kind(multi_tcp.objects, "VirtualService")
    main = services["meshbridge-export-pg-data"]["spec"]
    assert "tcp" not in main and [r["name"] for r in main["http"]] == ["port-80"]
    for port in (5432, 5433):
        assert services[f"meshbridge-export-pg-data-tcp-{port}"]["spec"] == {
            "hosts": [f"{port}.pg.data.remote"],
            "gateways": ["istio-system/meshbridge-ingress"],
            "exportTo": ["*"],
            "tcp": [
                {
                    "match": [{"port": 15444}],
                    "route": [{"destination": {"host": "pg.data.svc.cluster.local", "port": {"number": port}}}],
                }
            ],
        }
    policy = by_kind(multi_tcp.objects, "AuthorizationPolicy")["meshbridge-export-pg-data"]["spec"]
    (when,) = [r["when"] for r in policy["rules"] if "when" in r]
    assert when == [{"key": "connection.sni", "values": ["5432.pg.data.remote", "5433.pg.data.remote"]}]


def test_a_name_with_only_several_tcp_ports_has_no_routeless_virtual_service() -> None:
    data = config_dict()
    data["exports"] = [{**MULTI_TCP_EXPORT, "ports": MULTI_TCP_EXPORT["ports"][1:]}]
    out = render_all(parse_config(data), imports=[], peers=PEERS, vips={})
    assert set(by_kind(out.objects, "VirtualService")) == {
        "meshbridge-export-pg-data-tcp-5432",
        "meshbridge-export-pg-data-tcp-5433",
    }  # Istio refuses a VirtualService without http, tcp or tls routes


def test_each_tcp_port_has_its_own_sni_subset_server_and_route_at_the_egress(multi_tcp: Any) -> None:
    subsets = by_kind(multi_tcp.objects, "DestinationRule")["meshbridge-egress"]["spec"]["subsets"]
    assert subsets[1:] == [
        {
            "name": f"tcp-{p}-pg-data-remote",
            "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL", "sni": f"{p}.pg.data.remote"}},
        }
        for p in (5432, 5433)
    ]
    servers = by_kind(multi_tcp.objects, "Gateway")["meshbridge-egress"]["spec"]["servers"]
    assert [(s["name"], s["port"]["number"], s["hosts"]) for s in servers[1:]] == [
        (f"tcp-{p}-pg-data-remote", 15444, [f"istio-system/{p}.pg.data.remote"]) for p in (5432, 5433)
    ]
    services = by_kind(multi_tcp.objects, "VirtualService")
    main = services["meshbridge-import-pg-data"]["spec"]
    assert main["tcp"] == [
        {
            "match": [{"gateways": ["mesh"], "port": p}],
            "route": [
                {
                    "destination": {
                        "host": "istio-egressgateway.istio-system.svc.cluster.local",
                        "subset": f"tcp-{p}-pg-data-remote",
                        "port": {"number": 15444},
                    }
                }
            ],
        }
        for p in (5432, 5433)
    ]
    for p in (5432, 5433):
        assert services[f"meshbridge-import-pg-data-tcp-{p}"]["spec"] == {
            "hosts": [f"{p}.pg.data.remote"],
            "gateways": ["istio-system/meshbridge-egress"],
            "exportTo": ["data", "istio-system"],  # the import's consumer namespaces and the egress gateway's
            "tcp": [
                {
                    "match": [{"gateways": ["istio-system/meshbridge-egress"], "port": 15444}],
                    "route": [{"destination": {"host": "pg.data.remote", "port": {"number": p}}}],
                }
            ],
        }
    dr = by_kind(multi_tcp.objects, "DestinationRule")["meshbridge-import-pg-data"]["spec"]["trafficPolicy"]
    assert dr["tls"]["sni"] == "pg.data.remote"
    assert dr["portLevelSettings"] == [
        {
            "port": {"number": p},
            "tls": {"mode": "ISTIO_MUTUAL", "sni": f"{p}.pg.data.remote", "subjectAltNames": [INGRESS_A]},
        }
        for p in (5432, 5433)
    ]


def test_tcp_ports_reach_the_exporters_published_tcp_port() -> None:
    """Issue 11 item 11: the importer assumed its own cross_cluster_tcp_port for every exporter; it
    now takes `Import.gateway.tcp_port`, and its own only from an exporter that publishes none."""
    out = render_all(tcp_config(cross_cluster_tcp_port=16000), imports=[MULTI_TCP_IMPORT], peers=[], vips={})
    entry = by_kind(out.objects, "ServiceEntry")["meshbridge-import-pg-data"]["spec"]
    assert entry["endpoints"][0]["ports"] == {"http-80": 15443, "tcp-5432": 31444, "tcp-5433": 31444}
    old = {**MULTI_TCP_IMPORT, "gateway": {"address": "203.0.113.10", "port": 15443}}
    out = render_all(tcp_config(cross_cluster_tcp_port=16000), imports=[old], peers=[], vips={})
    entry = by_kind(out.objects, "ServiceEntry")["meshbridge-import-pg-data"]["spec"]
    assert entry["endpoints"][0]["ports"] == {"http-80": 15443, "tcp-5432": 16000, "tcp-5433": 16000}
    bad = {**MULTI_TCP_IMPORT, "gateway": {"address": "203.0.113.10", "port": 15443, "tcp_port": 0}}
    out = render_all(tcp_config(cross_cluster_tcp_port=16000), imports=[bad], peers=[], vips={})
    assert any("gateway tcp_port 0 is not a port" in w for w in out.warnings)


def test_multi_tcp_objects_match_istio_1_30_crd_schemas(multi_tcp: Any) -> None:
    validators = _crd_validators()
    for obj in multi_tcp.objects:
        key = f"{obj['apiVersion']}/{obj['kind']}"
        if key in validators:
            errors = [e.message for e in validators[key].iter_errors(obj["spec"])]
            assert not errors, (obj["metadata"]["name"], errors)


def test_tcp_objects_match_istio_1_30_crd_schemas(tcp_result: Any) -> None:
    validators = _crd_validators()
    allow = render_all(tcp_config(authorization_mode="allow"), imports=[TCP_IMPORT], peers=PEERS, vips={})
    for obj in tcp_result.objects + allow.objects:
        key = f"{obj['apiVersion']}/{obj['kind']}"
        if key in validators:
            errors = [e.message for e in validators[key].iter_errors(obj["spec"])]
            assert not errors, (obj["metadata"]["name"], errors)


# ------------------------------------------------------------------------------------------------
# Issue 11 item 1: every policy rule held to meshbridge's own container ports


def _rule_ports(spec: dict[str, Any]) -> list[list[str]]:
    return [[p for to in rule["to"] for p in to["operation"]["ports"]] for rule in spec["rules"]]


@pytest.mark.parametrize("mode", ["deny", "allow"])
def test_every_policy_rule_names_the_gateway_container_port(mode: str) -> None:
    """Istio drops the HTTP-only `hosts` of a DENY rule on TCP filter chains (authz model.go
    checkError); only positive `ports` keep it off other tenants' chains. The ports are the pods'
    container ports (Envoy's destination_port), which may differ from the Service ports."""
    data = config_dict()
    data["exports"].append(TCP_EXPORT)
    data["istio"]["authorization_mode"] = mode
    data["istio"]["ingress_gateway"].update(target_port=8443, tcp_target_port=18444)
    out = render_all(parse_config(data), imports=[], peers=PEERS, vips={})
    policies = by_kind(out.objects, "AuthorizationPolicy")
    assert _rule_ports(policies["meshbridge-export-ratings-bookinfo"]["spec"]) == [["8443"]]
    assert _rule_ports(policies["meshbridge-export-api-shop"]["spec"]) == [["8443"]]
    assert _rule_ports(policies["meshbridge-export-mongodb-bookinfo"]["spec"]) == [["18444"]]
    for policy in policies.values():
        for rule in policy["spec"]["rules"]:
            assert all("notPorts" not in to["operation"] for to in rule["to"])
    # The Gateway servers keep the Service ports: Istio translates them to the container ports.
    servers = by_kind(out.objects, "Gateway")["meshbridge-ingress"]["spec"]["servers"]
    assert [s["port"]["number"] for s in servers] == [15443, 15444]


def test_container_ports_default_to_the_service_ports() -> None:
    out = render_all(tcp_config(cross_cluster_port=16443, cross_cluster_tcp_port=16444), imports=[], peers=[], vips={})
    policies = by_kind(out.objects, "AuthorizationPolicy")
    assert _rule_ports(policies["meshbridge-export-ratings-bookinfo"]["spec"]) == [["16443"]]
    assert _rule_ports(policies["meshbridge-export-mongodb-bookinfo"]["spec"]) == [["16444"]]


# ------------------------------------------------------------------------------------------------
# Issue 11 item 10: imports are exported to their consumer namespaces and the egress gateway only


def _export_to(objects: list[dict[str, Any]], name: str) -> dict[str, list[str]]:
    return {
        kind: by_kind(objects, kind)[name]["spec"]["exportTo"]
        for kind in ("ServiceEntry", "VirtualService", "DestinationRule")
    }


def test_imports_go_to_their_own_namespace_and_the_egress_gateways_by_default(result: Any) -> None:
    both = ["bookinfo", "istio-system"]
    assert _export_to(result.objects, "meshbridge-import-details-bookinfo") == {
        "ServiceEntry": both,
        "VirtualService": both,
        "DestinationRule": both,
    }
    assert by_kind(result.objects, "DestinationRule")["meshbridge-egress"]["spec"]["exportTo"] == both


def test_consumer_namespaces_per_source_and_cluster_wide() -> None:
    data = config_dict()
    data["istio"]["consumer_namespaces"] = ["frontend"]
    data["imports"][1]["consumer_namespaces"] = ["*"]
    imports = [IMPORTS[0], imp("api.shop", "c", [(80, "HTTP")], identity=INGRESS_C), TCP_IMPORT]
    data["imports"][1]["names"] = ["api.shop"]
    out = render_all(parse_config(data), imports=imports, peers=[], vips={})
    scoped = ["frontend", "istio-system"]
    assert all(v == scoped for v in _export_to(out.objects, "meshbridge-import-details-bookinfo").values())
    assert all(v == ["*"] for v in _export_to(out.objects, "meshbridge-import-api-shop").values())
    rules = by_kind(out.objects, "DestinationRule")
    # one egress rule per gateway, exported to every namespace its imports go to
    assert rules["meshbridge-egress"]["spec"]["exportTo"] == scoped
    assert rules["meshbridge-egress-egress-to-c"]["spec"]["exportTo"] == ["*"]
    data["imports"][0]["consumer_namespaces"] = ["istio-system", "bookinfo", "shop"]
    again = render_all(parse_config(data), imports=imports, peers=[], vips={})
    assert all(
        v == ["bookinfo", "istio-system", "shop"]
        for v in _export_to(again.objects, "meshbridge-import-mongodb-bookinfo").values()
    )


def test_egress_gateway_in_its_own_namespace_gets_the_imports() -> None:
    data = config_dict()
    data["istio"]["egress_gateway"] = {
        "selector": {"istio": "egress"},
        "service": "egress",
        "namespace": "istio-egress",
        "service_account": "egress",
    }
    out = render_all(parse_config(data), imports=IMPORTS[:1], peers=[], vips={})
    assert all(
        v == ["bookinfo", "istio-egress"]
        for v in _export_to(out.objects, "meshbridge-import-details-bookinfo").values()
    )


def test_nodelocal_dns_stanza_is_rendered_beside_the_coredns_block() -> None:
    data = config_dict()
    data["dns"]["nodelocal_dns"] = {"bind": ["169.254.20.10", "10.96.0.10"]}
    out = render_all(parse_config(data), imports=IMPORTS, peers=[], vips={})
    block_cm = by_kind(out.objects, "ConfigMap")["meshbridge-coredns"]
    assert sorted(block_cm["data"]) == ["nodelocaldns.remote.server", "remote.server"]
    assert out.server_block == block_cm["data"]["remote.server"]  # only this is merged into the Corefile
    stanza = block_cm["data"]["nodelocaldns.remote.server"].splitlines()
    assert "remote:53 {" in stanza
    assert "    bind 169.254.20.10 10.96.0.10" in stanza
    assert "    forward . __PILLAR__CLUSTER__DNS__ {" in stanza and "            force_tcp" in stanza
    without = render_all(config(), imports=IMPORTS, peers=[], vips={})
    assert list(by_kind(without.objects, "ConfigMap")["meshbridge-coredns"]["data"]) == ["remote.server"]


def test_names_renumbered_by_a_range_change_are_reported_once() -> None:
    old = {"details.bookinfo": "240.240.0.2"}
    out = render_all(config(), imports=IMPORTS, peers=[], vips=old)
    assert out.vips["details.bookinfo"] == "241.0.0.2"
    moved = [w for w in out.warnings if w.startswith("dns.vip_range 241.0.0.0/16: 1 imported name(s) got a new")]
    assert len(moved) == 1 and "details.bookinfo 240.240.0.2 -> 241.0.0.2" in moved[0]
    again = render_all(config(), imports=IMPORTS, peers=[], vips=out.vips)
    assert not [w for w in again.warnings if w.startswith("dns.vip_range")]
