"""The fleet exchange: snapshots of the fleet (read once per revision), each cluster's desired
state computed from them, and what agents publish (exports, status)."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from ca_server.core import tokens as tk
from ca_server.core.auditsize import capped
from ca_server.core.clusters import must_cluster
from ca_server.core.context import Context
from ca_server.core.crls import check_published_crls, crl_pem_from
from ca_server.core.errors import InvalidInput, NotFound
from ca_server.core.gates import format_time
from ca_server.core.models import Cluster, ClusterStatus
from ca_server.core.ports import Tx
from ca_server.core.rootkeys import root_endorsements_from, trust_bundle_from
from ca_server.core.validation import identity_in_trust_domain
from meshbridge_wire.names import workload_identity

END_TO_END = "end-to-end"


@dataclass
class FleetSnapshot:
    """Everything desired state is computed from, read once per fleet revision."""

    revision: int
    trust_bundle: str
    crl_pem: str
    clusters: dict[str, Cluster]
    root_endorsements: list[str] = field(default_factory=list)
    imports_for: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    peers_for: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    audit_id: int = -1  # every audited change up to this entry is reflected (-1: unknown)
    # the last deltas this snapshot was built through: (from revision, to revision, the clusters
    # whose desired state may differ between the two); empty after a full read
    changes: tuple[tuple[int, int, frozenset[str]], ...] = ()

    def changed_since(self, earlier: FleetSnapshot) -> frozenset[str] | None:
        """The clusters whose desired state may differ from ``earlier``'s; None when that is not
        known (a full read since, or ``earlier`` older than the deltas kept): then any may."""
        if earlier.revision == self.revision:
            return frozenset()
        names: set[str] = set()
        for start, _end, changed in reversed(self.changes):
            names |= changed
            if start == earlier.revision:
                return frozenset(names)
        return None


# Audit actions whose only effect on desired state is the row of the cluster named as their
# subject: a new snapshot after only these re-reads those rows instead of the whole fleet.
_CLUSTER_ACTIONS = frozenset(
    {
        "intermediate.renew",
        "intermediate.enroll",
        "cluster.rotate",
        "cluster.create",
        "bootstrap_token.create",
        "exports.update",
    }
)
_MAX_DELTA = 256  # entries a delta may cover at least; a quarter of the fleet when that is more


def _max_delta(fleet: int) -> int:
    """How many audit entries a snapshot delta may re-read before a full read is cheaper. Relative
    to the fleet: in a fleet-wide renewal at 10,000 clusters a fixed 256 sent every snapshot taken
    while the watcher was busy to a full read, which took longer still (seconds), and so on."""
    return max(_MAX_DELTA, fleet // 4)


_CHANGES_KEPT = 64  # deltas a snapshot remembers, for ``changed_since``


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _published(c: Cluster) -> bool:
    return c.status == ClusterStatus.ACTIVE and c.exports is not None


def _index_inputs(c: Cluster | None) -> tuple[Any, ...]:
    """What of a cluster's row the imports and peers of every cluster are built from."""
    return (None,) if c is None else (c.status, c.trust_domain, _canon(c.exports))


def _index_changes(prev: FleetSnapshot, snap: FleetSnapshot) -> set[str]:
    """The clusters whose imports or peers differ between the two indexed snapshots."""
    out = set()
    for before, after in ((prev.imports_for, snap.imports_for), (prev.peers_for, snap.peers_for)):
        out |= {n for n in before.keys() | after.keys() if before.get(n) != after.get(n)}
    return out


