"""The agent's configuration file (API.md, "Agent configuration file").

`load_config(path)` reads the YAML file, validates it against `AgentConfig` and resolves relative
paths against the file's directory. Every problem is reported as a `ConfigError` whose message
names the key path (``istio.ingress_gateway.port: must be 1..65535 (got 70000)``) and what to fix;
unknown keys are refused rather than ignored, so a typo never silently falls back to a default.
`parse_config` checks a document; `load_config` also requires what a running agent needs
(`runtime_problems`: the ingress gateway's address, which its exports are published with).
"""

from __future__ import annotations

import ipaddress
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from meshbridge_wire.names import is_dns_label, is_dns_name, is_service_label, is_service_name
from meshbridge_wire.protocols import GATEWAY_CARRIED, Protocol, parse_protocol

__all__ = [
    "DEFAULT_VIP_RANGE",
    "END_TO_END",
    "ISTIO_AUTO_ALLOCATE_RANGE",
    "KEY_TYPES",
    "AgentConfig",
    "CAConfig",
    "ConfigError",
    "DNSConfig",
    "EgressGatewayConfig",
    "ExportConfig",
    "ExportConsumerConfig",
    "ExportPortConfig",
    "ImportConfig",
    "IngressGatewayConfig",
    "IstioConfig",
    "KubernetesConfig",
    "NodeLocalDNSConfig",
    "load_config",
    "parse_config",
    "runtime_problems",
]

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")
KeyType = Literal["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"]


MAX_CRL_VALIDITY = timedelta(days=7)
# istiod's defaults: DEFAULT_WORKLOAD_CERT_TTL 24 h and MAX_WORKLOAD_CERT_TTL 90 d
# (istio security/pkg/cmd/constants.go DefaultWorkloadCertTTL, DefaultMaxWorkloadCertTTL, read in
# pilot/pkg/bootstrap/istio_ca.go); istio-agent asks for SECRET_TTL, 24 h by default
# (pilot/cmd/pilot-agent/options/options.go).
DEFAULT_WORKLOAD_CERT_TTL = timedelta(hours=24)
MAX_WORKLOAD_CERT_TTL = timedelta(days=90)

MISSING_GATEWAY_ADDRESS = (
    "istio.ingress_gateway.address: required to run the agent: the address other clusters reach this "
    "cluster's ingress gateway at (its load balancer IP or DNS name), published with this cluster's "
    "exports; set it, e.g. `address: 198.51.100.20`"
)


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid.

    `problems` holds one ``<key path>: <what is wrong and how to fix it>`` line per problem.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems)


# --------------------------------------------------------------------------------------------
# Scalar checks. Each raises ValueError with a message that says what a valid value looks like.

_LABEL_NAME_RE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def _check_dns_label(value: str) -> str:
    if not is_dns_label(value):
        raise ValueError(
            f"must be a DNS label: lowercase letters, digits and '-', starting and ending with a "
            f"letter or digit, at most 63 characters (got {value!r})"
        )
    return value


def _check_service_name(value: str) -> str:
    if not is_service_label(value):
        raise ValueError(
            f"must be a Kubernetes Service name: lowercase letters, digits and '-', starting with a "
            f"letter, at most 63 characters (got {value!r})"
        )
    return value


def _check_dns_name(value: str) -> str:
    if not is_dns_name(value):
        raise ValueError(
            f"must be a lowercase DNS name such as 'b.mesh' (labels of letters, digits and '-', "
            f"separated by dots, no trailing dot) (got {value!r})"
        )
    return value


def _check_trust_domain(value: str) -> str:
    if not is_dns_name(value):
        raise ValueError(
            f"must be a valid trust domain: a lowercase domain such as 'b.mesh' (letters, digits, "
            f"'-' and dots; no 'spiffe://', no path) (got {value!r})"
        )
    return value


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be 1..65535 (got {value})")
    return value


def _check_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not is_dns_name(value.lower().rstrip(".")):
            raise ValueError(f"must be an IP address or a DNS name (got {value!r})") from None
        return value.lower().rstrip(".")
    return value


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"must be host:port (got {value!r})")
    return f"{_check_address(host)}:{int(port)}"


def _check_selector(value: dict[str, str]) -> dict[str, str]:
    if not value:
        raise ValueError("must name at least one label, e.g. {istio: ingressgateway}")
    for key, label in value.items():
        name = key.rsplit("/", 1)[-1]
        if not name or len(name) > 63 or _LABEL_NAME_RE.fullmatch(name) is None:
            raise ValueError(f"label key {key!r} is not a valid Kubernetes label key")
        if len(label) > 63 or _LABEL_NAME_RE.fullmatch(label) is None:
            raise ValueError(f"label {key!r}: value {label!r} is not a valid Kubernetes label value")
    return value


def _parse_duration(value: object) -> object:
    """Accept '7d', '12h', '90m', '3600s', '1d12h' besides what pydantic accepts (seconds, ISO 8601)."""
    if isinstance(value, str) and value and not value.startswith("P"):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is None or not any(match.groups()):
            raise ValueError(f"must be a duration such as '7d', '36h', '90m' or a number of seconds (got {value!r})")
        days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    return value


