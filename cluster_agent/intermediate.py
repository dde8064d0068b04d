"""This cluster's intermediate CA as the agent holds it: enrollment, renewal when due, and the CRL
it signs for istiod's ``ca-crl.pem``. The key is generated here and never leaves the agent's state;
every bundle the CA service issues is checked as istiod would before it is kept."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
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

__all__ = ["Intermediate"]


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
        self.state.key_pem = pki.key_pem(key)
        self.state.bundle = bundle.model_dump(by_alias=True)
        self.state.generation = generation
        self.state.serial = format(x509.load_pem_x509_certificate(bundle.ca_cert.encode()).serial_number, "x")
        self.state.own_crl_pem = ""  # a new intermediate signs a new CRL of its own
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

    # ------------------------------------------------------------------ its own CRL
    def own_crl(self) -> str:
        """The CRL this intermediate signs, re-signed once half its validity has passed."""
        assert self.state.key_pem is not None
        now = self.clock()
        signed = datetime.fromisoformat(self.state.own_crl_signed_at) if self.state.own_crl_signed_at else None
        validity = self.config.ca.crl_validity
        if not self.state.own_crl_pem or signed is None or now - signed >= validity / 2:
            self.state.own_crl_pem = rc.sign_intermediate_crl(
                self.state.bundle["ca-cert.pem"], self.state.key_pem, now=now, validity=validity
            )
            self.state.own_crl_signed_at = now.isoformat()
            self.state_store.save(self.state)
        return self.state.own_crl_pem
