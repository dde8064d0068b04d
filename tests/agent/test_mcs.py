"""MCS ServiceExports become exports with each Service port classified as Istio classifies it
(pkg/config/kube/conversion.go `ConvertProtocol`), TLS and HTTPS carried as opaque TCP, and ports no
gateway can carry (UDP, SCTP) refused with a warning instead of silently dropped (issue 11, item 11).

Before: `kube._port_protocol` read the part before the first '-' of appProtocol or the name and fell
back to HTTP: an unnamed or `mongo` port crossed as HTTP, `grpc-web` as GRPC, and `https`/`tls` ports
and UDP ports were published as protocols the importers then dropped."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from lightkube.models.core_v1 import ServicePort, ServiceSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Service

from cluster_agent.config import parse_config
from cluster_agent.kube import KubeApplier
from cluster_agent.mcs import ServicePortView, carried_protocol, istio_protocol, service_export_entry

# (port, name, L4 protocol, appProtocol) → Istio's protocol (ConvertProtocol) → what crosses.
CASES = [
    (9080, "http", "TCP", None, "HTTP", "HTTP"),
    (9080, "http-web", "TCP", None, "HTTP", "HTTP"),
    (8080, "HTTP2-x", "TCP", None, "HTTP2", "HTTP2"),
    (8080, "web", "TCP", "http", "HTTP", "HTTP"),  # appProtocol wins over the name
    (8080, "http", "TCP", "grpc", "GRPC", "GRPC"),
    (8080, "grpc-web-ui", "TCP", None, "GRPC-Web", "GRPC-Web"),  # the grpc-web prefix before '-' splitting
    (8080, "x", "TCP", "kubernetes.io/h2c", "HTTP2", "HTTP2"),
    (8080, "x", "TCP", "kubernetes.io/ws", "HTTP", "HTTP"),
    (8443, "x", "TCP", "kubernetes.io/wss", "HTTPS", "TCP"),
    (443, "https", "TCP", None, "HTTPS", "TCP"),  # the client's TLS inside the tunnel
    (9443, "tls-api", "TCP", None, "TLS", "TCP"),
    (27017, "mongo", "TCP", None, "Mongo", "TCP"),
    (6379, "redis", "TCP", None, "Redis", "TCP"),
    (5432, "tcp-pg", "TCP", None, "TCP", "TCP"),
    (8080, "", "TCP", None, "UnsupportedProtocol", "TCP"),  # sniffed in-mesh; opaque TCP across
    (8080, "web", "TCP", None, "UnsupportedProtocol", "TCP"),
    (3306, "", "TCP", None, "TCP", "TCP"),  # a well-known port
    (53, "dns", "UDP", None, "UDP", None),
    (9999, "tcp-x", "SCTP", None, "TCP", None),
]


@pytest.mark.parametrize(("number", "name", "l4", "app", "istio", "carried"), CASES)
def test_ports_are_classified_as_istio_does(
    number: int, name: str, l4: str, app: str | None, istio: str, carried: str | None
) -> None:
    port = ServicePortView(number, name, l4, app)
    assert istio_protocol(port) == istio
    protocol, istio_name = carried_protocol(port)
    assert (protocol.value if protocol else None, istio_name) == (carried, istio)


def test_a_port_that_cannot_cross_is_named_in_a_warning() -> None:
    entry, warnings = service_export_entry(
        "dns", "infra", " a, b ,a", [ServicePortView(53, "dns", "UDP"), ServicePortView(53, "dns-tcp", "TCP")]
    )
    assert entry == {
        "name": "dns.infra",
        "namespace": "infra",
        "service": "dns",
        "ports": [{"number": 53, "protocol": "TCP"}],
        "consumers": ["a", "b"],
    }
    assert warnings == [
        "ServiceExport infra/dns: port 53 (UDP UDP) is not exported: the gateways proxy TCP only "
        "(Istio builds no UDP listeners)"
    ]
    none, why = service_export_entry("dns", "infra", "", [ServicePortView(53, "dns", "UDP")])
    assert (
        none is None
        and why[-1] == "ServiceExport infra/dns: its Service has no port that can cross clusters; not exported"
    )


class FakeKube:
    """lightkube's Client for `service_exports`: one ServiceExport and its Service."""

    def __init__(self, ports: list[ServicePort]) -> None:
        self.ports = ports

    def list(self, *args: Any, **kwargs: Any) -> list[Any]:
        meta = ObjectMeta(name="shop", namespace="web", annotations={"meshbridge.io/consumers": "a"})
        return [SimpleNamespace(metadata=meta)]

    def get(self, *args: Any, **kwargs: Any) -> Service:
        return Service(metadata=ObjectMeta(name="shop", namespace="web"), spec=ServiceSpec(ports=self.ports))


def test_service_exports_publish_istios_protocols_and_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config(
        {
            "cluster": "b",
            "ca": {"url": "https://ca:8443", "trust_anchor": "/r.pem"},
            "istio": {"trust_domain": "b.mesh"},
        }
    )
    ports = [
        ServicePort(port=80, name="web"),  # no protocol named: crossed as HTTP before
        ServicePort(port=443, name="https"),  # HTTPS: published, then dropped by importers
        ServicePort(port=8081, name="grpc-web"),  # read as GRPC before
        ServicePort(port=9000, name="metrics", protocol="UDP"),
    ]
    applier = KubeApplier(FakeKube(ports), config)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="meshbridge.agent.kube"):
        (entry,) = applier.service_exports()
        applier.service_exports()
    assert entry["ports"] == [
        {"number": 80, "protocol": "TCP"},
        {"number": 443, "protocol": "TCP"},
        {"number": 8081, "protocol": "GRPC-Web"},
    ]
    assert entry["consumers"] == ["a"]
    refused = [r.getMessage() for r in caplog.records if "9000" in r.getMessage()]
    assert refused == [
        "ServiceExport web/shop: port 9000 (UDP UDP) is not exported: the gateways proxy TCP only "
        "(Istio builds no UDP listeners)"
    ]
