"""Issuance: enrollment, renewal (the hot path, with its caches and proof of possession) and the
CA service's own server certificate."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_server.core import tokens as tk
from ca_server.core import x509profiles as xp
from ca_server.core.clusters import must_cluster
from ca_server.core.context import Context, log
from ca_server.core.crls import crl_pem_from
from ca_server.core.errors import BadProof, Conflict, Forbidden, Unauthenticated
from ca_server.core.models import BootstrapToken, CertificateRecord, Cluster, ClusterStatus, Root, RootStatus
from ca_server.core.ports import Tx
from ca_server.core.rootkeys import RootKeys, active_root, trust_bundle_from
from ca_server.core.roots import rotate_clusters
from ca_server.core.validation import require_dns_label

_KEY_CACHE = 20_000  # entries each per-process cache keeps: clusters' newest keys and serials, certified keys
K = TypeVar("K")
V = TypeVar("V")
_ALREADY_CERTIFIED = (
    "a certificate for this CSR's public key exists already: every enrollment and renewal needs a new key"
)


@dataclass(frozen=True)
class Bundle:
    ca_cert: str
    cert_chain: str
    root_cert: str
    crl: str

    def as_files(self) -> dict[str, str]:
        return {
            "ca-cert.pem": self.ca_cert,
            "cert-chain.pem": self.cert_chain,
            "root-cert.pem": self.root_cert,
            "crl.pem": self.crl,
        }


@dataclass(frozen=True)
class Issued:
    cluster: str
    generation: int
    serial: str
    not_after: datetime
    bundle: Bundle


@dataclass(frozen=True)
class RenewalDraft:
    """A renewal checked and signed ahead of its write (``Issuance.draft_renewal``): ``record`` is
    its write job, for ``Context.write_joined`` or ``submit_joined`` (on PostgreSQL committed with
    concurrent renewals, which read their ``cluster`` rows all at once); ``finish`` takes what the
    job returned once its transaction committed, and returns it; ``committed`` is what the process
    learns the moment that transaction committed, called by whoever sees the commit first (a group
    commit's thread, before its next batch begins)."""

    cluster: str
    record: Callable[[Tx], Issued]
    finish: Callable[[Issued], Issued]
    committed: Callable[[], None]


@dataclass(frozen=True)
class Enrolled:
    issued: Issued
    agent_token: str

    def __repr__(self) -> str:
        return f"Enrolled(cluster={self.issued.cluster!r}, serial={self.issued.serial!r})"


@dataclass(frozen=True)
class _KnownAgent:
    """An agent token as last confirmed by the store (its hash only, never the secret)."""

    cluster: str
    trust_domain: str
    token_hash: str = field(repr=False)


def _decode_proof(proof_b64: str) -> bytes:
    try:
        proof = base64.b64decode(proof_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadProof("proof must be base64") from exc
    if not proof:
        raise BadProof("proof of possession of the current intermediate's key is required")
    return proof


def _check_bootstrap(rec: BootstrapToken | None, tok: tk.PresentedToken, cluster_name: str, *, now: datetime) -> None:
    """Unauthenticated unless ``rec`` is the stored, unused, unexpired bootstrap token of the cluster."""
    if rec is None or not tk.secret_matches(tok, rec.token_hash) or rec.cluster != cluster_name:
        raise Unauthenticated("bootstrap token is not valid for this cluster")
    if rec.used_at is not None:
        raise Unauthenticated("bootstrap token was already used: ask the operator for a new one")
    if rec.expires_at <= now:
        raise Unauthenticated(
            "bootstrap token has expired or was replaced by a newer one: ask the operator for a new one"
        )


def _enrollable(cluster: Cluster) -> Cluster:
    """``cluster``, unless it is revoked (then no bootstrap token is valid for it)."""
    if cluster.status == ClusterStatus.REVOKED:
        raise Unauthenticated("bootstrap token is not valid: the cluster is revoked")
    return cluster


AgentAuthenticator = Callable[[tk.PresentedToken, str], Cluster]


class Issuance:
    def __init__(self, ctx: Context, rootkeys: RootKeys, authenticate_agent: AgentAuthenticator) -> None:
        self.ctx = ctx
        self.rootkeys = rootkeys
        self._authenticate_agent = authenticate_agent
        # caches for the renewal hot path (see renew): each only guides work the write transaction
        # confirms against the store
        self._pki: tuple[int, list[Root], str, tuple[str, ...]] | None = None
        self._pki_refresh = threading.Lock()  # one draft reads them again for a new revision, the others wait
        self._keys: dict[str, Any] = {}  # intermediate serial -> public key, for proof checks
        self._newest: dict[str, str] = {}  # cluster -> serial of its newest intermediate, as last seen
        self._certified: dict[str, None] = {}  # SPKI fingerprints certified by this process (a replay filter)
        self._known_agents: dict[str, _KnownAgent] = {}

    def enroll(self, *, cluster_name: str, bootstrap_token: str, csr_pem: str) -> Enrolled:
        """The cluster's first (or a new) intermediate and agent token, for its bootstrap token.

        The token is checked before the CSR is even parsed, so unauthenticated requests cost a
        hash; the signing happens before the write transaction, which checks the token again,
        records, and makes the new intermediate the only one that proves a renewal."""
        tok = tk.parse_token(bootstrap_token)
        if tok is None or tok.kind != "boot":
            raise Unauthenticated("bootstrap token is not valid")
        require_dns_label(cluster_name, what="cluster")
        now = self.ctx.clock()
        with self.ctx.store.read() as tx:
            _check_bootstrap(tx.get_bootstrap_token(tok.token_id), tok, cluster_name, now=now)
            seen = _enrollable(must_cluster(tx, cluster_name))
            roots, names = tx.list_roots(), tuple(tx.list_server_names())
        csr, csr_key = xp.parse_csr_and_key(csr_pem)
        fingerprint = self._new_key_fingerprint(csr_key)
        draft = self._sign_intermediate(seen.name, seen.trust_domain, csr, csr_key, roots, names, now=now)
        with self.ctx.write() as tx:
            _check_bootstrap(tx.get_bootstrap_token(tok.token_id, for_update=True), tok, cluster_name, now=now)
            cluster = _enrollable(must_cluster(tx, cluster_name, for_update=True))
            cluster.generation += 1
            cluster.rotation_pending = False
            cluster.status = ClusterStatus.ACTIVE
            agent = tk.new_token("agent")
            cluster.agent_token_id, cluster.agent_token_hash = agent.token_id, agent.token_hash
            roots, server_names = tx.list_roots(), tuple(tx.list_server_names())
            if server_names != names or not self._draft_holds(draft, seen.trust_domain, cluster, roots):
                draft = self._sign_intermediate(
                    cluster.name, cluster.trust_domain, csr, csr_key, roots, server_names, now=now
                )
            cert, root = draft
            issued = self._record_issue(
                tx,
                cluster,
                cert,
                root,
                fingerprint,
                roots=roots,
                crl_pem=None,
                now=now,
                actor=f"bootstrap:{tok.token_id}",
                action="enroll",
            )
            cluster.proof_floor = self._id_of(tx, issued.serial)  # older intermediates prove nothing now
            tx.mark_bootstrap_used(tok.token_id, now)
            tx.save_cluster(cluster)
            self.ctx.changed(tx)
        self._remember_issue(issued, csr_key, fingerprint)
        return Enrolled(issued, agent.plaintext)

    @property
    def renewal_is_cpu_bound(self) -> bool:
        """Whether a renewal is pure CPU work here (embedded database, key in memory): an event loop
        then runs it inline, as a thread pool hand-off would cost more than it frees."""
        return self.ctx.store.embedded and self.ctx.keys.in_memory

    def draft_renewal(
        self,
        tok: tk.PresentedToken,
        *,
        cluster_name: str,
        csr_pem: str,
        proof_b64: str,
        admitted: Cluster | None = None,
        revision: int | None = None,
    ) -> RenewalDraft:
        """A new intermediate for an enrolled cluster, for its agent token and a proof of possession
        of the key of one of the cluster's proof candidates (``_candidates``). ``admitted``: the
        cluster's row in a fleet snapshot that admits the token (``fleet.agent_in_snapshot``, read
        from the store earlier), which the pre-filter takes instead of reading the store when the
        token is not in its cache. ``revision``: the fleet revision the process has seen (its
        snapshot's); roots cached for an older one are read again before the draft is signed.

        Checked in order of cost: the token (from the cache of tokens the store confirmed), the
        CSR, whose key must never have been certified, and the proof (``_prover``: at most two
        signature checks, no read when it was made by the newest intermediate this process knows).
        Signing and path validation are then drafted before the write transaction, from the cached
        roots, so the single writer slot is held only for reads and inserts. Inside, everything is
        decided on what the store holds now: the token, the cluster, whether the proving
        intermediate is still a candidate, and the active root — a draft made under a root that is
        no longer active is signed again. Nothing is signed for a bad proof, nothing returned or
        stored that the transaction did not confirm."""
        known = self._agent_for_draft(tok, cluster_name, admitted)
        csr, csr_key = xp.parse_csr_and_key(csr_pem)
        fingerprint = self._new_key_fingerprint(csr_key)
        proof = _decode_proof(proof_b64)
        csr_der = csr.public_bytes(serialization.Encoding.DER)
        now = self.ctx.clock()
        proved_by = self._prover(known.cluster, csr_der, proof, now=now, row=admitted)
        pki = self._pki_for_draft(revision)
        draft = (
            self._sign_intermediate(known.cluster, known.trust_domain, csr, csr_key, pki[1], pki[3], now=now)
            if pki is not None
            else None
        )

        bumped: list[int] = []  # the revision this renewal's transaction commits, when it ends a rotation

        def record(tx: Tx) -> Issued:
            locked = must_cluster(tx, cluster_name, for_update=True)
            self._require_agent(tok, locked)
            roots, crl_pem, server_names = self._pki_state(tx)
            self._confirm_prover(tx, locked, proved_by, now=now, roots=roots)
            signed = draft
            if (
                signed is None
                or pki is None
                or pki[3] != server_names
                or not self._draft_holds(signed, known.trust_domain, locked, roots)
            ):
                signed = self._sign_intermediate(
                    locked.name, locked.trust_domain, csr, csr_key, roots, server_names, now=now
                )
            cert, root = signed
            ended = locked.rotation_pending
            locked.rotation_pending = False
            issued = self._record_issue(
                tx,
                locked,
                cert,
                root,
                fingerprint,
                roots=roots,
                crl_pem=crl_pem,
                now=now,
                actor=f"agent:{locked.name}",
                action="renew",
            )
            if ended:
                tx.save_cluster(locked)
                self.ctx.changed(tx)
                bumped[:] = [tx.get_revision() + 1]  # one bump per transaction, writers serialised
            return issued

        def finish(issued: Issued) -> Issued:
            self._remember_issue(issued, csr_key, fingerprint)  # the agent proves with this key next time
            return issued

        def committed() -> None:
            if bumped:
                self._carry_pki(bumped[0])

        return RenewalDraft(cluster_name, record, finish, committed)

    def _new_key_fingerprint(self, csr_key: Any) -> str:
        """The key's SPKI fingerprint; Conflict when this process certified the key already (the
        store's unique fingerprint refuses the others, before anything is written)."""
        fingerprint = xp.public_key_fingerprint(csr_key)
        if fingerprint in self._certified:
            raise Conflict(_ALREADY_CERTIFIED)
        return fingerprint

    def _remember_issue(self, issued: Issued, csr_key: Any, fingerprint: str) -> None:
        """The new intermediate becomes the cluster's newest, its key kept for the cluster's next
        proof; the key it supersedes is dropped (a retry proved with it, after a lost answer,
        reads the candidates), so the keys kept follow the fleet's size, not its renewals."""
        superseded = self._newest.get(issued.cluster)
        self._remember_key(issued.serial, csr_key)
        _put(self._newest, issued.cluster, issued.serial)
        _put(self._certified, fingerprint, None)
        if superseded is not None and superseded != issued.serial:
            self._keys.pop(superseded, None)

    @staticmethod
    def _id_of(tx: Tx, serial: str) -> int | None:
        rec = tx.get_certificate(serial)
        return rec.id if rec is not None else None

    def _agent_for_draft(self, tok: tk.PresentedToken, cluster_name: str, admitted: Cluster | None) -> _KnownAgent:
        """Authenticate before any signing happens: from the token last confirmed by the store,
        else from the snapshot row that ``admitted`` it, else from the store. Only a pre-filter:
        the write transaction decides (``_require_agent``), so a stale row costs at most a draft."""
        known = self._known_agents.get(tok.token_id)
        if known is None:
            cluster = admitted if admitted is not None else self._authenticate_agent(tok, cluster_name)
            known = _KnownAgent(cluster.name, cluster.trust_domain, cluster.agent_token_hash or "")
            self._known_agents[tok.token_id] = known
        elif not tk.secret_matches(tok, known.token_hash):
            raise Unauthenticated("agent token is not valid")
        if known.cluster != cluster_name:
            raise Forbidden("this agent token belongs to another cluster")
        return known

    def _require_agent(self, tok: tk.PresentedToken, cluster: Cluster) -> None:
        """The authoritative check, on the row the write transaction holds."""
        if (
            cluster.agent_token_id != tok.token_id
            or cluster.status != ClusterStatus.ACTIVE
            or not tk.secret_matches(tok, cluster.agent_token_hash)
        ):
            self._known_agents.pop(tok.token_id, None)
            raise Unauthenticated("agent token is no longer valid")

    @staticmethod
    def _draft_holds(
        draft: tuple[x509.Certificate, Root], trust_domain: str, cluster: Cluster, roots: Sequence[Root]
    ) -> bool:
        """Whether the certificate signed ahead (for ``trust_domain``) is the one the transaction
        would sign: same active root (certificate and chain), same trust domain."""
        active, signed_under = active_root(roots), draft[1]
        return (
            active.id == signed_under.id
            and active.cert_pem == signed_under.cert_pem
            and active.chain_pem == signed_under.chain_pem
            and cluster.trust_domain == trust_domain
        )

    @staticmethod
    def _may_prove(rec: CertificateRecord, roots: Sequence[Root]) -> bool:
        """A proof candidate (unrevoked, unexpired, above the floor: the store's query) whose root
        is not retired."""
        return all(r.id != rec.root_id or r.status != RootStatus.RETIRED for r in roots)

    def _public_key(self, rec: CertificateRecord) -> Any:
        """The certificate's public key, parsed once per process (bounded cache)."""
        key = self._keys.get(rec.serial)
        if key is None:
            key = x509.load_pem_x509_certificate(rec.cert_pem.encode()).public_key()
            self._remember_key(rec.serial, key)
        return key

    def _remember_key(self, serial: str, key: Any) -> None:
        _put(self._keys, serial, key)

    def _pki_state(self, tx: Tx) -> tuple[list[Root], str, tuple[str, ...]]:
        """The roots, the trust bundle's PEM CRLs and the CA service's own names, read once per fleet
        revision: every change to any bumps the revision in the same transaction, so a matching
        revision means unchanged."""
        revision = tx.get_revision()
        cached = self._pki
        if cached is not None and cached[0] == revision:
            return cached[1], cached[2], cached[3]
        roots = tx.list_roots()
        crl_pem = crl_pem_from(tx, roots)
        server_names = tuple(tx.list_server_names())
        self._pki = (revision, roots, crl_pem, server_names)
        return roots, crl_pem, server_names

    def _pki_for_draft(self, revision: int | None) -> tuple[int, list[Root], str, tuple[str, ...]] | None:
        """The cached roots, CRLs and server names, read again first when the fleet has moved past
        the revision they were read at. Left stale after a root's activation, every renewal of
        the fleet was drafted under the old root and signed again inside its write, and the first
        batch found the cache stale with its writes deferred and ran again (``joined.Replay``)."""
        pki = self._pki
        if revision is None or (pki is not None and pki[0] >= revision):
            return pki
        with self._pki_refresh:
            pki = self._pki
            if pki is None or pki[0] < revision:
                with self.ctx.store.read() as tx:
                    self._pki_state(tx)
            return self._pki

    def _carry_pki(self, revision: int) -> None:
        """After a renewal's transaction moved the revision to ``revision`` by ending a rotation: it
        changed no root, CRL or server name (nor did the others of its group commit: renewals are
        its only jobs), so what ``_pki_state`` cached for the revision before holds for this one
        too. Without it, every renewal of a fleet-wide rotation found the cache
        stale (the one before it had moved the revision) and read them all again."""
        cached = self._pki
        if cached is not None and cached[0] == revision - 1:
            self._pki = (revision, cached[1], cached[2], cached[3])

    def _prover(self, cluster: str, csr_der: bytes, proof: bytes, *, now: datetime, row: Cluster | None = None) -> str:
        """The serial of the proof candidate whose key made ``proof``, found before any signing or
        writing; BadProof when none did. First the newest intermediate this process knows of the
        cluster (no read: almost always the one), else the candidates the store holds (one read,
        with the cluster's proof floor from ``row``, its fleet snapshot row, when given: a floor
        raised since costs at most a draft, as the write transaction confirms the prover on the row
        it locks, ``_confirm_prover``). Two signature checks at most, three when the process's
        newest is out of date."""
        newest = self._newest.get(cluster)
        key = self._keys.get(newest) if newest is not None else None
        tried = newest if key is not None else None
        if tried is not None and xp.verify_proof(key, csr_der, proof):
            return tried
        with self.ctx.store.read() as tx:
            candidates = self._candidates(
                tx,
                row if row is not None else must_cluster(tx, cluster),
                now=now,
                roots=self._pki[1] if self._pki is not None else tx.list_roots(),
            )
        for rec in candidates:
            if rec.serial != tried and xp.verify_proof(self._public_key(rec), csr_der, proof):
                return rec.serial
        raise BadProof("proof does not verify with the key of the cluster's current (or previous) intermediate")

    def warm_proof_keys(self) -> int:
        """Learn each cluster's newest intermediate and parse its key, so that a renewal proved with
        it (nearly every one) reads nothing in ``_prover``: a process that has not renewed a cluster
        since it started read the cluster's candidates and parsed their certificates at its next
        renewal, in a root rotation the whole fleet's at once. What it learns is each cluster's
        newest proof candidate, read in one statement by the terms of ``Tx.proof_candidates``
        (``Tx.newest_proof_candidates``), under a root not retired: ``_candidates``' first. Never
        over what this process learnt meanwhile, and never past the caches' bound. A hint
        like the rest of the cache: the renewal's transaction still confirms the prover. Returns
        how many clusters it learnt."""
        with self.ctx.store.read() as tx:
            newest = tx.newest_proof_candidates(now=self.ctx.clock())
            roots = tx.list_roots()
        learnt = 0
        for name, rec in newest.items():
            if len(self._newest) >= _KEY_CACHE:
                break  # learning makes no room: what renewals put in stays
            if name in self._newest or not self._may_prove(rec, roots):
                continue
            self._public_key(rec)
            learnt += self._newest.setdefault(name, rec.serial) == rec.serial
        return learnt

    def _confirm_prover(self, tx: Tx, cluster: Cluster, serial: str, *, now: datetime, roots: Sequence[Root]) -> None:
        """BadProof unless the intermediate ``serial`` (whose key made the proof) is still one of the
        cluster's proof candidates in ``tx`` (no signature check: each key is certified once)."""
        if all(rec.serial != serial for rec in self._candidates(tx, cluster, now=now, roots=roots)):
            raise BadProof("the intermediate that made the proof can no longer prove a renewal")

    def _candidates(self, tx: Tx, cluster: Cluster, *, now: datetime, roots: Sequence[Root]) -> list[CertificateRecord]:
        """The cluster's proof candidates, newest first: its two newest unrevoked, unexpired
        intermediates at or above its proof floor (raised by enrollment and rotate) under a root
        that is not retired. An agent proves with the newest or, when the answer to its last
        renewal was lost, with the one before."""
        candidates = [
            rec
            for rec in tx.proof_candidates(cluster.name, now=now, floor=cluster.proof_floor or 0)
            if self._may_prove(rec, roots)
        ]
        if candidates:
            _put(self._newest, cluster.name, candidates[0].serial)
        return candidates

    def _sign_intermediate(
        self,
        name: str,
        trust_domain: str,
        csr: x509.CertificateSigningRequest,
        csr_key: Any,
        roots: Sequence[Root],
        server_names: Sequence[str],
        *,
        now: datetime,
    ) -> tuple[x509.Certificate, Root]:
        """Sign and path-validate an intermediate under the active root, excluding the CA service's
        own ``server_names`` from what it may sign (nothing stored)."""
        root = active_root(roots)
        issuer = self.rootkeys.cert(root.cert_pem)
        cert = xp.issue_intermediate(
            csr=csr,
            issuer=issuer,
            signer=self.rootkeys.signer(root),
            subject=xp.intermediate_subject(name, trust_domain, self.ctx.policy.org),
            trust_domain=trust_domain,
            now=now,
            validity=self.ctx.policy.intermediate_validity,
            csr_key=csr_key,
            excluded_names=server_names,
        )
        chain_above = xp.load_pem_certificates(root.chain_pem) if root.chain_pem else []
        self.rootkeys.verifier([root]).verify(cert, intermediates=[issuer, *chain_above], now=now)
        return cert, root

    def _record_issue(
        self,
        tx: Tx,
        cluster: Cluster,
        cert: x509.Certificate,
        root: Root,
        fingerprint: str,
        *,
        roots: Sequence[Root],
        crl_pem: str | None,
        now: datetime,
        actor: str,
        action: str,
    ) -> Issued:
        """Store and audit a signed intermediate (``fingerprint``: its key's, from the CSR); the
        bundle the agent installs. Conflict when the key was certified before."""
        pem = xp.cert_pem(cert)
        rec = CertificateRecord(
            serial=xp.serial_hex(cert),
            cluster=cluster.name,
            root_id=root.id,
            generation=cluster.generation,
            cert_pem=pem,
            public_key_fp=fingerprint,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            issued_at=now,
        )
        tx.add_certificate(rec)
        self.ctx.audit(
            tx,
            actor=actor,
            action=f"intermediate.{action}",
            subject=cluster.name,
            serial=rec.serial,
            generation=cluster.generation,
            root=root.id,
            not_after=rec.not_after.isoformat(),
        )
        bundle = Bundle(
            ca_cert=pem,
            cert_chain=pem + root.cert_pem + root.chain_pem,
            root_cert=trust_bundle_from(roots),
            crl=crl_pem_from(tx, roots) if crl_pem is None else crl_pem,
        )
        return Issued(cluster.name, cluster.generation, rec.serial, rec.not_after, bundle)

    def issue_server_certificate(
        self, public_key: Any, *, dns_names: Sequence[str], ip_addresses: Sequence[str]
    ) -> tuple[x509.Certificate, Root]:
        """The CA service's TLS certificate for these names, under the active root. A name no cluster
        intermediate excludes yet is first recorded (``protect_server_names``)."""
        self.protect_server_names([*dns_names, *ip_addresses], actor="serve")
        now = self.ctx.clock()
        with self.ctx.store.read() as tx:
            root = active_root(tx.list_roots())
        cert = xp.issue_server_cert(
            issuer=self.rootkeys.cert(root.cert_pem),
            signer=self.rootkeys.signer(root),
            public_key=public_key,
            dns_names=list(dns_names),
            ip_addresses=[ipaddress.ip_address(i) for i in ip_addresses],
            now=now,
        )
        return cert, root

    def protect_server_names(self, names: Sequence[str], *, actor: str) -> list[str]:
        """Record the CA service's names that the store does not hold yet, so every intermediate
        signed from now on excludes them; every active cluster holding an intermediate signed before
        is marked for rotation (its intermediate could still mint a certificate for the new name
        until it expires or is revoked). Audited. Returns the names added. InvalidInput for a name
        that cannot be excluded without breaking the mesh (see ``x509profiles.protectable_name``)."""
        wanted = sorted(dict.fromkeys(xp.protectable_name(n) for n in names))
        with self.ctx.store.read() as tx:
            if set(wanted) <= set(tx.list_server_names()):
                return []
        with self.ctx.write() as tx:
            self.ctx.changed(tx)  # first: the revision row's lock orders replicas adding the same name
            added = [n for n in wanted if n not in set(tx.list_server_names())]
            if not added:
                return []
            now = self.ctx.clock()
            for name in added:
                tx.add_server_name(name, now)
            rotated = rotate_clusters(tx)
            self.ctx.audit(tx, actor=actor, action="server_names.protect", subject="ca", names=added, rotated=rotated)
        log.warning(
            "the CA service's names %s are now excluded from cluster intermediates; clusters "
            "rotating to exclude them: %s",
            ", ".join(added),
            ", ".join(rotated) or "none",
        )
        return added

    @staticmethod
    def server_chain_pem(cert: x509.Certificate, root: Root) -> str:
        """What the CA service presents in TLS: its certificate, the issuing CA when that is below an
        offline root, and the active root's endorsement by the root before it, so an agent that
        still trusts only the older root can build a path to it."""
        issuing = root.cert_pem if root.chain_pem else ""
        return xp.cert_pem(cert) + issuing + root.endorsement_pem


def _put(cache: dict[K, V], key: K, value: V) -> None:
    """``cache[key] = value`` in a cache of at most ``_KEY_CACHE`` entries: when full, its oldest
    quarter goes first (a dict keeps insertion order, and a key put again moves to its end). Each
    cache used to be cleared whole when any one was full: at 10,000 clusters that fell near the end
    of a root rotation, and the renewals after it read and parsed their candidates again. Safe
    across threads: ``list(islice(...))`` walks the dict in C without giving up the interpreter
    lock (its keys are strings), and an entry another thread dropped first is skipped."""
    cache.pop(key, None)
    if len(cache) >= _KEY_CACHE:
        for stale in list(itertools.islice(cache, _KEY_CACHE // 4)):
            cache.pop(stale, None)
    cache[key] = value