def _check_crl_validity(value: timedelta) -> timedelta:
    if not timedelta(0) < value <= MAX_CRL_VALIDITY:
        raise ValueError(f"must be more than 0 and at most 7 days (got {value})")
    return value


def _check_workload_cert_ttl(value: timedelta) -> timedelta:
    if not timedelta(0) < value <= MAX_WORKLOAD_CERT_TTL:
        raise ValueError(f"must be more than 0 and at most 90 days, Istio's MAX_WORKLOAD_CERT_TTL (got {value})")
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        return Path(base) / value
    return value


def _check_consumer_namespaces(value: list[str]) -> list[str]:
    for item in value:
        if item != "*":
            _check_dns_label(item)
    _unique(value, "namespace")
    if "*" in value and len(value) > 1:
        raise ValueError("'*' already means every namespace; list either '*' or namespaces")
    return value


DnsLabel = Annotated[str, AfterValidator(_check_dns_label)]
ServiceName = Annotated[str, AfterValidator(_check_service_name)]
DnsName = Annotated[str, AfterValidator(_check_dns_name)]
TrustDomain = Annotated[str, AfterValidator(_check_trust_domain)]
Port = Annotated[StrictInt, AfterValidator(_check_port)]
Selector = Annotated[dict[str, str], AfterValidator(_check_selector)]
RelPath = Annotated[Path, AfterValidator(_resolve_path)]
CrlValidity = Annotated[timedelta, BeforeValidator(_parse_duration), AfterValidator(_check_crl_validity)]
WorkloadCertTtl = Annotated[timedelta, BeforeValidator(_parse_duration), AfterValidator(_check_workload_cert_ttl)]
# The namespaces whose sidecars see an import's ServiceEntry, VirtualService and DestinationRule
# (their exportTo, besides the egress gateway's namespace): DNS labels, or "*" alone for all.
ConsumerNamespaces = Annotated[list[str], Field(min_length=1), AfterValidator(_check_consumer_namespaces)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _unique(values: Iterable[Any], what: str) -> None:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value!r} is listed twice")
        seen.add(value)


# --------------------------------------------------------------------------------------------
# Sections


class CAConfig(_Model):
    """How to reach the CA service and what to ask it for."""

    url: str
    trust_anchor: RelPath
    bootstrap_token_file: RelPath | None = None
    key_type: KeyType = "ecdsa-p256"
    # Renew the intermediate once this fraction of its lifetime has passed.
    renew_fraction: float = Field(default=2 / 3, gt=0, lt=1)
    # Lifetime of the CRL the intermediate signs for istiod's ca-crl.pem (re-signed at half of it).
    crl_validity: CrlValidity = MAX_CRL_VALIDITY
    # Write istiod's ca-crl.pem (istiod then ships it to every sidecar, whose Envoy checks CRLs on
    # every in-cluster chain). See AGENT-CONFIG `ca.ca_crl` for why it is on and how to turn it off.
    ca_crl: StrictBool = True
    # The longest life of a workload certificate istiod in this cluster issues: a superseded
    # intermediate's final CRL stays in ca-crl.pem this long after its replacement.
    workload_cert_ttl: WorkloadCertTtl = DEFAULT_WORKLOAD_CERT_TTL

    @field_validator("url")
    @classmethod
    def _https_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"must be an https:// URL such as https://ca.example:8443 (got {value!r})")
        if parts.query or parts.fragment:
            raise ValueError(f"must not carry a query or fragment (got {value!r})")
        return value.rstrip("/")


class _GatewayBase(_Model):
    selector: Selector
    service: ServiceName
    service_account: DnsName
    # Where the gateway's pods and Service live; defaults to istio.namespace.
    namespace: DnsLabel | None = None
    # A gateway installed with Istio's Helm `gateway` chart under this release name: the defaults
    # of service, service_account and selector follow the chart (keys given explicitly win).
    helm_release: ServiceName | None = None

    @model_validator(mode="before")
    @classmethod
    def _helm_layout(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("helm_release"), str):
            return {**helm_gateway_defaults(data["helm_release"]), **data}
        return data


def helm_gateway_defaults(release: str) -> dict[str, Any]:
    """What Istio's Helm `gateway` chart names after its release (values `name` and `labels` left
    unset): manifests/charts/gateway/templates/_helpers.tpl — `gateway.name` is the release name,
    the Service (service.yaml) and the service account (`gateway.serviceAccountName`, with
    `serviceAccount.create: true`, the chart's default) take it, and `gateway.selectorLabels`
    labels the pods `istio: <release without a leading "istio-">` (and `app: <release>`)."""
    return {"service": release, "service_account": release, "selector": {"istio": release.removeprefix("istio-")}}


