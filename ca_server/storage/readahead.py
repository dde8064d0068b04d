"""What a group commit read for all its jobs at once, before running them (``SqlTx.read_ahead``).

A renewal in a group commit reads its cluster's row (locked) and its proof candidates. Run one
after another on the batch's connection, those were two waits for the database per renewal, and on
a busy server each wait is also a wait for the interpreter lock, while the batch holds the audit
head's row lock that every other writer (the other replicas' batches) queues on (bench/RESULTS.md).
The batch reads them for all its jobs in two statements instead; the jobs' reads are answered from
here until a write changes what they cover, and then from the database again.

Nothing here is trusted beyond the transaction that read it: the clusters were read locked in it
(the batch holds every row until it commits) and the certificates under the audit head's lock
that every writer takes first, so only the transaction's own writes can change them, and each of
those (``forget_*``, ``cluster_saved``) is reported here by ``SqlTx``.

The roots, CRLs and server names (what a renewal signs under and hands out, ``Pki``) are read for
the jobs, in a second wait, only when the fleet revision has moved since the process last had
them: another replica's batch moves it with every renewal that ends a rotation. Read by a job
instead, with its writes deferred, they made the batch run again, each job's statements settled in
turn, while it held the audit head's lock the other replica waits for: with two replicas in a
1,000-cluster fleet event, a third of all batches (bench/RESULTS.md). A batch with deferred writes
can write none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from ca_server.core.models import CertificateRecord, Cluster, CRLRecord, Root

PROOF_CANDIDATES = 2  # a cluster's proof candidates: its newest intermediate and the one before
# candidates read ahead per cluster: one more than a renewal takes, so that one of them expiring
# between the batch's read and a job's own clock still leaves the job its two without a read
CANDIDATES_AHEAD = PROOF_CANDIDATES + 1


@dataclass(frozen=True)
class _Candidates:
    records: tuple[CertificateRecord, ...]  # unrevoked, at or above ``floor``, newest first
    floor: int
    complete: bool  # every such certificate (fewer than CANDIDATES_AHEAD exist)


@dataclass(frozen=True)
class Pki:
    """The roots, CRLs and CA service names as a group commit read them ahead."""

    roots: tuple[Root, ...]
    crls: tuple[CRLRecord, ...]
    server_names: tuple[str, ...]


class ReadAhead:
    """The clusters and proof candidates a group commit read ahead, answering its jobs' reads."""

    def __init__(self) -> None:
        self._clusters: dict[str, Cluster] = {}
        self._candidates: dict[str, _Candidates] = {}
        self._pki: Pki | None = None

    def hold_pki(self, pki: Pki) -> None:
        self._pki = pki

    def roots(self) -> list[Root] | None:
        """The roots as read ahead (copies the caller may change), or None: read them."""
        return [replace(r) for r in self._pki.roots] if self._pki is not None else None

    def crls(self) -> list[CRLRecord] | None:
        return [replace(c) for c in self._pki.crls] if self._pki is not None else None

    def server_names(self) -> list[str] | None:
        return list(self._pki.server_names) if self._pki is not None else None

    def hold(self, clusters: list[Cluster], certificates: list[CertificateRecord]) -> None:
        """``certificates``: for each of ``clusters``, its newest ``CANDIDATES_AHEAD`` unrevoked
        certificates at or above its proof floor (expired ones included), in any order."""
        self._clusters = {c.name: c for c in clusters}
        by_cluster: dict[str, list[CertificateRecord]] = {c.name: [] for c in clusters}
        for rec in certificates:
            by_cluster[rec.cluster].append(rec)
        self._candidates = {
            c.name: _Candidates(
                records=tuple(sorted(by_cluster[c.name], key=lambda r: r.id or 0, reverse=True)),
                floor=c.proof_floor or 0,
                complete=len(by_cluster[c.name]) < CANDIDATES_AHEAD,
            )
            for c in clusters
        }

    def cluster(self, name: str) -> Cluster | None:
        """The cluster as read ahead (a copy the caller may change), or None: read it."""
        held = self._clusters.get(name)
        return replace(held) if held is not None else None

    def proof_candidates(self, cluster: str, *, now: datetime, floor: int) -> list[CertificateRecord] | None:
        """``SqlTx.proof_candidates``'s answer from what was read ahead, or None: read it. The
        answer is the database's: the newest unexpired ones among the newest unrevoked ones are
        the newest unexpired ones, when there are enough of them or the read held them all."""
        held = self._candidates.get(cluster)
        if held is None or held.floor != floor:
            return None
        live = [r for r in held.records if r.not_after > now]
        if len(live) < PROOF_CANDIDATES and not held.complete:
            return None
        return live[:PROOF_CANDIDATES]

    def cluster_saved(self, cluster: Cluster) -> None:
        """The transaction wrote ``cluster``: later reads get what it wrote."""
        if cluster.name in self._clusters:
            self._clusters[cluster.name] = replace(cluster)

    def forget_clusters(self) -> None:
        """The transaction changed clusters some other way (or rolled back): read them again."""
        self._clusters.clear()

    def forget_candidates(self, cluster: str | None = None) -> None:
        """The transaction changed a certificate of ``cluster`` (None: of any cluster)."""
        if cluster is None:
            self._candidates.clear()
        else:
            self._candidates.pop(cluster, None)

    def forget(self) -> None:
        self.forget_clusters()
        self.forget_candidates()
