"""Istio's preconditions and the configured gateways, checked against the cluster (issue 11 items 3
and 7) rather than assumed.

`kube.KubeApplier.mesh_facts` reads what the checks need (`MeshFacts`); `check_mesh` judges it,
purely, into a `MeshReport`: `blocking` problems stop the pass before anything is written (the
reconciler raises `IstioPreconditionFailed`), the other `problems` are reported in the agent's
status and the pass goes on. Render mode has no cluster to read, so nothing is checked there.

Blocking:
- istiod's `meshConfig.trustDomain` differs from `istio.trust_domain` (the trust domain the CA
  name-constrains this cluster's intermediate to): istiod would sign workload certificates for
  `spiffe://<its trust domain>/…` under an intermediate that may sign only `spiffe://<ours>/…`,
  so every workload chain would fail verification. `cacerts` is not installed.
- `cacerts` would get a different `root-cert.pem` while istiod runs without
  `ISTIO_MULTIROOT_MESH=true`: istiod would ignore the whole change (pilot/pkg/bootstrap/
  istio_ca.go `handleEvent` returns as soon as root-cert.pem differs and `features.MultiRootMesh`
  is off), so it would keep signing with the old intermediate.
Reported:
- no `istio` ConfigMap (istiod not installed yet: the trust domain cannot be checked; Istio's own
  plug-in CA procedure installs `cacerts` before istiod), istiod pods without
  `ISTIO_MULTIROOT_MESH=true`, istiod pods started before `cacerts` existed (they run the
  self-signed CA: `createIstioCA` reads /etc/cacerts only at start, and starts its file watcher
  only in plugged-in mode, so a restart and then a workload roll-out are needed);
- a gateway Service that is missing or lacks a cross-cluster port, an ingress Service that maps one
  to another targetPort than the AuthorizationPolicy expects;
  gateway pods that are missing or run under another service account than the configured one;
- whatever the injected DNS check finds in the parsed meshConfig.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml

from cluster_agent.config import AgentConfig, EgressGatewayConfig, IngressGatewayConfig
from cluster_agent.render.inputs import exporter_order
from meshbridge_wire.models import ExportedService, ImportOut
from meshbridge_wire.protocols import Protocol, parse_protocol

__all__ = [
    "MULTIROOT_ENV",
    "DnsCheck",
    "GatewayFacts",
    "MeshFacts",
    "MeshReport",
    "PodFacts",
    "ServicePort",
    "Traffic",
    "check_mesh",
    "go_bool",
    "traffic",
]

MULTIROOT_ENV = "ISTIO_MULTIROOT_MESH"
# pkg/config/mesh/mesh.go `DefaultMeshConfig`: TrustDomain constants.DefaultClusterLocalDomain;
# `ApplyMeshConfig` overlays the ConfigMap's YAML on those defaults.
DEFAULT_TRUST_DOMAIN = "cluster.local"
# pkg/config/mesh/kubemesh/watcher.go: the mesh config is the `mesh` key of istiod's ConfigMap.
MESH_KEY = "mesh"

DnsCheck = Callable[[Mapping[str, Any]], "str | None"]


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    target_port: int | str | None  # None: the same as `number` (Kubernetes' default)
    name: str = ""


@dataclass(frozen=True, slots=True)
class PodFacts:
    name: str
    service_account: str
    started_at: datetime | None  # status.startTime; None: not started
    env: Mapping[str, str | None] = field(default_factory=dict)  # None: set from a reference (valueFrom)
    container_ports: Mapping[str, int] = field(default_factory=dict)  # named container ports


@dataclass(frozen=True, slots=True)
class GatewayFacts:
    ports: tuple[ServicePort, ...] | None  # of its Service; None: no such Service
    pods: tuple[PodFacts, ...]  # the running pods its selector selects


@dataclass(frozen=True, slots=True)
class MeshFacts:
    gateways: Mapping[tuple[str, str], GatewayFacts]  # by (namespace, Service name)
    mesh_config: str | None  # the `mesh` key of istiod's ConfigMap; None: no such ConfigMap
    istiod_pods: tuple[PodFacts, ...]
    cacerts_created: datetime | None  # creationTimestamp of Secret cacerts; None: not there yet
    cacerts_root_cert: str | None  # its root-cert.pem; None: not there yet
    now: datetime
    # What RBAC would not show (`service <ns>/<name>`, `pods <ns>`, `configmap <ns>/<name>`,
    # `secret <ns>/cacerts`): the checks that need it are skipped, and that is reported.
    unreadable: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Traffic:
    """Which cross-cluster ports the gateways must carry: HTTP exports need the ingress gateway's
    cross_cluster_port, TCP exports its cross_cluster_tcp_port; imports need their egress
    gateway's `port` (HTTP) and `tcp_port` (TCP)."""

    http_exports: bool = False
    tcp_exports: bool = False
    # (namespace, Service) of an egress gateway → (carries HTTP imports, carries TCP imports)
    egress: Mapping[tuple[str, str], tuple[bool, bool]] = field(default_factory=dict)


