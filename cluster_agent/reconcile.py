"""The agent's pass, in one place (`Reconciler.run_pass`), each step once:

    enroll if needed → publish exports → desired state → renew if due → render → apply → status

Render and apply run only when something may have changed (a new desired revision, a resync the
loop asks for, a renewal due). Nothing here touches httpx or lightkube: the CA client and the
applier are passed in, and their failures arrive as `ca_client.CAClientError` and
`errors.KubeError`. Scheduling, backoff, leadership and metrics are the loop's (`loop.py`).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from pydantic import ValidationError

from cluster_agent.apply import Applier, ApplyReport
from cluster_agent.ca_client import CAClient, CAClientError
from cluster_agent.config import AgentConfig
from cluster_agent.errors import BundleRejected, ExportsInvalid, IstioPreconditionFailed, validation_problems
from cluster_agent.intermediate import Intermediate
from cluster_agent.meshcheck import DnsCheck, MeshReport, check_mesh, traffic
from cluster_agent.render import BundleError, CacertsResult, RenderResult, render_all, render_cacerts
from cluster_agent.served import IstiodView, ServedTracker, authority_key_id
from cluster_agent.state import StateStore
from cluster_agent.trust import TrustedRoots
from meshbridge_wire.models import DesiredOut, ExportsIn, ServedIn, StatusIn
from meshbridge_wire.pem import certificate_fingerprints

log = logging.getLogger("meshbridge.agent")

# An unchanged status is sent again after this long, so the CA sees the report is fresh.
STATUS_REFRESH_S = 300.0
# While istiod does not serve what was installed, passes wait at most this long for the CA, so the
# report catches up with istiod within seconds instead of a long-poll later.
CONVERGE_WAIT_S = 2.0

__all__ = ["PassResult", "ReconcileResult", "Reconciler"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _comparable(status: StatusIn | None) -> StatusIn | None:
    """``status`` without the time of istiod's observation, which moves every pass."""
    if status is None or status.served is None:
        return status
    return status.model_copy(update={"served": status.served.model_copy(update={"observed_at": ""})})


