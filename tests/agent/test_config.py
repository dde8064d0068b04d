"""The agent configuration file: API.md's example loads; every bad input names its key path."""

from __future__ import annotations

import copy
import ipaddress
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster_agent.config import AgentConfig, ConfigError, load_config, parse_config

# Verbatim from API.md "Agent configuration file" (with the optional per-source example enabled).
API_EXAMPLE = """\
cluster: b                                   # as registered with the CA service
ca:
  url: https://127.0.0.1:8443
  trust_anchor: ca-root.pem                  # pins the CA service's root
  bootstrap_token_file: bootstrap-token      # read once, at first enrollment
  key_type: ecdsa-p256                       # of the cluster intermediate generated here
istio:
  namespace: istio-system
  trust_domain: b.mesh                       # must equal the trust domain registered for the cluster
  ingress_gateway: {selector: {istio: ingressgateway}, service: istio-ingressgateway, service_account: istio-ingressgateway-service-account, address: 198.51.100.20, port: 15443}
  egress_gateway: {selector: {istio: egressgateway}, service: istio-egressgateway, service_account: istio-egressgateway-service-account}
dns:
  suffix: remote
  mode: coredns                              # istio (default: sidecars' DNS proxy) | coredns | none
  vip_range: 241.0.0.0/16                    # one stable address per imported name; not Istio's 240.240.0.0/16
exports:
  - {service: ratings, namespace: bookinfo, ports: [9080], consumers: [a]}   # name ratings.bookinfo → ratings.bookinfo.remote
imports:
  - {from: a, names: ["*"]}                  # everything cluster a exports to b
  - {from: c, names: [reviews.bookinfo], egress_gateway: {selector: {istio: egress-to-c}, service: egress-to-c, service_account: egress-to-c}}
kubernetes: {}                               # in-cluster or $KUBECONFIG; not used in render mode
"""


def example() -> dict[str, Any]:
    data = yaml.safe_load(API_EXAMPLE)
    assert isinstance(data, dict)
    return data


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return list(info.value.problems)


def test_api_example_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "agent.yaml"
    path.write_text(API_EXAMPLE)
    config = load_config(path)
    assert config.cluster == "b"
    assert config.ca.trust_anchor == tmp_path / "conf" / "ca-root.pem"
    assert config.ca.bootstrap_token_file == tmp_path / "conf" / "bootstrap-token"
    assert config.ca.key_type == "ecdsa-p256"
    assert config.istio.ingress_gateway.address == "198.51.100.20"
    assert config.istio.ingress_gateway.port == 15443
    assert config.istio.cross_cluster_port == 15443
    assert config.istio.egress_gateway.port == 443
    assert config.dns.vip_range == ipaddress.IPv4Network("241.0.0.0/16")
    assert config.exports[0].export_name == "ratings.bookinfo"
    assert [(p.number, p.protocol) for p in config.exports[0].ports] == [(9080, "HTTP")]
    assert config.imports[0].from_ == "a" and config.imports[0].selects("anything.at-all")
    assert config.imports[1].selects("reviews.bookinfo") and not config.imports[1].selects("ratings.bookinfo")
    assert config.imports[1].egress_gateway is not None
    assert config.kubernetes.field_manager == "meshbridge"
    assert config.ca.crl_validity == timedelta(days=7)


def test_absolute_paths_stay_and_home_expands(tmp_path: Path) -> None:
    data = example()
    data["ca"]["trust_anchor"] = "/etc/meshbridge/root.pem"
    data["state_dir"] = "state"
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    assert config.ca.trust_anchor == Path("/etc/meshbridge/root.pem")
    assert config.state_dir == tmp_path / "state"


