"""Istio objects for the hop-by-hop shape of ISTIO-NOTES ("Shape that works today").

A call from a workload in cluster b to `ratings.bookinfo.remote:9080`, exported by cluster a:

1. b, sidecar: ServiceEntry `ratings.bookinfo.remote` (its VIP, port `http-9080`) makes the name
   routable; the import's VirtualService, bound to `mesh`, sends port 9080 to the egress gateway
   Service on its Gateway port (443), subset `meshbridge`, rewriting the authority to
   `ratings.bookinfo.remote:9080` so the port survives every later hop whatever the client sent,
   with `retries: {attempts: 0}` (see Retries below).
2. b, sidecar → egress: the egress DestinationRule's `meshbridge` subset speaks ISTIO_MUTUAL with
   SNI `meshbridge-egress.remote`, a name on the egress Gateway server (HTTPS, ISTIO_MUTUAL) that
   no import can take (imports have two labels before the suffix), so one subset serves every
   import instead of one cluster per import and egress port in every sidecar.
3. b, egress gateway: the same VirtualService, bound to the egress Gateway, matches the authority
   `ratings.bookinfo.remote:9080` and routes to the `.remote` host on port 9080, whose endpoint
   is a's ingress gateway address on the cross-cluster port (`Import.gateway.port`); the import's
   DestinationRule makes that hop ISTIO_MUTUAL with `sni: ratings.bookinfo.remote` and a's ingress
   identity as SAN. This route too has `retries: {attempts: 0}`.
4. a, ingress gateway: a Gateway server on the cross-cluster port (HTTPS, ISTIO_MUTUAL) lists only
   exported hosts; the export's VirtualService routes the authority's port to
   `ratings.bookinfo.svc.cluster.local:9080` and rewrites the authority to
   `ratings.bookinfo.svc.cluster.local:9080` (no `:80` for port 80), the Host an in-cluster client
   would send, so the destination (virtual hosts, Host checks, its own `hosts` policies) accepts
   it: Istio turns `rewrite.authority` into Envoy's `host_rewrite_literal`
   (pilot/pkg/networking/core/route/route.go `applyHTTPRouteDestination`), and the destination's
   sidecar accepts any Host (`buildSidecarInboundHTTPRouteConfig`: domains `*`). An
   AuthorizationPolicy admits only the consumers' egress identities for that host.

Retries: with no `retries` on a route Istio applies its default, 2 retries on
`connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` (no status code listed)
with the previous-hosts predicate (pilot/pkg/networking/core/route/retry/retry.go `DefaultPolicy`),
set on every HTTP route (route.go `applyHTTPRouteDestination` → `retry.ConvertPolicy`). On three
hops a gRPC UNAVAILABLE from the destination would be tried 3 * 3 * 3 = 27 times. Only the last
hop, b's ingress gateway, keeps the default: it is the one hop that can pick another destination pod
(the previous-hosts predicate) when one is restarting, the failure these retries are for, and its
retries never resend a request across clusters; the importer's two routes set
`retries: {attempts: 0}`, which
`ConvertPolicy` turns into no retry policy at all ("explicitly disabling"). The destination's own
sidecar keeps its inbound `reset-before-request` retries (`BuildDefaultHTTPInboundRoute`), which
resend only requests that never left it.

Plain TCP (a port with protocol TCP) takes the same hops on TLS servers of their own ports, since
Istio cannot mix HTTPS and TLS servers on one gateway port. Each TCP port of a name crosses on an
SNI of its own (`tcp_snis`): the `.remote` host itself when it is the name's only TCP port, else
`<port>.<host>` for each (three or more labels before the suffix: never an imported name, two
labels, nor the egress SNI, one). A terminated TLS server takes the `tcp` route of the first
VirtualService whose hosts meet the server's, matching on port only
(pilot/pkg/networking/core/gateway.go `buildGatewayNetworkFiltersFromTCPRoutes`), so each SNI has
its own TLS server and its own VirtualService at both gateways:

1. b, sidecar: the ServiceEntry's own VIP and the TCP port select the import's `tcp` route, which
   sends the connection to the egress gateway's TCP port (`egress_gateway.tcp_port`, 15444), the
   subset of that port's SNI, whose ISTIO_MUTUAL `sni` is that SNI.
2. b, egress gateway: one TLS server (ISTIO_MUTUAL) per SNI on that port, hosts = the SNI, so the
   SNI picks the filter chain; the `tcp` route of the VirtualService for that SNI, bound to the
   egress Gateway, sends it to the `.remote` host's TCP port, whose endpoint is the exporter's
   published TCP port (`Import.gateway.tcp_port`); the import's DestinationRule (ISTIO_MUTUAL, SAN)
   sets that port's `sni` (per port in `portLevelSettings` when it is not the host).
3. a, ingress gateway: one TLS server (ISTIO_MUTUAL) per SNI on `cross_cluster_tcp_port`; the `tcp`
   route of that SNI's VirtualService delivers to `<svc>.<ns>.svc.cluster.local:<port>`; the
   AuthorizationPolicy admits only the consumers for `connection.sni` = the export's SNIs (TCP has
   no Host).

Gateway servers on one port: Istio merges every TLS server of a port into one listener with a
filter chain per server, matched on the server's hosts as SNIs; a host may appear in one TLS server
per port only (pilot/pkg/model/gateway.go `mergeGateways` → `CheckDuplicates` skips the later server:
Envoy refuses two chains with the same match), while one server may list many hosts (the HTTPS
server lists every HTTP export). A name's only TCP port crosses on the host, which the HTTPS server
lists too when the name has HTTP ports: on one port `CheckDuplicates` would drop the TLS server,
hence TCP on a port of its own (`cross_cluster_tcp_port`, `egress_gateway.tcp_port`).

Gateways ignore the port in Host matching (`ignore_port_in_host_matching`), so
`ratings.bookinfo.remote:9080` selects the `ratings.bookinfo.remote` virtual host and the route
matches on the full authority.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cluster_agent.config import AgentConfig, EgressGatewayConfig
from cluster_agent.render.failover import failover_policy, import_endpoints, resolution
from cluster_agent.render.inputs import Exporter, ExportSpec, ImportSpec, PeerSpec, PortSpec
from cluster_agent.render.objects import (
    NAME_ANNOTATION,
    SOURCE_CLUSTER_LABEL,
    Manifest,
    managed_labels,
    metadata,
    object_names,
)

__all__ = [
    "EGRESS_SUBSET",
    "INGRESS_GATEWAY",
    "EgressTarget",
    "IstioContext",
    "consumer_principals",
    "render_egress_destination_rule",
    "render_egress_gateway",
    "render_export_authorization_policy",
    "render_export_side",
    "render_export_tcp_virtual_service",
    "render_export_virtual_service",
    "render_import_destination_rule",
    "render_import_side",
    "render_import_tcp_virtual_service",
    "render_import_virtual_service",
    "render_ingress_gateway",
    "render_service_entry",
    "tcp_snis",
    "tcp_subsets",
]

NETWORKING = "networking.istio.io/v1"
SECURITY = "security.istio.io/v1"
INGRESS_GATEWAY = "meshbridge-ingress"
EGRESS_GATEWAY = "meshbridge-egress"
EGRESS_SUBSET = "meshbridge"
SERVER_PORT_NAME = "https-meshbridge"
TCP_SUBSET_PREFIX = "tcp"
EXPORT_TO_ALL = ("*",)
# `retries` of the importer's routes: Istio's default policy stays on the exporter's ingress only.
NO_RETRIES = {"attempts": 0}
HTTP_DEFAULT_PORT = 80


@dataclass(frozen=True, slots=True)
class EgressTarget:
    """One egress gateway carrying imports: its Gateway, Service and the SNI sidecars send it."""

    gateway_name: str
    gateway_ref: str  # <namespace>/<name>, as VirtualServices reference it
    selector: Mapping[str, str]
    namespace: str  # of the gateway's pods: imports through it are exported there
    service_host: str  # FQDN of the gateway's Service
    port: int
    sni: str
    tcp_port: int


@dataclass(frozen=True, slots=True)
class IstioContext:
    cluster: str
    namespace: str
    suffix: str
    cluster_domain: str
    cross_cluster_port: int
    cross_cluster_tcp_port: int
    authorization_mode: Literal["deny", "allow"]
    ingress_selector: Mapping[str, str]
    # Where the export AuthorizationPolicies live: the ingress gateway's own namespace. A policy with
    # a selector binds only to workloads of its own namespace, unless it sits in the root namespace
    # (pilot/pkg/model/authorization.go `ListAuthorizationPolicies` looks in the mesh's
    # RootNamespace and the workload's namespace only).
    policy_namespace: str
    default_egress: EgressTarget
    egress_by_source: Mapping[str, EgressTarget]
    # The ingress gateway pods' container ports behind cross_cluster_port / cross_cluster_tcp_port.
    ingress_target_port: int
    ingress_tcp_target_port: int
    # Per source cluster: the namespaces whose sidecars may call its names (None: each name's own).
    consumer_namespaces: Mapping[str, tuple[str, ...] | None]

    @classmethod
    def from_config(cls, config: AgentConfig) -> IstioContext:
        istio = config.istio
        default = _egress_target(config, istio.egress_gateway, EGRESS_GATEWAY)
        by_source: dict[str, EgressTarget] = {}
        for rule in config.imports:
            gateway = rule.egress_gateway
            if gateway is None or gateway == istio.egress_gateway:
                continue
            namespace = istio.gateway_namespace(gateway)
            name = f"{EGRESS_GATEWAY}-{gateway.service}"
            if namespace != istio.namespace:
                name = f"{EGRESS_GATEWAY}-{namespace}-{gateway.service}"
            by_source[rule.from_] = _egress_target(config, gateway, name)
        target_port, tcp_target_port = istio.ingress_target_ports()
        return cls(
            cluster=config.cluster,
            namespace=istio.namespace,
            suffix=config.dns.suffix,
            cluster_domain=istio.cluster_domain,
            cross_cluster_port=istio.cross_cluster_port,
            cross_cluster_tcp_port=istio.cross_cluster_tcp_port,
            authorization_mode=istio.authorization_mode,
            ingress_selector=dict(istio.ingress_gateway.selector),
            policy_namespace=istio.gateway_namespace(istio.ingress_gateway),
            default_egress=default,
            egress_by_source=by_source,
            ingress_target_port=target_port,
            ingress_tcp_target_port=tcp_target_port,
            consumer_namespaces={rule.from_: config.consumer_namespaces(rule) for rule in config.imports},
        )

    def host(self, name: str) -> str:
        return f"{name}.{self.suffix}"

    def egress_for(self, cluster: str) -> EgressTarget:
        return self.egress_by_source.get(cluster, self.default_egress)

    def import_export_to(self, spec: ImportSpec, egress: EgressTarget) -> tuple[str, ...]:
        """`exportTo` of an import's ServiceEntry, VirtualService and DestinationRule.

        Without a Sidecar resource every sidecar builds a cluster per port of each ServiceEntry
        exported to its namespace (pilot/pkg/model/push_context.go IsServiceVisible), so an import
        goes only to its consumer namespaces (default: the namespace in its own name, as MCS
        namespace sameness reads `<service>.<namespace>`) plus the egress gateway's namespace, whose
        proxy needs all three: the `.remote` cluster, the VirtualService bound to its Gateway
        (VirtualServicesForGateway looks them up by the proxy's namespace) and the DestinationRule
        of the hop to the exporter. Namespaces are written by name, never `.`: a DestinationRule's
        `.` stays a literal that getExportedDestinationRuleFromNamespace compares with the client's
        namespace, so `[".", "ns"]` in the root namespace would hide it from a root-namespace egress
        gateway (setDestinationRules keeps only single-namespace rules in rootNamespaceLocal).
        """
        namespaces = self.consumer_namespaces.get(spec.cluster)
        if namespaces is None:
            namespaces = (spec.local.split(".", 1)[1],)
        if "*" in namespaces:
            return EXPORT_TO_ALL
        return tuple(sorted({*namespaces, egress.namespace}))

    def labels(self, component: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return managed_labels(self.cluster, component, extra)


def _egress_target(config: AgentConfig, gateway: EgressGatewayConfig, name: str) -> EgressTarget:
    istio = config.istio
    namespace = istio.gateway_namespace(gateway)
    return EgressTarget(
        gateway_name=name,
        gateway_ref=f"{istio.namespace}/{name}",
        selector=dict(gateway.selector),
        namespace=namespace,
        service_host=f"{gateway.service}.{namespace}.svc.{istio.cluster_domain}",
        port=gateway.port,
        # One label before the suffix: never the host of an import (<service>.<namespace>.<suffix>).
        sni=f"{EGRESS_GATEWAY}.{config.dns.suffix}",
        tcp_port=gateway.tcp_port,
    )


def _manifest(api_version: str, kind: str, meta: dict[str, Any], spec: dict[str, Any]) -> Manifest:
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec}


def _server(name: str, port: int, hosts: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "port": {"number": port, "name": SERVER_PORT_NAME, "protocol": "HTTPS"},
        "hosts": hosts,
        "tls": {"mode": "ISTIO_MUTUAL"},
    }


def _tls_server(label: str, port: int, host: str) -> dict[str, Any]:
    """One TLS server (Istio mTLS terminated, then plain TCP) per SNI: a host may sit in one TLS
    server per port only (`mergeGateways` → `CheckDuplicates`), and the server's hosts decide which
    VirtualService's `tcp` route it takes (`buildGatewayNetworkFiltersFromTCPRoutes`)."""
    return {
        "name": label,
        "port": {"number": port, "name": f"tls-{label}", "protocol": "TLS"},
        "hosts": [host],
        "tls": {"mode": "ISTIO_MUTUAL"},
    }


def tcp_snis(host: str, ports: Sequence[PortSpec]) -> dict[int, str]:
    """The SNI each TCP port of `host` crosses both gateways with, by port number.

    A name's only TCP port keeps the host itself (what agents sent before a name could have several
    TCP ports); with several, each is `<port>.<host>`, a DNS name with three or more labels before
    the suffix, so never an imported host (two) nor the egress SNI (one). The AuthorizationPolicy's
    `connection.sni` values for an export are these.
    """
    numbers = [p.number for p in ports if p.is_tcp]
    if len(numbers) == 1:
        return {numbers[0]: host}
    return {number: f"{number}.{host}" for number in numbers}


def tcp_subsets(snis: Sequence[str]) -> dict[str, str]:
    """Map each TCP SNI to a DNS label: its egress subset and TLS server names."""
    return object_names(snis, prefix=TCP_SUBSET_PREFIX, max_len=63)


def _own_tcp_snis(host: str, ports: Sequence[PortSpec]) -> dict[int, str]:
    """The TCP SNIs other than the host: each needs a VirtualService of its own at the gateway."""
    return {number: sni for number, sni in tcp_snis(host, ports).items() if sni != host}


def _tcp_key(name: str, port: int) -> str:
    """The object-name key of the VirtualService of TCP port `port` of `name` (own SNI)."""
    return f"{name}.tcp-{port}"


def _object_keys(name: str, host: str, ports: Sequence[PortSpec]) -> list[str]:
    """Object-name keys of one export or import: its name, one per TCP SNI of its own."""
    return [name, *(_tcp_key(name, number) for number in _own_tcp_snis(host, ports))]


def _destination_authority(target: str, port: PortSpec) -> str:
    """The Host an in-cluster client sends for `target` on `port` (RFC 9110: no default port)."""
    return target if port.number == HTTP_DEFAULT_PORT else f"{target}:{port.number}"


def _http_ports(ports: Sequence[PortSpec]) -> list[PortSpec]:
    return [p for p in ports if not p.is_tcp]


def _tcp_ports(ports: Sequence[PortSpec]) -> list[PortSpec]:
    return [p for p in ports if p.is_tcp]


def _authority_matches(host: str, port: PortSpec, gateway_ref: str | None = None) -> list[dict[str, Any]]:
    """Match requests for `port` by their authority; a client omits the default port 80."""
    authorities = [f"{host}:{port.number}", host] if port.number == 80 else [f"{host}:{port.number}"]
    matches: list[dict[str, Any]] = []
    for authority in authorities:
        match: dict[str, Any] = {"authority": {"exact": authority}}
        if gateway_ref is not None:
            match["gateways"] = [gateway_ref]
        matches.append(match)
    return matches


# --------------------------------------------------------------------------------------------
# Exporting side


def render_ingress_gateway(ctx: IstioContext, hosts: Sequence[str], tcp_snis: Sequence[str] = ()) -> Manifest:
    """The one ingress Gateway: only exported hosts, only from Istio-issued client certificates.

    Hosts carry the Gateway's namespace, so only VirtualServices there can bind them. HTTP exports
    share one HTTPS server on the cross-cluster port; each TCP SNI (`tcp_snis`) has its own TLS
    server on the cross-cluster TCP port.
    """
    servers: list[dict[str, Any]] = []
    if hosts:
        server_hosts = [f"{ctx.namespace}/{h}" for h in sorted(hosts)]
        servers.append(_server(INGRESS_GATEWAY, ctx.cross_cluster_port, server_hosts))
    labels = tcp_subsets(tcp_snis)
    servers += [_tls_server(labels[s], ctx.cross_cluster_tcp_port, f"{ctx.namespace}/{s}") for s in sorted(tcp_snis)]
    spec = {"selector": dict(ctx.ingress_selector), "servers": servers}
    return _manifest(NETWORKING, "Gateway", metadata(INGRESS_GATEWAY, ctx.namespace, ctx.labels("export")), spec)


def _export_target(ctx: IstioContext, export: ExportSpec) -> str:
    return f"{export.service}.{export.namespace}.svc.{ctx.cluster_domain}"


def _export_tcp_route(ctx: IstioContext, target: str, port: int) -> dict[str, Any]:
    return {
        "match": [{"port": ctx.cross_cluster_tcp_port}],
        "route": [{"destination": {"host": target, "port": {"number": port}}}],
    }


def render_export_virtual_service(ctx: IstioContext, export: ExportSpec, name: str) -> Manifest | None:
    """The export's host at the ingress: HTTP ports by authority, rewritten to the destination's
    own Host; the TCP port whose SNI is the host (a name's only one). None when no port is left
    for it (several TCP ports only: each has its own; Istio refuses a VirtualService without
    routes)."""
    host = ctx.host(export.name)
    target = _export_target(ctx, export)
    routes: list[dict[str, Any]] = []
    http_ports = _http_ports(export.ports)
    for port in http_ports:
        route: dict[str, Any] = {
            "name": f"port-{port.number}",
            "rewrite": {"authority": _destination_authority(target, port)},
            "route": [{"destination": {"host": target, "port": {"number": port.number}}}],
        }
        if len(http_ports) > 1:
            route["match"] = _authority_matches(host, port)
        routes.append(route)
    tcp_routes = [
        _export_tcp_route(ctx, target, number) for number, sni in tcp_snis(host, export.ports).items() if sni == host
    ]
    spec: dict[str, Any] = {
        "hosts": [host],
        "gateways": [f"{ctx.namespace}/{INGRESS_GATEWAY}"],
        "exportTo": list(EXPORT_TO_ALL),
    }
    if not routes and not tcp_routes:
        return None
    if routes:
        spec["http"] = routes
    if tcp_routes:
        spec["tcp"] = tcp_routes
    meta = metadata(name, ctx.namespace, ctx.labels("export"), {NAME_ANNOTATION: export.name})
    return _manifest(NETWORKING, "VirtualService", meta, spec)


def render_export_tcp_virtual_service(
    ctx: IstioContext, export: ExportSpec, name: str, port: int, sni: str
) -> Manifest:
    """One TCP port with an SNI of its own: the ingress TLS server for `sni` takes this `tcp` route."""
    spec = {
        "hosts": [sni],
        "gateways": [f"{ctx.namespace}/{INGRESS_GATEWAY}"],
        "exportTo": list(EXPORT_TO_ALL),
        "tcp": [_export_tcp_route(ctx, _export_target(ctx, export), port)],
    }
    meta = metadata(name, ctx.namespace, ctx.labels("export"), {NAME_ANNOTATION: export.name})
    return _manifest(NETWORKING, "VirtualService", meta, spec)


def render_export_authorization_policy(
    ctx: IstioContext, export: ExportSpec, name: str, principals: Sequence[str]
) -> Manifest:
    """Only `principals` (the consumers' egress gateways) reach this export's host.

    HTTP ports are matched on the Host on the cross-cluster port, TCP ports on their SNIs
    (`connection.sni`, `tcp_snis`) on the cross-cluster TCP port. Every rule names its port
    (`to.operation.ports`), because Istio builds these rules for every filter chain of the selected
    pods, HTTP or TCP (core/networkfilter.go adds the RBAC network filter to each TCP chain), and on
    a TCP chain it cannot build the HTTP-only `hosts` (authz model/generator.go hostGenerator): for
    DENY it drops that one condition and keeps the rest (model.go checkError: "a wider deny"), so a
    rule of `notPrincipals` + `hosts` alone would refuse every non-consumer on every TLS-passthrough
    or TCP chain of a shared ingress gateway. `ports` match Envoy's `destination_port`, the port the
    connection arrived on (Envoy rbac/matchers.cc PortMatcher::matches: the downstream local
    address's port), i.e. the listener's port: the pods' container port (the Service's
    targetPort), to which Istio translates a Gateway server's Service port (model/gateway.go
    resolvePorts, called from MergeGateways), hence `ingress_target_port`.

    deny mode: DENY everyone else for the host on that port; other traffic through a shared ingress
    gateway is left alone. allow mode: ALLOW the consumers for the host on that port. Once any ALLOW
    policy selects a workload, Envoy refuses every request no ALLOW policy matches: on a shared
    ingress gateway that refuses every other tenant's traffic (public HTTPS, passthrough, TCP)
    unless their own ALLOW policies admit it, and an export without any published consumer (an
    ALLOW policy without rules) refuses everything. Allow mode is kept for gateways dedicated to
    meshbridge; `check-config` notes what it does, and deny stays the default.
    """
    host = ctx.host(export.name)
    targets: list[dict[str, Any]] = []
    if _http_ports(export.ports):
        http_operation = {"ports": [str(ctx.ingress_target_port)], "hosts": [host, f"{host}:*"]}
        targets.append({"to": [{"operation": http_operation}]})
    if _tcp_ports(export.ports):
        snis = sorted(tcp_snis(host, export.ports).values())
        tcp_operation = {"ports": [str(ctx.ingress_tcp_target_port)]}
        targets.append({"to": [{"operation": tcp_operation}], "when": [{"key": "connection.sni", "values": snis}]})
    spec: dict[str, Any] = {"selector": {"matchLabels": dict(ctx.ingress_selector)}}
    if ctx.authorization_mode == "deny":
        rules: list[dict[str, Any]] = []
        for target in targets:
            rule = dict(target)
            if principals:
                rule["from"] = [{"source": {"notPrincipals": list(principals)}}]
            rules.append(rule)
        spec.update(action="DENY", rules=rules)
    else:
        spec["action"] = "ALLOW"
        if principals:
            spec["rules"] = [{"from": [{"source": {"principals": list(principals)}}], **t} for t in targets]
    meta = metadata(name, ctx.policy_namespace, ctx.labels("export"), {NAME_ANNOTATION: export.name})
    return _manifest(SECURITY, "AuthorizationPolicy", meta, spec)


def consumer_principals(
    exports: Sequence[ExportSpec], peers: Mapping[str, PeerSpec]
) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Principals (`<td>/ns/<ns>/sa/<sa>`, no `spiffe://`) admitted for each export."""
    principals: dict[str, tuple[str, ...]] = {}
    unpublished: dict[str, list[str]] = {}
    used: dict[str, PeerSpec] = {}
    for export in exports:
        found: set[str] = set()
        for consumer in export.consumers:
            peer = peers.get(consumer)
            if peer is None or not peer.egress_identities:
                unpublished.setdefault(consumer, []).append(export.name)
                continue
            used[consumer] = peer
            found.update(uri[len("spiffe://") :] for uri in peer.egress_identities)
        principals[export.name] = tuple(sorted(found))
    warnings = [
        f"consumer {consumer} has not published its egress identity yet; left out of the policy for {', '.join(names)}"
        for consumer, names in sorted(unpublished.items())
    ]
    by_domain: dict[str, list[str]] = {}
    for peer in used.values():
        by_domain.setdefault(peer.trust_domain, []).append(peer.name)
    warnings += [
        f"consumers {', '.join(sorted(names))} share the trust domain {domain}: their egress gateways "
        f"have the same identity, so the ingress cannot tell them apart; register a distinct trust "
        f"domain per cluster"
        for domain, names in sorted(by_domain.items())
        if len(names) > 1
    ]
    return principals, warnings


def render_export_side(
    ctx: IstioContext, exports: Sequence[ExportSpec], peers: Mapping[str, PeerSpec]
) -> tuple[list[Manifest], list[str]]:
    if not exports:
        return [], []
    principals, warnings = consumer_principals(exports, peers)
    keys = [k for e in exports for k in _object_keys(e.name, ctx.host(e.name), e.ports)]
    names = object_names(keys, prefix="meshbridge-export")
    http_hosts = [ctx.host(e.name) for e in exports if _http_ports(e.ports)]
    snis = [sni for e in exports for sni in tcp_snis(ctx.host(e.name), e.ports).values()]
    objects = [render_ingress_gateway(ctx, http_hosts, snis)]
    for export in exports:
        name = names[export.name]
        main = render_export_virtual_service(ctx, export, name)
        objects += [main] if main is not None else []
        for number, sni in _own_tcp_snis(ctx.host(export.name), export.ports).items():
            key = _tcp_key(export.name, number)
            objects.append(render_export_tcp_virtual_service(ctx, export, names[key], number, sni))
        objects.append(render_export_authorization_policy(ctx, export, name, principals[export.name]))
    return objects, warnings


# --------------------------------------------------------------------------------------------
# Importing side


def render_egress_gateway(
    ctx: IstioContext,
    egress: EgressTarget,
    hosts: Sequence[str],
    tcp_subsets: Mapping[str, str] | None = None,
) -> Manifest:
    """HTTPS server for HTTP imports (and the shared SNI); one TLS server per TCP SNI (`tcp_subsets`:
    SNI → label)."""
    server_hosts = [f"{ctx.namespace}/{h}" for h in sorted({egress.sni, *hosts})]
    servers = [_server(egress.gateway_name, egress.port, server_hosts)]
    for sni, label in sorted((tcp_subsets or {}).items()):
        servers.append(_tls_server(label, egress.tcp_port, f"{ctx.namespace}/{sni}"))
    spec = {"selector": dict(egress.selector), "servers": servers}
    return _manifest(NETWORKING, "Gateway", metadata(egress.gateway_name, ctx.namespace, ctx.labels("egress")), spec)


def render_egress_destination_rule(
    ctx: IstioContext,
    egress: EgressTarget,
    tcp_subsets: Mapping[str, str] | None = None,
    export_to: Sequence[str] = EXPORT_TO_ALL,
) -> Manifest:
    """Sidecar → egress gateway: Istio mTLS with the SNI of the egress Gateway server.

    Only the `meshbridge` subset carries settings, so other users of the egress gateway keep auto
    mTLS. `useClientProtocol` keeps HTTP/2 (gRPC) as HTTP/2 on the HTTPS-named gateway port. Each
    TCP SNI (`tcp_snis`) has a subset sending it, the only thing that tells its connections apart
    at the egress gateway. `export_to`: the namespaces of the imports using this gateway (every
    subset is a cluster in each sidecar that sees the rule).
    """
    tcp = [
        {"name": label, "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL", "sni": sni}}}
        for sni, label in sorted((tcp_subsets or {}).items())
    ]
    spec = {
        "host": egress.service_host,
        "exportTo": list(export_to),
        "subsets": [
            {
                "name": EGRESS_SUBSET,
                "trafficPolicy": {
                    "tls": {"mode": "ISTIO_MUTUAL", "sni": egress.sni},
                    "connectionPool": {"http": {"useClientProtocol": True}},
                },
            },
            *tcp,
        ],
    }
    meta = metadata(egress.gateway_name, ctx.namespace, ctx.labels("egress"))
    return _manifest(NETWORKING, "DestinationRule", meta, spec)


def _import_meta(ctx: IstioContext, spec: ImportSpec, name: str) -> dict[str, Any]:
    labels = ctx.labels("import", {SOURCE_CLUSTER_LABEL: spec.cluster})
    return metadata(name, ctx.namespace, labels, {NAME_ANNOTATION: spec.name})


def render_service_entry(
    ctx: IstioContext, spec: ImportSpec, name: str, vip: str, export_to: Sequence[str] = EXPORT_TO_ALL
) -> Manifest:
    """The `.remote` host: its VIP, the import's ports, and one endpoint per address of each
    exporter (render/failover.py), HTTP ports reaching its cross-cluster port and TCP ports its
    published TCP port."""

    def port_of(port: PortSpec, exporter: Exporter) -> int:
        # An exporter whose agent predates `Gateway.tcp_port` publishes none: it listens on its
        # `cross_cluster_tcp_port`, which then had to be the same fleet-wide, so this cluster's own.
        return (exporter.tcp_port or ctx.cross_cluster_tcp_port) if port.is_tcp else exporter.port

    body = {
        "hosts": [ctx.host(spec.local)],
        "addresses": [vip],
        "exportTo": list(export_to),
        "location": "MESH_EXTERNAL",
        "resolution": resolution(spec),
        "ports": [{"number": p.number, "name": p.name, "protocol": p.protocol.value} for p in spec.ports],
        "endpoints": import_endpoints(spec, port_of),
        "subjectAltNames": list(spec.identities),
    }
    return _manifest(NETWORKING, "ServiceEntry", _import_meta(ctx, spec, name), body)


def _egress_tcp_route(egress: EgressTarget, host: str, port: int) -> dict[str, Any]:
    """At the egress gateway: the TLS server's connection on to the `.remote` host's TCP port."""
    return {
        "match": [{"gateways": [egress.gateway_ref], "port": egress.tcp_port}],
        "route": [{"destination": {"host": host, "port": {"number": port}}}],
    }


def render_import_virtual_service(
    ctx: IstioContext,
    spec: ImportSpec,
    name: str,
    egress: EgressTarget,
    tcp_subsets: Mapping[str, str] | None = None,
    export_to: Sequence[str] = EXPORT_TO_ALL,
) -> Manifest:
    """The `.remote` host for sidecars (`mesh`: to the egress gateway) and at the egress gateway (on
    to the exporter); `tcp_subsets` maps each TCP SNI of this import to its egress subset. Under an
    alias, the egress route rewrites the authority to the exported name, the one the exporter's
    ingress routes."""
    host = ctx.host(spec.local)
    to_egress: list[dict[str, Any]] = []
    to_remote: list[dict[str, Any]] = []
    http_ports = _http_ports(spec.ports)
    for port in http_ports:
        authority = f"{host}:{port.number}"
        to_egress.append(
            {
                "name": f"mesh-{port.number}",
                "match": [{"gateways": ["mesh"], "port": port.number}],
                "rewrite": {"authority": authority},
                "retries": dict(NO_RETRIES),
                "route": [
                    {
                        "destination": {
                            "host": egress.service_host,
                            "subset": EGRESS_SUBSET,
                            "port": {"number": egress.port},
                        }
                    }
                ],
            }
        )
        match = (
            [{"gateways": [egress.gateway_ref]}]
            if len(http_ports) == 1
            else _authority_matches(host, port, egress.gateway_ref)
        )
        onward: dict[str, Any] = {
            "name": f"egress-{port.number}",
            "match": match,
            "retries": dict(NO_RETRIES),
            "route": [{"destination": {"host": host, "port": {"number": port.number}}}],
        }
        if spec.alias is not None:
            onward["rewrite"] = {"authority": f"{ctx.host(spec.name)}:{port.number}"}
        to_remote.append(onward)
    tcp_routes: list[dict[str, Any]] = []
    for number, sni in tcp_snis(host, spec.ports).items():
        assert tcp_subsets is not None and sni in tcp_subsets, "a TCP import needs its egress subsets"
        egress_destination = {
            "host": egress.service_host,
            "subset": tcp_subsets[sni],
            "port": {"number": egress.tcp_port},
        }
        tcp_routes.append(
            {"match": [{"gateways": ["mesh"], "port": number}], "route": [{"destination": egress_destination}]}
        )
        if sni == host:
            tcp_routes.append(_egress_tcp_route(egress, host, number))
    body: dict[str, Any] = {
        "hosts": [host],
        "gateways": ["mesh", egress.gateway_ref],
        "exportTo": list(export_to),
    }
    if to_egress:
        body["http"] = to_egress + to_remote
    if tcp_routes:
        body["tcp"] = tcp_routes
    return _manifest(NETWORKING, "VirtualService", _import_meta(ctx, spec, name), body)


def render_import_tcp_virtual_service(
    ctx: IstioContext,
    spec: ImportSpec,
    name: str,
    egress: EgressTarget,
    port: int,
    sni: str,
    export_to: Sequence[str] = EXPORT_TO_ALL,
) -> Manifest:
    """One TCP port with an SNI of its own: the egress TLS server for `sni` takes this `tcp` route."""
    body = {
        "hosts": [sni],
        "gateways": [egress.gateway_ref],
        "exportTo": list(export_to),
        "tcp": [_egress_tcp_route(egress, ctx.host(spec.local), port)],
    }
    return _manifest(NETWORKING, "VirtualService", _import_meta(ctx, spec, name), body)


def render_import_destination_rule(
    ctx: IstioContext, spec: ImportSpec, name: str, export_to: Sequence[str] = EXPORT_TO_ALL
) -> Manifest:
    """Egress gateway → remote ingress: ISTIO_MUTUAL, SNI = host, SANs = every exporter's ingress
    (any of them may answer), with the failover settings of render/failover.py; a TCP port with an
    SNI of its own sends that one (`portLevelSettings` replace the whole TLS setting for that port's
    cluster). Under an alias the host is the alias and the SNIs are the exported name's."""
    host, remote = ctx.host(spec.local), ctx.host(spec.name)

    def tls(sni: str) -> dict[str, Any]:
        return {"mode": "ISTIO_MUTUAL", "sni": sni, "subjectAltNames": list(spec.identities)}

    policy: dict[str, Any] = {"tls": tls(remote), **failover_policy(spec)}
    own = _own_tcp_snis(remote, spec.ports)
    if own:
        # A port's settings replace the whole policy for its cluster, outlier detection and load
        # balancer included, even when unset there (pilot/pkg/model/destination_rule.go
        # `MergeTrafficPolicy` with hasPortLevel): each repeats the failover settings.
        policy["portLevelSettings"] = [
            {"port": {"number": n}, "tls": tls(sni), **failover_policy(spec)} for n, sni in sorted(own.items())
        ]
    body = {"host": host, "exportTo": list(export_to), "trafficPolicy": policy}
    return _manifest(NETWORKING, "DestinationRule", _import_meta(ctx, spec, name), body)


def render_import_side(ctx: IstioContext, imports: Sequence[ImportSpec], vips: Mapping[str, str]) -> list[Manifest]:
    """Everything one cluster needs to reach its imports; `vips` maps every import name to its VIP."""
    if not imports:
        return []
    keys = [k for s in imports for k in _object_keys(s.local, ctx.host(s.local), s.ports)]
    names = object_names(keys, prefix="meshbridge-import")
    subsets = tcp_subsets([sni for s in imports for sni in tcp_snis(ctx.host(s.local), s.ports).values()])
    hosts_by_egress: dict[str, list[str]] = {}
    tcp_by_egress: dict[str, dict[str, str]] = {}
    export_to_by_egress: dict[str, set[str]] = {}
    targets: dict[str, EgressTarget] = {}
    objects: list[Manifest] = []
    for spec in imports:
        egress = ctx.egress_for(spec.cluster)
        host = ctx.host(spec.local)
        export_to = ctx.import_export_to(spec, egress)
        export_to_by_egress.setdefault(egress.gateway_name, set()).update(export_to)
        targets[egress.gateway_name] = egress
        if _http_ports(spec.ports):
            hosts_by_egress.setdefault(egress.gateway_name, []).append(host)
        own = {sni: subsets[sni] for sni in tcp_snis(host, spec.ports).values()}
        tcp_by_egress.setdefault(egress.gateway_name, {}).update(own)
        name = names[spec.local]
        objects.append(render_service_entry(ctx, spec, name, vips[spec.local], export_to))
        objects.append(render_import_virtual_service(ctx, spec, name, egress, own, export_to))
        for number, sni in _own_tcp_snis(host, spec.ports).items():
            key = _tcp_key(spec.local, number)
            objects.append(render_import_tcp_virtual_service(ctx, spec, names[key], egress, number, sni, export_to))
        objects.append(render_import_destination_rule(ctx, spec, name, export_to))
    for gateway_name, egress in sorted(targets.items()):
        tcp = tcp_by_egress.get(gateway_name)
        objects.append(render_egress_gateway(ctx, egress, hosts_by_egress.get(gateway_name, []), tcp))
        egress_export_to = _union_export_to(export_to_by_egress[gateway_name])
        objects.append(render_egress_destination_rule(ctx, egress, tcp, egress_export_to))
    return objects


def _union_export_to(namespaces: set[str]) -> tuple[str, ...]:
    """One `exportTo` covering several: `*` alone if any has it. Istio refuses `*` beside names and
    duplicates (pkg/config/validation/validation.go validateExportTo)."""
    return EXPORT_TO_ALL if "*" in namespaces else tuple(sorted(namespaces))
