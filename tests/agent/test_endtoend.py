"""End-to-end mode on the agent's side (issue 13 items 1, 2 and 6): the config, what is published,
what an importer accepts, and the workload policy the exporter renders."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster_agent.config import ConfigError, parse_config
from cluster_agent.render import render_all
from cluster_agent.render.endtoend import e2e_sni
from meshbridge_wire.pem import load_crls
from tests.agent.conftest import configure_agents
from tests.agent.test_agent_pass import recording_reconciler
from tests.support.caservice import CAService

BASE: dict[str, Any] = {
    "cluster": "b",
    "ca": {"url": "https://ca.example", "trust_anchor": "/etc/meshbridge/ca-root.pem"},
    "istio": {"trust_domain": "b.mesh"},
    "dns": {"mode": "none"},
}
RATINGS: dict[str, Any] = {
    "service": "ratings",
    "namespace": "bookinfo",
    "ports": [9080],
    "mode": "end-to-end",
    "service_accounts": ["bookinfo-ratings"],
    "consumers": [{"cluster": "a", "principals": ["ns/shop/sa/checkout"]}, "c"],
}


def _config(**export: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["exports"] = [{**copy.deepcopy(RATINGS), **export}]
    return data


def _problems(data: dict[str, Any]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return exc.value.problems


@pytest.mark.parametrize(
    ("export", "expected"),
    [
        ({"service_accounts": []}, "exports[0].service_accounts: an end-to-end export needs the service accounts"),
        ({"mode": "hop-by-hop"}, "exports[0].service_accounts: only for mode end-to-end"),
        (
            {"mode": "hop-by-hop", "service_accounts": []},
            "exports[0].consumers[0].principals: only for mode end-to-end",
        ),
        ({"consumers": [{"cluster": "a", "principals": ["shop/checkout"]}]}, "exports[0].consumers[0].principals[0]: "),
        ({"consumers": [{"cluster": "a", "principals": ["ns/shop/sa/x", "ns/shop/sa/x"]}]}, "exports[0].consumers[0]"),
        ({"consumers": ["a", {"cluster": "a"}]}, "exports[0].consumers: consumer 'a' is listed twice"),
        ({"mode": "end-to-middle"}, "exports[0].mode: "),
        ({"service_accounts": ["Bad_Name"]}, "exports[0].service_accounts[0]: "),
    ],
)
def test_bad_end_to_end_config_names_its_key(export: dict[str, Any], expected: str) -> None:
    problems = _problems(_config(**export))
    assert any(p.startswith(expected) for p in problems), problems


def test_end_to_end_export_publishes_its_workload_identities() -> None:
    export = parse_config(_config()).exports[0]
    assert export.consumer_clusters == ["a", "c"]
    assert export.end_to_end_fields("b.mesh") == {
        "mode": "end-to-end",
        "workload_identities": ["spiffe://b.mesh/ns/bookinfo/sa/bookinfo-ratings"],
        "consumer_principals": {"a": ["ns/shop/sa/checkout"]},
    }
    assert (
        parse_config(_config(mode="hop-by-hop", service_accounts=[], consumers=["a"]))
        .exports[0]
        .end_to_end_fields("b.mesh")
        == {}
    )


def _peer(name: str) -> dict[str, Any]:
    td = f"{name}.mesh"
    return {
        "name": name,
        "trust_domain": td,
        "identities": {
            "ingress": f"spiffe://{td}/ns/istio-system/sa/ingress",
            "egress": f"spiffe://{td}/ns/istio-system/sa/egress",
        },
    }


def _policy(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [policy] = [o for o in objects if o["kind"] == "AuthorizationPolicy"]
    return policy


def test_workload_policy_admits_declared_workloads_and_whole_clusters_only() -> None:
    result = render_all(parse_config(_config()), imports=[], peers=[_peer("a"), _peer("c")], vips={})
    policy = _policy(result.objects)
    assert policy["metadata"]["namespace"] == "bookinfo" and "selector" not in policy["spec"]
    [rule] = policy["spec"]["rules"]
    assert policy["spec"]["action"] == "DENY"
    assert rule["from"] == [{"source": {"notPrincipals": ["a.mesh/ns/shop/sa/checkout", "c.mesh/*"]}}]
    assert rule["when"] == [{"key": "connection.sni", "values": [e2e_sni(9080, "ratings.bookinfo")]}]


def test_a_consumer_not_yet_published_is_refused_with_a_warning() -> None:
    result = render_all(parse_config(_config()), imports=[], peers=[_peer("a")], vips={})
    [rule] = _policy(result.objects)["spec"]["rules"]
    assert rule["from"] == [{"source": {"notPrincipals": ["a.mesh/ns/shop/sa/checkout"]}}]
    assert any("consumer c has not published yet" in w for w in result.warnings), result.warnings
    alone = render_all(parse_config(_config(consumers=["c"])), imports=[], peers=[], vips={})
    [rule] = _policy(alone.objects)["spec"]["rules"]
    assert "from" not in rule  # no one admitted: every end-to-end caller is refused


IMPORTER: dict[str, Any] = {
    **BASE,
    "cluster": "a",
    "istio": {"trust_domain": "a.mesh"},
    "imports": [{"from": "b", "names": ["*"]}],
}


def _import(**fields: Any) -> dict[str, Any]:
    return {
        "name": "ratings.bookinfo",
        "cluster": "b",
        "ports": [{"number": 9080, "protocol": "HTTP"}],
        "gateway": {"address": "198.51.100.20", "port": 15443, "tcp_port": 15444},
        "identity": "spiffe://b.mesh/ns/istio-system/sa/ingress",
        "mode": "end-to-end",
        "workload_identities": ["spiffe://b.mesh/ns/bookinfo/sa/bookinfo-ratings"],
        **fields,
    }


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"workload_identities": None}, "end-to-end without workload identities"),
        ({"workload_identities": ["spiffe://evil.mesh/ns/bookinfo/sa/x"]}, "in the exporter's trust domain b.mesh"),
        ({"mode": "sideways"}, "unknown mode 'sideways'"),
    ],
)
def test_an_end_to_end_import_without_pinnable_identities_is_left_out(fields: dict[str, Any], why: str) -> None:
    result = render_all(parse_config(IMPORTER), imports=[_import(**fields)], peers=[], vips={})
    assert not [o for o in result.objects if o["kind"] == "DestinationRule"]
    assert any(why in w and "left out" in w for w in result.warnings), result.warnings


def test_render_tells_each_imports_mode() -> None:
    hop = {k: v for k, v in _import(name="details.bookinfo").items() if k not in ("mode", "workload_identities")}
    result = render_all(parse_config(IMPORTER), imports=[_import(), hop], peers=[], vips={})
    modes = {host: how.split(":")[0] for host, how in result.imports.items()}
    assert modes == {"details.bookinfo.remote": "hop-by-hop", "ratings.bookinfo.remote": "end-to-end"}
    [dr] = [
        o for o in result.objects if o["kind"] == "DestinationRule" and o["spec"]["host"] == "ratings.bookinfo.remote"
    ]
    assert dr["spec"]["trafficPolicy"]["tls"] == {
        "mode": "ISTIO_MUTUAL",
        "sni": "9080.ratings.bookinfo.mb-e2e",
        "subjectAltNames": ["spiffe://b.mesh/ns/bookinfo/sa/bookinfo-ratings"],
    }


def test_several_end_to_end_exporters_share_one_sni_and_fail_over() -> None:
    """Issue 13 item 4 in end-to-end mode: b (preferred) and c export ratings.bookinfo end to end.
    The caller pins both exporters' workloads, sends one SNI whichever exporter answers, and a's
    egress gateway forwards that SNI to every exporter's ingress, ranked, with outlier detection."""
    config = {**IMPORTER, "imports": [{"from": "b", "names": ["*"]}, {"from": "c", "names": ["*"], "priority": 1}]}
    c = _import(
        cluster="c",
        gateway={"address": "198.51.100.30", "addresses": ["198.51.100.30", "gw.c.example"], "port": 15443},
        identity="spiffe://c.mesh/ns/istio-system/sa/ingress",
        workload_identities=["spiffe://c.mesh/ns/bookinfo/sa/bookinfo-ratings"],
    )
    result = render_all(parse_config(config), imports=[_import(), c], peers=[], vips={})
    rules = {o["spec"]["host"]: o["spec"] for o in result.objects if o["kind"] == "DestinationRule"}
    assert rules["ratings.bookinfo.remote"]["trafficPolicy"]["tls"] == {
        "mode": "ISTIO_MUTUAL",
        "sni": "9080.ratings.bookinfo.mb-e2e",
        "subjectAltNames": [
            "spiffe://b.mesh/ns/bookinfo/sa/bookinfo-ratings",
            "spiffe://c.mesh/ns/bookinfo/sa/bookinfo-ratings",
        ],
    }
    [forward] = [o for o in result.objects if o["kind"] == "ServiceEntry" and "forward" in o["metadata"]["name"]]
    assert forward["spec"]["hosts"] == ["9080.ratings.bookinfo.mb-e2e"]
    assert forward["spec"]["resolution"] == "DNS"  # one endpoint is a name
    endpoints = [(e["address"], e["ports"], e.get("labels", {})) for e in forward["spec"]["endpoints"]]
    rank = {"meshbridge.io/rank-below-1": "true"}
    assert endpoints == [
        ("198.51.100.20", {"tls-15444": 15444}, rank),
        ("198.51.100.30", {"tls-15444": 15444}, {}),
        ("gw.c.example", {"tls-15444": 15444}, {}),
    ]
    hop = rules["9080.ratings.bookinfo.mb-e2e"]["trafficPolicy"]
    assert "tls" not in hop  # the caller's TLS passes untouched
    assert hop["outlierDetection"]["consecutiveGatewayErrors"] == 3
    assert hop["loadBalancer"]["localityLbSetting"]["failoverPriority"] == ["meshbridge.io/rank-below-1=true"]
    assert result.imports == {
        "ratings.bookinfo.remote": "end-to-end: b@0 [198.51.100.20], c@1 [198.51.100.30, gw.c.example]"
    }


