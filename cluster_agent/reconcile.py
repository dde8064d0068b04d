"""One reconcile pass: enroll if needed → publish exports → desired state → renew if due →
render → check → apply (or write), reporting what was created, updated, unchanged and pruned.

Nothing here touches httpx or lightkube directly: the CA client and the applier are passed in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from cluster_agent import pki
from cluster_agent.ca_client import CAAuthFailed, CAClient, CARejected
from cluster_agent.config import AgentConfig
from cluster_agent.render import BundleError, render_all
from cluster_agent.render import cacerts as rc
from cluster_agent.state import StateStore

log = logging.getLogger("meshbridge.agent")

MANAGED_BY = {"app.kubernetes.io/managed-by": "meshbridge"}


@dataclass
class ApplyReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)

    @property
    def writes(self) -> int:
        return len(self.created) + len(self.updated) + len(self.pruned)

    def summary(self) -> str:
        return (f"{len(self.created)} created, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
                f"{len(self.pruned)} pruned")


class Applier(Protocol):
    """Where rendered objects go: a live cluster (kube.KubeApplier) or a directory (render mode)."""

    def apply(self, objects: list[dict[str, Any]], *, corefile_block: str | None) -> ApplyReport: ...

    def current_corefile(self) -> str | None: ...

    def service_exports(self) -> list[dict[str, Any]]: ...


class BundleRejected(Exception):
    """The bundle would fail istiod's own checks: nothing was written."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class ReconcileResult:
    report: ApplyReport
    desired_revision: str
    imports_applied: int
    renewed: bool
    warnings: list[str]