class IngressGatewayConfig(_GatewayBase):
    """The gateway that receives other clusters' traffic for this cluster's exports."""

    selector: Selector = Field(default_factory=lambda: {"istio": "ingressgateway"})
    service: ServiceName = "istio-ingressgateway"
    service_account: DnsName = "istio-ingressgateway-service-account"
    # Published to peers: where they reach the cross-cluster port from outside (LB address).
    address: Annotated[str, AfterValidator(_check_address)] | None = None
    # Instead of `address`: several (IPs or DNS names), each an endpoint of its own at importers,
    # so one ejected address does not take the cluster out.
    addresses: (
        Annotated[list[Annotated[str, AfterValidator(_check_address)]], Field(min_length=1, max_length=16)] | None
    ) = None
    port: Port | None = None
    # The gateway pods' container ports (the Service's targetPort) behind istio.cross_cluster_port
    # and istio.cross_cluster_tcp_port: Envoy listens there, so the AuthorizationPolicy's `ports`
    # name them. Default: the Service ports themselves.
    target_port: Port | None = None
    tcp_target_port: Port | None = None
    # Published too: where peers reach the cross-cluster TCP port at `address` (default
    # istio.cross_cluster_tcp_port; differs when a load balancer maps ports).
    tcp_port: Port | None = None

    @model_validator(mode="after")
    def _one_address_key(self) -> IngressGatewayConfig:
        if self.address is not None and self.addresses is not None:
            raise ValueError("give either address or addresses (a list, the first is also published as address)")
        if self.addresses is not None:
            _unique(self.addresses, "address")
        return self

    @property
    def published_addresses(self) -> list[str]:
        return list(self.addresses) if self.addresses else [self.address] if self.address else []


class EgressGatewayConfig(_GatewayBase):
    """A gateway that carries this cluster's traffic towards other clusters."""

    # Port of the egress Gateway server (a port of the gateway's Service) that sidecars reach.
    port: Port = 443
    # Port of the egress Gateway's TLS servers for plain-TCP imports (Istio cannot mix HTTPS and TLS
    # servers on one port); the gateway's Service must expose it.
    tcp_port: Port = 15444


def _default_egress() -> EgressGatewayConfig:
    return EgressGatewayConfig(
        selector={"istio": "egressgateway"},
        service="istio-egressgateway",
        service_account="istio-egressgateway-service-account",
    )


class IstioConfig(_Model):
    namespace: DnsLabel = "istio-system"
    # istiod's revision (`--set revision=R`): its ConfigMap is `istio-R` and its pods are labelled
    # `istio.io/rev: R`; none: ConfigMap `istio`, label `istio.io/rev: default`.
    revision: DnsLabel | None = None
    trust_domain: TrustDomain
    cluster_domain: DnsName = "cluster.local"
    # Port of the ingress Gateway server that other clusters' egress gateways connect to.
    cross_cluster_port: Port = 15443
    # Port of the ingress Gateway's TLS servers for plain-TCP exports; published to peers (as
    # `gateway.tcp_port`, or ingress_gateway.tcp_port when set), so each cluster may pick its own.
    cross_cluster_tcp_port: Port = 15444
    # deny: a DENY policy refuses every principal but an export's consumers for that export's host,
    #       leaving the gateway's other traffic alone (safe on a shared ingress gateway).
    # allow: an ALLOW policy per export; on a shared gateway this denies all other traffic unless
    #        further ALLOW policies admit it.
    authorization_mode: Literal["deny", "allow"] = "deny"
    ingress_gateway: IngressGatewayConfig = Field(default_factory=IngressGatewayConfig)
    egress_gateway: EgressGatewayConfig = Field(default_factory=_default_egress)
    # istiod's secure gRPC address (host:port), where the agent reads which intermediate istiod
    # signs with; default istiod.<namespace>.svc:15012.
    istiod_address: Annotated[str, AfterValidator(_check_host_port)] | None = None

    @property
    def istiod(self) -> tuple[str, int]:
        """istiod's secure gRPC (host, port)."""
        host, _, port = (self.istiod_address or f"istiod.{self.namespace}.svc:15012").rpartition(":")
        return host, int(port)

    # Namespaces whose sidecars may call imported names, for every imports[] entry that does not
    # set its own; unset: each imported name's own namespace (see ConsumerNamespaces).
    consumer_namespaces: ConsumerNamespaces | None = None

    @model_validator(mode="after")
    def _ports_apart(self) -> IstioConfig:
        # Istio merges the TLS servers of the Gateways on one port into one listener and tells them
        # apart by SNI only (pilot/pkg/model/gateway.go mergeGateways: "We have another TLS server on
        # the same port. Can differentiate servers using SNI"): the TCP exports' TLS servers would sit
        # beside the HTTP exports' mTLS server, and the HTTP DENY rule, held to its port but without
        # its HTTP-only `hosts` on TCP chains (authz model.go checkError), would then refuse every
        # non-consumer of an HTTP export on every TCP export too (issue 11 item 2).
        if self.cross_cluster_port == self.cross_cluster_tcp_port:
            raise ValueError(
                f"cross_cluster_port and cross_cluster_tcp_port are both {self.cross_cluster_port}: give TCP "
                f"exports their own port (the default is 15444, HTTP 15443)"
            )
        return self

    def gateway_namespace(self, gateway: _GatewayBase) -> str:
        return gateway.namespace or self.namespace

    def ingress_target_ports(self) -> tuple[int, int]:
        """The ingress gateway's container ports (HTTP, TCP) behind the cross-cluster ports."""
        gateway = self.ingress_gateway
        return (
            gateway.target_port or self.cross_cluster_port,
            gateway.tcp_target_port or self.cross_cluster_tcp_port,
        )

    def published_gateway(self) -> dict[str, Any]:
        """Where other clusters reach this cluster's exports (`Gateway` of `PUT …/exports`):
        ingress_gateway.address, its port (cross_cluster_port unless set) and its TCP port
        (cross_cluster_tcp_port unless set); ConfigError when the address is not set."""
        gateway = self.ingress_gateway
        addresses = gateway.published_addresses
        if not addresses:
            raise ConfigError(MISSING_GATEWAY_ADDRESS, [MISSING_GATEWAY_ADDRESS])
        published: dict[str, Any] = {
            "address": addresses[0],
            "port": gateway.port or self.cross_cluster_port,
            "tcp_port": gateway.tcp_port or self.cross_cluster_tcp_port,
        }
        if len(addresses) > 1:
            # Only then: a CA service predating `addresses` refuses unknown keys, and still gets
            # the exports of every agent with one address.
            published["addresses"] = addresses
        return published

    def identity(self, gateway: _GatewayBase) -> str:
        """SPIFFE identity of a gateway's workload certificate: its own namespace and service
        account, as istiod signs it (pkg/spiffe/spiffe.go `genSpiffeURI`: `spiffe://<td>/ns/<ns>/sa/<sa>`)."""
        ns = self.gateway_namespace(gateway)
        return f"spiffe://{self.trust_domain}/ns/{ns}/sa/{gateway.service_account}"

    @property
    def mesh_configmap(self) -> str:
        """istiod's mesh ConfigMap (manifests/charts/istio-control/istio-discovery/templates/
        configmap.yaml: `istio`, or `istio-<revision>`)."""
        return f"istio-{self.revision}" if self.revision else "istio"

    @property
    def istiod_selector(self) -> dict[str, str]:
        """Labels of istiod's pods (istio-discovery/templates/deployment.yaml: `app: istiod`,
        `istio.io/rev: <revision or "default">`)."""
        return {"app": "istiod", "istio.io/rev": self.revision or "default"}