def test_minimal_config_gets_istio_defaults() -> None:
    config = parse_config(
        {
            "cluster": "a",
            "ca": {"url": "https://ca:8443", "trust_anchor": "/r.pem"},
            "istio": {"trust_domain": "a.mesh"},
        }
    )
    assert config.istio.ingress_gateway.selector == {"istio": "ingressgateway"}
    assert config.istio.egress_gateway.service == "istio-egressgateway"
    assert config.istio.identity(config.istio.egress_gateway) == (
        "spiffe://a.mesh/ns/istio-system/sa/istio-egressgateway-service-account"
    )
    assert config.dns.suffix == "remote" and config.dns.mode == "istio"
    assert config.dns.vip_range == ipaddress.IPv4Network("241.0.0.0/16") and config.dns.nodelocal_dns is None
    assert config.exports == [] and config.imports == []


def test_ports_may_name_their_protocol() -> None:
    data = example()
    data["exports"][0]["ports"] = [9080, {"number": 9090, "protocol": "grpc"}, {"number": 8080, "protocol": "grpc-web"}]
    config = parse_config(data)
    assert [(p.number, p.protocol) for p in config.exports[0].ports] == [
        (9080, "HTTP"),
        (9090, "GRPC"),
        (8080, "GRPC-Web"),
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("36h", timedelta(hours=36)),
        ("1d12h", timedelta(days=1, hours=12)),
        (3600, timedelta(hours=1)),
        ("P2D", timedelta(days=2)),
        ("90m", timedelta(minutes=90)),
    ],
)
def test_crl_validity_durations(value: object, expected: timedelta) -> None:
    data = example()
    data["ca"]["crl_validity"] = value
    assert parse_config(data).ca.crl_validity == expected


def test_crl_settings_default_to_shipping_ca_crl_with_istios_24h_workload_ttl() -> None:
    config = parse_config(example())
    assert config.ca.ca_crl is True and config.ca.workload_cert_ttl == timedelta(hours=24)
    data = example()
    data["ca"].update(ca_crl=False, workload_cert_ttl="2d")
    config = parse_config(data)
    assert config.ca.ca_crl is False and config.ca.workload_cert_ttl == timedelta(days=2)


def _set(data: dict[str, Any], path: str, value: object) -> None:
    keys = path.split(".")
    node: Any = data
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last = keys[-1]
    if value is _DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


_DELETE = object()

