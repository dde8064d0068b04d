"""`render_all`: every object one agent wants in its cluster, from the config and desired state."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cluster_agent.config import AgentConfig
from cluster_agent.render.cacerts import (
    bundle_files,
    check_cacerts_bundle,
    compose_ca_crl,
    earliest_next_update,
    render_cacerts_secret,
)
from cluster_agent.render.coredns import render_coredns_configmaps, render_nodelocal_stanza, server_block_key
from cluster_agent.render.endtoend import end_to_end_peer_crls, render_e2e_export_side, render_e2e_import_side
from cluster_agent.render.errors import BundleError
from cluster_agent.render.failover import describe_exporters
from cluster_agent.render.inputs import (
    ImportSpec,
    exports_from_config,
    parse_exports,
    parse_imports,
    parse_peers,
    select_imports,
)
from cluster_agent.render.istio import IstioContext, render_export_side, render_import_side
from cluster_agent.render.objects import Manifest, sort_objects
from cluster_agent.render.vip import allocate_vips, render_state_configmap

__all__ = ["CacertsResult", "RenderResult", "render_all", "render_cacerts"]


@dataclass(frozen=True)
class RenderResult:
    """Objects sorted by (kind, namespace, name); warnings for the operator (also fit for the
    agent's status `errors`); the VIP allocation to persist; the CoreDNS server block, if any."""

    objects: list[Manifest]
    warnings: list[str] = field(default_factory=list)
    vips: dict[str, str] = field(default_factory=dict)
    server_block: str | None = None
    ca_crl_next_update: datetime | None = None  # the earliest nextUpdate in cacerts' ca-crl.pem
    # per imported host: its mode and exporters, for operators (`render` prints them)
    imports: dict[str, str] = field(default_factory=dict)
    peer_crls: str = ""  # the end-to-end peers' CRLs added to ca-crl.pem


@dataclass(frozen=True)
class CacertsResult:
    """Secret `cacerts`, warnings for the operator, and the earliest nextUpdate of its ca-crl.pem
    (None without one)."""

    secret: Manifest
    warnings: list[str]
    ca_crl_next_update: datetime | None


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building tens of thousands of small dicts.

    They form no cycles, yet each generation-2 pass walks every live object, which made
    rendering 5,000 imports several times slower; reference counting frees them as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def render_all(
    config: AgentConfig,
    *,
    imports: Sequence[Mapping[str, Any]],
    peers: Sequence[Mapping[str, Any]],
    vips: Mapping[str, str],
    exports: Sequence[Mapping[str, Any]] | None = None,
    bundle: Mapping[str, str] | None = None,
    intermediate_key_pem: str | None = None,
    crl_pem: str | None = None,
    corefile: str | None = None,
    now: datetime | None = None,
) -> RenderResult:
    """Render everything; pure (no I/O; the clock only through `now`).

    imports       `Desired.imports` (API `Import` dicts); filtered by the config's `imports`.
    peers         `Desired.peers`; consumers' egress identities become policy principals.
    vips          the previous VIP allocation (e.g. from ConfigMap `meshbridge-state`); every
                  name still imported keeps its address. The new allocation is `result.vips`.
    exports       published exports (`services` of the exports PUT); default: from the config.
    bundle        API `Bundle`; with `intermediate_key_pem` it becomes Secret `cacerts`, checked
                  as istiod would (BundleError if it would be refused).
    crl_pem       the CRLs of this cluster's intermediates: the current one's, then the final
                  CRL of each superseded one still kept; `ca-crl.pem` = bundle `crl.pem` + these.
                  Without it, or with `ca.ca_crl: false`, `ca-crl.pem` is left out (a partial
                  CRL set makes istiod fail).
    corefile      the current Corefile; given, the merged `coredns` ConfigMap is rendered too.
    now           when given, certificate and CRL validity are checked against it.
    """
    with _collector_paused():
        return _render_all(
            config,
            imports=imports,
            peers=peers,
            vips=vips,
            exports=exports,
            bundle=bundle,
            intermediate_key_pem=intermediate_key_pem,
            crl_pem=crl_pem,
            corefile=corefile,
            now=now,
        )


def _render_all(
    config: AgentConfig,
    *,
    imports: Sequence[Mapping[str, Any]],
    peers: Sequence[Mapping[str, Any]],
    vips: Mapping[str, str],
    exports: Sequence[Mapping[str, Any]] | None,
    bundle: Mapping[str, str] | None,
    intermediate_key_pem: str | None,
    crl_pem: str | None,
    corefile: str | None,
    now: datetime | None,
) -> RenderResult:
    ctx = IstioContext.from_config(config)
    warnings = config.advisories()

    parsed_imports, import_warnings = parse_imports(imports)
    selected, selection_warnings = select_imports(config, parsed_imports)
    peer_specs, peer_warnings = parse_peers(peers)
    if exports is None:
        export_specs = exports_from_config(config)
        export_warnings: list[str] = []
    else:
        export_specs, export_warnings = parse_exports(exports)
    warnings += import_warnings + selection_warnings + peer_warnings + export_warnings

    allocation = allocate_vips((s.local for s in selected), vip_range=config.dns.vip_range, previous=vips)

    peer_specs, alias_warnings = _drop_aliased_consumers(config.istio.trust_domain, peer_specs)
    warnings += alias_warnings
    hop_exports = [e for e in export_specs if not e.end_to_end]
    export_objects, policy_warnings = render_export_side(ctx, hop_exports, peer_specs)
    e2e_objects, e2e_warnings = render_e2e_export_side(ctx, [e for e in export_specs if e.end_to_end], peer_specs)
    warnings += policy_warnings + e2e_warnings
    objects = (
        export_objects + e2e_objects + render_import_side(ctx, [s for s in selected if not s.end_to_end], allocation)
    )
    objects += render_e2e_import_side(ctx, [s for s in selected if s.end_to_end], allocation)
    e2e_peers = {c for e in export_specs if e.end_to_end for c in e.consumers}
    e2e_peers |= {e.cluster for s in selected if s.end_to_end for e in s.exporters}
    peer_crls, crl_warnings = end_to_end_peer_crls(sorted(e2e_peers), peer_specs)
    if config.ca.ca_crl:
        warnings += crl_warnings
    objects.append(render_state_configmap(allocation, namespace=ctx.namespace, cluster=config.cluster))

    warnings += _renumbered(config, vips, allocation)
    server_block: str | None = None
    if config.dns.mode == "coredns":
        dns_objects = _coredns_objects(config, allocation, corefile)
        server_block = dns_objects[0]["data"][server_block_key(config.dns.suffix)]
        objects += dns_objects

    ca_crl_next_update: datetime | None = None
    if bundle is not None:
        own_and_peers = None if crl_pem is None else crl_pem + peer_crls
        cacerts = render_cacerts(
            config, bundle, intermediate_key_pem=intermediate_key_pem, crl_pem=own_and_peers, now=now
        )
        objects.append(cacerts.secret)
        warnings += cacerts.warnings
        ca_crl_next_update = cacerts.ca_crl_next_update

    routes = {ctx.host(s.local): _describe(ctx, s) for s in selected}
    return RenderResult(
        sort_objects(objects), warnings, allocation, server_block, ca_crl_next_update, routes, peer_crls
    )


def _describe(ctx: IstioContext, spec: ImportSpec) -> str:
    alias = f" (alias of {ctx.host(spec.name)})" if spec.alias else ""
    return f"{spec.mode}{alias}: {describe_exporters(spec)}"


def _coredns_objects(config: AgentConfig, allocation: Mapping[str, str], corefile: str | None) -> list[Manifest]:
    """`dns.mode: coredns`: ConfigMap `meshbridge-coredns` (with the NodeLocal DNSCache stanza when
    `dns.nodelocal_dns` asks for it) and, given the live Corefile, the merged `coredns` ConfigMap."""
    dns = config.dns
    nodelocal = dns.nodelocal_dns
    stanza = (
        None
        if nodelocal is None
        else render_nodelocal_stanza(dns.suffix, bind=nodelocal.bind, forward_to=nodelocal.forward_to)
    )
    return render_coredns_configmaps(
        dns.suffix,
        allocation,
        cluster=config.cluster,
        namespace=dns.coredns_namespace,
        ttl=dns.ttl,
        corefile=corefile,
        corefile_configmap=dns.coredns_configmap,
        corefile_key=dns.corefile_key,
        nodelocal_stanza=stanza,
    )


def _renumbered(config: AgentConfig, previous: Mapping[str, str], allocation: Mapping[str, str]) -> list[str]:
    """A warning when names kept from the previous allocation got new addresses: the range changed
    (e.g. the default moved off Istio's 240.240.0.0/16 on upgrade), so clients holding the old
    answers or connections break once."""
    moved = sorted(n for n, a in allocation.items() if n in previous and previous[n] != a)
    if not moved:
        return []
    listing = ", ".join(f"{n} {previous[n]} -> {allocation[n]}" for n in moved[:5])
    more = f" and {len(moved) - 5} more" if len(moved) > 5 else ""
    return [
        f"dns.vip_range {config.dns.vip_range}: {len(moved)} imported name(s) got a new address outside the "
        f"previous allocation ({listing}{more}); clients re-resolve within dns.ttl and reconnect. A meshbridge "
        f"block left in the Corefile by dns.mode coredns (the default before dns.mode istio) still answers the "
        f"old addresses: set dns.mode coredns, or remove the block between its markers"
    ]


def _drop_aliased_consumers(own_trust_domain: str, peers: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """istiod rewrites `cluster.local` principals to its own trust domain (trust-domain aliases), so
    a consumer still on `cluster.local` would name this cluster's own egress gateway in the policy:
    such consumers are left out (and so refused) until they register a trust domain of their own."""
    if own_trust_domain == "cluster.local":
        return peers, []
    kept = {n: p for n, p in peers.items() if p.trust_domain != "cluster.local"}
    warnings = [
        f"consumer {n} uses the trust domain cluster.local, which istiod here would read as "
        f"{own_trust_domain}; it is refused until it registers a trust domain of its own"
        for n in sorted(set(peers) - set(kept))
    ]
    return kept, warnings


def render_cacerts(
    config: AgentConfig,
    bundle: Mapping[str, str],
    *,
    intermediate_key_pem: str | None,
    crl_pem: str | None,
    now: datetime | None,
) -> CacertsResult:
    """Secret `cacerts` alone (as `render_all` renders it), checked as istiod would: BundleError if
    it would be refused. Pure; also used to re-sign its CRLs while the CA service is unreachable."""
    if intermediate_key_pem is None:
        raise BundleError("bundle given without intermediate_key_pem; cacerts needs the intermediate's key")
    ca_cert, chain, roots, root_crls = bundle_files(bundle)
    # ca.ca_crl: false — no ca-crl.pem, so Envoy checks no CRL (AGENT-CONFIG `ca.ca_crl`)
    ca_crl, warnings = _ca_crl(root_crls, crl_pem) if config.ca.ca_crl else (None, [])
    check_cacerts_bundle(
        ca_cert_pem=ca_cert,
        ca_key_pem=intermediate_key_pem,
        cert_chain_pem=chain,
        root_cert_pem=roots,
        crl_pem=ca_crl,
        now=now,
    )
    secret = render_cacerts_secret(
        config.istio.namespace,
        ca_cert_pem=ca_cert,
        ca_key_pem=intermediate_key_pem,
        cert_chain_pem=chain,
        root_cert_pem=roots,
        crl_pem=ca_crl,
        cluster=config.cluster,
    )
    return CacertsResult(secret, warnings, earliest_next_update(ca_crl) if ca_crl is not None else None)


def _ca_crl(root_crls: str, crl_pem: str | None) -> tuple[str | None, list[str]]:
    """ca-crl.pem, or None with the reason when a part is missing (a partial set makes istiod fail)."""
    if crl_pem is None:
        return None, [
            "cacerts: no CRL signed by the intermediate was given, so ca-crl.pem is left out "
            "(istiod refuses a CRL set without one from every CA in cert-chain.pem)"
        ]
    if not root_crls.strip():
        return None, [
            "cacerts: the bundle carries no root CRLs (crl.pem), so ca-crl.pem is left out "
            "(istiod refuses a CRL set without one from every CA in cert-chain.pem)"
        ]
    return compose_ca_crl(root_crls, crl_pem), []