class Reconciler:
    def __init__(self, config: AgentConfig, *, client: CAClient, applier: Applier, state_store: StateStore,
                 clock: Any = utcnow) -> None:
        self.config = config
        self.client = client
        self.applier = applier
        self.state_store = state_store
        self.clock = clock
        self.state = state_store.load()
        if self.state.agent_token:
            self.client.set_token(self.state.agent_token)
        if self.state.trust_bundle:
            self.client.set_trust_bundle(self.state.trust_bundle)
        self.desired: dict[str, Any] | None = None
        self.published: dict[str, Any] | None = None
        self.errors: list[str] = []
        self.last_reconcile: datetime | None = None

    # ------------------------------------------------------------------ enrollment and renewal
    def ensure_enrolled(self) -> bool:
        if self.state.agent_token and self.state.key_pem:
            return False
        token_file = self.config.ca.bootstrap_token_file
        if token_file is None or not Path(token_file).exists():
            raise CAAuthFailed(f"not enrolled and no bootstrap token file at {token_file}: ask the operator for "
                               f"`meshbridge-ca cluster token {self.config.cluster}`", status=401)
        bootstrap = Path(token_file).read_text().strip()
        key = pki.new_key(self.config.ca.key_type)
        csr = pki.make_csr(key, self.config.cluster)
        answer = self.client.enroll(bootstrap_token=bootstrap, csr_pem=csr)
        self.state.agent_token = answer["agent_token"]
        self.client.set_token(self.state.agent_token)
        self._install_issued(key, answer)
        log.info("enrolled", extra={"cluster": self.config.cluster, "generation": answer["generation"]})
        return True

    def _install_issued(self, key: pki.PrivateKey, answer: dict[str, Any]) -> None:
        bundle = answer["bundle"]
        rc.check_cacerts_bundle(
            ca_cert_pem=bundle["ca-cert.pem"], ca_key_pem=pki.key_pem(key), cert_chain_pem=bundle["cert-chain.pem"],
            root_cert_pem=bundle["root-cert.pem"])
        self.state.key_pem = pki.key_pem(key)
        self.state.bundle = dict(bundle)
        self.state.generation = int(answer["generation"])
        cert = x509.load_pem_x509_certificate(bundle["ca-cert.pem"].encode())
        self.state.serial = format(cert.serial_number, "x")
        self.state.own_crl_pem = ""  # a new intermediate signs a new CRL of its own
        self.state.trust_bundle = bundle["root-cert.pem"]
        self.client.set_trust_bundle(self.state.trust_bundle)
        self.state_store.save(self.state)

    def renewal_due(self, desired: dict[str, Any] | None) -> str | None:
        if not self.state.bundle:
            return "no intermediate yet"
        if desired is not None:
            if desired.get("rotate_required") and int(desired.get("generation", 0)) >= self.state.generation:
                return f"rotation to generation {desired['generation']} requested"
            if int(desired.get("generation", 0)) > self.state.generation:
                return f"generation {desired['generation']} is newer than installed {self.state.generation}"
        cert = x509.load_pem_x509_certificate(self.state.bundle["ca-cert.pem"].encode())
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        if self.clock() >= cert.not_valid_before_utc + life * self.config.ca.renew_fraction:
            return "two thirds of the lifetime have passed"
        return None

    def renew(self, reason: str) -> None:
        assert self.state.key_pem is not None
        current = pki.load_key(self.state.key_pem)
        key = pki.new_key(self.config.ca.key_type)
        csr = pki.make_csr(key, self.config.cluster)
        answer = self.client.renew(csr_pem=csr, proof=pki.prove(current, csr))
        self._install_issued(key, answer)
        log.info("renewed intermediate (%s)", reason, extra={"cluster": self.config.cluster,
                                                             "serial": self.state.serial})

    # ------------------------------------------------------------------ exchange
    def exports_body(self) -> dict[str, Any]:
        cfg = self.config
        td, ns = cfg.istio.trust_domain, cfg.istio.namespace
        services = []
        for e in cfg.exports:
            services.append({"name": e.export_name, "namespace": e.namespace, "service": e.service,
                             "ports": [{"number": p.number, "protocol": p.protocol.value} for p in e.ports],
                             "consumers": sorted(e.consumers)})
        for extra in self.applier.service_exports():
            if extra["name"] not in {s["name"] for s in services}:
                services.append(extra)
        gw = cfg.istio.ingress_gateway
        if not gw.address:
            raise CARejected("istio.ingress_gateway.address is not set: peers need the address of this cluster's "
                             "ingress gateway to reach its exports", status=400)
        return {
            "gateway": {"address": gw.address, "port": gw.port or cfg.istio.cross_cluster_port},
            "identities": {"ingress": f"spiffe://{td}/ns/{ns}/sa/{cfg.istio.ingress_gateway.service_account}",
                           "egress": f"spiffe://{td}/ns/{ns}/sa/{cfg.istio.egress_gateway.service_account}"},
            "services": sorted(services, key=lambda s: s["name"]),
        }

    def _exports(self) -> dict[str, Any]:
        """What this pass published (publish() reads ServiceExports from the API server once per pass)."""
        return self.published if self.published is not None else self.exports_body()

    def publish(self) -> bool:
        body = self.exports_body()
        if body == self.published:
            return False
        self.client.put_exports(body)
        self.published = body
        return True

    # ------------------------------------------------------------------ the pass
    def own_crl(self) -> str:
        assert self.state.key_pem is not None
        now = self.clock()
        signed = datetime.fromisoformat(self.state.own_crl_signed_at) if self.state.own_crl_signed_at else None
        validity = self.config.ca.crl_validity
        if not self.state.own_crl_pem or signed is None or now - signed >= validity / 2:
            self.state.own_crl_pem = rc.sign_intermediate_crl(
                self.state.bundle["ca-cert.pem"], self.state.key_pem, now=now, validity=validity)
            self.state.own_crl_signed_at = now.isoformat()
            self.state_store.save(self.state)
        return self.state.own_crl_pem

    def reconcile(self, desired: dict[str, Any]) -> ReconcileResult:
        self.desired = desired
        if desired.get("trust_bundle"):
            self.client.set_trust_bundle(desired["trust_bundle"])
            if self.state.trust_bundle != desired["trust_bundle"]:
                self.state.trust_bundle = desired["trust_bundle"]
                self.state_store.save(self.state)
        renewed = False
        reason = self.renewal_due(desired)
        if reason:
            self.renew(reason)
            renewed = True
        assert self.state.key_pem is not None
        bundle = {**self.state.bundle,
                  "root-cert.pem": desired.get("trust_bundle") or self.state.bundle["root-cert.pem"],
                  "crl.pem": desired.get("crl") or self.state.bundle.get("crl.pem", "")}
        try:
            result = render_all(
                self.config, imports=desired.get("imports", []), peers=desired.get("peers", []),
                vips=self.state.vips, exports=self._exports()["services"], bundle=bundle,
                intermediate_key_pem=self.state.key_pem, crl_pem=self.own_crl(),
                corefile=self.applier.current_corefile(), now=self.clock())
        except BundleError as exc:
            raise BundleRejected(f"cacerts would fail istiod's checks, nothing written: {exc}") from exc
        if result.vips != self.state.vips:
            self.state.vips = dict(result.vips)
            self.state_store.save(self.state)
        report = self.applier.apply(result.objects, corefile_block=result.server_block)
        self.last_reconcile = self.clock()
        for w in result.warnings:
            log.warning(w, extra={"cluster": self.config.cluster})
        log.info("reconciled: %s", report.summary(), extra={"cluster": self.config.cluster})
        return ReconcileResult(report, str(desired.get("revision", "")), len(result.vips), renewed,
                               list(result.warnings))

    def status_body(self) -> dict[str, Any]:
        not_after = ""
        if self.state.bundle:
            cert = x509.load_pem_x509_certificate(self.state.bundle["ca-cert.pem"].encode())
            not_after = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "installed_generation": self.state.generation,
            "installed_serial": self.state.serial,
            "last_reconcile_at": self.last_reconcile.strftime("%Y-%m-%dT%H:%M:%SZ") if self.last_reconcile else None,
            "imports_applied": len(self.state.vips),
            "errors": self.errors[-10:],
            "cacerts_not_after": not_after or None,
        }
