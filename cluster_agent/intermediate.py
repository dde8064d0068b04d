"""This cluster's intermediate CA as the agent holds it: enrollment, renewal when due, and the CRLs
of this cluster's intermediates for istiod's ``ca-crl.pem``. The key is generated here and never
leaves the agent's state; every bundle the CA service issues is checked as istiod would before it
is kept.

A renewal supersedes the installed intermediate, but istiod signed workload certificates with it
until it loaded the new one (istio_ca.go handleEvent, on the file watch of /etc/cacerts), and those
live up to the workload certificate TTL (istio-agent asks for SECRET_TTL, 24 h; istiod caps at
MAX_WORKLOAD_CERT_TTL, 90 d: pilot-agent options.go, security/pkg/cmd/constants.go). Envoy checks
each with CRL_CHECK_ALL, so each needs a current CRL of the superseded intermediate. Before its key
is dropped the superseded intermediate signs one final CRL whose nextUpdate is the end of its
keep period, `ca.workload_cert_ttl` + SUPERSEDED_GRACE after the renewal; it stays in ca-crl.pem
(and in the agent's state) until then, and is dropped after."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from pydantic import ValidationError

from cluster_agent import pki
from cluster_agent.ca_client import CAClient
from cluster_agent.config import AgentConfig
from cluster_agent.errors import NotEnrolled, TrustRefused
from cluster_agent.render import cacerts as rc
from cluster_agent.state import AgentState, StateStore
from cluster_agent.trust import TrustedRoots
from meshbridge_wire.models import BundleOut, DesiredOut, EnrollIn, RenewIn

log = logging.getLogger("meshbridge.agent")

__all__ = ["SUPERSEDED_GRACE", "Intermediate"]

# Between a renewal and the last workload certificate istiod signs with the superseded key: the
# same pass applies cacerts, the kubelet refreshes the mounted Secret (about a minute), istiod
# reloads after a 100 ms debounce (istio_ca.go handleCACertsFileWatch). An hour covers that and
# clock skew between nodes.
SUPERSEDED_GRACE = timedelta(hours=1)


class Intermediate:
    def __init__(
        self,
        config: AgentConfig,
        *,
        client: CAClient,
        state: AgentState,
        state_store: StateStore,
        clock: Callable[[], datetime],
        trust: TrustedRoots,
    ) -> None:
        self.config = config
        self.client = client
        self.state = state
        self.state_store = state_store
        self.clock = clock
        self.trust = trust

    def certificate(self) -> x509.Certificate | None:
        """The installed intermediate's certificate (None before enrollment)."""
        if not self.state.bundle:
            return None
        return x509.load_pem_x509_certificate(self.state.bundle["ca-cert.pem"].encode())

    def not_after(self) -> datetime | None:
        cert = self.certificate()
        return cert.not_valid_after_utc if cert is not None else None

    # ------------------------------------------------------------------ enrollment
    def ensure_enrolled(self) -> bool:
        """Enroll with the bootstrap token unless the agent holds an agent token and a key."""
        if self.state.agent_token and self.state.key_pem:
            return False
        bootstrap_token = self._bootstrap_token()
        key = pki.new_key(self.config.ca.key_type)
        try:
            request = EnrollIn(
                cluster=self.config.cluster, bootstrap_token=bootstrap_token, csr=pki.make_csr(key, self.config.cluster)
            )
        except ValidationError:
            raise NotEnrolled(
                f"not enrolled, and {self.config.ca.bootstrap_token_file} does not hold a bootstrap "
                f"token (1 to 256 characters): {self._ask_for_token()}"
            ) from None
        answer = self.client.enroll(request)
        self.state.agent_token = answer.agent_token
        self.client.set_token(self.state.agent_token)
        self._learn_roots_for(answer.bundle)
        self._install(key, answer.generation, answer.bundle)
        log.info("enrolled", extra={"cluster": self.config.cluster, "generation": answer.generation})
        return True

    def _ask_for_token(self) -> str:
        return f"ask the operator for `meshbridge-ca cluster token {self.config.cluster}`"

    def _bootstrap_token(self) -> str:
        token_file = self.config.ca.bootstrap_token_file
        if token_file is None or not Path(token_file).exists():
            raise NotEnrolled(f"not enrolled and no bootstrap token file at {token_file}: {self._ask_for_token()}")
        return Path(token_file).read_text().strip()

    def _learn_roots_for(self, bundle: BundleOut) -> None:
        """Enrolled during a root rotation, the chain may end at a root newer than the configured
        anchor: learn it from desired state's endorsements (now that the agent token authenticates),
        so a bootstrap token is not spent for nothing. The chain is still checked by ``_install``."""
        roots = bundle.root_cert
        try:
            self.trust.require_roots_trusted(roots, "the enrollment answer's root-cert.pem")
        except TrustRefused:
            desired = self.client.desired()
            if desired.trust_bundle:
                self.trust.follow(
                    desired.trust_bundle,
                    desired.root_endorsements,
                    installed_chain_pem=bundle.cert_chain,
                    now=self.clock(),
                )
                self.client.set_trust_bundle(self.trust.pem)

    def _install(self, key: pki.PrivateKey, generation: int, bundle: BundleOut) -> None:
        """Check an issued bundle — as istiod would, its chain ending at a root this agent trusts and
        every root it names trusted — then keep it. TrustRefused/BundleRejected: nothing kept."""
        now = self.clock()
        self.trust.require_chain(bundle.cert_chain, "the issued cert-chain.pem", now=now)
        self.trust.require_roots_trusted(bundle.root_cert, "the issued root-cert.pem")
        rc.check_cacerts_bundle(
            ca_cert_pem=bundle.ca_cert,
            ca_key_pem=pki.key_pem(key),
            cert_chain_pem=bundle.cert_chain,
            root_cert_pem=self.trust.pem,
        )
        self._supersede(now)
        self.state.key_pem = pki.key_pem(key)
        self.state.bundle = bundle.model_dump(by_alias=True)
        self.state.generation = generation
        self.state.serial = format(x509.load_pem_x509_certificate(bundle.ca_cert.encode()).serial_number, "x")
        self.state.own_crl_pem = ""  # a new intermediate signs a new CRL of its own
        self.state.root_crls_pem = bundle.crl
        self.state.trust_bundle = bundle.root_cert
        self.client.set_trust_bundle(self.trust.pem)
        self.state_store.save(self.state)

    # ------------------------------------------------------------------ renewal
    def renewal_due(self, desired: DesiredOut) -> str | None:
        """Why the intermediate should be renewed now (None: it need not be)."""
        cert = self.certificate()
        if cert is None:
            return "no intermediate yet"
        if desired.rotate_required and desired.generation >= self.state.generation:
            return f"rotation to generation {desired.generation} requested"
        if desired.generation > self.state.generation:
            return f"generation {desired.generation} is newer than installed {self.state.generation}"
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        if self.clock() >= cert.not_valid_before_utc + life * self.config.ca.renew_fraction:
            return "two thirds of the lifetime have passed"
        return None

    def renew(self, reason: str) -> None:
        """A new key, its CSR signed with the current key as proof, the new bundle installed."""
        assert self.state.key_pem is not None
        current = pki.load_key(self.state.key_pem)
        key = pki.new_key(self.config.ca.key_type)
        csr = pki.make_csr(key, self.config.cluster)
        answer = self.client.renew(RenewIn(csr=csr, proof=pki.prove(current, csr)))
        self._install(key, answer.generation, answer.bundle)
        log.info(
            "renewed intermediate (%s)", reason, extra={"cluster": self.config.cluster, "serial": self.state.serial}
        )

    # ------------------------------------------------------------------ the CRLs of its intermediates
    def own_crl(self) -> str:
        """The CRL this intermediate signs, re-signed once half its validity has passed."""
        assert self.state.key_pem is not None
        now = self.clock()
        if self._own_crl_due(now):
            self.state.own_crl_pem = rc.sign_intermediate_crl(
                self.state.bundle["ca-cert.pem"], self.state.key_pem, now=now, validity=self.config.ca.crl_validity
            )
            self.state.own_crl_signed_at = now.isoformat()
            self.state_store.save(self.state)
        return self.state.own_crl_pem

    def crl_set(self) -> str:
        """This cluster's part of ca-crl.pem: its own CRL, then the final CRL of each superseded
        intermediate still kept (those past their keep period dropped)."""
        own = self.own_crl()
        now = self.clock()
        kept = [e for e in self.state.superseded_crls if datetime.fromisoformat(e["keep_until"]) > now]
        if kept != self.state.superseded_crls:
            self.state.superseded_crls = kept
            self.state_store.save(self.state)
        return own + "".join(e["crl_pem"] for e in kept)

    def crl_set_due(self) -> bool:
        """Whether `crl_set` would change now: the own CRL is due for re-signing or a kept final
        CRL has reached the end of its keep period."""
        now = self.clock()
        expired = any(datetime.fromisoformat(e["keep_until"]) <= now for e in self.state.superseded_crls)
        return self._own_crl_due(now) or expired

    def _own_crl_due(self, now: datetime) -> bool:
        signed = datetime.fromisoformat(self.state.own_crl_signed_at) if self.state.own_crl_signed_at else None
        return not self.state.own_crl_pem or signed is None or now - signed >= self.config.ca.crl_validity / 2

    def _supersede(self, now: datetime) -> None:
        """The installed intermediate (if any) signs its final CRL, kept until no workload certificate
        under it can be alive; called before its key is replaced."""
        if not self.state.key_pem or not self.state.bundle:
            return
        keep_until = now + self.config.ca.workload_cert_ttl + SUPERSEDED_GRACE
        final = rc.sign_final_crl(self.state.bundle["ca-cert.pem"], self.state.key_pem, now=now, keep_until=keep_until)
        entry = {"serial": self.state.serial, "crl_pem": final, "keep_until": keep_until.isoformat()}
        kept = [e for e in self.state.superseded_crls if datetime.fromisoformat(e["keep_until"]) > now]
        self.state.superseded_crls = [*kept, entry]
