"""Cluster lifecycle: creation and bootstrap tokens, rotation, revocation (of a cluster or one
certificate), and the admin's reads of clusters."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ca_server.core import tokens as tk
from ca_server.core.context import Context
from ca_server.core.crls import Crls
from ca_server.core.errors import Conflict, NotFound
from ca_server.core.models import BootstrapToken, CertificateRecord, Cluster, ClusterStatus
from ca_server.core.ports import Tx
from ca_server.core.validation import require_dns_label, require_reason, require_serial, require_trust_domain


@dataclass(frozen=True)
class NewCluster:
    cluster: Cluster
    bootstrap_token: str
    bootstrap_expires_at: datetime

    def __repr__(self) -> str:
        return f"NewCluster(cluster={self.cluster.name!r})"


def must_cluster(tx: Tx, name: str, *, for_update: bool = False) -> Cluster:
    cluster = tx.get_cluster(name, for_update=for_update)
    if cluster is None:
        raise NotFound(f"no cluster named {name}")
    return cluster


class Clusters:
    def __init__(self, ctx: Context, crls: Crls) -> None:
        self.ctx = ctx
        self.crls = crls

    def create_cluster(
        self,
        *,
        name: str,
        trust_domain: str,
        gateway: dict[str, Any] | None,
        actor: str,
        share_trust_domain: bool = False,
    ) -> NewCluster:
        """A pending cluster and its bootstrap token. Its trust domain must be its own: an intermediate
        can mint every identity of its trust domain, so two clusters in one can impersonate each other."""
        require_dns_label(name, what="cluster name")
        require_trust_domain(trust_domain)
        now = self.ctx.clock()
        with self.ctx.write() as tx:
            self.ctx.changed(tx)  # first: the revision row's lock serialises registrations (replicas included)
            if tx.get_cluster(name) is not None:
                raise Conflict(f"cluster {name} exists")
            holders = tx.trust_domain_holders(trust_domain)  # a query, not a read of the whole fleet
            if holders and not share_trust_domain:
                raise Conflict(
                    f"trust domain {trust_domain} is held by cluster(s) {', '.join(holders)}: give each cluster "
                    f"its own (its Istio meshConfig.trustDomain), or share it knowingly with share_trust_domain"
                )
            cluster = Cluster(
                name=name,
                trust_domain=trust_domain,
                status=ClusterStatus.PENDING,
                generation=0,
                rotation_pending=False,
                gateway=gateway,
                created_at=now,
            )
            tx.add_cluster(cluster)
            self.ctx.audit(
                tx,
                actor=actor,
                action="cluster.create",
                subject=name,
                trust_domain=trust_domain,
                gateway=gateway,
                **({"shares_trust_domain_with": holders} if holders else {}),
            )
            token, expires = self._new_bootstrap(tx, cluster, now=now, actor=actor)
        return NewCluster(cluster, token, expires)

    def _new_bootstrap(self, tx: Tx, cluster: Cluster, *, now: datetime, actor: str) -> tuple[str, datetime]:
        """A new bootstrap token for ``cluster``; the unused ones issued before it end now."""
        superseded = tx.expire_bootstrap_tokens(cluster.name, now)
        tok = tk.new_token("boot")
        expires = now + self.ctx.policy.bootstrap_ttl
        tx.add_bootstrap_token(BootstrapToken(tok.token_id, cluster.name, tok.token_hash, expires, now))
        self.ctx.audit(
            tx,
            actor=actor,
            action="bootstrap_token.create",
            subject=cluster.name,
            token_id=tok.token_id,
            expires_at=expires.isoformat(),
            superseded=superseded,
        )
        return tok.plaintext, expires

    def new_bootstrap_token(self, name: str, *, actor: str) -> tuple[str, datetime]:
        now = self.ctx.clock()
        with self.ctx.write() as tx:
            cluster = must_cluster(tx, name, for_update=True)
            if cluster.status == ClusterStatus.REVOKED:
                raise Conflict(f"cluster {name} is revoked")
            return self._new_bootstrap(tx, cluster, now=now, actor=actor)

    def get_cluster(self, name: str) -> tuple[Cluster, CertificateRecord | None]:
        with self.ctx.store.read() as tx:
            cluster = must_cluster(tx, name)
            latest = tx.latest_certificate(name)
        return cluster, latest

    def list_clusters(self) -> list[tuple[Cluster, CertificateRecord | None]]:
        with self.ctx.store.read() as tx:
            current = tx.current_certificates()
            return [(c, current.get(c.name)) for c in sorted(tx.list_clusters(), key=lambda c: c.name)]

    def intermediate_not_after(self) -> dict[str, datetime]:
        """notAfter of every active cluster's current intermediate (for the metrics)."""
        with self.ctx.store.read() as tx:
            current = tx.current_certificates()
            return {
                c.name: current[c.name].not_after
                for c in tx.list_clusters()
                if c.status == ClusterStatus.ACTIVE and c.name in current
            }

    def rotate(self, name: str, *, actor: str) -> int:
        """Ask the agent for a new intermediate; only the newest valid one proves it from now on
        (its predecessors, which proved renewals until now, prove nothing any more)."""
        now = self.ctx.clock()
        with self.ctx.write() as tx:
            cluster = must_cluster(tx, name, for_update=True)
            if cluster.status == ClusterStatus.REVOKED:
                raise Conflict(f"cluster {name} is revoked")
            if cluster.status == ClusterStatus.PENDING:
                raise Conflict(f"cluster {name} has never enrolled")
            if cluster.rotation_pending:
                return cluster.generation
            cluster.generation += 1
            cluster.rotation_pending = True
            newest = tx.proof_candidates(name, now=now, floor=cluster.proof_floor or 0)[:1]
            if newest:
                cluster.proof_floor = newest[0].id
            tx.save_cluster(cluster)
            self.ctx.audit(
                tx,
                actor=actor,
                action="cluster.rotate",
                subject=name,
                generation=cluster.generation,
                proves=newest[0].serial if newest else None,
            )
            self.ctx.changed(tx)
        return cluster.generation

    def revoke_cluster(self, name: str, *, reason: str, actor: str) -> Cluster:
        require_reason(reason)
        now = self.ctx.clock()
        with self.ctx.write() as tx:
            cluster = must_cluster(tx, name, for_update=True)
            if cluster.status == ClusterStatus.REVOKED:
                return cluster
            revoked = []
            for rec in tx.cluster_certificates(name):
                if rec.revoked_at is None:
                    tx.revoke_certificate(rec.serial, at=now, reason=reason)
                    revoked.append(rec)
            cluster.status = ClusterStatus.REVOKED
            cluster.revoked_at = now
            cluster.rotation_pending = False
            cluster.agent_token_hash = None
            tx.save_cluster(cluster)
            self.ctx.audit(
                tx,
                actor=actor,
                action="cluster.revoke",
                subject=name,
                reason=reason,
                serials=[r.serial for r in revoked],
            )
            self.crls.resign_for(tx, {r.root_id for r in revoked}, now=now, actor=actor)
            self.ctx.changed(tx)
        return cluster

    def revoke_certificate(self, serial: str, *, reason: str, actor: str) -> CertificateRecord:
        require_serial(serial)
        require_reason(reason)
        now = self.ctx.clock()
        with self.ctx.write() as tx:
            rec = tx.get_certificate(serial)
            if rec is None:
                raise NotFound(f"no certificate with serial {serial}")
            if rec.revoked_at is not None:
                return rec
            tx.revoke_certificate(serial, at=now, reason=reason)
            rec.revoked_at, rec.revocation_reason = now, reason
            self.ctx.audit(
                tx, actor=actor, action="certificate.revoke", subject=serial, cluster=rec.cluster, reason=reason
            )
            self.crls.resign_for(tx, {rec.root_id}, now=now, actor=actor)
            self.ctx.changed(tx)
        return rec
