"""Typed views of the renderers' inputs: `Import`, `Desired.peers` and exports (API.md shapes).

Imports and peers arrive from the CA service as JSON. Each entry is checked here once; an entry
that cannot be rendered safely is dropped with a warning instead of failing the whole render.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from cluster_agent.config import END_TO_END, HOP_BY_HOP, AgentConfig
from meshbridge_wire.names import is_dns_label, is_dns_name, workload_identity
from meshbridge_wire.names import is_service_name as _is_service_name
from meshbridge_wire.protocols import GATEWAY_CARRIED, Protocol, parse_protocol

__all__ = [
    "ExportSpec",
    "Exporter",
    "ImportSpec",
    "PeerSpec",
    "PortSpec",
    "exporter_order",
    "exports_from_config",
    "parse_exports",
    "parse_imports",
    "parse_peers",
    "select_imports",
]

# ServiceEntry endpoints map at most 128 port names (CRD: endpoints[].ports maxProperties).
MAX_PORTS = 128


@dataclass(frozen=True, slots=True)
class PortSpec:
    number: int
    protocol: Protocol  # one the gateways carry (GATEWAY_CARRIED)

    @property
    def name(self) -> str:
        return f"{self.protocol.lower()}-{self.number}"

    @property
    def is_tcp(self) -> bool:
        return self.protocol == "TCP"


@dataclass(frozen=True, slots=True)
class Exporter:
    """One cluster serving an imported name: its ingress gateway's addresses (IPs or DNS names, each
    an endpoint of its own), ports, identity, and the importer's preference for it."""

    cluster: str
    addresses: tuple[str, ...]
    port: int
    identity: str  # spiffe:// identity of the exporting cluster's ingress gateway
    # The exporter's published cross-cluster TCP port (`Gateway.tcp_port`); None from an exporter
    # whose agent predates it.
    tcp_port: int | None = None
    priority: int = 0  # `imports[].priority` of its rule: lower is preferred
    locality: str | None = None  # `imports[].locality`: region[/zone[/subzone]]
    mode: str = HOP_BY_HOP  # the export's `mode`, as this exporter publishes it
    # end-to-end: the destination workloads' spiffe:// identities, in the exporter's trust domain
    workload_identities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ImportSpec:
    """One imported name and every cluster serving it, preferred first (priority, then name), all
    in one mode (`select_imports` keeps the exporters in the preferred exporter's mode)."""

    name: str  # <service>.<namespace>, as exported
    ports: tuple[PortSpec, ...]
    exporters: tuple[Exporter, ...]
    alias: str | None = None  # `imports[].aliases`: the name this cluster serves it under instead

    @property
    def mode(self) -> str:
        return self.exporters[0].mode

    @property
    def workload_identities(self) -> tuple[str, ...]:
        """End to end, the SANs the caller's sidecar pins: every exporter's destination workloads."""
        return tuple(sorted({u for e in self.exporters for u in e.workload_identities}))

    @property
    def local(self) -> str:
        """The name this cluster's workloads call (`<local>.<suffix>`): the alias, else the name."""
        return self.alias or self.name

    @property
    def cluster(self) -> str:
        """The preferred exporter: its rule picks the egress gateway and consumer namespaces."""
        return self.exporters[0].cluster

    @property
    def identities(self) -> tuple[str, ...]:
        """The SANs to pin: every exporter's ingress identity."""
        return tuple(sorted({e.identity for e in self.exporters}))

    @property
    def all_ips(self) -> bool:
        return all(_is_ip(a) for e in self.exporters for a in e.addresses)

    @property
    def end_to_end(self) -> bool:
        return self.mode == END_TO_END


@dataclass(frozen=True, slots=True)
class PeerSpec:
    name: str
    trust_domain: str
    egress_identities: tuple[str, ...]  # spiffe:// URIs
    crl: str | None = None  # its intermediates' CRLs (PEM), published for end-to-end peers


@dataclass(frozen=True, slots=True)
class ExportSpec:
    name: str  # <service>.<namespace>
    service: str
    namespace: str
    ports: tuple[PortSpec, ...]
    consumers: tuple[str, ...]
    mode: str = HOP_BY_HOP
    workload_identities: tuple[str, ...] = ()
    # consumer cluster → `ns/<ns>/sa/<sa>` of its admitted workloads (end-to-end; absent: all of them)
    consumer_principals: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def end_to_end(self) -> bool:
        return self.mode == END_TO_END


def is_service_name(value: object) -> bool:
    """'<service>.<namespace>' with a Service name (DNS-1035 label) and a namespace (DNS label)."""
    return isinstance(value, str) and _is_service_name(value)