@dataclass
class ReconcileResult:
    report: ApplyReport
    desired_revision: str
    imports_applied: int
    renewed: bool
    warnings: list[str]
    cacerts_not_after: datetime | None  # of the intermediate installed
    ca_crl_next_update: datetime | None = None  # the earliest nextUpdate in the ca-crl.pem applied
    istio_problems: list[str] = field(default_factory=list)  # meshcheck's, reported in the status
    imports: dict[str, str] = field(default_factory=dict)  # per imported host: mode and exporters


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
        istiod: IstiodView | None = None,
        dns_check: DnsCheck | None = None,
    ) -> None:
        """``dns_check``: called with istiod's parsed meshConfig on every full reconcile in run
        mode; a string it returns is reported as a problem in the status."""
        self.config = config
        self.istiod = istiod
        self.served_tracker = ServedTracker()
        self.served: ServedIn | None = None
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
        # End-to-end: whether the last desired state had end-to-end imports (then this cluster's
        # CRLs are published too), and the peers' CRLs last added to ca-crl.pem (kept for the
        # offline CRL refresh, which has no desired state)
        self._imports_end_to_end = False
        self._peer_crls = ""
        self.last_reconcile: datetime | None = None
        self._errors: list[str] = []
        self._status_sent: StatusIn | None = None
        self._status_sent_at = 0.0
        self.dns_check = dns_check
        # what the last check of Istio's preconditions found (`meshcheck`), kept in the status
        self.istio_problems: list[str] = []

    # ------------------------------------------------------------------ the pass
    def run_pass(self, *, revision: str | None, wait: float, resync: Callable[[], bool]) -> PassResult:
        """One pass. ``revision``: the desired revision seen last (the CA holds the answer up to
        ``wait`` seconds until it changes); ``resync``, asked once the answer is in: whether a full
        render is due anyway."""
        self.intermediate.ensure_enrolled()
        self.publish()
        if not self.istiod_caught_up():
            wait = min(wait, CONVERGE_WAIT_S)
        desired = self.client.desired(revision=revision, wait=wait)
        renewal = self.intermediate.renewal_due(desired)
        result = None
        if desired.revision != revision or resync() or renewal is not None:
            result = self._reconcile(desired, renewal)
        self._errors.clear()
        self.observe_istiod()
        self.report_status()
        return PassResult(desired.revision, result)

    # ------------------------------------------------------------------ what istiod serves
    def observe_istiod(self) -> ServedIn | None:
        """Read what istiod serves now (None without a view of istiod, e.g. in render mode)."""
        if self.istiod is None:
            return None
        self.served = self.served_tracker.observe(self.istiod.read(), self._known_intermediates(), self.clock())
        return self.served

    def _known_intermediates(self) -> dict[str, x509.Certificate | bytes]:
        """The intermediates this agent installed: the current one's certificate, and the key
        identifier of each superseded one still kept (from its final CRL's authority key id)."""
        known: dict[str, x509.Certificate | bytes] = {}
        for entry in self.state.superseded_crls:
            aki = authority_key_id(x509.load_pem_x509_crl(entry["crl_pem"].encode()))
            if aki is not None:
                known[entry["serial"]] = aki
        current = self.intermediate.certificate()
        if current is not None and self.state.serial:
            known[self.state.serial] = current
        return known

    def istiod_caught_up(self) -> bool:
        """Whether istiod served what is installed when last observed (True without a view)."""
        if self.istiod is None or not self.state.serial:
            return True
        served = self.served
        installed_roots = certificate_fingerprints(self.state.bundle.get("root-cert.pem", ""))
        return served is not None and served.signing_serial == self.state.serial and served.bundle == installed_roots

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
                "consumers": sorted(e.consumer_clusters),
                **e.end_to_end_fields(cfg.istio.trust_domain),
            }
        for extra in self.applier.service_exports():
            services.setdefault(extra["name"], extra)
        gateway = cfg.istio.published_gateway()
        if not any(str(p["protocol"]).upper() == "TCP" or "mode" in s for s in services.values() for p in s["ports"]):
            # Only TCP and end-to-end exports need it: without it, this agent still publishes to a CA service that
            # predates the field (which refuses unknown fields).
            del gateway["tcp_port"]
        body = {
            "gateway": gateway,
            "identities": self.identities(),
            "services": [services[name] for name in sorted(services)],
        }
        if self._imports_end_to_end or any("mode" in s for s in services.values()):
            # end to end, peers' sidecars check this cluster's workload chains with CRL_CHECK_ALL
            crl = self.intermediate.crl_set() if self.state.key_pem else ""
            if crl:
                body["crl"] = crl
        try:
            return ExportsIn.model_validate(body)
        except ValidationError as exc:
            raise ExportsInvalid(
                f"exports not published, they do not fit the CA service's model: {validation_problems(exc)}"
            ) from None

    def identities(self) -> dict[str, Any]:
        """The gateways' identities as published: each gateway's own namespace and service account
        (`IstioConfig.identity`); `egress_additional` lists the further egress gateways of
        `imports[].egress_gateway` (left out when there are none, so an older CA service, whose
        model does not know the key, still accepts the body)."""
        istio = self.config.istio
        egress = istio.identity(istio.egress_gateway)
        additional = sorted({istio.identity(g) for g in self.config.egress_gateways()} - {egress})
        identities: dict[str, Any] = {"ingress": istio.identity(istio.ingress_gateway), "egress": egress}
        if additional:
            identities["egress_additional"] = additional
        return identities

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
            errors=self._errors[-10:] + self.istio_problems[:10],
            cacerts_not_after=_rfc3339(not_after) if not_after is not None else None,
            served=self.served,
        )

    def report_status(self) -> None:
        """PUT the status when it differs from the one sent last (the time of istiod's observation
        aside), or when that was STATUS_REFRESH_S ago."""
        status = self.status_body()
        stale = time.monotonic() - self._status_sent_at > STATUS_REFRESH_S
        if stale or _comparable(status) != _comparable(self._status_sent):
            self.client.put_status(status)
            self._status_sent = status
            self._status_sent_at = time.monotonic()

    # ------------------------------------------------------------------ render and apply
    def reconcile(self, desired: DesiredOut) -> ReconcileResult:
        """Render and apply ``desired`` (renewing first when due), outside a pass."""
        return self._reconcile(desired, self.intermediate.renewal_due(desired))

    def _cacerts_bundle(self, trust_bundle: str) -> dict[str, str]:
        """The installed bundle with this trust bundle and the roots' CRLs as last received."""
        return {
            **self.state.bundle,
            "root-cert.pem": trust_bundle or self.state.bundle["root-cert.pem"],
            "crl.pem": self.state.root_crls_pem or self.state.bundle.get("crl.pem", ""),
        }

    def _keep_root_crls(self, desired: DesiredOut) -> None:
        """Remember desired state's root CRLs, for passes while the CA service is unreachable."""
        if desired.crl and desired.crl != self.state.root_crls_pem:
            self.state.root_crls_pem = desired.crl
            self.state_store.save(self.state)

    def _render(self, desired: DesiredOut) -> RenderResult:
        """Everything this cluster should hold (pure renderers; the renderers parse the imports and
        peers, so they get them as the API's JSON shapes)."""
        assert self.state.key_pem is not None
        self._keep_root_crls(desired)
        bundle = self._cacerts_bundle(desired.trust_bundle)
        published = self._published if self._published is not None else self.exports_body()
        self._imports_end_to_end = any((i.model_extra or {}).get("mode") == "end-to-end" for i in desired.imports)
        try:
            result = render_all(
                self.config,
                imports=[i.model_dump() for i in desired.imports],
                peers=[p.model_dump() for p in desired.peers],
                vips=self.state.vips,
                exports=[s.model_dump(mode="json") for s in published.services],
                bundle=bundle,
                intermediate_key_pem=self.state.key_pem,
                crl_pem=self.intermediate.crl_set(),
                corefile=self.applier.current_corefile(),
                now=self.clock(),
            )
        except BundleError as exc:
            raise BundleRejected(f"cacerts would fail istiod's checks, nothing written: {exc}") from exc
        self._peer_crls = result.peer_crls
        return result

    def refresh_crls_offline(self) -> CacertsResult | None:
        """The CA service is unreachable: when this cluster's CRLs are due (the own CRL at half its
        validity, a superseded intermediate's at the end of its keep period), re-sign them — the
        intermediate's key is here — and replace `cacerts` alone, from the agent's state (the last
        accepted trust bundle and root CRLs; the root CRLs outlive the intermediate). None when
        nothing was due or the agent holds no intermediate yet."""
        if not self.state.key_pem or not self.state.bundle or not self.intermediate.crl_set_due():
            return None
        try:
            result = render_cacerts(
                self.config,
                self._cacerts_bundle(self.state.trust_bundle),
                intermediate_key_pem=self.state.key_pem,
                # the end-to-end peers' CRLs of the last render stay (they are theirs to re-sign)
                crl_pem=self.intermediate.crl_set() + self._peer_crls,
                now=self.clock(),
            )
        except BundleError as exc:
            raise BundleRejected(f"cacerts would fail istiod's checks, nothing written: {exc}") from exc
        report = self.applier.apply_cacerts(result.secret)
        log.info("CA service unreachable; re-signed this cluster's CRLs: %s", report.summary())
        return result

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

    def _check_istio(self, desired: DesiredOut, result: RenderResult) -> MeshReport | None:
        """Istio's preconditions and the gateways, checked against the cluster (run mode only):
        problems go to the status; a blocking one raises IstioPreconditionFailed before anything is
        written."""
        facts = self.applier.mesh_facts()
        if facts is None:
            self.istio_problems = []
            return None
        published = self._published if self._published is not None else self.exports_body()
        report = check_mesh(
            self.config,
            facts,
            needs=traffic(self.config, published.services, desired.imports),
            root_cert_to_install=_cacerts_root(result),
            dns_check=self.dns_check,
        )
        self.istio_problems = report.problems  # a blocking one reaches the status as the pass's error
        for problem in report.problems:
            log.warning(problem, extra={"cluster": self.config.cluster})
        if report.blocking:
            raise IstioPreconditionFailed(report.blocking)
        return report

    def _reconcile(self, desired: DesiredOut, renewal: str | None) -> ReconcileResult:
        self._follow_trust_bundle(desired)
        if renewal is not None:
            self.intermediate.renew(renewal)
        result = self._render(desired)
        self._check_istio(desired, result)
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
            result.ca_crl_next_update,
            list(self.istio_problems),
            dict(result.imports),
        )


def _cacerts_root(result: RenderResult) -> str | None:
    """root-cert.pem of the rendered Secret cacerts (None when none was rendered)."""
    for obj in result.objects:
        if obj["kind"] == "Secret" and obj["metadata"]["name"] == "cacerts":
            return base64.b64decode(obj["data"]["root-cert.pem"]).decode()
    return None
