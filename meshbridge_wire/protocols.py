"""Istio's port protocol names, and which of them the gateways carry from one cluster to another.

Istio reads a port's protocol case-insensitively (`pkg/config/protocol/instance.go` `Parse`);
the spellings here are Istio's canonical ones, as they appear in Istio objects and on the wire.
"""

from __future__ import annotations

from enum import StrEnum


class Protocol(StrEnum):
    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    HTTPS = "HTTPS"
    GRPC = "GRPC"
    GRPC_WEB = "GRPC-Web"
    TCP = "TCP"
    TLS = "TLS"


# Both gateways terminate mTLS and route these on the HTTP authority.
HTTP_ROUTED: frozenset[Protocol] = frozenset({Protocol.HTTP, Protocol.HTTP2, Protocol.GRPC, Protocol.GRPC_WEB})
# Plain TCP crosses too, on its own gateway port, routed on the SNI of its own TLS server.
GATEWAY_CARRIED: frozenset[Protocol] = HTTP_ROUTED | {Protocol.TCP}

_BY_UPPER = {p.value.upper(): p for p in Protocol}


def parse_protocol(value: str) -> Protocol | None:
    """Istio's protocol for `value` in any letter case, else None."""
    return _BY_UPPER.get(value.upper())
