"""The agent's pass, in one place (`Reconciler.run_pass`), each step once:

    enroll if needed → publish exports → desired state → renew if due → render → apply → status

Render and apply run only when something may have changed (a new desired revision, a resync the
loop asks for, a renewal due). Nothing here touches httpx or lightkube: the CA client and the
applier are passed in, and their failures arrive as `ca_client.CAClientError` and
`errors.KubeError`. Scheduling, backoff, leadership and metrics are the loop's (`loop.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from pydantic import ValidationError

from cluster_agent import pki
from cluster_agent.apply import Applier, ApplyReport
from cluster_agent.ca_client import CAClient, CAClientError
from cluster_agent.config import AgentConfig
from cluster_agent.errors import BundleRejected, ExportsInvalid, NotEnrolled
from cluster_agent.render import BundleError, render_all
from cluster_agent.render import cacerts as rc
from cluster_agent.state import StateStore
from meshbridge_wire.models import BundleOut, DesiredOut, EnrollIn, ExportsIn, RenewIn, StatusIn

log = logging.getLogger("meshbridge.agent")

__all__ = ["PassResult", "ReconcileResult", "Reconciler"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ReconcileResult:
    report: ApplyReport
    desired_revision: str
    imports_applied: int
    renewed: bool
    warnings: list[str]
    cacerts_not_after: datetime | None = None  # of the intermediate installed


@dataclass(frozen=True)
class PassResult:
    revision: str  # of the desired state this pass saw
    reconciled: ReconcileResult | None  # None: nothing could have changed, nothing was rendered


class Reconciler:
    def __init__(self, config: AgentConfig, *, client: CAClient, applier: Applier, state_store: StateStore,
                 clock: Callable[[], datetime] = utcnow) -> None:
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
        self.published: ExportsIn | None = None
        self.last_reconcile: datetime | None = None
        self._errors: list[str] = []
        self._status_sent: StatusIn | None = None

    # ------------------------------------------------------------------ the pass
    def run_pass(self, *, revision: str | None, wait: float, resync: Callable[[], bool]) -> PassResult:
        """One pass. ``revision``: the desired revision seen last (the CA holds the answer up to
        ``wait`` seconds until it changes); ``resync``, asked once the answer is in: whether a full
        render is due anyway."""
        self.ensure_enrolled()
        self.publish()
        desired = self.client.desired(revision=revision, wait=wait)
        renewal = self.renewal_due(desired)
        result = None
        if desired.revision != revision or resync() or renewal is not None:
            result = self._reconcile(desired, renewal)
        self._errors.clear()
        self.report_status()
        return PassResult(desired.revision, result)

    def failed(self, message: str, *, tell_ca: bool = True) -> None:
        """A pass failed: keep ``message`` for the status report, and send that report when the CA
        service may be reachable (best effort)."""
        self._errors.append(message)
        if tell_ca:
            try:
                self.report_status()
            except CAClientError:
                pass

    # ------------------------------------------------------------------ enrollment and renewal
    def ensure_enrolled(self) -> bool:
        if self.state.agent_token and self.state.key_pem:
            return False
        bootstrap_token = self._bootstrap_token()
        key = pki.new_key(self.config.ca.key_type)
        try:
            request = EnrollIn(cluster=self.config.cluster, bootstrap_token=bootstrap_token,
                               csr=pki.make_csr(key, self.config.cluster))
        except ValidationError:
            raise NotEnrolled(f"not enrolled, and {self.config.ca.bootstrap_token_file} does not hold a bootstrap "
                              f"token (1 to 256 characters): {self._ask_for_token}") from None
        answer = self.client.enroll(request)
        self.state.agent_token = answer.agent_token
        self.client.set_token(self.state.agent_token)
        self._install_issued(key, answer.generation, answer.bundle)
        log.info("enrolled", extra={"cluster": self.config.cluster, "generation": answer.generation})
        return True

    @property
    def _ask_for_token(self) -> str:
        return f"ask the operator for `meshbridge-ca cluster token {self.config.cluster}`"

    def _bootstrap_token(self) -> str:
        token_file = self.config.ca.bootstrap_token_file
        if token_file is None or not Path(token_file).exists():
            raise NotEnrolled(f"not enrolled and no bootstrap token file at {token_file}: {self._ask_for_token}")
        return Path(token_file).read_text().strip()

    def _install_issued(self, key: pki.PrivateKey, generation: int, bundle: BundleOut) -> None:
        rc.check_cacerts_bundle(ca_cert_pem=bundle.ca_cert, ca_key_pem=pki.key_pem(key),
                                cert_chain_pem=bundle.cert_chain, root_cert_pem=bundle.root_cert)
        self.state.key_pem = pki.key_pem(key)
        self.state.bundle = bundle.model_dump(by_alias=True)
        self.state.generation = generation
        self.state.serial = format(x509.load_pem_x509_certificate(bundle.ca_cert.encode()).serial_number, "x")
        self.state.own_crl_pem = ""  # a new intermediate signs a new CRL of its own
        self.state.trust_bundle = bundle.root_cert
        self.client.set_trust_bundle(self.state.trust_bundle)
        self.state_store.save(self.state)

    def _installed_cert(self) -> x509.Certificate | None:
        if not self.state.bundle:
            return None
        return x509.load_pem_x509_certificate(self.state.bundle["ca-cert.pem"].encode())

    def renewal_due(self, desired: DesiredOut | None) -> str | None:
        cert = self._installed_cert()
        if cert is None:
            return "no intermediate yet"
        if desired is not None:
            if desired.rotate_required and desired.generation >= self.state.generation:
                return f"rotation to generation {desired.generation} requested"
            if desired.generation > self.state.generation:
                return f"generation {desired.generation} is newer than installed {self.state.generation}"
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        if self.clock() >= cert.not_valid_before_utc + life * self.config.ca.renew_fraction:
            return "two thirds of the lifetime have passed"
        return None

    def renew(self, reason: str) -> None:
        assert self.state.key_pem is not None
        current = pki.load_key(self.state.key_pem)
        key = pki.new_key(self.config.ca.key_type)
        csr = pki.make_csr(key, self.config.cluster)
        answer = self.client.renew(RenewIn(csr=csr, proof=pki.prove(current, csr)))
        self._install_issued(key, answer.generation, answer.bundle)
        log.info("renewed intermediate (%s)", reason, extra={"cluster": self.config.cluster,
                                                             "serial": self.state.serial})

    # ------------------------------------------------------------------ exchange
    def exports_body(self) -> ExportsIn:
        """This cluster's exports as published: the configured ones, then MCS ServiceExports."""
        cfg = self.config
        address, port = cfg.istio.published_gateway()
        services: dict[str, dict[str, Any]] = {}
        for e in cfg.exports:
            services[e.export_name] = {
                "name": e.export_name, "namespace": e.namespace, "service": e.service,
                "ports": [{"number": p.number, "protocol": p.protocol} for p in e.ports],
                "consumers": sorted(e.consumers)}
        for extra in self.applier.service_exports():
            services.setdefault(extra["name"], extra)
        td, ns = cfg.istio.trust_domain, cfg.istio.namespace
        body = {
            "gateway": {"address": address, "port": port},
            "identities": {"ingress": f"spiffe://{td}/ns/{ns}/sa/{cfg.istio.ingress_gateway.service_account}",
                           "egress": f"spiffe://{td}/ns/{ns}/sa/{cfg.istio.egress_gateway.service_account}"},
            "services": [services[name] for name in sorted(services)],
        }
        try:
            return ExportsIn.model_validate(body)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
            raise ExportsInvalid(f"exports not published, they do not fit the CA service's model: {problems}") \
                from None

    def publish(self) -> bool:
        """Publish the exports when they changed since the last publication (ServiceExports are
        read from the API server once per pass)."""
        body = self.exports_body()
        if body == self.published:
            return False
        self.client.put_exports(body)
        self.published = body
        return True

    def status_body(self) -> StatusIn:
        cert = self._installed_cert()
        return StatusIn(
            installed_generation=self.state.generation,
            installed_serial=self.state.serial,
            last_reconcile_at=_rfc3339(self.last_reconcile) if self.last_reconcile else None,
            imports_applied=len(self.state.vips),
            errors=self._errors[-10:],
            cacerts_not_after=_rfc3339(cert.not_valid_after_utc) if cert is not None else None,
        )

    def report_status(self) -> None:
        """PUT the status, when it differs from the one sent last."""
        status = self.status_body()
        if status != self._status_sent:
            self.client.put_status(status)
            self._status_sent = status

    # ------------------------------------------------------------------ render and apply
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

    def reconcile(self, desired: DesiredOut) -> ReconcileResult:
        """Render and apply ``desired`` (renewing first when due), outside a pass."""
        return self._reconcile(desired, self.renewal_due(desired))

    def _follow_trust_bundle(self, desired: DesiredOut) -> None:
        if desired.trust_bundle:
            self.client.set_trust_bundle(desired.trust_bundle)
            if self.state.trust_bundle != desired.trust_bundle:
                self.state.trust_bundle = desired.trust_bundle
                self.state_store.save(self.state)

    def _reconcile(self, desired: DesiredOut, renewal: str | None) -> ReconcileResult:
        self._follow_trust_bundle(desired)
        if renewal is not None:
            self.renew(renewal)
        assert self.state.key_pem is not None
        bundle = {**self.state.bundle,
                  "root-cert.pem": desired.trust_bundle or self.state.bundle["root-cert.pem"],
                  "crl.pem": desired.crl or self.state.bundle.get("crl.pem", "")}
        published = self.published if self.published is not None else self.exports_body()
        try:
            result = render_all(
                self.config, imports=[i.model_dump() for i in desired.imports],
                peers=[p.model_dump() for p in desired.peers], vips=self.state.vips,
                exports=[s.model_dump(mode="json") for s in published.services], bundle=bundle,
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
        cert = self._installed_cert()
        return ReconcileResult(report, desired.revision, len(result.vips), renewal is not None,
                               list(result.warnings), cert.not_valid_after_utc if cert is not None else None)
