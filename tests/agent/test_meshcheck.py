"""Issue 11 items 3 and 7: `meshcheck.check_mesh` judges what the agent read from the cluster. Each
problem is a clear line; only a trust-domain mismatch (or an unreadable meshConfig) and a root change
istiod would ignore block the pass. The same checks run against a real API server in
tests/e2e/test_istio_preconditions_e2e.py."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cluster_agent.config import AgentConfig, parse_config
from cluster_agent.meshcheck import (
    GatewayFacts,
    MeshFacts,
    PodFacts,
    ServicePort,
    Traffic,
    check_mesh,
    go_bool,
    traffic,
)
from meshbridge_wire.models import ExportedService, ImportOut

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(hours=1)
ROOT_A = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n"
ROOT_AB = ROOT_A + "-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n"
ING = ("istio-system", "istio-ingressgateway")
EGR = ("istio-system", "istio-egressgateway")
HTTP_ONLY = Traffic(http_exports=True, egress={EGR: (True, False)})


def config(**istio: Any) -> AgentConfig:
    section: dict[str, Any] = {"trust_domain": "b.mesh", "ingress_gateway": {"address": "198.51.100.20"}, **istio}
    return parse_config(
        {
            "cluster": "b",
            "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/ca-root.pem"},
            "istio": section,
            "exports": [{"service": "ratings", "namespace": "bookinfo", "ports": [9080], "consumers": ["a"]}],
            "imports": [{"from": "a", "names": ["*"]}],
        }
    )


def istiod(env: Mapping[str, str | None] | None = None, started: datetime | None = EARLIER) -> PodFacts:
    return PodFacts("istiod-1", "istiod", started, {"ISTIO_MULTIROOT_MESH": "true"} if env is None else env)


def gateway(sa: str, ports: list[ServicePort] | None, *, named: Mapping[str, int] | None = None) -> GatewayFacts:
    pods = (PodFacts(f"{sa}-pod", sa, EARLIER, {}, dict(named or {})),)
    return GatewayFacts(tuple(ports) if ports is not None else None, pods)


def healthy(**changes: Any) -> MeshFacts:
    facts: dict[str, Any] = {
        "gateways": {
            ING: gateway(
                "istio-ingressgateway-service-account", [ServicePort(15443, 15443), ServicePort(15444, 15444)]
            ),
            EGR: gateway("istio-egressgateway-service-account", [ServicePort(443, 8443), ServicePort(15444, None)]),
        },
        "mesh_config": "trustDomain: b.mesh\n",
        "istiod_pods": (istiod(),),
        "cacerts_created": EARLIER - timedelta(minutes=5),
        "cacerts_root_cert": ROOT_A,
        "now": NOW,
    }
    facts.update(changes)
    return MeshFacts(**facts)


def problems(
    facts: MeshFacts, *, cfg: AgentConfig | None = None, needs: Traffic = HTTP_ONLY, root: str = ROOT_A
) -> tuple[list[str], list[str]]:
    report = check_mesh(cfg or config(), facts, needs=needs, root_cert_to_install=root)
    return report.blocking, report.problems


def test_a_healthy_mesh_has_no_problem() -> None:
    assert problems(healthy()) == ([], [])


@pytest.mark.parametrize("mesh", ["trustDomain: a.mesh\n", "", "defaultConfig: {}\n", "trustDomain: ''\n"])
def test_another_trust_domain_blocks_the_pass(mesh: str) -> None:
    """An absent or empty trustDomain is Istio's default, cluster.local (pkg/config/mesh/mesh.go)."""
    blocking, _ = problems(healthy(mesh_config=mesh))
    (line,) = blocking
    found = "a.mesh" if "a.mesh" in mesh else "cluster.local"
    assert line.startswith(f"istio: istiod's meshConfig.trustDomain is '{found}' (ConfigMap istio-system/istio)")
    assert "cacerts is not installed and nothing is written" in line and "set meshConfig.trustDomain: b.mesh" in line


def test_an_unreadable_mesh_config_blocks_and_a_missing_one_is_reported() -> None:
    blocking, _ = problems(healthy(mesh_config="[not, a, mapping]"))
    assert blocking == [
        "istio: the `mesh` key of ConfigMap istio-system/istio is not a YAML mapping, so istiod's trust domain is "
        "unknown: cacerts not installed, nothing written"
    ]
    blocking, found = problems(healthy(mesh_config=None, istiod_pods=()))
    assert blocking == []
    assert found == [
        "istio: ConfigMap istio-system/istio not found: istiod is not installed (or runs another revision: set "
        "istio.revision), so meshConfig.trustDomain was not checked; install istiod with meshConfig.trustDomain: "
        "b.mesh and ISTIO_MULTIROOT_MESH=true"
    ]
    _, found = problems(healthy(mesh_config=None, istiod_pods=()), cfg=config(revision="canary"))
    assert "ConfigMap istio-system/istio-canary not found" in found[0]