BAD_INPUTS = [
    ("cluster", "B", "cluster: must be a DNS label"),
    ("cluster", "a_b", "cluster: must be a DNS label"),
    ("cluster", 7, "cluster: must be a string"),
    ("ca", _DELETE, "ca: required key is missing"),
    ("ca.url", "http://127.0.0.1:8443", "ca.url: must be an https:// URL"),
    ("ca.key_type", "ed25519", "ca.key_type: must be one of 'ecdsa-p256'"),
    ("ca.renew_fraction", 1.5, "ca.renew_fraction:"),
    ("ca.crl_validity", "8d", "ca.crl_validity: must be more than 0 and at most 7 days"),
    ("ca.crl_validity", "soon", "ca.crl_validity: must be a duration"),
    ("ca.workload_cert_ttl", "91d", "ca.workload_cert_ttl: must be more than 0 and at most 90 days"),
    ("ca.workload_cert_ttl", 0, "ca.workload_cert_ttl: must be more than 0 and at most 90 days"),
    ("ca.ca_crl", "yes", "ca.ca_crl: "),
    (
        "ca.trust_ancor",
        "x.pem",
        "ca.trust_ancor: unknown key; allowed here: bootstrap_token_file, ca_crl, crl_validity",
    ),
    ("istio.trust_domain", "spiffe://b.mesh", "istio.trust_domain: must be a valid trust domain"),
    ("istio.trust_domain", "B.Mesh", "istio.trust_domain: must be a valid trust domain"),
    ("istio.namespace", "Istio_System", "istio.namespace: must be a DNS label"),
    ("istio.ingress_gateway.port", 70000, "istio.ingress_gateway.port: must be 1..65535 (got 70000)"),
    ("istio.ingress_gateway.port", 0, "istio.ingress_gateway.port: must be 1..65535 (got 0)"),
    ("istio.ingress_gateway.port", "15443", "istio.ingress_gateway.port: must be a whole number"),
    ("istio.ingress_gateway.port", True, "istio.ingress_gateway.port: must be a whole number"),
    ("istio.ingress_gateway.address", "not an address", "istio.ingress_gateway.address: must be an IP address"),
    ("istio.ingress_gateway.adress", "1.2.3.4", "istio.ingress_gateway.adress: unknown key; allowed here: address"),
    ("istio.ingress_gateway.selector", {}, "istio.ingress_gateway.selector: must name at least one label"),
    ("istio.egress_gateway.service", "Egress", "istio.egress_gateway.service: must be a Kubernetes Service name"),
    (
        "istio.egress_gateway.service",
        "istio-ingressgateway",
        "istio.egress_gateway.service: 'istio-ingressgateway' is the ingress gateway",
    ),
    ("istio.cross_cluster_port", 99999, "istio.cross_cluster_port: must be 1..65535"),
    ("istio.authorization_mode", "permit", "istio.authorization_mode: must be one of 'deny' or 'allow'"),
    ("dns.mode", "kube-dns", "dns.mode: must be one of 'istio', 'coredns' or 'none' (got 'kube-dns')"),
    ("dns.vip_range", "241.0.0.1/16", "dns.vip_range: must be an IPv4 network such as 241.0.0.0/16"),
    ("dns.vip_range", "240.240.0.0/16", "dns.vip_range: 240.240.0.0/16 overlaps 240.240.0.0/16, where Istio allocates"),
    ("dns.vip_range", "240.240.128.0/24", "dns.vip_range: 240.240.128.0/24 overlaps 240.240.0.0/16"),
    ("dns.vip_range", "240.0.0.0/4", "dns.vip_range: 240.0.0.0/4 overlaps 240.240.0.0/16"),
    ("dns.nodelocal_dns", {"bind": []}, "dns.nodelocal_dns.bind: must not be empty"),
    ("dns.nodelocal_dns", {"bind": ["node-local"]}, "dns.nodelocal_dns.bind[0]: must be an IP address"),
    (
        "dns.nodelocal_dns",
        {"bind": ["169.254.20.10"], "forward_to": "kube-dns"},
        "dns.nodelocal_dns.forward_to: must be __PILLAR__CLUSTER__DNS__",
    ),
    (
        "dns.nodelocal_dns",
        {"bind": ["169.254.20.10"], "forward_to": "10.96.0.10:0"},
        "dns.nodelocal_dns.forward_to: must be __PILLAR__CLUSTER__DNS__",
    ),
    ("dns.vip_range", "fd00::/64", "dns.vip_range: must be an IPv4 network; got the IPv6 network"),
    ("dns.vip_range", "240.240.0.0/31", "dns.vip_range: 240.240.0.0/31 has no room"),
    ("dns.vip_range", "nonsense", "dns.vip_range: must be an IPv4 network"),
    ("dns.suffix", "svc.cluster.local", "dns.suffix: 'svc.cluster.local' overlaps istio.cluster_domain"),
    ("dns.suffix", "Remote.", "dns.suffix: must be a lowercase DNS name"),
    ("exports.0.name", "ratings.other", "exports[0].name: must be <service>.<namespace>"),
    ("exports.0.service", "9ratings", "exports[0].service: must be a Kubernetes Service name"),
    ("exports.0.consumers", ["A"], "exports[0].consumers[0]: must be a DNS label"),
    ("exports.0.consumers", ["b"], "exports[0].consumers[0]: 'b' is this cluster"),
    ("exports.0.consumers", ["a", "a"], "exports[0].consumers: consumer 'a' is listed twice"),
    ("exports.0.ports", [], "exports[0].ports: must not be empty"),
    ("exports.0.ports", [0], "exports[0].ports[0].number: must be 1..65535 (got 0)"),
    ("exports.0.ports", [9080, 9080], "exports[0].ports: port 9080 is listed twice"),
    ("exports.0.ports", ["http"], "exports[0].ports[0]: must be a port number or {number: N, protocol: HTTP}"),
    (
        "exports.0.ports",
        [{"number": 5432, "protocol": "UDP"}],
        "exports[0].ports[0].protocol: protocol 'UDP' cannot cross clusters",
    ),
    (
        "exports.0.extra",
        1,
        "exports[0].extra: unknown key; allowed here: consumers, mode, name, namespace, ports, service, service_accounts",
    ),
    ("imports.0.names", ["ratings"], "imports[0].names[0]: must be '*' or <service>.<namespace>"),
    ("imports.0.names", ["*", "ratings.bookinfo"], "imports[0].names: '*' already selects every name"),
    ("imports.0.names", [], "imports[0].names: must not be empty"),
    ("imports.0.from", "b", "imports[0].from: 'b' is this cluster"),
    ("imports.1.from", "a", "imports[1].from: 'a' appears twice"),
    ("imports.1.egress_gateway.port", -1, "imports[1].egress_gateway.port: must be 1..65535"),
    (
        "imports.1.egress_gateway.service",
        "istio-egressgateway",
        "imports[1].egress_gateway: service 'istio-egressgateway' is also configured at istio.egress_gateway",
    ),
    ("kubernetes.field_manager", "", "kubernetes.field_manager:"),
    (
        "kubernetes.kubeconfg",
        "x",
        "kubernetes.kubeconfg: unknown key; allowed here: context, field_manager, kubeconfig",
    ),
    (
        "exprots",
        [],
        "exprots: unknown key; allowed here: ca, cluster, dns, exports, imports, istio, kubernetes, state_dir",
    ),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD_INPUTS, ids=[f"{p}={v!r}" for p, v, _ in BAD_INPUTS])