def build_fleet_index(snap: FleetSnapshot) -> None:
    """Imports and peers per cluster from every published cluster's exports (pure). Sparse: a
    cluster with neither has no entry (rebuilt on every fleet change, so it must stay cheap when
    most clusters export nothing)."""
    imports: dict[str, list[dict[str, Any]]] = {}
    peer_names: dict[str, set[str]] = {}
    for exporter in snap.clusters.values():  # each list is sorted below: no need to sort the fleet
        if not _published(exporter):
            continue
        assert exporter.exports is not None
        for svc in exporter.exports.get("services", []):
            for consumer in svc.get("consumers", []):
                target = snap.clusters.get(consumer)
                if target is None or target.status == ClusterStatus.REVOKED or consumer == exporter.name:
                    continue
                imports.setdefault(consumer, []).append(_import_entry(exporter, exporter.exports, svc))
                peer_names.setdefault(consumer, set()).add(exporter.name)
                peer_names.setdefault(exporter.name, set()).add(consumer)
    for name, lst in imports.items():
        lst.sort(key=lambda i: (i["cluster"], i["name"]))
        snap.imports_for[name] = lst
    for name, peers in peer_names.items():
        snap.peers_for[name] = _peers(snap, peers)


def _import_entry(exporter: Cluster, exports: dict[str, Any], svc: dict[str, Any]) -> dict[str, Any]:
    """One exported service as an import entry of a consumer's desired state."""
    entry = {
        "name": svc["name"],
        "cluster": exporter.name,
        "ports": svc.get("ports", []),
        "gateway": exports.get("gateway"),
        "identity": exports.get("identities", {}).get("ingress"),
    }
    if svc.get("mode") == END_TO_END:  # only then: hop-by-hop entries (and revisions) stay as they were
        entry.update(mode=END_TO_END, workload_identities=svc.get("workload_identities", []))
    return entry


def exporters_by_name(snap: FleetSnapshot, consumer: str) -> dict[str, list[str]]:
    """Per name ``consumer`` imports, the clusters exporting it there, by name (the fleet view)."""
    served: dict[str, list[str]] = {}
    for entry in snap.imports_for.get(consumer, []):  # sorted by (cluster, name)
        served.setdefault(entry["name"], []).append(entry["cluster"])
    return {name: served[name] for name in sorted(served)}


def _peers(snap: FleetSnapshot, names: set[str]) -> list[dict[str, Any]]:
    """The published clusters among ``names``, by name, as a peer entry of desired state."""
    out = []
    for p in sorted(names):
        pc = snap.clusters[p]
        if not _published(pc):
            continue
        assert pc.exports is not None
        peer = {"name": p, "trust_domain": pc.trust_domain, "identities": pc.exports.get("identities", {})}
        if pc.exports.get("crl"):  # end-to-end peers' sidecars need it in their ca-crl.pem
            peer["crl"] = pc.exports["crl"]
        out.append(peer)
    return out


def agent_in_snapshot(snap: FleetSnapshot, tok: tk.PresentedToken, cluster_name: str) -> Cluster | None:
    """``cluster_name``'s row in ``snap`` when ``tok`` is its agent token and it is not revoked;
    None otherwise (no refusal here: the caller asks the store, whose answer names the reason)."""
    cluster = snap.clusters.get(cluster_name)
    if cluster is None or cluster.agent_token_id != tok.token_id or cluster.status == ClusterStatus.REVOKED:
        return None
    return cluster if tk.secret_matches(tok, cluster.agent_token_hash) else None


def must_be_in(snap: FleetSnapshot, cluster_name: str) -> Cluster:
    cluster = snap.clusters.get(cluster_name)
    if cluster is None:
        raise NotFound(f"no cluster named {cluster_name}")
    return cluster


def desired_state(snap: FleetSnapshot, cluster: Cluster) -> dict[str, Any]:
    body: dict[str, Any] = {
        "generation": cluster.generation,
        "rotate_required": cluster.rotation_pending,
        "trust_bundle": snap.trust_bundle,
        "crl": snap.crl_pem,
        "root_endorsements": snap.root_endorsements,
        "imports": snap.imports_for.get(cluster.name, []) if cluster.status == ClusterStatus.ACTIVE else [],
        "peers": snap.peers_for.get(cluster.name, []) if cluster.status == ClusterStatus.ACTIVE else [],
        "status": cluster.status.value,
    }
    body["revision"] = hashlib.sha256(_canon(body).encode()).hexdigest()[:20]
    return body