@pytest.mark.parametrize(
    ("value", "on"),
    [
        ("true", True),
        ("1", True),
        ("True", True),
        ("T", True),
        ("yes", False),
        ("on", False),
        ("", False),
        (None, False),
    ],
)
def test_flags_parse_as_gos_strconv_parse_bool(value: str | None, on: bool) -> None:
    assert go_bool(value) is on


def test_istiod_without_multiroot_is_reported_and_blocks_a_root_change() -> None:
    off = healthy(istiod_pods=(istiod({}),))
    blocking, found = problems(off)
    assert blocking == []
    (line,) = found
    assert line.startswith("istio: istiod pod(s) istiod-1 run without ISTIO_MULTIROOT_MESH=true;")
    assert (
        "istioctl: values.pilot.env.ISTIO_MULTIROOT_MESH=true" in line
        and "kubectl -n istio-system rollout restart deployment/istiod" in line
    )
    blocking, _ = problems(off, root=ROOT_AB)  # root phase 2: istiod would ignore the whole cacerts change
    (line,) = blocking
    assert line.startswith("istio: cacerts would change its root-cert.pem (a root phase) but istiod pod(s) istiod-1")
    assert "cacerts not updated, nothing written" in line
    assert problems(healthy(), root=ROOT_AB) == ([], [])  # with the flag: fine
    assert problems(healthy(istiod_pods=(istiod({"ISTIO_MULTIROOT_MESH": None}),)), root=ROOT_AB)[
        0
    ]  # valueFrom: unknown


def test_istiod_started_before_cacerts_needs_a_restart_then_a_roll_out() -> None:
    for facts in (
        healthy(cacerts_created=None, cacerts_root_cert=None),  # first adoption: this pass creates cacerts
        healthy(cacerts_created=EARLIER + timedelta(minutes=1)),  # created after istiod started, not restarted since
    ):
        blocking, found = problems(facts)
        assert blocking == []
        (line,) = found
        assert line.startswith(
            "istio: istiod pod(s) istiod-1 started before cacerts existed, so they run istiod's self-signed CA"
        )
        assert (
            "restart istiod (kubectl -n istio-system rollout restart deployment/istiod), then roll out every workload"
            in line
        )
    assert problems(healthy(cacerts_created=None, istiod_pods=(istiod(started=None),)))[1] == [
        "istio: no running istiod pod in istio-system with labels app=istiod, istio.io/rev=default: "
        "ISTIO_MULTIROOT_MESH and istiod's start were not checked"
    ]


def test_gateway_services_need_the_cross_cluster_ports_and_the_ingress_its_target_ports() -> None:
    tcp = Traffic(http_exports=True, tcp_exports=True, egress={EGR: (True, True)})
    facts = healthy(
        gateways={
            ING: gateway("istio-ingressgateway-service-account", [ServicePort(15443, 8443)]),  # no 15444; 15443 → 8443
            EGR: gateway(
                "istio-egressgateway-service-account", [ServicePort(443, 8443)]
            ),  # no 15444; 443 → 8443 is fine
        }
    )
    blocking, found = problems(facts, needs=tcp)
    assert blocking == []
    assert found == [
        "istio: Service istio-system/istio-ingressgateway maps port 15443 (istio.cross_cluster_port) to targetPort 8443, "
        "not 15443: istiod binds the Gateway server on the targetPort, where the AuthorizationPolicy's ports do not match",
        "istio: Service istio-system/istio-ingressgateway has no port 15444 (istio.cross_cluster_tcp_port): other clusters "
        "cannot reach the Gateway server there; add it to the gateway's Service (Istio's gateway charts expose 15021, 80 "
        "and 443 only)",
        "istio: Service istio-system/istio-egressgateway has no port 15444 (istio.egress_gateway.tcp_port): other "
        "clusters cannot reach the Gateway server there; add it to the gateway's Service (Istio's gateway charts expose "
        "15021, 80 and 443 only)",
    ]
    assert problems(facts, needs=Traffic())[1] == []  # nothing exported or imported through them: nothing needed


