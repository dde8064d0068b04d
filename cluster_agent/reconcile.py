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
from typing import Any

from pydantic import ValidationError

from cluster_agent.apply import Applier, ApplyReport
from cluster_agent.ca_client import CAClient, CAClientError
from cluster_agent.config import AgentConfig
from cluster_agent.errors import BundleRejected, ExportsInvalid, validation_problems
from cluster_agent.intermediate import Intermediate
from cluster_agent.render import BundleError, RenderResult, render_all
from cluster_agent.state import StateStore
from cluster_agent.trust import TrustedRoots
from meshbridge_wire.models import DesiredOut, ExportsIn, StatusIn

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
    cacerts_not_after: datetime | None  # of the intermediate installed


@dataclass(frozen=True)
class PassResult:
    revision: str  # of the desired state this pass saw
    reconciled: ReconcileResult | None  # None: nothing could have changed, nothing was rendered


class Reconciler:
    def __init__(
        self,
        config: AgentConfig,
        *,
        client: CAClient,
        applier: Applier,
        state_store: StateStore,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.client = client
        self.applier = applier
        self.state_store = state_store
        self.clock = clock
        self.state = state_store.load()
        if self.state.agent_token:
            self.client.set_token(self.state.agent_token)
        # the client was built with the configured anchor: it seeds the trusted set, which from now on
        # is the client's only TLS trust (never an answer's bundle)
        self.trust = TrustedRoots(self.state, configured_pem=client.trust_pem)
        self.client.set_trust_bundle(self.trust.pem)
        self.intermediate = Intermediate(
            config, client=client, state=self.state, state_store=state_store, clock=clock, trust=self.trust
        )
        self._published: ExportsIn | None = None
        self.last_reconcile: datetime | None = None
        self._errors: list[str] = []
        self._status_sent: StatusIn | None = None

    # ------------------------------------------------------------------ the pass
    def run_pass(self, *, revision: str | None, wait: float, resync: Callable[[], bool]) -> PassResult:
        """One pass. ``revision``: the desired revision seen last (the CA holds the answer up to
        ``wait`` seconds until it changes); ``resync``, asked once the answer is in: whether a full
        render is due anyway."""
        self.intermediate.ensure_enrolled()
        self.publish()
        desired = self.client.desired(revision=revision, wait=wait)
        renewal = self.intermediate.renewal_due(desired)
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

    # ------------------------------------------------------------------ exchange
    def exports_body(self) -> ExportsIn:
        """This cluster's exports as published: the configured ones, then MCS ServiceExports."""
        cfg = self.config
        services: dict[str, dict[str, Any]] = {}
        for e in cfg.exports:
            services[e.export_name] = {
                "name": e.export_name,
                "namespace": e.namespace,
                "service": e.service,
                "ports": [{"number": p.number, "protocol": p.protocol} for p in e.ports],
                "consumers": sorted(e.consumers),
            }
        for extra in self.applier.service_exports():
            services.setdefault(extra["name"], extra)
        td, ns = cfg.istio.trust_domain, cfg.istio.namespace
        gateway = cfg.istio.published_gateway()
        if not any(str(p["protocol"]).upper() == "TCP" for s in services.values() for p in s["ports"]):
            # Only TCP exports need it: without it, this agent still publishes to a CA service that
            # predates the field (which refuses unknown fields).
            del gateway["tcp_port"]
        body = {
            "gateway": gateway,
            "identities": {
                "ingress": f"spiffe://{td}/ns/{ns}/sa/{cfg.istio.ingress_gateway.service_account}",
                "egress": f"spiffe://{td}/ns/{ns}/sa/{cfg.istio.egress_gateway.service_account}",
            },
            "services": [services[name] for name in sorted(services)],
        }
        try:
            return ExportsIn.model_validate(body)
        except ValidationError as exc:
            raise ExportsInvalid(
                f"exports not published, they do not fit the CA service's model: {validation_problems(exc)}"
            ) from None

    def publish(self) -> bool:
        """Publish the exports when they changed since the last publication (ServiceExports are
        read from the API server once per pass)."""
        body = self.exports_body()
        if body == self._published:
            return False
        self.client.put_exports(body)
        self._published = body
        return True

    def status_body(self) -> StatusIn:
        not_after = self.intermediate.not_after()
        return StatusIn(
            installed_generation=self.state.generation,
            installed_serial=self.state.serial,
            last_reconcile_at=_rfc3339(self.last_reconcile) if self.last_reconcile else None,
            imports_applied=len(self.state.vips),
            errors=self._errors[-10:],
            cacerts_not_after=_rfc3339(not_after) if not_after is not None else None,
        )

    def report_status(self) -> None:
        """PUT the status, when it differs from the one sent last."""
        status = self.status_body()
        if status != self._status_sent:
            self.client.put_status(status)
            self._status_sent = status

    # ------------------------------------------------------------------ render and apply
    def reconcile(self, desired: DesiredOut) -> ReconcileResult:
        """Render and apply ``desired`` (renewing first when due), outside a pass."""
        return self._reconcile(desired, self.intermediate.renewal_due(desired))

    def _render(self, desired: DesiredOut) -> RenderResult:
        """Everything this cluster should hold (pure renderers; the renderers parse the imports and
        peers, so they get them as the API's JSON shapes)."""
        assert self.state.key_pem is not None
        bundle = {
            **self.state.bundle,
            "root-cert.pem": desired.trust_bundle or self.state.bundle["root-cert.pem"],
            "crl.pem": desired.crl or self.state.bundle.get("crl.pem", ""),
        }
        published = self._published if self._published is not None else self.exports_body()
        try:
            return render_all(
                self.config,
                imports=[i.model_dump() for i in desired.imports],
                peers=[p.model_dump() for p in desired.peers],
                vips=self.state.vips,
                exports=[s.model_dump(mode="json") for s in published.services],
                bundle=bundle,
                intermediate_key_pem=self.state.key_pem,
                crl_pem=self.intermediate.own_crl(),
                corefile=self.applier.current_corefile(),
                now=self.clock(),
            )
        except BundleError as exc:
            raise BundleRejected(f"cacerts would fail istiod's checks, nothing written: {exc}") from exc

    def _follow_trust_bundle(self, desired: DesiredOut) -> None:
        """Take the CA's trust bundle only as far as trusted roots prove it (``TrustedRoots.follow``):
        TrustRefused, with trust, cacerts and state unchanged, otherwise."""
        if not desired.trust_bundle:
            return
        changed = self.trust.follow(
            desired.trust_bundle,
            desired.root_endorsements,
            installed_chain_pem=self.state.bundle.get("cert-chain.pem", ""),
            now=self.clock(),
        )
        self.client.set_trust_bundle(self.trust.pem)
        if changed or self.state.trust_bundle != desired.trust_bundle:
            self.state.trust_bundle = desired.trust_bundle
            self.state_store.save(self.state)

    def _reconcile(self, desired: DesiredOut, renewal: str | None) -> ReconcileResult:
        self._follow_trust_bundle(desired)
        if renewal is not None:
            self.intermediate.renew(renewal)
        result = self._render(desired)
        if result.vips != self.state.vips:
            self.state.vips = dict(result.vips)
            self.state_store.save(self.state)
        report = self.applier.apply(result.objects, corefile_block=result.server_block)
        self.last_reconcile = self.clock()
        for w in result.warnings:
            log.warning(w, extra={"cluster": self.config.cluster})
        log.info("reconciled: %s", report.summary(), extra={"cluster": self.config.cluster})
        return ReconcileResult(
            report,
            desired.revision,
            len(result.vips),
            renewal is not None,
            list(result.warnings),
            self.intermediate.not_after(),
        )