def spiffe_trust_domain(uri: object) -> str | None:
    """The trust domain of exactly `spiffe://<td>/ns/<ns>/sa/<sa>`, else None: an identity the
    renderers turn into a principal must name one workload (no wildcard, no extra segment)."""
    parsed = workload_identity(uri) if isinstance(uri, str) else None
    return parsed[0] if parsed is not None else None


@lru_cache(maxsize=4096)
def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=4096)
def _is_address(value: str) -> bool:
    return _is_ip(value) or is_dns_name(value.lower().rstrip("."))


def _port(raw: object) -> int | None:
    if isinstance(raw, int) and not isinstance(raw, bool) and 1 <= raw <= 65535:
        return raw
    return None


def _ports(raw: object, where: str, warnings: list[str]) -> tuple[PortSpec, ...] | None:
    if not isinstance(raw, list) or not raw:
        warnings.append(f"{where}: no ports; left out")
        return None
    ports: dict[int, PortSpec] = {}
    for item in raw:
        if not isinstance(item, Mapping) or _port(item.get("number")) is None:
            warnings.append(f"{where}: port entry {item!r} is not {{number, protocol}}; left out")
            continue
        number = int(item["number"])
        protocol = str(item.get("protocol") or "HTTP")
        canonical = parse_protocol(protocol)
        if canonical is None or canonical not in GATEWAY_CARRIED:
            warnings.append(
                f"{where}: port {number} speaks {protocol}, which the gateways cannot carry "
                f"(they route HTTP on the authority and plain TCP on the SNI); that port is left out"
            )
            continue
        ports.setdefault(number, PortSpec(number, canonical))
    if not ports:
        return None
    if len(ports) > MAX_PORTS:
        warnings.append(f"{where}: more than {MAX_PORTS} ports; left out")
        return None
    return tuple(ports[n] for n in sorted(ports))


def _addresses(gateway: Mapping[str, Any]) -> tuple[str, ...] | None:
    """`Gateway.addresses` when published (several), else the single `address` (older agents);
    None when any is unusable."""
    listed = gateway.get("addresses")
    raw = listed if isinstance(listed, list) and listed else [gateway.get("address")]
    if not all(isinstance(a, str) and _is_address(a) for a in raw):
        return None
    return tuple(dict.fromkeys(str(a).lower().rstrip(".") for a in raw))


def _import(raw: Mapping[str, Any], warnings: list[str]) -> ImportSpec | None:
    """One `Import` entry: one name as one exporter serves it."""
    name, cluster = raw.get("name"), raw.get("cluster")
    if not is_service_name(name) or not isinstance(cluster, str) or not is_dns_label(cluster):
        warnings.append(f"import {name!r} from {cluster!r}: malformed name or cluster; left out")
        return None
    assert isinstance(name, str)  # narrowed by is_service_name
    where = f"import {name} from {cluster}"
    gateway = raw.get("gateway")
    addresses = _addresses(gateway) if isinstance(gateway, Mapping) else None
    port = _port(gateway.get("port")) if isinstance(gateway, Mapping) else None
    if addresses is None or port is None:
        warnings.append(f"{where}: no usable gateway address and port ({gateway!r}); left out")
        return None
    assert isinstance(gateway, Mapping)  # it held the address
    identity = raw.get("identity")
    if spiffe_trust_domain(identity) is None:
        warnings.append(
            f"{where}: identity {identity!r} is not a spiffe:// URI of one workload "
            "(spiffe://<td>/ns/<ns>/sa/<sa>); left out"
        )
        return None
    assert isinstance(identity, str)
    ports = _ports(raw.get("ports"), where, warnings)
    if ports is None:
        return None
    mode = raw.get("mode") or HOP_BY_HOP
    if mode not in (HOP_BY_HOP, END_TO_END):
        warnings.append(f"{where}: unknown mode {mode!r}; left out")
        return None
    workloads = _workload_identities(raw, identity, where, warnings) if mode == END_TO_END else ()
    if workloads is None:
        return None
    needs_tcp_port = mode == END_TO_END or any(p.is_tcp for p in ports)
    tcp_port = _tcp_port(gateway, where, warnings) if needs_tcp_port else None
    exporter = Exporter(cluster, addresses, port, identity, tcp_port, mode=mode, workload_identities=workloads)
    return ImportSpec(name, ports, (exporter,))


