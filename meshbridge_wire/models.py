"""The REST API's request and response bodies (docs/api.md), as pydantic models.

The server validates what it receives with them and the agent parses what it receives with them,
so a field or a protocol name cannot mean one thing on one side and another on the other.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meshbridge_wire.names import DNS_LABEL as _LABEL
from meshbridge_wire.names import DNS_NAME as _NAME
from meshbridge_wire.names import is_dns_label
from meshbridge_wire.protocols import Protocol

# Anchored forms for pydantic's `pattern` (its regex engine has no trailing-newline `$` quirk).
DNS_LABEL = rf"^{_LABEL}$"
DOMAIN = rf"^{_NAME}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


GatewayAddress = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:\-]+$")]


class Gateway(Strict):
    address: GatewayAddress  # the first of `addresses` when both are given: what older agents use
    port: int = Field(ge=1, le=65535)
    # Every address (IP or DNS name) peers reach the gateway at, each an endpoint of its own at
    # importers; absent from older agents, and sent only when there are several.
    addresses: list[GatewayAddress] | None = Field(default=None, min_length=1, max_length=16)

    @model_validator(mode="after")
    def _first_is_address(self) -> Gateway:
        if self.addresses is not None and self.addresses[0] != self.address:
            raise ValueError("addresses[0] must be address (older agents read address alone)")
        return self


class ClusterCreate(Strict):
    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL)
    trust_domain: str = Field(default="cluster.local", min_length=1, max_length=253, pattern=DOMAIN)
    gateway: Gateway | None = None
    # A trust domain held by another active cluster is refused (409) unless this says so.
    share_trust_domain: bool = False


class BootstrapTokenOut(BaseModel):
    bootstrap_token: str
    bootstrap_expires_at: str


class ClusterCreated(BootstrapTokenOut):
    name: str
    status: str
    generation: int


class IntermediateOut(BaseModel):
    serial: str
    not_before: str
    not_after: str
    root_id: str


class InstalledOut(BaseModel):
    """What the agent reported it wrote into `cacerts` (its last status)."""

    generation: int | None
    serial: str | None


class ServedOut(BaseModel):
    """What the cluster's istiod serves, from the agent's last report, as the CA reads it."""

    observed_at: str | None  # when the agent looked, on the agent's clock (as reported)
    received_at: str | None  # when the CA received the report, on the CA's clock
    report_age_s: int | None  # the CA's clock now minus received_at
    bundle_roots: list[str]  # root ids of istiod's trust bundle; "unknown:<16 hex>" for a root this CA lacks
    bundle_since: str | None  # since when istiod serves that bundle, on the CA's clock
    signing_serial: str | None
    signing_generation: int | None  # None when the CA did not issue that serial to this cluster
    signing_root_id: str | None
    signing_since: str | None  # on the CA's clock: corrected for the agent's clock, never before issuance
    problems: list[str]


class ClusterOut(BaseModel):
    name: str
    status: Literal["pending", "active", "revoked"]
    generation: int
    trust_domain: str
    gateway: dict[str, Any] | None
    rotation_pending: bool
    intermediate: IntermediateOut | None
    agent_status: dict[str, Any] | None
    installed: InstalledOut | None = None
    served: ServedOut | None = None
    # the cluster's last `PUT …/exports` body (gateway, identities, services with their consumers), or None
    exports: dict[str, Any] | None = None
    # per name this cluster imports, the clusters exporting it to it (several: its agent fails over)
    imports: dict[str, list[str]] = {}


class ClusterList(BaseModel):
    items: list[ClusterOut]


class Empty(Strict):
    pass


class RotateOut(BaseModel):
    generation: int


RevocationReason = Literal[
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "certificateHold",
    "privilegeWithdrawn",
    "aACompromise",
]


class RevokeIn(Strict):
    reason: RevocationReason = "unspecified"


class CertRevoked(BaseModel):
    serial: str
    revoked_at: str
    reason: str


class RootIn(Strict):
    key_type: Literal["ecdsa-p256", "ecdsa-p384", "rsa-3072", "rsa-4096"] | None = None


class RootOut(BaseModel):
    id: str
    status: Literal["trusted", "active", "retired"]
    not_after: str
    certificate: str


class RootList(BaseModel):
    items: list[RootOut]


class RootPhaseIn(Strict):
    """Optional body of `POST /v1/roots/{id}/activate` and `/retire`."""

    # proceed although some active clusters' istiod is not ready (audited with those clusters);
    # strict: only JSON true forces (not "yes", 1 or "true")
    force: bool = Field(default=False, strict=True)


class GateClusterOut(BaseModel):
    name: str
    ready: bool
    waiting_for: list[str]  # empty when ready
    ready_at: str | None = None  # when the workload-certificate wait ends (CA clock), once it can be told
    overridable: bool = True  # False: `force` cannot override what it waits for


class RootGateOut(BaseModel):
    root_id: str
    phase: Literal["activate", "retire"]  # phase 3 and phase 4
    ready: bool
    clusters: list[GateClusterOut]  # every active cluster, by name


class RootStatusOut(BaseModel):
    active_root: str
    workload_cert_lifetime_s: int
    margin_s: int
    gates: list[RootGateOut]


class LaggingCluster(BaseModel):
    cluster: str
    waiting_for: str


class FleetNotReadyProblem(BaseModel):
    """The 409 of a refused root phase: a problem document with the lagging clusters."""

    type: str
    title: str
    status: int
    detail: str
    lagging: list[LaggingCluster]


class AdminTokenIn(Strict):
    """A new operator token of the admin API (issue 14): ``viewer`` reads, ``admin`` does all."""

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL)
    role: Literal["admin", "viewer"]
    expires_in_s: int | None = Field(default=None, ge=60, le=3650 * 86400)  # None: never expires


class AdminTokenOut(BaseModel):
    """An operator token as listed: never its secret nor its hash."""

    id: str
    name: str
    role: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    state: Literal["live", "expired", "revoked"]


class AdminTokenCreated(AdminTokenOut):
    token: str  # the plaintext, shown this once


class AdminTokenList(BaseModel):
    items: list[AdminTokenOut]


class AuditOut(BaseModel):
    id: int
    at: str
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    hash: str


class AuditList(BaseModel):
    items: list[AuditOut]


class BundleOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    ca_cert: str = Field(alias="ca-cert.pem")
    cert_chain: str = Field(alias="cert-chain.pem")
    root_cert: str = Field(alias="root-cert.pem")
    crl: str = Field(alias="crl.pem")


class EnrollIn(Strict):
    cluster: str = Field(min_length=1, max_length=63)
    bootstrap_token: str = Field(min_length=1, max_length=256)
    csr: str = Field(min_length=1, max_length=16384)


class EnrollOut(BaseModel):
    agent_token: str
    generation: int
    bundle: BundleOut


class RenewIn(Strict):
    csr: str = Field(min_length=1, max_length=16384)
    proof: str = Field(default="", max_length=4096)


class RenewOut(BaseModel):
    generation: int
    bundle: BundleOut


class Port(Strict):
    number: int = Field(ge=1, le=65535)
    protocol: Protocol = Protocol.HTTP
    name: str | None = Field(default=None, max_length=63)


Identity = Annotated[str, Field(min_length=10, max_length=512)]


class Identities(Strict):
    ingress: Identity
    egress: Identity
    # The identities of further egress gateways this cluster sends through (an agent's
    # `imports[].egress_gateway`), which exporters admit too. Absent from older agents' bodies;
    # an agent leaves it out when it has none, so an older CA service still accepts the body.
    egress_additional: list[Identity] | None = Field(default=None, max_length=32)


ExportMode = Literal["hop-by-hop", "end-to-end"]
# `ns/<namespace>/sa/<service account>` or `ns/<namespace>/sa/*`: Istio's principal minus the trust domain.
ConsumerPrincipal = Annotated[str, Field(min_length=7, max_length=330, pattern=rf"^ns/{_LABEL}/sa/(\*|{_NAME})$")]


class ExportedService(Strict):
    name: str = Field(
        min_length=3, max_length=127, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\.[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    )
    namespace: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL)
    service: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL)
    ports: list[Port] = Field(min_length=1, max_length=32)
    consumers: list[str] = Field(default_factory=list, max_length=1000)
    # Absent (hop-by-hop): the gateways terminate mTLS. end-to-end: callers' sidecars speak mTLS to
    # the destination workloads, whose SPIFFE identities `workload_identities` lists (the CA checks
    # they are in the exporter's trust domain); `consumer_principals` narrows a consumer to some of
    # its workloads (`ns/<ns>/sa/<sa>`, the trust domain being the consumer's).
    mode: ExportMode | None = None
    workload_identities: list[Identity] | None = Field(default=None, min_length=1, max_length=64)
    consumer_principals: dict[str, list[ConsumerPrincipal]] | None = Field(default=None, max_length=1000)

    @field_validator("consumers")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        for c in v:
            if not is_dns_label(c):
                raise ValueError("each consumer must be a cluster name (a DNS label)")
        return sorted(set(v))


class PublishedGateway(Gateway):
    """Where peers reach an exporter's ingress gateway: `port` for HTTP exports, `tcp_port` for TCP
    exports (absent from agents before it existed: importers then assume their own TCP port)."""

    tcp_port: int | None = Field(default=None, ge=1, le=65535)


class ExportsIn(Strict):
    gateway: PublishedGateway
    identities: Identities
    services: list[ExportedService] = Field(default_factory=list, max_length=2000)
    # PEM CRLs signed by this cluster's intermediates (its current one's, then superseded ones' final
    # CRLs): peers it meets end to end add them to their `ca-crl.pem`, since their sidecars check this
    # cluster's workload chains with CRL_CHECK_ALL. Sent only by clusters with end-to-end exports or
    # imports, so older CA services still accept every other body.
    crl: str | None = Field(default=None, min_length=1, max_length=262144)


class ImportOut(BaseModel):
    # Entries of end-to-end exports also carry `mode: end-to-end` and `workload_identities` (the
    # destination workloads' SPIFFE IDs the importer's sidecars pin). They are kept as extra fields,
    # present only then, so every other entry (and the revision of desired state) stays as it was.
    model_config = ConfigDict(extra="allow")

    name: str
    cluster: str
    ports: list[dict[str, Any]]
    gateway: dict[str, Any] | None
    identity: str | None


class ImportList(BaseModel):
    items: list[ImportOut]


class PeerOut(BaseModel):
    # A peer that published `crl` (end-to-end mode) carries it as an extra field `crl`, present only
    # then, so other entries (and the revision of desired state) stay as they were.
    model_config = ConfigDict(extra="allow")

    name: str
    trust_domain: str
    identities: dict[str, Any]


class DesiredOut(BaseModel):
    revision: str
    generation: int
    rotate_required: bool
    trust_bundle: str
    crl: str
    imports: list[ImportOut]
    peers: list[PeerOut]
    status: str
    # each newer root cross-signed by the root active when it was added: how an agent proves a new
    # root from one it already trusts (absent from older CA services)
    root_endorsements: list[str] = []


class ServedCRL(Strict):
    """One CRL in the `istio-ca-crl` ConfigMap istiod publishes to sidecars."""

    issuer: str = Field(max_length=1024)  # RFC 4514
    authority_key_id: str | None = Field(default=None, max_length=128, pattern=r"^[0-9a-f]*$")
    number: int | None = Field(default=None, ge=0)
    this_update: str = Field(max_length=64)
    next_update: str | None = Field(default=None, max_length=64)


class ServedIn(Strict):
    """What the cluster's istiod serves, as the agent observed it from istiod's own outputs: the trust
    bundle it publishes (`istio-ca-root-cert` in istio-system), the intermediate it signs with (the
    issuer of its serving certificate) and the CRLs it publishes (`istio-ca-crl`), each with the time
    the agent first saw it as it is now (RFC 3339)."""

    observed_at: str = Field(max_length=64)
    # SHA-256 of each root's DER, lowercase hex, as istiod publishes them
    bundle: list[str] = Field(default_factory=list, max_length=16)
    bundle_since: str | None = Field(default=None, max_length=64)
    # serial (hex) of the intermediate istiod signs with; None when it could not be told
    signing_serial: str | None = Field(default=None, max_length=64)
    signing_since: str | None = Field(default=None, max_length=64)
    crls: list[ServedCRL] = Field(default_factory=list, max_length=64)
    crls_since: str | None = Field(default=None, max_length=64)
    # why something could not be observed (istiod unreachable, ConfigMap missing, ...)
    problems: list[str] = Field(default_factory=list, max_length=20)

    @field_validator("bundle")
    @classmethod
    def _fingerprints(cls, v: list[str]) -> list[str]:
        for fp in v:
            if len(fp) != 64 or any(ch not in "0123456789abcdef" for ch in fp):
                raise ValueError("each bundle entry must be a SHA-256 fingerprint in lowercase hex")
        return v


class StatusIn(Strict):
    installed_generation: int | None = Field(default=None, ge=0, le=2**53)
    installed_serial: str | None = Field(default=None, max_length=64)
    last_reconcile_at: str | None = Field(default=None, max_length=64)
    imports_applied: int | None = Field(default=None, ge=0, le=2**53)
    errors: list[str] = Field(default_factory=list, max_length=100)
    cacerts_not_after: str | None = Field(default=None, max_length=64)
    ca_reachable: bool | None = None
    # what istiod serves (absent from agents that cannot observe it, e.g. render mode)
    served: ServedIn | None = None


class Problem(BaseModel):
    """RFC 9457 problem details: every error, 401 and 403 included."""

    type: str
    title: str
    status: int
    detail: str