def test_named_target_ports_resolve_through_the_gateway_pods() -> None:
    tcp = Traffic(http_exports=True, tcp_exports=True)
    ports = [ServicePort(15443, "tls"), ServicePort(15444, "nope")]
    facts = healthy(gateways={ING: gateway("istio-ingressgateway-service-account", ports, named={"tls": 15443})})
    assert problems(facts, needs=tcp)[1] == [
        "istio: Service istio-system/istio-ingressgateway port 15444 has the named targetPort 'nope', which no gateway "
        "pod names: its listener port is unknown"
    ]


def test_missing_gateways_and_other_service_accounts_are_reported() -> None:
    facts = healthy(
        gateways={
            ING: gateway("istio-ingress", [ServicePort(15443, None)]),  # Helm gateway chart: SA = release name
            EGR: GatewayFacts(None, ()),  # the default profile has no egress gateway
        }
    )
    _, found = problems(facts)
    assert found == [
        "istio: istio.ingress_gateway.service_account is 'istio-ingressgateway-service-account' but pod(s) "
        "istio-ingress-pod run as 'istio-ingress': peers expect the published identity, so mTLS to and from this "
        "gateway fails; set istio.ingress_gateway.service_account: istio-ingress",
        "istio: istio.egress_gateway.service: Service istio-system/istio-egressgateway does not exist (Istio's default "
        "profile installs no egress gateway); install the gateway or name its Service",
        "istio: istio.egress_gateway.selector: no running pod in istio-system has the labels istio=egressgateway: the "
        "Gateway selects nothing",
    ]


def test_unreadable_facts_are_reported_once_and_their_checks_skipped() -> None:
    facts = healthy(
        mesh_config=None,
        istiod_pods=(),
        gateways={ING: GatewayFacts(None, ()), EGR: GatewayFacts(None, ())},
        unreadable=(
            "configmap istio-system/istio",
            "pods istio-system",
            "service istio-system/istio-ingressgateway",
            "service istio-system/istio-egressgateway",
        ),
    )
    blocking, found = problems(facts)
    assert blocking == []
    assert len(found) == 4 and all(line.startswith("istio: cannot read ") and "(forbidden)" in line for line in found)


def test_the_dns_hook_gets_the_parsed_mesh_config() -> None:
    seen: list[Mapping[str, Any]] = []

    def dns(mesh: Mapping[str, Any]) -> str | None:
        seen.append(mesh)
        return "dns: ISTIO_META_DNS_CAPTURE is off"

    facts = healthy(
        mesh_config="trustDomain: b.mesh\ndefaultConfig: {proxyMetadata: {ISTIO_META_DNS_CAPTURE: 'false'}}\n"
    )
    report = check_mesh(config(), facts, needs=HTTP_ONLY, root_cert_to_install=ROOT_A, dns_check=dns)
    assert seen == [{"trustDomain": "b.mesh", "defaultConfig": {"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "false"}}}]
    assert report.problems == ["dns: ISTIO_META_DNS_CAPTURE is off"]


def test_traffic_follows_the_exports_and_the_selected_imports() -> None:
    cfg = parse_config(
        {
            "cluster": "b",
            "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/ca-root.pem"},
            "istio": {"trust_domain": "b.mesh"},
            "imports": [
                {"from": "a", "names": ["*"]},
                {
                    "from": "c",
                    "names": ["db.shop"],
                    "egress_gateway": {"selector": {"istio": "to-c"}, "service": "to-c", "service_account": "to-c"},
                },
            ],
        }
    )
    services = [
        ExportedService.model_validate(
            {"name": "db.shop", "namespace": "shop", "service": "db", "ports": [{"number": 5432, "protocol": "TCP"}]}
        )
    ]

    def offered(name: str, cluster: str, protocol: str) -> ImportOut:
        return ImportOut(
            name=name, cluster=cluster, ports=[{"number": 1, "protocol": protocol}], gateway=None, identity=None
        )

    needs = traffic(
        cfg, services, [offered("r.x", "a", "HTTP"), offered("db.shop", "c", "TCP"), offered("other.shop", "c", "HTTP")]
    )
    assert (needs.http_exports, needs.tcp_exports) == (False, True)
    assert needs.egress == {
        ("istio-system", "istio-egressgateway"): (True, False),
        ("istio-system", "to-c"): (False, True),
    }
    # issue 13: db.shop exported by a too, which is preferred (priority 0 against 0, sorts first):
    # all of db.shop goes through a's gateway, so c's dedicated one carries nothing
    both = traffic(cfg, services, [offered("db.shop", "a", "TCP"), offered("db.shop", "c", "TCP")])
    assert both.egress == {
        ("istio-system", "istio-egressgateway"): (False, True),
        ("istio-system", "to-c"): (False, False),
    }
