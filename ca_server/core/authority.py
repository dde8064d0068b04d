"""The signing authority's front: one object for the HTTP routes, the CLI and the server.

It authenticates callers and composes the concerns, each in its own module and sharing only a
``context.Context`` (the store, the audited write with its one revision bump, the clock, the
policy): ``roots`` (root phases), ``crls``, ``clusters`` (lifecycle), ``issuance`` (enrollment and
renewal), ``fleet`` (snapshots, desired state, exports) and ``gates`` (what each istiod serves,
and the root phases' gates on it). Everything here is framework-free.
Each public method is one transaction: the change, its audit entry and the fleet revision bump
commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from cryptography import x509

from ca_server.core import tokens as tk
from ca_server.core.clusters import Clusters, NewCluster
from ca_server.core.context import Context, Joined, Policy, utcnow
from ca_server.core.crls import Crls
from ca_server.core.errors import Forbidden, InvalidInput, Unauthenticated
from ca_server.core.fleet import (
    Fleet,
    FleetSnapshot,
    agent_in_snapshot,
    build_fleet_index,
    desired_state,
    exporters_by_name,
    must_be_in,
)
from ca_server.core.gates import Gates, RootGates, ServedView
from ca_server.core.issuance import Bundle, Enrolled, Issuance, Issued, RenewalDraft
from ca_server.core.keytypes import KeyType
from ca_server.core.models import AdminToken, AuditEntry, CertificateRecord, Cluster, ClusterStatus, Root
from ca_server.core.operators import ADMIN, Operators
from ca_server.core.ports import KeyBackend, Store
from ca_server.core.rootkeys import RootKeys, trust_bundle_from
from ca_server.core.roots import Roots

__all__ = [  # the names callers have always imported from here
    "Authority",
    "Bundle",
    "Enrolled",
    "FleetSnapshot",
    "Issued",
    "NewCluster",
    "Policy",
    "build_fleet_index",
    "desired_state",
    "utcnow",
]


class Authority:
    def __init__(
        self,
        store: Store,
        keys: KeyBackend,
        *,
        policy: Policy | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.ctx = Context(store, keys, policy or Policy(), clock)
        self.rootkeys = RootKeys(keys)
        self.crls = Crls(self.ctx, self.rootkeys)
        self.roots = Roots(self.ctx, self.rootkeys, self.crls)
        self.clusters = Clusters(self.ctx, self.crls)
        self.issuance = Issuance(self.ctx, self.rootkeys, self._authenticate_agent)
        self.fleet = Fleet(self.ctx)
        self.gates = Gates(self.ctx)
        self.operators = Operators(self.ctx)

    @property
    def store(self) -> Store:
        return self.ctx.store

    @property
    def on_change(self) -> list[Callable[[], None]]:
        """Called after every committed change that bumped the fleet revision."""
        return self.ctx.on_change

    def now(self) -> datetime:
        """The authority's clock (a test moves it)."""
        return self.ctx.clock()

    def notify_changed(self) -> None:
        self.ctx.notify_changed()

    # ------------------------------------------------------------------ authentication
    def authenticate_admin(self, presented: str) -> str:
        """The actor of an admin-role token (Unauthenticated, or Forbidden audited, otherwise)."""
        return self.operators.authorize(presented, role=ADMIN, what="admin API")

    def authorize_operator(self, presented: str, *, role: str, what: str) -> str:
        """The actor of ``presented`` when its role has ``role``'s rights (see ``core.operators``)."""
        return self.operators.authorize(presented, role=role, what=what)

    def authenticate_agent(self, presented: str, cluster_name: str) -> Cluster:
        return self._authenticate_agent(self._parse_agent_token(presented), cluster_name)

    @staticmethod
    def _parse_agent_token(presented: str) -> tk.PresentedToken:
        tok = tk.parse_token(presented)
        if tok is None or tok.kind != "agent":
            raise Unauthenticated("agent token required")
        return tok

    def revision(self) -> int:
        """The fleet revision as the store has it now (one row)."""
        return self.fleet.revision()

    def agent_view(self, presented: str, cluster_name: str) -> tuple[FleetSnapshot, Cluster]:
        """The fleet snapshot at the store's current revision and the cluster ``presented``
        authenticates as, read from it: as fresh as a read of the cluster's row (revoking a cluster
        or re-enrolling it moves the revision), in one hop instead of two. A token the snapshot
        does not admit is looked up in the store, which gives the precise refusal."""
        tok = self._parse_agent_token(presented)
        snap = self.fleet.snapshot()
        cluster = agent_in_snapshot(snap, tok, cluster_name)
        if cluster is None:  # refused below; or admitted by a row newer than this snapshot
            self._authenticate_agent(tok, cluster_name)
            snap = self.fleet.snapshot()
            cluster = must_be_in(snap, cluster_name)
        return snap, cluster

    def agent_in(self, snap: FleetSnapshot, presented: str, cluster_name: str) -> Cluster | None:
        """The cluster ``presented`` authenticates as by ``snap``'s rows (no store read); None when
        ``snap`` does not admit it, which may be a stale snapshot: then ask ``agent_view``."""
        return agent_in_snapshot(snap, self._parse_agent_token(presented), cluster_name)

    def _authenticate_agent(self, tok: tk.PresentedToken, cluster_name: str) -> Cluster:
        with self.store.read() as tx:
            cluster = tx.find_cluster_by_agent_token(tok.token_id)
        if cluster is None or not tk.secret_matches(tok, cluster.agent_token_hash):
            raise Unauthenticated("agent token is not valid")
        if cluster.status == ClusterStatus.REVOKED:
            raise Unauthenticated("agent token is not valid: the cluster is revoked")
        if cluster.name != cluster_name:
            raise Forbidden("this agent token belongs to another cluster")
        return cluster

    # ------------------------------------------------------------------ roots and CRLs
    def init_root(self, *, key_type: KeyType, actor: str = "init") -> tuple[Root, str]:
        """Create the first root and the first admin token. Returns (root, admin token)."""
        return self.roots.init_root(key_type=key_type, actor=actor)

    def import_root(self, *, cert_pem: str, chain_pem: str, key_ref: str, actor: str = "init") -> tuple[Root, str]:
        """Adopt an existing root, or an issuing CA below an offline root (chain checked)."""
        return self.roots.import_root(cert_pem=cert_pem, chain_pem=chain_pem, key_ref=key_ref, actor=actor)

    def list_roots(self) -> list[Root]:
        return self.roots.list_roots()

    def add_root(self, *, key_type: KeyType | None, actor: str) -> Root:
        return self.roots.add_root(key_type=key_type, actor=actor)

    def activate_root(self, root_id: str, *, actor: str, force: bool = False) -> Root:
        """Phase 3, gated on every active cluster's istiod serving the root (see ``core.gates``)."""
        return self.roots.activate_root(root_id, actor=actor, force=force)

    def retire_root(self, root_id: str, *, actor: str, force: bool = False) -> Root:
        """Phase 4, gated on every active cluster's istiod signing elsewhere for long enough."""
        return self.roots.retire_root(root_id, actor=actor, force=force)

    def root_status(self) -> RootGates:
        """Each trusted root's phase 3 and phase 4 gates: which active clusters are ready, what the others wait for."""
        return self.gates.status()

    def served(self, clusters: Sequence[Cluster]) -> dict[str, ServedView]:
        """What each of ``clusters``' istiod serves, as the CA reads its agent's last report."""
        return self.gates.served(clusters)

    def check_signing_key(self) -> None:
        """Raise Unavailable unless the active root's key can sign now (for /readyz)."""
        self.roots.check_signing_key()

    def trust_bundle_from(self, roots: Sequence[Root]) -> str:
        return trust_bundle_from(roots)

    def refresh_crls(self, *, actor: str = "scheduler") -> int:
        """Re-sign every CRL past half of its validity. Safe to call from every replica."""
        return self.crls.refresh(actor=actor)

    def crl_der(self) -> bytes:
        return self.crls.der()

    # ------------------------------------------------------------------ clusters
    def create_cluster(
        self,
        *,
        name: str,
        trust_domain: str,
        gateway: dict[str, Any] | None,
        actor: str,
        share_trust_domain: bool = False,
    ) -> NewCluster:
        return self.clusters.create_cluster(
            name=name, trust_domain=trust_domain, gateway=gateway, actor=actor, share_trust_domain=share_trust_domain
        )

    def new_bootstrap_token(self, name: str, *, actor: str) -> tuple[str, datetime]:
        return self.clusters.new_bootstrap_token(name, actor=actor)

    def get_cluster(self, name: str) -> tuple[Cluster, CertificateRecord | None]:
        return self.clusters.get_cluster(name)

    def list_clusters(self) -> list[tuple[Cluster, CertificateRecord | None]]:
        return self.clusters.list_clusters()

    def intermediate_not_after(self) -> dict[str, datetime]:
        """notAfter of every active cluster's current intermediate (for the metrics)."""
        return self.clusters.intermediate_not_after()

    def rotate(self, name: str, *, actor: str) -> int:
        return self.clusters.rotate(name, actor=actor)

    def revoke_cluster(self, name: str, *, reason: str, actor: str) -> Cluster:
        return self.clusters.revoke_cluster(name, reason=reason, actor=actor)

    def revoke_certificate(self, serial: str, *, reason: str, actor: str) -> CertificateRecord:
        return self.clusters.revoke_certificate(serial, reason=reason, actor=actor)

    # ------------------------------------------------------------------ issuance
    def enroll(self, *, cluster_name: str, bootstrap_token: str, csr_pem: str) -> Enrolled:
        return self.issuance.enroll(cluster_name=cluster_name, bootstrap_token=bootstrap_token, csr_pem=csr_pem)

    @property
    def renewal_is_cpu_bound(self) -> bool:
        """Whether a renewal is pure CPU work here (an event loop then runs it inline)."""
        return self.issuance.renewal_is_cpu_bound

    def warm_proof_keys(self) -> int:
        """Learn every cluster's newest intermediate key ahead of its next renewal
        (``Issuance.warm_proof_keys``); returns how many."""
        return self.issuance.warm_proof_keys()

    def renew(
        self, *, cluster_name: str, agent_token: str, csr_pem: str, proof_b64: str, seen: FleetSnapshot | None = None
    ) -> Issued:
        """A new intermediate for an enrolled cluster's agent token and proof, returned once stored:
        ``draft_renewal``, its write (``submit_renewal``: the draft's ``committed`` runs on the
        thread that committed it, before that thread's next batch), its ``finish``. ``seen``: the
        latest fleet snapshot, whose row for the cluster may spare the token's pre-filter a store
        read (the write transaction checks the token on the row it locks)."""
        draft = self.draft_renewal(
            cluster_name=cluster_name, agent_token=agent_token, csr_pem=csr_pem, proof_b64=proof_b64, seen=seen
        )
        return self.finish_renewal(draft, self.submit_renewal(draft).result())

    def draft_renewal(
        self, *, cluster_name: str, agent_token: str, csr_pem: str, proof_b64: str, seen: FleetSnapshot | None = None
    ) -> RenewalDraft:
        """``renew`` up to its write: checked and signed (``Issuance.draft_renewal``)."""
        tok = self._parse_agent_token(agent_token)
        admitted = agent_in_snapshot(seen, tok, cluster_name) if seen is not None else None
        return self.issuance.draft_renewal(
            tok,
            cluster_name=cluster_name,
            csr_pem=csr_pem,
            proof_b64=proof_b64,
            admitted=admitted,
            revision=seen.revision if seen is not None else None,
        )

    def submit_renewal(self, draft: RenewalDraft) -> Future[Joined[Issued]]:
        """A drafted renewal's write, done once committed: its outcome goes to ``finish_renewal``.
        With group commit (PostgreSQL) nothing waits for it meanwhile, no thread either. The
        draft's ``committed`` runs as the future is done, on the group commit's thread: the
        fleet revision a batch of renewals moved to by ending rotations carries the roots cached
        for the one before before the next batch begins (run by ``finish_renewal`` on the event
        loop, it came too late for the next batch, which found the cache stale and ran again)."""
        done = self.ctx.submit_joined(draft.record, cluster=draft.cluster)
        done.add_done_callback(partial(_on_commit, draft))
        return done

    def finish_renewal(self, draft: RenewalDraft, outcome: Joined[Issued]) -> Issued:
        """The renewal a committed ``submit_renewal`` issued (a failed one's future raised its error)."""
        return draft.finish(self.ctx.joined_result(outcome))

    def issue_server_certificate(
        self, public_key: Any, *, dns_names: Sequence[str], ip_addresses: Sequence[str]
    ) -> tuple[x509.Certificate, Root]:
        return self.issuance.issue_server_certificate(public_key, dns_names=dns_names, ip_addresses=ip_addresses)

    def server_chain_pem(self, cert: x509.Certificate, root: Root) -> str:
        return self.issuance.server_chain_pem(cert, root)

    # ------------------------------------------------------------------ fleet exchange
    def snapshot(self) -> FleetSnapshot:
        return self.fleet.snapshot()

    def desired(self, cluster_name: str) -> dict[str, Any]:
        return self.fleet.desired(cluster_name)

    def imports(self, cluster_name: str) -> list[dict[str, Any]]:
        return self.fleet.imports(cluster_name)

    def exporters_by_name(self, consumer: str) -> dict[str, list[str]]:
        return exporters_by_name(self.fleet.snapshot(), consumer)

    def put_exports(self, cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        return self.fleet.put_exports(cluster, body)

    def put_status(self, cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        return self.fleet.put_status(cluster, body)

    # ------------------------------------------------------------------ operator tokens
    def create_admin_token(
        self, *, name: str, role: str, lifetime: timedelta | None, actor: str
    ) -> tuple[AdminToken, str]:
        """A named operator token; returns its record and its plaintext (shown once)."""
        return self.operators.create(name=name, role=role, lifetime=lifetime, actor=actor)

    def list_admin_tokens(self) -> list[AdminToken]:
        return self.operators.list()

    def revoke_admin_token(self, ref: str, *, actor: str) -> AdminToken:
        """By id or name; the last live admin token is refused (Conflict)."""
        return self.operators.revoke(ref, actor=actor)

    # ------------------------------------------------------------------ audit
    def audit(self, *, after: int, limit: int) -> list[AuditEntry]:
        if limit < 1 or limit > 1000:
            raise InvalidInput("limit must be between 1 and 1000")
        if after < 0:
            raise InvalidInput("after must be 0 or more")
        with self.store.read() as tx:
            return tx.list_audit(after=after, limit=limit)


def _on_commit(draft: RenewalDraft, done: Future[Joined[Issued]]) -> None:
    if not done.cancelled() and done.exception() is None:
        draft.committed()