def _check_exports(cluster: Cluster, body: dict[str, Any]) -> list[str]:
    """InvalidInput unless every identity (ingress, egress and each of `egress_additional`) is in
    the cluster's trust domain and service names are unique; returns the service names."""
    for role, value in sorted(body.get("identities", {}).items()):
        # `egress_additional` is a list (further egress gateways); every entry is checked alike
        listed = value if isinstance(value, list) else [] if value is None else [value]
        for i, ident in enumerate(listed):
            if not identity_in_trust_domain(ident, cluster.trust_domain):
                where = f"identities.{role}[{i}]" if isinstance(value, list) else f"identities.{role}"
                raise InvalidInput(
                    f"{where} must be a SPIFFE ID in the cluster's trust domain (spiffe://{cluster.trust_domain}/...)"
                )
    names = [s["name"] for s in body.get("services", [])]
    if len(names) != len(set(names)):
        raise InvalidInput("services: each name may appear once")
    for i, svc in enumerate(body.get("services", [])):
        _check_end_to_end(cluster, i, svc)
    return names


def _check_end_to_end(cluster: Cluster, i: int, svc: dict[str, Any]) -> None:
    """An end-to-end export names its workloads, each the SPIFFE ID of one workload in the cluster's
    trust domain; per-workload consumers are among its consumers; neither field without the mode."""
    if svc.get("mode") != END_TO_END:
        for key in ("workload_identities", "consumer_principals"):
            if svc.get(key) is not None:
                raise InvalidInput(f"services[{i}].{key}: only for mode end-to-end")
        return
    identities = svc.get("workload_identities")
    if not identities:
        raise InvalidInput(
            f"services[{i}].workload_identities: an end-to-end export needs the SPIFFE identities of its "
            f"destination workloads (spiffe://{cluster.trust_domain}/ns/<ns>/sa/<sa>)"
        )
    for j, ident in enumerate(identities):
        parsed = workload_identity(ident)
        if parsed is None or parsed[0] != cluster.trust_domain:
            raise InvalidInput(
                f"services[{i}].workload_identities[{j}] must be the SPIFFE ID of one workload in the cluster's "
                f"trust domain (spiffe://{cluster.trust_domain}/ns/<ns>/sa/<sa>)"
            )
    for consumer in sorted(svc.get("consumer_principals") or {}):
        if consumer not in svc.get("consumers", []):
            raise InvalidInput(f"services[{i}].consumer_principals.{consumer}: not one of the export's consumers")