# Istio's own VIP auto-allocation range: the IP autoallocate controller (PILOT_ENABLE_IP_AUTOALLOCATE,
# on from 1.25) takes ServiceEntry addresses from PILOT_IP_AUTOALLOCATE_IPV4_PREFIX, default
# 240.240.0.0/16 (pilot/pkg/features/pilot.go), and the older allocator behind
# ISTIO_META_DNS_AUTO_ALLOCATE hashes into 240.240.x.y, fixed (serviceregistry/serviceentry/
# auto_allocation.go `autoAllocateIPs`). The controller counts addresses written in
# ServiceEntry.addresses as taken but, on a clash, moves its own allocation only after the fact
# (controllers/ipallocate/ipallocate.go `checkInSpecAddresses`, `resolveConflict`); the older
# allocator does not look at them at all. The IPv6 range (2001:2::/48) does not matter: the VIPs
# are IPv4.
ISTIO_AUTO_ALLOCATE_RANGE = ipaddress.IPv4Network("240.240.0.0/16")
# The default VIP range: class E like Istio's (never routed, so a VIP cannot shadow a real
# address), a /16 as before, and outside Istio's range. A name's offset in the range is a hash
# of the name, so names allocated under the old default 240.240.0.0/16 keep their host part:
# 240.240.A.B becomes 241.0.A.B (vip.py `allocate_vips`).
DEFAULT_VIP_RANGE = ipaddress.IPv4Network("241.0.0.0/16")
# NodeLocal DNSCache's upstream for in-cluster names, filled in by node-cache from the
# kube-dns-upstream Service (kubernetes cluster/addons/dns/nodelocaldns/README.md).
NODELOCAL_CLUSTER_DNS = "__PILLAR__CLUSTER__DNS__"


def _check_forward_target(value: str) -> str:
    """NodeLocal's placeholder, or an address CoreDNS's `forward` takes: IP, IPv4:port, [IPv6]:port."""
    if value == NODELOCAL_CLUSTER_DNS:
        return value
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    try:
        ipaddress.ip_address(host)
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(port)
    except ValueError:
        raise ValueError(
            f"must be {NODELOCAL_CLUSTER_DNS} (node-cache fills in the cluster DNS upstream) or the cluster "
            f"DNS Service IP, optionally with a port, e.g. 10.96.0.10 (got {value!r})"
        ) from None
    return value


def _check_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"must be an IP address such as 169.254.20.10 (got {value!r})") from None
    return value


class NodeLocalDNSConfig(_Model):
    """The stanza to add to NodeLocal DNSCache's Corefile, shaped like its cluster.local block."""

    # the `bind` line of the node-local-dns Corefile's cluster.local block: its link-local address
    # and, with kube-proxy in iptables mode, the kube-dns Service IP
    bind: list[Annotated[str, AfterValidator(_check_ip)]] = Field(min_length=1)
    forward_to: Annotated[str, AfterValidator(_check_forward_target)] = NODELOCAL_CLUSTER_DNS