def test_exporters_in_different_modes_keep_the_preferred_ones_mode() -> None:
    hop = {k: v for k, v in _import(cluster="c", identity="spiffe://c.mesh/ns/istio-system/sa/ingress").items()}
    hop.pop("mode")
    hop.pop("workload_identities")
    result = render_all(
        parse_config({**IMPORTER, "imports": [{"from": "b", "names": ["*"]}, {"from": "c", "names": ["*"]}]}),
        imports=[_import(), hop],
        peers=[],
        vips={},
    )
    assert result.imports["ratings.bookinfo.remote"].startswith("end-to-end: b@0")
    assert any("c exports it hop-by-hop" in w and "left out" in w for w in result.warnings), result.warnings


def test_end_to_end_export_travels_through_the_ca_to_the_importer(ca_service: CAService, tmp_path: Path) -> None:
    exports = yaml.safe_dump([RATINGS | {"consumers": ["b"]}], default_flow_style=True).strip()
    paths = configure_agents(ca_service, tmp_path, exports)
    a = recording_reconciler(paths["a"], [])
    a.run_pass(revision=None, wait=0, resync=lambda: True)
    body = a.exports_body()
    assert body.services[0].mode == "end-to-end" and body.gateway.tcp_port is not None
    assert body.crl and "BEGIN X509 CRL" in body.crl  # an exporter end to end publishes its CRLs
    b = recording_reconciler(paths["b"], [])
    result = b.run_pass(revision=None, wait=0, resync=lambda: True).reconciled
    assert result is not None and result.imports == {"ratings.bookinfo.remote": "end-to-end: a@0 [198.51.100.10]"}
    rules = [yaml.safe_load(p.read_text()) for p in (paths["b"].parent / "out").glob("destinationrule-*e2e*.yaml")]
    assert [r["spec"]["trafficPolicy"]["tls"]["subjectAltNames"] for r in rules] == [
        ["spiffe://a.mesh/ns/bookinfo/sa/bookinfo-ratings"]
    ]
    # each side's ca-crl.pem gets the other's intermediate CRL (the importer publishes its own once
    # its desired state showed an end-to-end import, on its next pass)
    b.run_pass(revision=None, wait=0, resync=lambda: True)
    a.run_pass(revision=None, wait=0, resync=lambda: True)
    for me, peer in (("a", "b"), ("b", "a")):
        out = paths[me].parent / "out"
        secret = yaml.safe_load((out / "secret-istio-system-cacerts.yaml").read_text())
        crls = load_crls(base64.b64decode(secret["data"]["ca-crl.pem"]).decode())
        issuers = {c.issuer.rfc4514_string() for c in crls}
        assert f"CN={peer},OU={peer}.mesh,O=meshbridge" in issuers, (me, issuers)


def test_hop_by_hop_peers_crls_stay_out_of_ca_crl() -> None:
    """Only peers met end to end: a hop-by-hop peer's sidecars never verify this cluster's workloads."""
    crl = "-----BEGIN X509 CRL-----\nMA==\n-----END X509 CRL-----\n"
    peers = [{**_peer("a"), "crl": crl}, {**_peer("c"), "crl": crl.replace("MA==", "MQ==")}]
    data = _config(consumers=["a"])
    data["exports"].append({"service": "details", "namespace": "bookinfo", "ports": [9080], "consumers": ["c"]})
    result = render_all(parse_config(data), imports=[], peers=peers, vips={})
    assert result.peer_crls == crl and not [w for w in result.warnings if "has not published" in w]
