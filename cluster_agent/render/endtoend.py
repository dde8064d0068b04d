"""Istio objects for end-to-end exports (`exports[].mode: end-to-end`): the caller's sidecar speaks
Istio mTLS to the destination workload itself; both gateways forward the TLS unopened, on its SNI.

A call from a workload in cluster a to `ratings.bookinfo.remote:9080`, exported end to end by b:

1. a, sidecar: ServiceEntry `ratings.bookinfo.remote` (its VIP, the exported ports, MESH_EXTERNAL)
   whose endpoint is a's egress gateway Service on `egress_gateway.tcp_port`; its DestinationRule
   makes the sidecar originate ISTIO_MUTUAL with `sni` = `<port>.ratings.bookinfo.mb-e2e` (one per
   port, `e2e_sni`) and `subjectAltNames` = the destination workloads' SPIFFE identities that b
   published. With an explicit ISTIO_MUTUAL the sidecar uses the given SNI and SANs instead of the
   cluster's own (pilot/pkg/networking/core/cluster_tls.go `buildUpstreamTLSSettings`: "Use client
   provided SNI if set", SANs from `tls.SubjectAltNames` before the service accounts), and
   `buildUpstreamClusterTLSContext` offers ALPN `istio-peer-exchange, istio` (`util.ALPNInMeshWithMxc`;
   with `h2` for HTTP/2 clusters) and validates the peer against the SANs and the SDS ROOTCA, which
   carries this cluster's `ca-crl.pem` (CRL_CHECK_ALL, see docs/istio-notes.md "CRLs in the data plane"),
   hence b's intermediate CRL there too (`end_to_end_peer_crls`).
2. a, egress gateway: a Gateway server `tls.mode: PASSTHROUGH` on the TCP port whose hosts are those
   SNIs, and a VirtualService `tls` route per SNI (`match.sniHosts`) to a host named by the SNI: a
   MESH_EXTERNAL ServiceEntry whose endpoints are the ingress gateways of every exporter of the name
   (each address of each, on its `Import.gateway.tcp_port`), ranked and ejected as hop-by-hop
   imports are (`failover.py`: endpoint labels and locality, and a DestinationRule per SNI with
   outlier detection and `failoverPriority`, no TLS: the bytes stay the caller's).
   Passthrough filter chains match the SNI and carry no TLS context
   (pilot/pkg/networking/core/gateway.go `buildGatewayNetworkFiltersFromTLSRoutes`: "NO TLS context
   because this is passthrough", `sniHosts` from the route's match), then TCP-proxy to the route's
   cluster (`buildOutboundNetworkFilters`).
3. b, ingress gateway: the same shape, a PASSTHROUGH server listing exactly the exported SNIs (any
   other SNI matches no filter chain and is refused) and a `tls` route per SNI to a MESH_EXTERNAL
   ServiceEntry named by the SNI whose endpoint is `<svc>.<ns>.svc.<cluster domain>` on the port.
4. b, destination sidecar: its inbound listener matches mTLS on transport protocol `tls` and the
   Istio ALPNs, never on the SNI (pilot/pkg/networking/core/filterchain_options.go
   `inboundPermissiveFilterChainMatchWithMxcOptions` / `inboundStrictFilterChainMatchOptions`:
   `ApplicationProtocols` `mtlsHTTPALPNs` / `mtlsTCPWithMxcALPNs`, no `ServerNames`), so the SNI
   the caller chose is accepted; it terminates the mTLS and sees the caller's identity
   `spiffe://a.mesh/ns/<ns>/sa/<sa>`. A namespace AuthorizationPolicy (DENY, `connection.sni` = the
   export's SNIs, `notPrincipals` = the admitted consumers) refuses every other caller arriving this way.

Why the forwarding hosts are MESH_EXTERNAL ServiceEntries and not the destination Service: a gateway
route straight to `<svc>.<ns>.svc.cluster.local` uses that Service's ordinary cluster, which auto mTLS
wraps in a second Istio mTLS for sidecar endpoints (`applyUpstreamTLSSettings`: transport socket
match `tlsMode-istio`, from `buildUpstreamTLSSettings` when no DestinationRule sets TLS), so the
destination would see the gateway and the caller's TLS as bytes inside. For a MESH_EXTERNAL service
without a DestinationRule `buildUpstreamTLSSettings` returns no TLS at all (`if meshExternal ...
return nil`): the bytes go on as they came.

Why not AUTO_PASSTHROUGH (istio#16407): it routes every `outbound_.<port>_.<subset>_.<host>` SNI of
every service the gateway sees (`builtAutoPassthroughFilterChains`), i.e. exposes the whole cluster,
and builds those chains without authorization filters. Here the ingress forwards only what is exported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cluster_agent.render.failover import failover_policy, import_endpoints, resolution
from cluster_agent.render.inputs import ExportSpec, ImportSpec, PeerSpec, PortSpec
from cluster_agent.render.istio import EgressTarget, IstioContext
from cluster_agent.render.objects import NAME_ANNOTATION, SOURCE_CLUSTER_LABEL, Manifest, metadata, object_names
from meshbridge_wire.protocols import Protocol

__all__ = [
    "E2E_SUFFIX",
    "e2e_principals",
    "e2e_sni",
    "end_to_end_peer_crls",
    "render_e2e_export_side",
    "render_e2e_import_side",
    "render_workload_policy",
]

NETWORKING = "networking.istio.io/v1"
SECURITY = "security.istio.io/v1"
# The SNIs' own suffix: never a `.remote` host, an in-cluster name or another meshbridge SNI.
E2E_SUFFIX = "mb-e2e"
INGRESS_GATEWAY = "meshbridge-ingress-e2e"
EGRESS_GATEWAY = "meshbridge-egress-e2e"
SERVER_NAME = "meshbridge-e2e"


def e2e_sni(port: int, name: str) -> str:
    """The SNI one port of an end-to-end export crosses with: `<port>.<service>.<namespace>.mb-e2e`.

    Unique per name and port (the gateways route on it alone), and the same at every exporter of the
    name, so one caller's SNI fits whichever exporter the egress gateway picks (several exporters
    of one name fail over on the forwarding host's endpoints); at most 5 + 63 + 63 + 7 characters,
    a valid host for Gateway servers and ServiceEntries.
    """
    return f"{port}.{name}.{E2E_SUFFIX}"


def end_to_end_peer_crls(peers: Sequence[str], specs: Mapping[str, PeerSpec]) -> tuple[str, list[str]]:
    """The CRLs of the peers this cluster meets end to end, for its `ca-crl.pem`, and a warning per
    peer that has not published any.

    Sidecars verify a peer's chain with CRL_CHECK | CRL_CHECK_ALL against their own cluster's
    `ca-crl.pem` (docs/istio-notes.md "CRLs in the data plane": istio-agent puts `istio-ca-crl` on
    ROOTCA, Envoy's `default_validator.cc`), so every CA in the peer's chain, the peer cluster's
    intermediate included, needs a CRL there. Hop by hop, sidecars only ever meet their own cluster's
    gateways; end to end they meet the other cluster's workloads. istiod accepts CRLs of other issuers
    in `ca-crl.pem`: its check only wants one signed by each certificate of `cert-chain.pem`
    (security/pkg/pki/util/keycertbundle.go `Verify`). The CA service takes a cluster's published
    CRLs only when its own intermediates signed them.
    """
    crls: list[str] = []
    warnings: list[str] = []
    for name in peers:
        spec = specs.get(name)
        if spec is None or not spec.crl:
            warnings.append(
                f"end-to-end peer {name} has not published its intermediate's CRL: sidecars here check its "
                f"workloads' chains with CRL_CHECK_ALL against ca-crl.pem, so handshakes with it fail "
                f"(unable to get certificate CRL) until it does (its agent publishes it once it has an "
                f"end-to-end export or import)"
            )
            continue
        crls.append(spec.crl if spec.crl.endswith("\n") else spec.crl + "\n")
    return "".join(crls), warnings


def _manifest(api_version: str, kind: str, meta: dict[str, Any], spec: dict[str, Any]) -> Manifest:
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec}


def _passthrough_gateway(
    ctx: IstioContext, name: str, selector: Mapping[str, str], port: int, snis: Sequence[str], component: str
) -> Manifest:
    """One PASSTHROUGH server: its hosts (the SNIs) become the filter chains' `server_names`. It sits
    on the same port as the hop-by-hop TLS servers: Istio merges TLS servers of one port into one
    listener split by SNI (pilot/pkg/model/gateway.go `mergeGateways`), and our SNIs never meet theirs."""
    server = {
        "name": SERVER_NAME,
        "port": {"number": port, "name": f"tls-{SERVER_NAME}", "protocol": "TLS"},
        "hosts": [f"{ctx.namespace}/{sni}" for sni in sorted(snis)],
        "tls": {"mode": "PASSTHROUGH"},
    }
    spec = {"selector": dict(selector), "servers": [server]}
    return _manifest(NETWORKING, "Gateway", metadata(name, ctx.namespace, ctx.labels(component)), spec)


def _forward_virtual_service(
    meta: dict[str, Any], gateway_ref: str, listen_port: int, routes: Mapping[str, int], export_to: Sequence[str]
) -> Manifest:
    """`tls` routes at a gateway: each SNI (`routes`: SNI → port of its forwarding host) to the
    ServiceEntry named by it."""
    spec = {
        "hosts": sorted(routes),
        "gateways": [gateway_ref],
        "exportTo": list(export_to),
        "tls": [
            {
                "match": [{"port": listen_port, "sniHosts": [sni]}],
                "route": [{"destination": {"host": sni, "port": {"number": port}}}],
            }
            for sni, port in sorted(routes.items())
        ],
    }
    return _manifest(NETWORKING, "VirtualService", meta, spec)


def _forward_service_entry(
    meta: dict[str, Any],
    hosts: Sequence[str],
    port: int,
    endpoints: list[dict[str, Any]],
    resolution: str,
    export_to: Sequence[str],
) -> Manifest:
    """A gateway's next hop for `hosts` (SNIs): plain TCP to `endpoints` on `port` (an endpoint may
    map the port elsewhere), no TLS added (MESH_EXTERNAL, no TLS in any DestinationRule)."""
    spec = {
        "hosts": sorted(hosts),
        "exportTo": list(export_to),
        "location": "MESH_EXTERNAL",
        "resolution": resolution,
        "ports": [{"number": port, "name": f"tls-{port}", "protocol": "TLS"}],
        "endpoints": endpoints,
    }
    return _manifest(NETWORKING, "ServiceEntry", meta, spec)


# --------------------------------------------------------------------------------------------
# Exporting side


def e2e_principals(export: ExportSpec, peers: Mapping[str, PeerSpec]) -> tuple[list[str], list[str]]:
    """The principals admitted to `export` end to end: per consumer, its workloads named in
    `consumer_principals` (`<td>/ns/<ns>/sa/<sa>`), else its whole trust domain (`<td>/*`, a prefix
    match: pilot/pkg/security/authz/model/generator.go `srcPrincipalGenerator` →
    `matcher.StringMatcherWithPrefix(value, "spiffe://")`). A consumer whose trust domain is not known
    yet (not published) is left out, so refused, with a warning."""
    principals: list[str] = []
    warnings: list[str] = []
    for consumer in export.consumers:
        peer = peers.get(consumer)
        if peer is None:
            warnings.append(
                f"export {export.name} (end-to-end): consumer {consumer} has not published yet, its trust domain "
                f"is unknown; its workloads are refused until it does"
            )
            continue
        named = export.consumer_principals.get(consumer)
        principals += [f"{peer.trust_domain}/{p}" for p in named] if named else [f"{peer.trust_domain}/*"]
    return sorted(set(principals)), warnings


def render_workload_policy(ctx: IstioContext, export: ExportSpec, name: str, principals: Sequence[str]) -> Manifest:
    """DENY, on the connections that arrived end to end for this export (`connection.sni` = its
    SNIs, Envoy's `requested_server_name`), every principal but the admitted ones.

    In the export's namespace without a selector: only this export's SNIs reach it, and they reach
    only its workloads (the ingress routes each SNI to its Service), so local callers, who send other
    SNIs or none, are untouched. DENY rather than ALLOW: an ALLOW policy on a workload refuses every
    caller it does not name, its own cluster's included. With no principal admitted the rule has no
    `from` and refuses every end-to-end caller.
    """
    snis = sorted(e2e_sni(p.number, export.name) for p in export.ports)
    rule: dict[str, Any] = {"when": [{"key": "connection.sni", "values": snis}]}
    if principals:
        rule["from"] = [{"source": {"notPrincipals": list(principals)}}]
    spec = {"action": "DENY", "rules": [rule]}
    meta = metadata(name, export.namespace, ctx.labels("export"), {NAME_ANNOTATION: export.name})
    return _manifest(SECURITY, "AuthorizationPolicy", meta, spec)


def _ingress_allow_policy(ctx: IstioContext, snis: Sequence[str]) -> Manifest:
    """`authorization_mode: allow`: once an ALLOW policy selects the ingress pods every connection no
    ALLOW rule admits is refused, passthrough chains included (they carry the RBAC filter:
    `buildOutboundNetworkFilters` → `buildCompleteNetworkFilters`); admit the exported SNIs on the
    TCP port. Who may call is decided at the destination (`render_workload_policy`)."""
    operation = {"ports": [str(ctx.ingress_tcp_target_port)]}
    rule = {"to": [{"operation": operation}], "when": [{"key": "connection.sni", "values": sorted(snis)}]}
    spec = {"selector": {"matchLabels": dict(ctx.ingress_selector)}, "action": "ALLOW", "rules": [rule]}
    meta = metadata(INGRESS_GATEWAY, ctx.policy_namespace, ctx.labels("export"))
    return _manifest(SECURITY, "AuthorizationPolicy", meta, spec)


def render_e2e_export_side(
    ctx: IstioContext, exports: Sequence[ExportSpec], peers: Mapping[str, PeerSpec]
) -> tuple[list[Manifest], list[str]]:
    """b's objects for its end-to-end exports: the passthrough Gateway, per export a VirtualService,
    per port a forwarding ServiceEntry, and the destination workloads' policy."""
    if not exports:
        return [], []
    keys = [e.name for e in exports] + [f"{e.name}.{p.number}" for e in exports for p in e.ports]
    names = object_names(keys, prefix="meshbridge-e2e-export")
    gateway_ref = f"{ctx.namespace}/{INGRESS_GATEWAY}"
    forward_to = [ctx.policy_namespace]
    all_snis: list[str] = []
    objects: list[Manifest] = []
    warnings: list[str] = []
    for export in exports:
        target = f"{export.service}.{export.namespace}.svc.{ctx.cluster_domain}"
        routes = {e2e_sni(p.number, export.name): p.number for p in export.ports}
        all_snis += routes
        meta = metadata(names[export.name], ctx.namespace, ctx.labels("export"), {NAME_ANNOTATION: export.name})
        objects.append(_forward_virtual_service(meta, gateway_ref, ctx.cross_cluster_tcp_port, routes, forward_to))
        for sni, number in sorted(routes.items()):
            key = f"{export.name}.{number}"
            se_meta = metadata(names[key], ctx.namespace, ctx.labels("export"), {NAME_ANNOTATION: export.name})
            objects.append(_forward_service_entry(se_meta, [sni], number, [{"address": target}], "DNS", forward_to))
        principals, policy_warnings = e2e_principals(export, peers)
        warnings += policy_warnings
        objects.append(render_workload_policy(ctx, export, names[export.name], principals))
    objects.append(
        _passthrough_gateway(ctx, INGRESS_GATEWAY, ctx.ingress_selector, ctx.cross_cluster_tcp_port, all_snis, "export")
    )
    if ctx.authorization_mode == "allow":
        objects.append(_ingress_allow_policy(ctx, all_snis))
    return objects, warnings


# --------------------------------------------------------------------------------------------
# Importing side


def _import_meta(ctx: IstioContext, spec: ImportSpec, name: str) -> dict[str, Any]:
    labels = ctx.labels("import", {SOURCE_CLUSTER_LABEL: spec.cluster})
    return metadata(name, ctx.namespace, labels, {NAME_ANNOTATION: spec.name})


def render_e2e_service_entry(
    ctx: IstioContext, spec: ImportSpec, name: str, vip: str, egress: EgressTarget, export_to: Sequence[str]
) -> Manifest:
    """The `.remote` host for a's sidecars: its VIP and ports, every port to the egress gateway's
    TCP port (the passthrough server)."""
    body = {
        "hosts": [ctx.host(spec.local)],
        "addresses": [vip],
        "exportTo": list(export_to),
        "location": "MESH_EXTERNAL",
        "resolution": "DNS",
        "ports": [{"number": p.number, "name": p.name, "protocol": p.protocol.value} for p in spec.ports],
        "endpoints": [{"address": egress.service_host, "ports": {p.name: egress.tcp_port for p in spec.ports}}],
    }
    return _manifest(NETWORKING, "ServiceEntry", _import_meta(ctx, spec, name), body)


def render_e2e_destination_rule(ctx: IstioContext, spec: ImportSpec, name: str, export_to: Sequence[str]) -> Manifest:
    """The sidecar's mTLS to the destination workloads: ISTIO_MUTUAL, each port's SNI, the published
    workload identities as SANs (`portLevelSettings[].tls` replaces the whole TLS setting of its port)."""

    def tls(port: int) -> dict[str, Any]:
        return {
            "mode": "ISTIO_MUTUAL",
            "sni": e2e_sni(port, spec.name),
            "subjectAltNames": list(spec.workload_identities),
        }

    first, *others = spec.ports
    policy: dict[str, Any] = {"tls": tls(first.number)}
    if others:
        policy["portLevelSettings"] = [{"port": {"number": p.number}, "tls": tls(p.number)} for p in others]
    body = {"host": ctx.host(spec.local), "exportTo": list(export_to), "trafficPolicy": policy}
    return _manifest(NETWORKING, "DestinationRule", _import_meta(ctx, spec, name), body)


def render_e2e_import_side(ctx: IstioContext, imports: Sequence[ImportSpec], vips: Mapping[str, str]) -> list[Manifest]:
    """a's objects for its end-to-end imports: per import the `.remote` ServiceEntry and
    DestinationRule, the egress gateway's VirtualService and forwarding ServiceEntry (every
    exporter's ingress, `_forward_to_exporters`); per egress gateway one passthrough Gateway."""
    if not imports:
        return []
    keys = [k for s in imports for k in (s.local, f"{s.local}.forward")]
    keys += [f"{s.local}.forward.{p.number}" for s in imports for p in s.ports]
    names = object_names(keys, prefix="meshbridge-e2e-import")
    snis_by_egress: dict[str, list[str]] = {}
    targets: dict[str, EgressTarget] = {}
    objects: list[Manifest] = []
    for spec in imports:
        egress = ctx.egress_for(spec.cluster)
        targets[egress.gateway_name] = egress
        export_to = ctx.import_export_to(spec, egress)
        name = names[spec.local]
        objects.append(render_e2e_service_entry(ctx, spec, name, vips[spec.local], egress, export_to))
        objects.append(render_e2e_destination_rule(ctx, spec, name, export_to))
        snis = [e2e_sni(p.number, spec.name) for p in spec.ports]
        snis_by_egress.setdefault(egress.gateway_name, []).extend(snis)
        objects += _forward_to_exporters(ctx, spec, egress, snis, names)
    for gateway_name, egress in sorted(targets.items()):
        gateway = _egress_gateway_name(egress)
        snis = snis_by_egress[gateway_name]
        objects.append(_passthrough_gateway(ctx, gateway, egress.selector, egress.tcp_port, snis, "egress"))
    return objects


def _forward_to_exporters(
    ctx: IstioContext, spec: ImportSpec, egress: EgressTarget, snis: Sequence[str], names: Mapping[str, str]
) -> list[Manifest]:
    """At a's egress gateway: each SNI routed to a forwarding host whose endpoints are every address
    of every exporter, on the exporter's published TCP port (an exporter that published none listens
    on this cluster's own `cross_cluster_tcp_port`); with several endpoints, a DestinationRule per SNI
    host with the failover settings of `failover.py` and no TLS (the caller's TLS passes untouched)."""
    local_port = ctx.cross_cluster_tcp_port
    routes = dict.fromkeys(snis, local_port)
    forward = _import_meta(ctx, spec, names[f"{spec.local}.forward"])
    gateway_ref = f"{ctx.namespace}/{_egress_gateway_name(egress)}"
    objects = [_forward_virtual_service(forward, gateway_ref, egress.tcp_port, routes, [egress.namespace])]
    tls_port = PortSpec(local_port, Protocol.TLS)
    endpoints = import_endpoints(spec, lambda _p, e: e.tcp_port or local_port, ports=(tls_port,))
    objects.append(
        _forward_service_entry(forward, sorted(routes), local_port, endpoints, resolution(spec), [egress.namespace])
    )
    policy = failover_policy(spec)
    if policy:
        for port, sni in zip(spec.ports, snis, strict=True):
            meta = _import_meta(ctx, spec, names[f"{spec.local}.forward.{port.number}"])
            dr = {"host": sni, "exportTo": [egress.namespace], "trafficPolicy": dict(policy)}
            objects.append(_manifest(NETWORKING, "DestinationRule", meta, dr))
    return objects


def _egress_gateway_name(egress: EgressTarget) -> str:
    """The passthrough Gateway beside an egress gateway's own (`meshbridge-egress[-…]` → `…-e2e`)."""
    return egress.gateway_name.replace("meshbridge-egress", EGRESS_GATEWAY, 1)