class DNSConfig(_Model):
    suffix: DnsName = "remote"
    mode: Literal["istio", "coredns", "none"] = "istio"
    vip_range: ipaddress.IPv4Network = DEFAULT_VIP_RANGE
    ttl: Annotated[StrictInt, Field(ge=1, le=86400)] = 30
    coredns_namespace: DnsLabel = "kube-system"
    coredns_configmap: DnsName = "coredns"
    corefile_key: str = "Corefile"
    nodelocal_dns: NodeLocalDNSConfig | None = None

    @field_validator("vip_range", mode="before")
    @classmethod
    def _ipv4_network(cls, value: object) -> object:
        if isinstance(value, ipaddress.IPv4Network):
            network = value
        elif isinstance(value, str):
            try:
                parsed = ipaddress.ip_network(value, strict=True)
            except ValueError as exc:
                raise ValueError(
                    f"must be an IPv4 network such as {DEFAULT_VIP_RANGE} with the host bits zero ({exc})"
                ) from None
            if not isinstance(parsed, ipaddress.IPv4Network):
                raise ValueError(f"must be an IPv4 network; got the IPv6 network {value!r}")
            network = parsed
        else:
            raise ValueError(f"must be an IPv4 network written as a string, such as '{DEFAULT_VIP_RANGE}'")
        if network.prefixlen > 30:
            raise ValueError(
                f"{network} has no room: it needs at least 2 usable addresses; use a prefix of /30 or "
                f"shorter, sized for every imported name (the default {DEFAULT_VIP_RANGE} holds 65,534)"
            )
        if network.overlaps(ISTIO_AUTO_ALLOCATE_RANGE):
            raise ValueError(
                f"{network} overlaps {ISTIO_AUTO_ALLOCATE_RANGE}, where Istio allocates ServiceEntry addresses "
                f"itself (PILOT_ENABLE_IP_AUTOALLOCATE, on from Istio 1.25); two ServiceEntries would share "
                f"an address. Use a range outside it, such as the default {DEFAULT_VIP_RANGE}"
            )
        return network


class ExportPortConfig(_Model):
    number: Port
    protocol: Protocol = Protocol.HTTP

    @field_validator("protocol", mode="before")
    @classmethod
    def _carried(cls, value: object) -> Protocol:
        canonical = parse_protocol(value) if isinstance(value, str) else None
        if canonical is None or canonical not in GATEWAY_CARRIED:
            carried = ", ".join(sorted(GATEWAY_CARRIED))
            raise ValueError(
                f"protocol {value!r} cannot cross clusters: both gateways terminate mTLS and route HTTP "
                f"on the authority or plain TCP on the SNI; use one of {carried} (a TLS or HTTPS port "
                f"crosses as TCP: the client's TLS travels inside the gateways' mTLS, untouched)"
            )
        return canonical


def _check_principal(value: str) -> str:
    """`ns/<namespace>/sa/<service account>` (or `sa/*`): a workload of a consumer cluster, written as
    Istio's principal without the trust domain, which comes from that cluster's registration."""
    parts = value.split("/")
    if (
        len(parts) != 4
        or parts[0] != "ns"
        or parts[2] != "sa"
        or not is_dns_label(parts[1])
        or not (parts[3] == "*" or is_dns_name(parts[3]))
    ):
        raise ValueError(
            f"must be ns/<namespace>/sa/<service account> (or ns/<namespace>/sa/* for a whole namespace), "
            f"without the trust domain, e.g. 'ns/reviews/sa/reviews' (got {value!r})"
        )
    return value


def _check_service_account(value: str) -> str:
    if not is_dns_name(value):
        raise ValueError(
            f"must be a Kubernetes service account name (a DNS subdomain) such as 'ratings' (got {value!r})"
        )
    return value


Principal = Annotated[str, AfterValidator(_check_principal)]
ServiceAccount = Annotated[str, AfterValidator(_check_service_account)]
ExportMode = Literal["hop-by-hop", "end-to-end"]
END_TO_END: ExportMode = "end-to-end"
HOP_BY_HOP: ExportMode = "hop-by-hop"


class ExportConsumerConfig(_Model):
    """A consumer cluster; with `principals`, only those of its workloads (end-to-end exports)."""

    cluster: DnsLabel
    principals: list[Principal] = Field(default_factory=list)

    @field_validator("principals")
    @classmethod
    def _unique_principals(cls, value: list[str]) -> list[str]:
        _unique(value, "principal")
        return value


def _consumer_entry(value: object) -> object:
    """`consumers: [a]` is the short form of `[{cluster: a}]`."""
    if isinstance(value, str):
        return {"cluster": _check_dns_label(value)}
    return value


ConsumerEntry = Annotated[ExportConsumerConfig, BeforeValidator(_consumer_entry)]