class Fleet:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._snapshot: FleetSnapshot | None = None
        self._lock = threading.Lock()

    def revision(self) -> int:
        with self.ctx.store.read() as tx:
            return tx.get_revision()

    def snapshot(self) -> FleetSnapshot:
        with self.ctx.store.read() as tx:
            revision = tx.get_revision()
            snap = self._snapshot
            if snap is not None and snap.revision == revision:
                return snap
        head = self.ctx.store.audit_head()  # read before the data, so this watermark is never ahead of it
        with self.ctx.store.read() as tx:
            revision = tx.get_revision()
            prev = self._snapshot
            if prev is not None and prev.revision == revision:
                return prev
            delta = None
            if prev is not None and prev.audit_id >= 0:
                delta = self._snapshot_delta(tx, prev, revision)
            snap = delta if delta is not None else self._full_snapshot(tx, revision, head)
        if delta is None:
            build_fleet_index(snap)
        with self._lock:
            if self._snapshot is None or self._snapshot.revision <= snap.revision:
                self._snapshot = snap
        return snap

    @staticmethod
    def _full_snapshot(tx: Tx, revision: int, head: tuple[int, str] | None) -> FleetSnapshot:
        """The whole fleet as ``tx`` reads it (``head``: the audit head read before it)."""
        roots = tx.list_roots()
        return FleetSnapshot(
            revision=revision,
            trust_bundle=trust_bundle_from(roots),
            crl_pem=crl_pem_from(tx, roots),
            clusters={c.name: c for c in tx.list_clusters()},
            root_endorsements=root_endorsements_from(roots),
            audit_id=head[0] if head else -1,
        )

    @staticmethod
    def _snapshot_delta(tx: Tx, prev: FleetSnapshot, revision: int) -> FleetSnapshot | None:
        """``prev`` with the rows of the clusters named by the audit entries since it re-read, when
        every change since touched only its subject cluster's row (renewals, rotations,
        enrollments, exports); None when anything else happened (roots, CRLs, revocations …) or
        too much did: then the caller reads the whole fleet. Keeps unchanged Cluster objects."""
        most = _max_delta(len(prev.clusters))
        entries = tx.list_audit(after=prev.audit_id, limit=most + 1)
        if not entries or len(entries) > most or any(e.action not in _CLUSTER_ACTIONS for e in entries):
            return None
        clusters = dict(prev.clusters)
        names = {e.subject for e in entries}
        found = {c.name: c for c in tx.get_clusters(names)}  # one query, not one per cluster
        for name in names - found.keys():
            clusters.pop(name, None)
        clusters.update(found)
        snap = FleetSnapshot(
            revision=revision,
            trust_bundle=prev.trust_bundle,
            crl_pem=prev.crl_pem,
            clusters=clusters,
            root_endorsements=prev.root_endorsements,
            audit_id=entries[-1].id,
        )
        changed = set(names)
        if all(_index_inputs(prev.clusters.get(n)) == _index_inputs(found.get(n)) for n in names):
            # renewals and rotations: the fleet index (O(fleet) to build) stays as it was
            snap.imports_for, snap.peers_for = prev.imports_for, prev.peers_for
        else:
            build_fleet_index(snap)
            changed |= _index_changes(prev, snap)
        snap.changes = (*prev.changes, (prev.revision, revision, frozenset(changed)))[-_CHANGES_KEPT:]
        return snap

    def desired(self, cluster_name: str) -> dict[str, Any]:
        snap = self.snapshot()
        return desired_state(snap, must_be_in(snap, cluster_name))

    def imports(self, cluster_name: str) -> list[dict[str, Any]]:
        return self.desired(cluster_name)["imports"]  # type: ignore[no-any-return]

    def put_exports(self, cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        names = _check_exports(cluster, body)
        with self.ctx.write() as tx:
            locked = must_cluster(tx, cluster.name, for_update=True)
            if _canon(locked.exports) == _canon(body) and locked.gateway == body.get("gateway"):
                return body
            if body.get("crl"):
                check_published_crls(body["crl"], [c.cert_pem for c in tx.cluster_certificates(cluster.name)])
            locked.exports = body
            locked.gateway = body.get("gateway")
            tx.save_cluster(locked)
            self.ctx.audit(
                tx,
                actor=f"agent:{cluster.name}",
                action="exports.update",
                subject=cluster.name,
                **capped({"services": names, "gateway": body.get("gateway")}),
            )
            self.ctx.changed(tx)
        return body

    def put_status(self, cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        """Store the agent's status with the CA's receipt time (``received_at``, the CA's clock:
        what the root phases' gates read the agent's own times against); returns ``body``."""
        received = format_time(self.ctx.clock())
        # not audited (a report, not a change the CA made): it need not queue behind every
        # audited writer on the audit head's row lock, as a fleet's reports during a rotation did
        # and one statement: the report replaces one column, so nothing need be read and locked first
        with self.ctx.write_unaudited() as tx:
            if not tx.set_agent_status(cluster.name, {**body, "received_at": received}):
                raise NotFound(f"no cluster named {cluster.name}")
        return body