def test_bad_input_names_its_key_path(path: str, value: object, expected: str) -> None:
    data = copy.deepcopy(example())
    _set(data, path, value)
    problems = problems_of(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_at_once() -> None:
    data = example()
    data["cluster"] = "B"
    data["istio"]["ingress_gateway"]["port"] = 70000
    data["dns"]["mode"] = "x"
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="agent.yaml")
    message = str(info.value)
    assert message.startswith("agent.yaml is invalid:\n")
    assert len(info.value.problems) == 3
    for fragment in ("  cluster: ", "  istio.ingress_gateway.port: must be 1..65535 (got 70000)", "  dns.mode: "):
        assert fragment in message


def test_missing_file_bad_yaml_and_wrong_top_level(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- cluster: b\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="it is empty"):
        load_config(empty)


def test_config_error_is_a_value_error_and_config_is_frozen() -> None:
    assert issubclass(ConfigError, ValueError)
    config = parse_config(example())
    with pytest.raises(Exception, match="frozen"):
        config.cluster = "c"


def test_every_egress_gateway_is_listed_once() -> None:
    """Issue 11 item 3: a dedicated egress gateway with its own service account is published too
    (it used to draw an advisory: exporters admitted only `istio.egress_gateway`)."""
    data = example()
    data["istio"]["consumer_namespaces"] = ["bookinfo"]
    config = parse_config(data)
    assert config.advisories() == []
    assert [g.service for g in config.egress_gateways()] == ["istio-egressgateway", "egress-to-c"]
    data = example()
    data["imports"][0]["egress_gateway"] = data["imports"][1]["egress_gateway"]
    assert [g.service for g in parse_config(data).egress_gateways()] == ["istio-egressgateway", "egress-to-c"]


def test_helm_release_gives_the_gateway_charts_names() -> None:
    """Istio's Helm `gateway` chart names the Service and service account after the release and labels
    the pods `istio: <release without "istio-">` (manifests/charts/gateway/templates/_helpers.tpl)."""
    data = example()
    data["istio"]["ingress_gateway"] = {
        "helm_release": "istio-ingress",
        "namespace": "istio-ingress",
        "address": "x.example",
    }
    data["istio"]["egress_gateway"] = {"helm_release": "egress", "namespace": "istio-egress", "service_account": "sa-e"}
    istio = parse_config(data).istio
    assert (istio.ingress_gateway.service, istio.ingress_gateway.service_account) == ("istio-ingress", "istio-ingress")
    assert istio.ingress_gateway.selector == {"istio": "ingress"}
    assert istio.egress_gateway.service == "egress" and istio.egress_gateway.selector == {"istio": "egress"}
    assert istio.egress_gateway.service_account == "sa-e"  # an explicit key wins
    assert istio.identity(istio.ingress_gateway) == "spiffe://b.mesh/ns/istio-ingress/sa/istio-ingress"