@dataclass
class MeshReport:
    blocking: list[str] = field(default_factory=list)  # nothing may be written
    problems: list[str] = field(default_factory=list)  # reported; the pass goes on


def go_bool(value: str | None) -> bool:
    """An environment flag as istiod reads it: pkg/env/var.go `BooleanVar.Lookup` uses Go's
    `strconv.ParseBool` and falls back to the default (false for ISTIO_MULTIROOT_MESH,
    pilot/pkg/features/pilot.go) on anything it cannot parse."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def traffic(config: AgentConfig, services: Sequence[ExportedService], imports: Sequence[ImportOut]) -> Traffic:
    """What the published exports and the configured imports among ``imports`` need of the gateways."""
    protocols = [p.protocol for s in services for p in s.ports]
    istio = config.istio
    egress: dict[tuple[str, str], tuple[bool, bool]] = {}
    if config.imports:
        for gateway in config.egress_gateways():
            egress[(istio.gateway_namespace(gateway), gateway.service)] = (False, False)
    carried: dict[str, ImportOut] = {}  # per name, the preferred exporter's: its rule's gateway carries it
    for item in imports:
        rule = config.import_rule(item.cluster)
        if rule is None or not rule.selects(item.name):
            continue
        held = carried.get(item.name)
        if held is None or exporter_order(config, item.cluster) < exporter_order(config, held.cluster):
            carried[item.name] = item
    for item in carried.values():
        rule = config.import_rule(item.cluster)
        assert rule is not None  # selected above
        gateway = rule.egress_gateway or istio.egress_gateway
        key = (istio.gateway_namespace(gateway), gateway.service)
        tcp = [parse_protocol(str(p.get("protocol") or "HTTP")) == Protocol.TCP for p in item.ports]
        http_before, tcp_before = egress.get(key, (False, False))
        egress[key] = (http_before or not all(tcp), tcp_before or any(tcp))
    return Traffic(
        http_exports=any(p != Protocol.TCP for p in protocols),
        tcp_exports=Protocol.TCP in protocols,
        egress=egress,
    )


def check_mesh(
    config: AgentConfig,
    facts: MeshFacts,
    *,
    needs: Traffic,
    root_cert_to_install: str | None,
    dns_check: DnsCheck | None = None,
) -> MeshReport:
    """Every check, in a fixed order, so the same facts give the same report."""
    report = MeshReport()
    report.problems += [
        f"istio: cannot read {what} (forbidden): the checks that need it were skipped; grant the agent the "
        f"chart's RBAC (get, and list for pods)"
        for what in facts.unreadable
    ]
    _check_mesh_config(config, facts, report, dns_check)
    _check_istiod(config, facts, report, root_cert_to_install)
    istio = config.istio
    if needs.http_exports or needs.tcp_exports:
        ports = [("istio.cross_cluster_port", istio.cross_cluster_port)] if needs.http_exports else []
        ports += [("istio.cross_cluster_tcp_port", istio.cross_cluster_tcp_port)] if needs.tcp_exports else []
        _check_gateway(config, "istio.ingress_gateway", istio.ingress_gateway, ports, facts, report)
    for path, gateway in _egress_paths(config):
        key = (istio.gateway_namespace(gateway), gateway.service)
        if key not in needs.egress:
            continue
        http, tcp = needs.egress[key]
        ports = [("port", gateway.port)] if http else []
        ports += [("tcp_port", gateway.tcp_port)] if tcp else []
        _check_gateway(config, path, gateway, [(f"{path}.{k}", n) for k, n in ports], facts, report)
    return report


def _egress_paths(config: AgentConfig) -> list[tuple[str, EgressGatewayConfig]]:
    """Each configured egress gateway once, with the key path it was first configured at."""
    found: dict[tuple[str, str], tuple[str, EgressGatewayConfig]] = {}
    candidates = [("istio.egress_gateway", config.istio.egress_gateway)] + [
        (f"imports[{i}].egress_gateway", rule.egress_gateway)
        for i, rule in enumerate(config.imports)
        if rule.egress_gateway is not None
    ]
    for path, gateway in candidates:
        found.setdefault((config.istio.gateway_namespace(gateway), gateway.service), (path, gateway))
    return list(found.values())


# ------------------------------------------------------------------------------ istiod
def _configmap(config: AgentConfig) -> str:
    return f"{config.istio.namespace}/{config.istio.mesh_configmap}"


def _check_mesh_config(config: AgentConfig, facts: MeshFacts, report: MeshReport, dns_check: DnsCheck | None) -> None:
    where = _configmap(config)
    if f"configmap {where}" in facts.unreadable:
        return
    if facts.mesh_config is None:
        report.problems.append(
            f"istio: ConfigMap {where} not found: istiod is not installed (or runs another revision: set "
            f"istio.revision), so meshConfig.trustDomain was not checked; install istiod with "
            f"meshConfig.trustDomain: {config.istio.trust_domain} and {MULTIROOT_ENV}=true"
        )
        return
    try:
        mesh = yaml.safe_load(facts.mesh_config) or {}
    except yaml.YAMLError:
        mesh = None
    if not isinstance(mesh, Mapping):
        report.blocking.append(
            f"istio: the `{MESH_KEY}` key of ConfigMap {where} is not a YAML mapping, so istiod's trust domain is "
            f"unknown: cacerts not installed, nothing written"
        )
        return
    trust_domain = mesh.get("trustDomain") or DEFAULT_TRUST_DOMAIN
    if trust_domain != config.istio.trust_domain:
        report.blocking.append(
            f"istio: istiod's meshConfig.trustDomain is {trust_domain!r} (ConfigMap {where}) but this cluster's "
            f"trust domain is {config.istio.trust_domain!r} (istio.trust_domain, as registered with the CA): every "
            f"workload certificate would violate the intermediate's name constraints, so cacerts is not "
            f"installed and nothing is written; set meshConfig.trustDomain: {config.istio.trust_domain} in "
            f"istiod's installation and restart istiod"
        )
    if dns_check is not None:
        problem = dns_check(mesh)
        if problem:
            report.problems.append(problem)


def _multiroot_off(pods: Iterable[PodFacts]) -> list[str]:
    return sorted(p.name for p in pods if p.started_at is not None and not go_bool(p.env.get(MULTIROOT_ENV)))


def _check_istiod(config: AgentConfig, facts: MeshFacts, report: MeshReport, root_cert_to_install: str | None) -> None:
    ns = config.istio.namespace
    if f"pods {ns}" in facts.unreadable:
        return
    labels = ", ".join(f"{k}={v}" for k, v in config.istio.istiod_selector.items())
    running = [p for p in facts.istiod_pods if p.started_at is not None]
    if not running:
        if facts.mesh_config is not None:
            report.problems.append(
                f"istio: no running istiod pod in {ns} with labels {labels}: {MULTIROOT_ENV} and istiod's start "
                f"were not checked"
            )
        return
    restart = f"kubectl -n {ns} rollout restart deployment/istiod" + (
        f"-{config.istio.revision}" if config.istio.revision else ""
    )
    off = _multiroot_off(running)
    if off:
        changes_roots = (
            root_cert_to_install is not None
            and facts.cacerts_root_cert is not None
            and facts.cacerts_root_cert != root_cert_to_install
        )
        why = (
            f"istiod ignores every cacerts change whose root-cert.pem differs (root phases 2 to 4) unless "
            f"{MULTIROOT_ENV}=true; set it in istiod's env (istiod Helm chart: env.{MULTIROOT_ENV}=true; "
            f"istioctl: values.pilot.env.{MULTIROOT_ENV}=true) and restart istiod ({restart})"
        )
        if changes_roots:
            report.blocking.append(
                f"istio: cacerts would change its root-cert.pem (a root phase) but istiod pod(s) {', '.join(off)} "
                f"run without {MULTIROOT_ENV}=true: cacerts not updated, nothing written; {why}"
            )
        else:
            report.problems.append(
                f"istio: istiod pod(s) {', '.join(off)} run without {MULTIROOT_ENV}=true; {why}, before a root rotation"
            )
    if f"secret {ns}/cacerts" in facts.unreadable or report.blocking:
        return
    adopted = facts.cacerts_created or facts.now
    stale = sorted(p.name for p in running if p.started_at is not None and p.started_at < adopted)
    if stale:
        report.problems.append(
            f"istio: istiod pod(s) {', '.join(stale)} started before cacerts existed, so they run istiod's "
            f"self-signed CA and ignore cacerts: restart istiod ({restart}), then roll out every workload "
            f"(kubectl rollout restart deployment -n <namespace>) so each gets a certificate from the new "
            f"intermediate"
        )


# ------------------------------------------------------------------------------ gateways
def _expected_target(gateway: IngressGatewayConfig, port: int) -> int:
    """The container port an ingress cross-cluster Service port must lead to: istiod binds the
    Gateway server's listener on the matching Service port's targetPort (pilot/pkg/model/gateway.go
    `resolvePorts`), and the AuthorizationPolicy's `ports`/`notPorts` match that listener port.
    Hook: when the configuration names the gateway's target ports
    (`istio.ingress_gateway.target_port` / `tcp_target_port`), return those here; until then the
    Service port itself, as the AuthorizationPolicy is rendered with it."""
    del gateway
    return port


def _resolve_target(port: ServicePort, pods: Sequence[PodFacts]) -> int | None:
    if port.target_port is None:
        return port.number
    if isinstance(port.target_port, int):
        return port.target_port
    numbers = {p.container_ports[port.target_port] for p in pods if port.target_port in p.container_ports}
    return numbers.pop() if len(numbers) == 1 else None


def _check_gateway(
    config: AgentConfig,
    path: str,
    gateway: IngressGatewayConfig | EgressGatewayConfig,
    ports: Sequence[tuple[str, int]],
    facts: MeshFacts,
    report: MeshReport,
) -> None:
    ns = config.istio.gateway_namespace(gateway)
    where = f"{ns}/{gateway.service}"
    found = facts.gateways.get((ns, gateway.service))
    if found is None:
        return
    if f"service {where}" not in facts.unreadable:
        _check_service(path, gateway, where, ports, found, report)
    if f"pods {ns}" not in facts.unreadable:
        _check_pods(path, gateway, ns, found, report)


def _check_service(
    path: str,
    gateway: IngressGatewayConfig | EgressGatewayConfig,
    where: str,
    ports: Sequence[tuple[str, int]],
    found: GatewayFacts,
    report: MeshReport,
) -> None:
    if found.ports is None:
        hint = " (Istio's default profile installs no egress gateway)" if path.endswith("egress_gateway") else ""
        report.problems.append(
            f"istio: {path}.service: Service {where} does not exist{hint}; install the gateway or name its Service"
        )
        return
    by_number = {p.number: p for p in found.ports}
    for key, number in ports:
        service_port = by_number.get(number)
        if service_port is None:
            report.problems.append(
                f"istio: Service {where} has no port {number} ({key}): other clusters cannot reach the Gateway "
                f"server there; add it to the gateway's Service (Istio's gateway charts expose 15021, 80 and 443 "
                f"only)"
            )
            continue
        if not isinstance(gateway, IngressGatewayConfig):
            continue  # an egress Gateway server may listen anywhere (443 → 8443 in Istio's charts)
        target = _resolve_target(service_port, found.pods)
        expected = _expected_target(gateway, number)
        if target is None:
            report.problems.append(
                f"istio: Service {where} port {number} has the named targetPort {service_port.target_port!r}, which "
                f"no gateway pod names: its listener port is unknown"
            )
        elif target != expected:
            report.problems.append(
                f"istio: Service {where} maps port {number} ({key}) to targetPort {target}, not {expected}: istiod "
                f"binds the Gateway server on the targetPort, where the AuthorizationPolicy's ports do not match"
            )


def _check_pods(
    path: str,
    gateway: IngressGatewayConfig | EgressGatewayConfig,
    ns: str,
    found: GatewayFacts,
    report: MeshReport,
) -> None:
    labels = ", ".join(f"{k}={v}" for k, v in gateway.selector.items())
    if not found.pods:
        report.problems.append(
            f"istio: {path}.selector: no running pod in {ns} has the labels {labels}: the Gateway selects nothing"
        )
        return
    others = sorted({p.service_account for p in found.pods} - {gateway.service_account})
    if others:
        names = sorted(p.name for p in found.pods if p.service_account != gateway.service_account)
        report.problems.append(
            f"istio: {path}.service_account is {gateway.service_account!r} but pod(s) {', '.join(names)} run as "
            f"{', '.join(repr(o) for o in others)}: peers expect the published identity, so mTLS to and from this "
            f"gateway fails; set {path}.service_account: {others[0]}"
        )