def _workload_identities(
    raw: Mapping[str, Any], identity: str, where: str, warnings: list[str]
) -> tuple[str, ...] | None:
    """An end-to-end import's destination identities: workloads in the exporter's trust domain (that of
    its ingress identity), or None (left out: the sidecars would have nothing to pin)."""
    listed = raw.get("workload_identities")
    domain = spiffe_trust_domain(identity)
    if not isinstance(listed, list) or not listed or any(spiffe_trust_domain(u) != domain for u in listed):
        warnings.append(
            f"{where}: end-to-end without workload identities in the exporter's trust domain {domain} "
            f"({listed!r}); left out"
        )
        return None
    return tuple(sorted(set(listed)))


def _tcp_port(gateway: Mapping[str, Any], where: str, warnings: list[str]) -> int | None:
    """The exporter's published TCP port; None (the importer then assumes its own) when absent or
    unusable."""
    raw = gateway.get("tcp_port")
    port = _port(raw)
    if raw is not None and port is None:
        warnings.append(f"{where}: gateway tcp_port {raw!r} is not a port; assuming this cluster's own")
    return port


def parse_imports(raw: Iterable[Mapping[str, Any]]) -> tuple[list[ImportSpec], list[str]]:
    """Check `Import` entries: one spec per entry (one exporter each), by name then cluster;
    `select_imports` joins the exporters of a name."""
    warnings: list[str] = []
    specs = [spec for item in raw if isinstance(item, Mapping) and (spec := _import(item, warnings)) is not None]
    return sorted(specs, key=lambda s: (s.name, s.cluster)), warnings


def select_imports(config: AgentConfig, imports: Sequence[ImportSpec]) -> tuple[list[ImportSpec], list[str]]:
    """Keep the imports the configuration asks for, joined per name with each exporter's priority
    and locality from its rule; warn about named ones nobody offers."""
    by_name: dict[str, list[ImportSpec]] = {}
    for spec in imports:
        rule = config.import_rule(spec.cluster)
        if rule is not None and rule.selects(spec.name):
            exporter = replace(spec.exporters[0], priority=rule.priority, locality=rule.locality)
            by_name.setdefault(spec.name, []).append(replace(spec, exporters=(exporter,)))
    offered = {(spec.cluster, spec.name) for spec in imports}
    warnings = [
        f"imports: {name} from {rule.from_} is configured but not offered by the CA service "
        f"(not exported to {config.cluster}, or {rule.from_} has not published)"
        for rule in config.imports
        for name in rule.names
        if name != "*" and (rule.from_, name) not in offered
    ]
    sources = {cluster for cluster, _ in offered}
    warnings += [
        f"imports[{i}].priority: {rule.from_} exports nothing to {config.cluster}, so its priority orders nothing "
        f"(check the name, or that {rule.from_} lists {config.cluster} among its consumers)"
        for i, rule in enumerate(config.imports)
        if rule.priority and rule.names == ["*"] and rule.from_ not in sources
    ]
    joined = [_join(config, by_name[name], warnings) for name in sorted(by_name)]
    return _aliased(config, joined, warnings), warnings


def _aliased(config: AgentConfig, specs: list[ImportSpec], warnings: list[str]) -> list[ImportSpec]:
    """Each import under its alias (`imports[].aliases`), unless the alias is a name imported as
    itself (offered through `*`; the configuration refuses the names it lists): then the alias is
    dropped with a warning, so no two imports claim one host."""
    taken = {s.name for s in specs if config.alias_for(s.name) is None}
    out: list[ImportSpec] = []
    for spec in specs:
        alias = config.alias_for(spec.name)
        if alias is not None and alias in taken:
            warnings.append(
                f"imports: alias {alias} of {spec.name} is itself imported (from "
                f"{next(s.cluster for s in specs if s.name == alias)}); {spec.name} keeps its own name. "
                f"Pick another alias"
            )
            alias = None
        out.append(replace(spec, alias=alias))
    return out


def exporter_order(config: AgentConfig, cluster: str) -> tuple[int, str]:
    """How exporters of one name are ordered, preferred first: `imports[].priority`, then name."""
    rule = config.import_rule(cluster)
    return (rule.priority if rule is not None else 0, cluster)


