"""Typed views of the renderers' inputs: `Import`, `Desired.peers` and exports (API.md shapes).

Imports and peers arrive from the CA service as JSON. Each entry is checked here once; an entry
that cannot be rendered safely is dropped with a warning instead of failing the whole render.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cluster_agent.config import END_TO_END, AgentConfig
from meshbridge_wire.names import is_dns_label, is_dns_name, workload_identity
from meshbridge_wire.names import is_service_name as _is_service_name
from meshbridge_wire.protocols import GATEWAY_CARRIED, Protocol, parse_protocol

__all__ = [
    "ExportSpec",
    "ImportSpec",
    "PeerSpec",
    "PortSpec",
    "exports_from_config",
    "parse_exports",
    "parse_imports",
    "parse_peers",
    "select_imports",
]

HOP_BY_HOP = "hop-by-hop"
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
class ImportSpec:
    name: str  # <service>.<namespace>
    cluster: str
    ports: tuple[PortSpec, ...]
    gateway_address: str
    gateway_port: int
    identity: str  # spiffe:// identity of the exporting cluster's ingress gateway
    # The exporter's published cross-cluster TCP port (`Gateway.tcp_port`); None from an exporter
    # whose agent predates it.
    gateway_tcp_port: int | None = None
    mode: str = HOP_BY_HOP
    # end-to-end: the destination workloads' spiffe:// identities, in the exporter's trust domain
    workload_identities: tuple[str, ...] = ()

    @property
    def gateway_is_ip(self) -> bool:
        return _is_ip(self.gateway_address)

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


def _import(raw: Mapping[str, Any], warnings: list[str]) -> ImportSpec | None:
    name, cluster = raw.get("name"), raw.get("cluster")
    if not is_service_name(name) or not isinstance(cluster, str) or not is_dns_label(cluster):
        warnings.append(f"import {name!r} from {cluster!r}: malformed name or cluster; left out")
        return None
    assert isinstance(name, str)  # narrowed by is_service_name
    where = f"import {name} from {cluster}"
    gateway = raw.get("gateway")
    address = gateway.get("address") if isinstance(gateway, Mapping) else None
    port = _port(gateway.get("port")) if isinstance(gateway, Mapping) else None
    if not isinstance(address, str) or port is None or not _is_address(address):
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
    return ImportSpec(name, cluster, ports, address.lower().rstrip("."), port, identity, tcp_port, mode, workloads)


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
    """Check `Import` entries; one per name (the host is the same whichever cluster exports it).

    When two clusters export the same name, the one whose cluster name sorts first is kept.
    """
    warnings: list[str] = []
    by_name: dict[str, list[ImportSpec]] = {}
    for item in raw:
        spec = _import(item, warnings) if isinstance(item, Mapping) else None
        if spec is not None:
            by_name.setdefault(spec.name, []).append(spec)
    chosen: list[ImportSpec] = []
    for name in sorted(by_name):
        candidates = sorted(by_name[name], key=lambda s: s.cluster)
        chosen.append(candidates[0])
        others = sorted({s.cluster for s in candidates[1:]} - {candidates[0].cluster})
        if others:
            warnings.append(
                f"import {name}: exported by {', '.join([candidates[0].cluster, *others])}; one host "
                f"cannot lead to several clusters, using {candidates[0].cluster}"
            )
    return chosen, warnings


def select_imports(config: AgentConfig, imports: Sequence[ImportSpec]) -> tuple[list[ImportSpec], list[str]]:
    """Keep the imports the configuration asks for; warn about named ones nobody offers."""
    selected = [spec for spec in imports if (rule := config.import_rule(spec.cluster)) and rule.selects(spec.name)]
    offered = {(spec.cluster, spec.name) for spec in imports}
    warnings = [
        f"imports: {name} from {rule.from_} is configured but not offered by the CA service "
        f"(not exported to {config.cluster}, or {rule.from_} has not published)"
        for rule in config.imports
        for name in rule.names
        if name != "*" and (rule.from_, name) not in offered
    ]
    return selected, warnings


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