class ExportConfig(_Model):
    service: ServiceName
    namespace: DnsLabel
    ports: list[ExportPortConfig] = Field(min_length=1)
    consumers: list[ConsumerEntry] = Field(default_factory=list)
    name: str | None = None
    # hop-by-hop: the gateways terminate mTLS, the destination sees this cluster's ingress gateway.
    # end-to-end: callers' sidecars speak mTLS to the destination workloads, gateways forward on SNI.
    mode: ExportMode = HOP_BY_HOP
    # The destination workloads' service accounts (in `namespace`): their SPIFFE identities are
    # published, and importers' sidecars accept only them (end-to-end mode).
    service_accounts: list[ServiceAccount] = Field(default_factory=list)

    @field_validator("ports", mode="before")
    @classmethod
    def _ports_as_mappings(cls, value: object) -> object:
        # `ports: [9080]` is the documented form; `{number, protocol}` names the protocol.
        if isinstance(value, list):
            return [
                {"number": item} if isinstance(item, int) and not isinstance(item, bool) else item for item in value
            ]
        return value

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, value: list[ExportPortConfig]) -> list[ExportPortConfig]:
        _unique((p.number for p in value), "port")
        return value

    @field_validator("consumers")
    @classmethod
    def _unique_consumers(cls, value: list[ExportConsumerConfig]) -> list[ExportConsumerConfig]:
        _unique((c.cluster for c in value), "consumer")
        return value

    @field_validator("service_accounts")
    @classmethod
    def _unique_service_accounts(cls, value: list[str]) -> list[str]:
        _unique(value, "service account")
        return value

    @property
    def consumer_clusters(self) -> list[str]:
        return [c.cluster for c in self.consumers]

    @property
    def consumer_principals(self) -> dict[str, list[str]]:
        """The consumers that name workloads: cluster → `ns/<ns>/sa/<sa>` entries."""
        return {c.cluster: list(c.principals) for c in self.consumers if c.principals}

    def end_to_end_fields(self, trust_domain: str) -> dict[str, Any]:
        """The published fields of an end-to-end export (`ExportedService.mode` and what goes with it);
        none for hop-by-hop, so the body stays what a CA service predating the mode accepts."""
        if self.mode != END_TO_END:
            return {}
        fields: dict[str, Any] = {"mode": self.mode, "workload_identities": self.workload_identities(trust_domain)}
        if self.consumer_principals:
            fields["consumer_principals"] = self.consumer_principals
        return fields

    def workload_identities(self, trust_domain: str) -> list[str]:
        """The SPIFFE identities of the destination workloads (Istio's `spiffe://<td>/ns/<ns>/sa/<sa>`)."""
        return [f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{sa}" for sa in sorted(self.service_accounts)]

    @field_validator("name")
    @classmethod
    def _name_matches(cls, value: str | None, info: ValidationInfo) -> str | None:
        service, namespace = info.data.get("service"), info.data.get("namespace")
        if value is not None and service and namespace and value != f"{service}.{namespace}":
            raise ValueError(f"must be <service>.<namespace>, here {service}.{namespace!s} (got {value!r})")
        return value

    @property
    def export_name(self) -> str:
        return f"{self.service}.{self.namespace}"


def _check_import_name(value: str) -> str:
    if value == "*":
        return value
    if not is_service_name(value):
        raise ValueError(f"must be '*' or <service>.<namespace> such as 'ratings.bookinfo' (got {value!r})")
    return value


ImportName = Annotated[str, AfterValidator(_check_import_name)]


def _check_service_name_key(value: str) -> str:
    if not is_service_name(value):
        raise ValueError(f"must be <service>.<namespace> such as 'ratings.bookinfo' (got {value!r})")
    return value


ServiceNameKey = Annotated[str, AfterValidator(_check_service_name_key)]
MAX_PRIORITY = 15
# A Kubernetes label value (apimachinery validation.go IsValidLabelValue), non-empty.
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def _check_locality(value: str) -> str:
    """Istio's `region/zone/subzone` (pkg/util/locality: split on "/"): one to three non-empty
    segments, each a label value Kubernetes accepts on a node."""
    parts = value.split("/")
    if len(parts) > 3 or not all(_LABEL_VALUE.fullmatch(p) for p in parts):
        raise ValueError(f"must be region, region/zone or region/zone/subzone, such as 'eu-west1/b' (got {value!r})")
    return value


class ImportConfig(_Model):
    from_: DnsLabel = Field(alias="from")
    names: list[ImportName] = Field(min_length=1)
    # A dedicated egress gateway for this source's traffic.
    egress_gateway: EgressGatewayConfig | None = None
    # Namespaces whose sidecars may call this source's names; unset: istio.consumer_namespaces.
    consumer_namespaces: ConsumerNamespaces | None = None
    # When several sources export one name: lower is preferred; sources of equal priority share
    # the traffic, a lower one takes it only while every preferred one is ejected (render/failover.py).
    priority: Annotated[int, Field(ge=0, le=MAX_PRIORITY)] = 0
    # This source's locality (region[/zone[/subzone]]), the `locality` of its endpoints: with equal
    # priorities, Istio prefers the sources nearest the egress gateway.
    locality: Annotated[str, AfterValidator(_check_locality)] | None = None
    # Local names: {<name>: <alias>} serves an imported <name> as <alias>.<suffix> instead (its VIP,
    # DNS and routes), while the exporter still sees <name>.
    aliases: dict[ServiceNameKey, ServiceNameKey] = Field(default_factory=dict)

    @field_validator("names")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        _unique(value, "name")
        if "*" in value and len(value) > 1:
            raise ValueError("'*' already selects every name this source exports; list either '*' or names")
        return value

    def selects(self, name: str) -> bool:
        return "*" in self.names or name in self.names


class KubernetesConfig(_Model):
    kubeconfig: RelPath | None = None
    context: str | None = None
    field_manager: Annotated[str, Field(min_length=1, max_length=128)] = "meshbridge"


class AgentConfig(_Model):
    cluster: DnsLabel
    ca: CAConfig
    istio: IstioConfig
    dns: DNSConfig = Field(default_factory=DNSConfig)
    exports: list[ExportConfig] = Field(default_factory=list)
    imports: list[ImportConfig] = Field(default_factory=list)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    state_dir: RelPath | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> AgentConfig:
        problems = list(_cross_problems(self))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def import_rule(self, cluster: str) -> ImportConfig | None:
        for rule in self.imports:
            if rule.from_ == cluster:
                return rule
        return None

    def alias_for(self, name: str) -> str | None:
        """The alias of an imported name (`imports[].aliases`; the configuration makes it unique)."""
        for rule in self.imports:
            if name in rule.aliases:
                return rule.aliases[name]
        return None

    def egress_gateways(self) -> list[EgressGatewayConfig]:
        """`istio.egress_gateway`, then each further gateway of `imports[].egress_gateway`, once."""
        gateways = [self.istio.egress_gateway]
        for rule in self.imports:
            if rule.egress_gateway is not None and rule.egress_gateway not in gateways:
                gateways.append(rule.egress_gateway)
        return gateways

    def consumer_namespaces(self, rule: ImportConfig) -> tuple[str, ...] | None:
        """The namespaces whose sidecars may call `rule`'s names; None: each name's own namespace."""
        chosen = rule.consumer_namespaces or self.istio.consumer_namespaces
        return tuple(chosen) if chosen is not None else None

    def advisories(self) -> list[str]:
        """Valid but probably unintended settings, worded for an operator."""
        gateways: list[tuple[str, _GatewayBase]] = [
            ("istio.ingress_gateway", self.istio.ingress_gateway),
            ("istio.egress_gateway", self.istio.egress_gateway),
        ]
        gateways += [
            (f"imports[{i}].egress_gateway", rule.egress_gateway)
            for i, rule in enumerate(self.imports)
            if rule.egress_gateway is not None
        ]
        notes = [
            f"{path}.namespace: not set, so {self.istio.namespace!r} (istio.namespace); Istio's Helm gateway "
            f"chart is installed in a namespace of its own (its release's), give that namespace here"
            for path, gateway in gateways
            if gateway.helm_release is not None and gateway.namespace is None
        ]
        for i, rule in enumerate(self.imports):
            if self.consumer_namespaces(rule) is None:
                notes.append(
                    f"imports[{i}].consumer_namespaces: not set, so each name imported from {rule.from_!r} "
                    f"(<service>.<namespace>) is visible only to sidecars in its own <namespace> (and the egress "
                    f"gateway); workloads elsewhere get no route to it. List the calling namespaces, or ['*'] "
                    f"for every namespace (then every sidecar builds a cluster per imported port)"
                )
        if self.istio.authorization_mode == "allow" and self.exports:
            notes.append(
                "istio.authorization_mode: 'allow' puts ALLOW policies on the ingress gateway pods: every "
                "request they do not admit is refused, including other Gateways' traffic on the same pods "
                "(public HTTPS, TLS passthrough, TCP) unless ALLOW policies of their own admit it. Use 'deny' "
                "on a shared ingress gateway"
            )
        return notes


def _cross_problems(cfg: AgentConfig) -> Iterable[str]:
    suffix, cluster_domain = cfg.dns.suffix, cfg.istio.cluster_domain
    if suffix == cluster_domain or suffix.endswith("." + cluster_domain) or cluster_domain.endswith("." + suffix):
        yield (
            f"dns.suffix: {suffix!r} overlaps istio.cluster_domain {cluster_domain!r}; "
            f"pick a suffix of its own such as 'remote'"
        )
    if cfg.dns.nodelocal_dns is not None and cfg.dns.mode != "coredns":
        yield (
            f"dns.nodelocal_dns: needs dns.mode coredns (it is {cfg.dns.mode!r}): the stanza forwards the suffix "
            f"to the cluster DNS, which answers it only with the meshbridge CoreDNS block"
        )
    seen_sources: set[str] = set()
    for i, rule in enumerate(cfg.imports):
        if rule.from_ == cfg.cluster:
            yield f"imports[{i}].from: {rule.from_!r} is this cluster; a cluster cannot import from itself"
        if rule.from_ in seen_sources:
            yield f"imports[{i}].from: {rule.from_!r} appears twice; merge its names into one entry"
        seen_sources.add(rule.from_)
    yield from _alias_problems(cfg)
    seen_exports: set[str] = set()
    for i, export in enumerate(cfg.exports):
        if export.export_name in seen_exports:
            yield f"exports[{i}]: {export.export_name!r} is exported twice; merge the entries"
        seen_exports.add(export.export_name)
        for j, consumer in enumerate(export.consumer_clusters):
            if consumer == cfg.cluster:
                yield f"exports[{i}].consumers[{j}]: {consumer!r} is this cluster; list other clusters only"
        yield from _mode_problems(i, export)
    yield from _gateway_conflicts(cfg)


def _alias_problems(cfg: AgentConfig) -> Iterable[str]:
    """An alias must name a host no other import takes: not a name listed in any `names`, not
    another alias; a name has one alias (the same in every rule that gives one), which its rule
    must select."""
    listed = {n for rule in cfg.imports for n in rule.names if n != "*"}
    claimed: dict[str, tuple[str, str]] = {}  # alias -> (name, key path)
    alias_of: dict[str, str] = {}
    for i, rule in enumerate(cfg.imports):
        for name, alias in rule.aliases.items():
            path = f"imports[{i}].aliases.{name}"
            if not rule.selects(name):
                yield f"{path}: {name!r} is not among imports[{i}].names; alias only names this rule imports"
            if alias == name:
                yield f"{path}: the alias is the name itself; leave it out"
            elif alias in listed:
                yield f"{path}: alias {alias!r} collides with an imported name; pick another alias"
            first = claimed.setdefault(alias, (name, path))
            if first[0] != name:
                yield f"{path}: alias {alias!r} is already the alias of {first[0]!r} ({first[1]}); one host, one import"
            if alias_of.setdefault(name, alias) != alias:
                yield f"{path}: {name!r} already has the alias {alias_of[name]!r} in another rule; give it one alias"


def _mode_problems(i: int, export: ExportConfig) -> Iterable[str]:
    """An end-to-end export needs its workloads' identities; workload principals need end-to-end."""
    if export.mode == END_TO_END and not export.service_accounts:
        yield (
            f"exports[{i}].service_accounts: an end-to-end export needs the service accounts of the workloads "
            f"behind {export.service}.{export.namespace} (callers' sidecars accept only their SPIFFE identities), "
            f"e.g. service_accounts: [{export.service}]"
        )
    if export.mode != END_TO_END:
        if export.service_accounts:
            yield f"exports[{i}].service_accounts: only for mode end-to-end (this export is {export.mode})"
        for j, consumer in enumerate(export.consumers):
            if consumer.principals:
                yield (
                    f"exports[{i}].consumers[{j}].principals: only for mode end-to-end: in {export.mode} mode the "
                    f"destination sees this cluster's ingress gateway, not the caller's workload"
                )


def _gateway_conflicts(cfg: AgentConfig) -> Iterable[str]:
    istio = cfg.istio
    gateways: dict[tuple[str, str], tuple[str, EgressGatewayConfig]] = {}
    candidates = [("istio.egress_gateway", istio.egress_gateway)] + [
        (f"imports[{i}].egress_gateway", rule.egress_gateway)
        for i, rule in enumerate(cfg.imports)
        if rule.egress_gateway is not None
    ]
    ingress_key = (istio.gateway_namespace(istio.ingress_gateway), istio.ingress_gateway.service)
    for path, gateway in candidates:
        key = (istio.gateway_namespace(gateway), gateway.service)
        if key == ingress_key:
            yield f"{path}.service: {gateway.service!r} is the ingress gateway; egress needs its own gateway"
        first = gateways.setdefault(key, (path, gateway))
        if first[1] != gateway:
            yield (
                f"{path}: service {gateway.service!r} is also configured at {first[0]} with different "
                f"settings; one Service has one selector, service account and port"
            )


# --------------------------------------------------------------------------------------------
# Loading and error reporting


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate the configuration file an agent runs with (`parse_config`, then
    `runtime_problems`); relative paths are taken from its directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    config = parse_config(data, base_dir=path.resolve().parent, source=str(path))
    problems = runtime_problems(config)
    if problems:
        listing = "\n".join(f"  {p}" for p in problems)
        raise ConfigError(f"{path} cannot run an agent:\n{listing}", problems)
    return config


def runtime_problems(config: AgentConfig) -> list[str]:
    """What a valid document still lacks for a running agent. A Helm chart may render the file
    before the gateway's address is known; the agent publishes its exports with it on every pass."""
    return [] if config.istio.ingress_gateway.published_addresses else [MISSING_GATEWAY_ADDRESS]


def parse_config(data: object, *, base_dir: Path | None = None, source: str = "config") -> AgentConfig:
    """Validate already-parsed YAML; `base_dir` anchors relative paths."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{source}: the top level must be a mapping of keys (cluster, ca, istio, …); it is {kind}")
    try:
        return AgentConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = [line for err in exc.errors() for line in _describe(err)]
        listing = "\n".join(f"  {p}" for p in problems)
        raise ConfigError(f"{source} is invalid:\n{listing}", problems) from None


def _key_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _describe(err: Mapping[str, Any]) -> list[str]:
    loc = tuple(err["loc"])
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
        if not loc:  # cross-field checks carry their own key paths, one per line
            return message.splitlines()
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        message = f"unknown key{hint}"
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected', '')} (got {err.get('input')!r})"
    elif kind in ("string_type",):
        message = f"must be a string (got {err.get('input')!r}; quote it in YAML)"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        message = f"must be a whole number (got {err.get('input')!r})"
    elif kind in ("model_type", "dict_type", "model_attributes_type") and len(loc) >= 2 and loc[-2] == "ports":
        message = f"must be a port number or {{number: N, protocol: HTTP}} (got {err.get('input')!r})"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        message = "must be a mapping of keys"
    elif kind == "list_type":
        message = "must be a list"
    elif kind == "too_short":
        message = "must not be empty"
    else:
        message = str(err["msg"])
        message = message[:1].lower() + message[1:]
    path = _key_path(loc)
    return [f"{path}: {message}" if path else message]


def _allowed_keys(loc: Sequence[int | str]) -> list[str]:
    model: type[BaseModel] | None = AgentConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        model = _model_in(field.annotation) if field is not None else None
    if model is None:
        return []
    return sorted(f.alias or n for n, f in model.model_fields.items())


def _model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType, Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