def test_helm_release_without_a_namespace_is_advised_and_a_bad_release_names_its_key() -> None:
    data = example()
    data["istio"]["consumer_namespaces"] = ["bookinfo"]
    data["istio"]["egress_gateway"] = {"helm_release": "istio-egress"}
    (note,) = parse_config(data).advisories()
    assert note.startswith("istio.egress_gateway.namespace: not set")
    data["istio"]["egress_gateway"] = {"helm_release": "Bad_Name"}
    assert any(
        p.startswith("istio.egress_gateway.helm_release: must be a Kubernetes Service name") for p in problems_of(data)
    )


def test_revision_names_istiods_configmap_and_labels() -> None:
    istio = parse_config(example()).istio
    assert (istio.mesh_configmap, istio.istiod_selector) == ("istio", {"app": "istiod", "istio.io/rev": "default"})
    data = example()
    data["istio"]["revision"] = "canary"
    istio = parse_config(data).istio
    assert (istio.mesh_configmap, istio.istiod_selector) == (
        "istio-canary",
        {"app": "istiod", "istio.io/rev": "canary"},
    )


def test_consumer_namespaces_per_rule_over_the_cluster_default() -> None:
    """Issue 11 item 10: imports are exported to the namespaces that call them, not to every one."""
    data = example()
    config = parse_config(data)
    assert [config.consumer_namespaces(rule) for rule in config.imports] == [None, None]
    notes = config.advisories()
    assert notes[0].startswith("imports[0].consumer_namespaces: not set, so each name imported from 'a'")
    assert "visible only to sidecars in its own <namespace>" in notes[0] and "['*']" in notes[0]
    assert any(n.startswith("imports[1].consumer_namespaces: not set") for n in notes)
    data["istio"]["consumer_namespaces"] = ["frontend", "bookinfo"]
    data["imports"][1]["consumer_namespaces"] = ["*"]
    config = parse_config(data)
    assert [config.consumer_namespaces(rule) for rule in config.imports] == [("frontend", "bookinfo"), ("*",)]
    assert not any("consumer_namespaces" in n for n in config.advisories())


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("imports.0.consumer_namespaces", [], "imports[0].consumer_namespaces: must not be empty"),
        ("imports.0.consumer_namespaces", ["Front"], "imports[0].consumer_namespaces: must be a DNS label"),
        ("imports.0.consumer_namespaces", ["a", "a"], "imports[0].consumer_namespaces: namespace 'a' is listed twice"),
        ("imports.0.consumer_namespaces", ["*", "a"], "imports[0].consumer_namespaces: '*' already means every"),
        ("istio.consumer_namespaces", "bookinfo", "istio.consumer_namespaces: must be a list"),
        ("istio.ingress_gateway.target_port", 0, "istio.ingress_gateway.target_port: must be 1..65535"),
        ("istio.ingress_gateway.tcp_target_port", "x", "istio.ingress_gateway.tcp_target_port: must be a whole"),
    ],
)
def test_bad_consumer_namespaces_and_target_ports(path: str, value: object, expected: str) -> None:
    data = copy.deepcopy(example())
    _set(data, path, value)
    problems = problems_of(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_ingress_container_ports_default_to_the_service_ports() -> None:
    data = example()
    assert parse_config(data).istio.ingress_target_ports() == (15443, 15444)
    data["istio"]["cross_cluster_tcp_port"] = 16444
    data["istio"]["ingress_gateway"]["target_port"] = 8443
    assert parse_config(data).istio.ingress_target_ports() == (8443, 16444)


def test_allow_mode_on_the_ingress_gateway_is_advised() -> None:
    data = example()
    data["istio"]["authorization_mode"] = "allow"
    notes = parse_config(data).advisories()
    assert any(n.startswith("istio.authorization_mode: 'allow' puts ALLOW policies") for n in notes)
    assert any("Use 'deny' on a shared ingress gateway" in n for n in notes)


def test_model_is_the_public_type() -> None:
    assert isinstance(parse_config(example()), AgentConfig)


def test_a_missing_gateway_address_is_a_config_error_at_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster_agent.cli import main

    data = example()
    del data["istio"]["ingress_gateway"]["address"]
    parse_config(data)  # a valid document (a Helm chart may render it before the address is known) ...
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:  # ... but no agent runs with it: its exports need the address
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith("istio.ingress_gateway.address: required to run the agent")
    assert "set it" in problem
    assert main(["check-config", "--config", str(path)]) == 2
    assert "config error" in capsys.readouterr().err


def test_equal_cross_cluster_ports_are_refused_at_load() -> None:
    """Issue 11 item 2: one port for HTTP and TCP exports merges their Gateway servers by SNI, and the
    HTTP DENY rule's `notPorts` for the TCP port then opens every HTTP export to the fleet."""
    data = example()
    data["istio"]["cross_cluster_port"] = 16000
    data["istio"]["cross_cluster_tcp_port"] = 16000
    assert any("cross_cluster_port and cross_cluster_tcp_port are both 16000" in p for p in problems_of(data))
    data["istio"]["cross_cluster_tcp_port"] = 16001
    assert parse_config(data).istio.cross_cluster_tcp_port == 16001


def test_several_tcp_ports_per_export_load_and_the_ingress_tcp_port_is_published() -> None:
    """Issue 11 item 11: several TCP ports per name (each crosses on an SNI of its own), and the TCP
    port peers reach this cluster on travels with its exports (`gateway.tcp_port`)."""
    data = example()
    data["exports"] = [
        {
            "service": "db",
            "namespace": "data",
            "ports": [{"number": 5432, "protocol": "TCP"}, {"number": 5433, "protocol": "tcp"}],
        }
    ]
    data["istio"]["cross_cluster_tcp_port"] = 16000
    config = parse_config(data)
    assert [p.protocol for p in config.exports[0].ports] == ["TCP", "TCP"]
    published = config.istio.published_gateway()
    assert published["tcp_port"] == 16000
    data["istio"]["ingress_gateway"]["tcp_port"] = 31444  # a load balancer mapping the port
    assert parse_config(data).istio.published_gateway()["tcp_port"] == 31444


@pytest.mark.parametrize("mode", ["istio", "none"])
def test_nodelocal_dns_needs_the_coredns_block(mode: str) -> None:
    data = example()
    data["dns"].update(mode=mode, nodelocal_dns={"bind": ["169.254.20.10"]})
    assert problems_of(data) == [
        f"dns.nodelocal_dns: needs dns.mode coredns (it is {mode!r}): the stanza forwards the suffix to the "
        f"cluster DNS, which answers it only with the meshbridge CoreDNS block"
    ]


@pytest.mark.parametrize(
    "target", ["__PILLAR__CLUSTER__DNS__", "10.96.0.10", "10.96.0.10:53", "fd00::a", "[fd00::a]:53"]
)
def test_nodelocal_dns_forward_targets(target: str) -> None:
    data = example()
    data["dns"]["nodelocal_dns"] = {"bind": ["169.254.20.10", "10.96.0.10"], "forward_to": target}
    nodelocal = parse_config(data).dns.nodelocal_dns
    assert (
        nodelocal is not None and nodelocal.forward_to == target and nodelocal.bind == ["169.254.20.10", "10.96.0.10"]
    )


@pytest.mark.parametrize("vip_range", ["240.241.0.0/16", "241.0.0.0/16", "240.0.0.0/9", "10.200.0.0/16"])
def test_vip_ranges_beside_istios_are_accepted(vip_range: str) -> None:
    data = example()
    data["dns"]["vip_range"] = vip_range
    assert str(parse_config(data).dns.vip_range) == vip_range