def _join(config: AgentConfig, specs: Sequence[ImportSpec], warnings: list[str]) -> ImportSpec:
    """One name's exporters behind one host, preferred first; the ports are the preferred
    exporter's (one ServiceEntry has one port list), and so is the mode (one host is reached one
    way): an exporter publishing other ports or another mode is left out, with a warning."""
    ordered = sorted(specs, key=lambda s: exporter_order(config, s.cluster))
    first = ordered[0]
    kept = [s for s in ordered if s.ports == first.ports and s.mode == first.mode]
    for other in ordered:
        if other.ports != first.ports:
            warnings.append(
                f"import {first.name}: {other.cluster} exports other ports than {first.cluster} (the preferred "
                f"exporter); one host has one port list, so {other.cluster} is left out of it"
            )
        elif other.mode != first.mode:
            warnings.append(
                f"import {first.name}: {other.cluster} exports it {other.mode}, {first.cluster} (the preferred "
                f"exporter) {first.mode}; one host is reached one way, so {other.cluster} is left out of it"
            )
    egress = {c: config.import_rule(c) for c in (s.cluster for s in kept)}
    gateways = {c: rule.egress_gateway if rule else None for c, rule in egress.items()}
    if len({repr(g) for g in gateways.values()}) > 1:
        warnings.append(
            f"import {first.name}: exported by {', '.join(gateways)}, whose imports[] rules name different egress "
            f"gateways; one host is routed through one, so all of it goes through {first.cluster}'s (the "
            f"preferred exporter's)"
        )
    return ImportSpec(first.name, first.ports, tuple(s.exporters[0] for s in kept))


def parse_peers(raw: Iterable[Mapping[str, Any]]) -> tuple[dict[str, PeerSpec], list[str]]:
    """`Desired.peers`. A peer's egress identities are `identities.egress` (a string, or a list from
    older peers) and every entry of `identities.egress_additional` (its further egress gateways)."""
    warnings: list[str] = []
    peers: dict[str, PeerSpec] = {}
    for item in raw:
        if not isinstance(item, Mapping):
            continue
        name, trust_domain = item.get("name"), item.get("trust_domain")
        if not isinstance(name, str) or not is_dns_label(name) or not isinstance(trust_domain, str):
            warnings.append(f"peer {name!r}: malformed entry; left out")
            continue
        identities = item.get("identities")
        uris: list[object] = []
        for key in ("egress", "egress_additional"):  # the second: further egress gateways (imports')
            value = identities.get(key) if isinstance(identities, Mapping) else None
            uris += [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
        kept: list[str] = []
        for uri in uris:
            if not isinstance(uri, str) or spiffe_trust_domain(uri) != trust_domain:
                warnings.append(
                    f"peer {name}: egress identity {uri!r} is not a spiffe:// URI of one workload in its trust domain "
                    f"{trust_domain!r}; left out"
                )
            else:
                kept.append(uri)
        crl = item.get("crl")
        peers[name] = PeerSpec(name, trust_domain, tuple(sorted(set(kept))), crl if isinstance(crl, str) else None)
    return peers, warnings


def parse_exports(raw: Iterable[Mapping[str, Any]]) -> tuple[list[ExportSpec], list[str]]:
    """Exports in the shape published with `PUT /v1/clusters/{name}/exports` (`services`)."""
    warnings: list[str] = []
    exports: dict[str, ExportSpec] = {}
    for item in raw:
        service, namespace = item.get("service"), item.get("namespace")
        name = f"{service}.{namespace}"
        if not is_service_name(name) or item.get("name", name) != name:
            warnings.append(f"export {item.get('name')!r}: malformed service/namespace; left out")
            continue
        assert isinstance(service, str) and isinstance(namespace, str)
        ports = _ports(item.get("ports"), f"export {name}", warnings)
        consumers_raw = item.get("consumers") or []
        consumers = tuple(sorted({c for c in consumers_raw if isinstance(c, str) and is_dns_label(c)}))
        if ports is not None and name not in exports:
            mode = str(item.get("mode") or HOP_BY_HOP)
            identities = tuple(sorted(item.get("workload_identities") or ()))
            principals = {c: tuple(sorted(p)) for c, p in (item.get("consumer_principals") or {}).items()}
            exports[name] = ExportSpec(name, service, namespace, ports, consumers, mode, identities, principals)
    return [exports[n] for n in sorted(exports)], warnings


def exports_from_config(config: AgentConfig) -> list[ExportSpec]:
    specs = [
        ExportSpec(
            name=e.export_name,
            service=e.service,
            namespace=e.namespace,
            ports=tuple(sorted((PortSpec(p.number, p.protocol) for p in e.ports), key=lambda p: p.number)),
            consumers=tuple(sorted(set(e.consumer_clusters))),
            mode=e.mode,
            workload_identities=tuple(e.workload_identities(config.istio.trust_domain)),
            consumer_principals={c: tuple(sorted(p)) for c, p in e.consumer_principals.items()},
        )
        for e in config.exports
    ]
    return sorted(specs, key=lambda s: s.name)
