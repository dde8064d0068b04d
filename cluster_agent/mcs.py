"""Kubernetes MCS `ServiceExport`s as exports: each Service port classified as Istio classifies it.

Istio decides a Service port's protocol in `pkg/config/kube/conversion.go` `ConvertProtocol`:
UDP is UDP; otherwise `appProtocol` when set (with Kubernetes' `kubernetes.io/h2c` → HTTP2,
`kubernetes.io/ws` → HTTP, `kubernetes.io/wss` → HTTPS), else the port name; a `grpc-web` prefix is
GRPC-Web, else the part before the first `-` is parsed case-insensitively
(`pkg/config/protocol/instance.go` `Parse`); anything else is `UnsupportedProtocol` (sniffed by
sidecars), or TCP on the well-known ports 25, 53, 3306, 27017.

What crosses clusters: HTTP, HTTP2, GRPC and GRPC-Web as themselves (routed on the authority).
Everything else Envoy proxies over TCP (`Instance.IsTCP`: TCP, HTTPS, TLS, Mongo, Redis, MySQL), and a
port whose protocol Istio would only sniff, crosses as TCP: our mTLS tunnel around the client's own
bytes, TLS included, so the destination still terminates the client's TLS. The gateways cannot sniff
on the way, and TCP carries HTTP too. A port Envoy cannot proxy at all (UDP, SCTP: Istio's listeners
are TCP only) is refused with a warning naming it: never dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshbridge_wire.protocols import HTTP_ROUTED, Protocol, parse_protocol

__all__ = ["CONSUMERS_ANNOTATION", "ServicePortView", "carried_protocol", "istio_protocol", "service_export_entry"]

CONSUMERS_ANNOTATION = "meshbridge.io/consumers"
# Kubernetes' standard appProtocol names, as ConvertProtocol maps them (only for appProtocol).
_K8S_APP_PROTOCOLS = {"kubernetes.io/h2c": "HTTP2", "kubernetes.io/ws": "HTTP", "kubernetes.io/wss": "HTTPS"}
# ConvertProtocol's wellKnownPorts: SMTP, DNS, MySQL, MongoDB are TCP when nothing names a protocol.
_WELL_KNOWN_TCP = frozenset({25, 53, 3306, 27017})
# Istio's other protocol names (`protocol.Parse`), none of which the gateways route on HTTP.
_OTHER_ISTIO = {"udp": "UDP", "http_proxy": "HTTP_PROXY", "mongo": "Mongo", "redis": "Redis", "mysql": "MySQL"}
UNSUPPORTED = "UnsupportedProtocol"


@dataclass(frozen=True, slots=True)
class ServicePortView:
    """The fields of a Kubernetes ServicePort that decide its protocol."""

    number: int
    name: str | None = None
    protocol: str | None = None  # Kubernetes' L4 protocol: TCP (default), UDP, SCTP
    app_protocol: str | None = None


def istio_protocol(port: ServicePortView) -> str:
    """Istio's protocol name for a Service port, as `ConvertProtocol` decides it."""
    if (port.protocol or "TCP").upper() == "UDP":
        return "UDP"
    name = port.name or ""
    if port.app_protocol is not None:
        name = port.app_protocol
        if name in _K8S_APP_PROTOCOLS:
            return _K8S_APP_PROTOCOLS[name]
    if name[: len("grpc-web")].lower() == "grpc-web":
        return Protocol.GRPC_WEB.value
    prefix = name.split("-", 1)[0]
    known = parse_protocol(prefix)
    if known is not None:
        return known.value
    if prefix.lower() in _OTHER_ISTIO:
        return _OTHER_ISTIO[prefix.lower()]
    return Protocol.TCP.value if port.number in _WELL_KNOWN_TCP else UNSUPPORTED


def carried_protocol(port: ServicePortView) -> tuple[Protocol | None, str]:
    """The protocol a port crosses clusters with, and Istio's own name for it; None when it cannot."""
    istio = istio_protocol(port)
    if (port.protocol or "TCP").upper() != "TCP":
        return None, istio
    known = parse_protocol(istio)
    if known is not None and known in HTTP_ROUTED:
        return known, istio
    return Protocol.TCP, istio


def service_export_entry(
    name: str, namespace: str, consumers: str, ports: Sequence[ServicePortView]
) -> tuple[dict[str, object] | None, list[str]]:
    """One ServiceExport (its Service's ports, the consumers annotation) as a published export
    entry, and a warning per port that cannot cross; None when no port can."""
    where = f"ServiceExport {namespace}/{name}"
    carried: dict[int, Protocol] = {}
    warnings: list[str] = []
    for port in ports:
        protocol, istio = carried_protocol(port)
        if protocol is None:
            warnings.append(
                f"{where}: port {port.number} ({port.protocol} {istio}) is not exported: the gateways "
                f"proxy TCP only (Istio builds no {port.protocol} listeners)"
            )
            continue
        carried.setdefault(port.number, protocol)
    if not carried:
        warnings.append(f"{where}: its Service has no port that can cross clusters; not exported")
        return None, warnings
    entry: dict[str, object] = {
        "name": f"{name}.{namespace}",
        "namespace": namespace,
        "service": name,
        "ports": [{"number": n, "protocol": carried[n].value} for n in sorted(carried)],
        "consumers": sorted({c.strip() for c in consumers.split(",") if c.strip()}),
    }
    return entry, warnings
