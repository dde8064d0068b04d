"""The signing authority: enrollment, issuance, rotation, revocation, root phases, fleet exchange.

Everything here is framework-free. Each public method is one transaction: the change, its audit
entry and the fleet revision bump commit together or not at all.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_server.core import tokens as tk
from ca_server.core import x509profiles as xp
from ca_server.core.errors import (
    BadProof,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from ca_server.core.importca import check_importable_ca
from ca_server.core.models import (
    AdminToken,
    BootstrapToken,
    CertificateRecord,
    Cluster,
    ClusterStatus,
    CRLRecord,
    Root,
    RootStatus,
)
from ca_server.core.ports import Store, Tx
from ca_server.core.validation import (
    identity_in_trust_domain,
    require_dns_label,
    require_reason,
    require_serial,
    require_trust_domain,
)
from ca_server.keys.base import KeyBackend, KeyType, Signer

log = logging.getLogger("meshbridge.ca.authority")

CRL_VALIDITY = timedelta(days=7)
BOOTSTRAP_TTL = timedelta(hours=1)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Policy:
    org: str = "meshbridge"
    intermediate_validity: timedelta = timedelta(days=90)
    root_validity: timedelta = timedelta(days=3650)
    bootstrap_ttl: timedelta = BOOTSTRAP_TTL
    crl_validity: timedelta = CRL_VALIDITY
    root_key_type: KeyType = KeyType.ECDSA_P256


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
class Enrolled:
    issued: Issued
    agent_token: str

    def __repr__(self) -> str:
        return f"Enrolled(cluster={self.issued.cluster!r}, serial={self.issued.serial!r})"


@dataclass(frozen=True)
class NewCluster:
    cluster: Cluster
    bootstrap_token: str
    bootstrap_expires_at: datetime

    def __repr__(self) -> str:
        return f"NewCluster(cluster={self.cluster.name!r})"


@dataclass
class FleetSnapshot:
    """Everything desired state is computed from, read once per fleet revision."""

    revision: int
    trust_bundle: str
    crl_pem: str
    clusters: dict[str, Cluster]
    imports_for: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    peers_for: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    audit_id: int = -1  # every audited change up to this entry is reflected (-1: unknown)


# Audit actions whose only effect on desired state is the row of the cluster named as their
# subject: a new snapshot after only these re-reads those rows instead of the whole fleet.
_CLUSTER_ACTIONS = frozenset({"intermediate.renew", "intermediate.enroll", "cluster.rotate", "cluster.create",
                              "bootstrap_token.create", "exports.update"})
_MAX_DELTA = 256


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _published(c: Cluster) -> bool:
    return c.status == ClusterStatus.ACTIVE and c.exports is not None


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
                imports.setdefault(consumer, []).append(
                    {
                        "name": svc["name"],
                        "cluster": exporter.name,
                        "ports": svc.get("ports", []),
                        "gateway": exporter.exports.get("gateway"),
                        "identity": exporter.exports.get("identities", {}).get("ingress"),
                    }
                )
                peer_names.setdefault(consumer, set()).add(exporter.name)
                peer_names.setdefault(exporter.name, set()).add(consumer)
    for name, lst in imports.items():
        lst.sort(key=lambda i: (i["cluster"], i["name"]))
        snap.imports_for[name] = lst
    for name, peers in peer_names.items():
        out = []
        for p in sorted(peers):
            pc = snap.clusters[p]
            if not _published(pc):
                continue
            assert pc.exports is not None
            out.append({"name": p, "trust_domain": pc.trust_domain, "identities": pc.exports.get("identities", {})})
        snap.peers_for[name] = out


def desired_state(snap: FleetSnapshot, cluster: Cluster) -> dict[str, Any]:
    body: dict[str, Any] = {
        "generation": cluster.generation,
        "rotate_required": cluster.rotation_pending,
        "trust_bundle": snap.trust_bundle,
        "crl": snap.crl_pem,
        "imports": snap.imports_for.get(cluster.name, []) if cluster.status == ClusterStatus.ACTIVE else [],
        "peers": snap.peers_for.get(cluster.name, []) if cluster.status == ClusterStatus.ACTIVE else [],
        "status": cluster.status.value,
    }
    body["revision"] = hashlib.sha256(_canon(body).encode()).hexdigest()[:20]
    return body


_KEY_CACHE = 20_000  # parsed intermediate public keys kept per process


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


class Authority:
    def __init__(
        self,
        store: Store,
        keys: KeyBackend,
        *,
        policy: Policy | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.keys = keys
        self.policy = policy or Policy()
        self.clock = clock
        self._signers: dict[str, Signer] = {}
        self._certs: dict[str, x509.Certificate] = {}
        self._verifiers: dict[tuple[str, ...], xp.ChainVerifier] = {}
        self._snapshot: FleetSnapshot | None = None
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread list of audited events awaiting commit
        # caches for the renewal hot path (see renew): each only guides work the write transaction
        # confirms against the store
        self._pki: tuple[int, list[Root], str] | None = None
        self._keys: dict[str, Any] = {}  # intermediate serial -> public key, for proof checks
        self._known_agents: dict[str, _KnownAgent] = {}
        self.on_change: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ helpers
    def _cert(self, pem: str) -> x509.Certificate:
        cert = self._certs.get(pem)
        if cert is None:
            cert = x509.load_pem_x509_certificate(pem.encode())
            self._certs[pem] = cert
        return cert

    def _signer(self, root: Root) -> Signer:
        signer = self._signers.get(root.id)
        if signer is None:
            try:
                signer = self.keys.load(root.key_ref)
            except Exception as exc:  # the backend's own error types vary; never echo key material
                raise Unavailable(f"signing key of root {root.id} is not usable") from exc
            self._signers[root.id] = signer
        return signer

    def _verifier(self, roots: Sequence[Root]) -> xp.ChainVerifier:
        key = tuple(sorted(r.anchor_pem for r in roots))
        v = self._verifiers.get(key)
        if v is None:
            anchors = [self._cert(p) for p in dict.fromkeys(key)]
            v = xp.ChainVerifier(anchors)
            self._verifiers[key] = v
        return v

    @staticmethod
    def _bundle_roots(roots: Sequence[Root]) -> list[Root]:
        return sorted((r for r in roots if r.status != RootStatus.RETIRED), key=lambda r: (r.created_at, r.id))

    @staticmethod
    def _active_root(roots: Sequence[Root]) -> Root:
        for r in roots:
            if r.status == RootStatus.ACTIVE:
                return r
        raise Unavailable("no active root: initialise the CA first")

    def trust_bundle_from(self, roots: Sequence[Root]) -> str:
        anchors = dict.fromkeys(r.anchor_pem for r in self._bundle_roots(roots))
        return "".join(anchors)

    def _crl_pem_from(self, tx: Tx, roots: Sequence[Root]) -> str:
        wanted = {r.id for r in self._bundle_roots(roots)}
        order = {r.id: i for i, r in enumerate(self._bundle_roots(roots))}
        crls = sorted((c for c in tx.list_crls() if c.root_id in wanted), key=lambda c: order[c.root_id])
        return "".join(c.pem for c in crls)

    def _audit(self, tx: Tx, *, actor: str, action: str, subject: str, **details: Any) -> None:
        tx.append_audit(at=self.clock(), actor=actor, action=action, subject=subject, details=details)
        events = getattr(self._local, "events", None)
        if events is not None:
            events.append((action, subject, actor, details.get("serial") or details.get("generation")))

    @contextlib.contextmanager
    def _write(self) -> Iterator[Tx]:
        """A write transaction whose audited changes are logged once it has committed (a change that
        rolled back is never logged as done). Identifiers only: never a token or key."""
        self._local.events = []
        try:
            with self.store.write() as tx:
                yield tx
            for action, subject, actor, extra in self._local.events:
                log.info("%s %s", action, subject, extra={"actor": actor, **({"serial": extra} if extra else {})})
        finally:
            self._local.events = None

    def _changed(self, tx: Tx) -> None:
        tx.bump_revision()

    def notify_changed(self) -> None:
        for cb in self.on_change:
            cb()

    def check_signing_key(self) -> None:
        """Raise Unavailable unless the active root's key can sign now (for /readyz)."""
        with self.store.read() as tx:
            root = self._active_root(tx.list_roots())
        signer = self._signer(root)
        probe = b"meshbridge readiness probe"
        try:
            sig = signer.sign(probe)
        except Exception as exc:
            self._signers.pop(root.id, None)  # reopen next time (token reinserted, HSM back)
            raise Unavailable(f"signing key of root {root.id} cannot sign") from exc
        if not xp.verify_proof(signer.public_key(), probe, sig):
            raise Unavailable(f"signing key of root {root.id} does not match its certificate")

    # ------------------------------------------------------------------ authentication
    def authenticate_admin(self, presented: str) -> str:
        tok = tk.parse_token(presented)
        if tok is None or tok.kind != "admin":
            raise Unauthenticated("admin token required")
        with self.store.read() as tx:
            rec = tx.get_admin_token(tok.token_id)
        if not tk.secret_matches(tok, rec.token_hash if rec else None):
            raise Unauthenticated("admin token is not valid")
        return f"admin:{tok.token_id}"

    def authenticate_agent(self, presented: str, cluster_name: str) -> Cluster:
        return self._authenticate_agent(self._parse_agent_token(presented), cluster_name)

    @staticmethod
    def _parse_agent_token(presented: str) -> tk.PresentedToken:
        tok = tk.parse_token(presented)
        if tok is None or tok.kind != "agent":
            raise Unauthenticated("agent token required")
        return tok

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

    # ------------------------------------------------------------------ roots
    def init_root(
        self, *, key_type: KeyType, actor: str = "init"
    ) -> tuple[Root, str]:
        """Create the first root and the first admin token. Returns (root, admin token)."""
        now = self.clock()
        with self._new_key_discarded_on_failure() as created, self._write() as tx:
            if tx.list_roots():
                raise Conflict("this CA already has a root")
            root = self._generate_root(tx, key_type=key_type, status=RootStatus.ACTIVE, now=now, actor=actor,
                                       created=created)
            admin = self._first_admin_token(tx, now=now, actor=actor)
            self._sign_crl(tx, root, now=now, actor=actor)
            self._changed(tx)
        return root, admin.plaintext

    def import_root(
        self, *, cert_pem: str, chain_pem: str, key_ref: str, actor: str = "init"
    ) -> tuple[Root, str]:
        """Adopt an existing root, or an issuing CA below an offline root (chain checked)."""
        certs = xp.load_pem_certificates(cert_pem)  # InvalidInput for anything but PEM certificates
        if len(certs) != 1:
            raise InvalidInput("give exactly one CA certificate to import; the ones above it go into the chain")
        cert = certs[0]
        chain = xp.load_pem_certificates(chain_pem) if chain_pem.strip() else []
        check_importable_ca(cert, chain, self.keys.load(key_ref), now=self.clock())
        anchor = chain[-1] if chain else cert
        now = self.clock()
        with self._write() as tx:
            if tx.list_roots():
                raise Conflict("this CA already has a root")
            root = Root(
                id=xp.serial_hex(cert)[:16],
                status=RootStatus.ACTIVE,
                cert_pem=xp.cert_pem(cert),
                chain_pem="".join(xp.cert_pem(c) for c in chain),
                key_ref=key_ref,
                not_after=cert.not_valid_after_utc,
                created_at=now,
                anchor_pem=xp.cert_pem(anchor),
            )
            tx.add_root(root)
            self._audit(tx, actor=actor, action="root.import", subject=root.id, self_signed=not chain)
            admin = self._first_admin_token(tx, now=now, actor=actor)
            self._sign_crl(tx, root, now=now, actor=actor)
            self._changed(tx)
        return root, admin.plaintext

    def _first_admin_token(self, tx: Tx, *, now: datetime, actor: str) -> tk.IssuedToken:
        admin = tk.new_token("admin")
        tx.add_admin_token(AdminToken(admin.token_id, admin.token_hash, now, "initial admin token"))
        self._audit(tx, actor=actor, action="admin_token.create", subject=admin.token_id)
        return admin

    @contextlib.contextmanager
    def _new_key_discarded_on_failure(self) -> Iterator[list[tuple[str, str]]]:
        """For a transaction that generates root keys: each (key_ref, root id) appended to the
        yielded list is discarded from the key backend if the transaction fails, so a refused or
        failed change leaves no orphan key behind (best effort: a failure to discard is logged)."""
        created: list[tuple[str, str]] = []
        try:
            yield created
        except BaseException:
            for key_ref, root_id in created:
                self._signers.pop(root_id, None)
                try:
                    self.keys.discard(key_ref)
                except Exception as exc:  # the original failure is what the caller must see
                    log.warning("could not discard the key of a root that was not created: %s",
                                type(exc).__name__, extra={"key": self.keys.describe(key_ref)})
            raise

    def _generate_root(self, tx: Tx, *, key_type: KeyType, status: RootStatus, now: datetime, actor: str,
                       created: list[tuple[str, str]]) -> Root:
        suffix = tk.new_token("admin").token_id[:6]
        label = f"root-{now.strftime('%Y%m%d%H%M%S')}-{suffix}"
        key_ref, signer = self.keys.generate(key_type, label)
        created.append((key_ref, ""))
        # every root gets its own subject: two roots in one trust bundle must not share a name
        subject = xp.default_root_subject(self.policy.org, label=f"{now.strftime('%Y-%m-%d')} {suffix}")
        cert = xp.build_root(signer, subject=subject, now=now, validity=self.policy.root_validity)
        pem = xp.cert_pem(cert)
        root = Root(
            id=xp.serial_hex(cert)[:16],
            status=status,
            cert_pem=pem,
            chain_pem="",
            key_ref=key_ref,
            not_after=cert.not_valid_after_utc,
            created_at=now,
            anchor_pem=pem,
        )
        created[-1] = (key_ref, root.id)
        tx.add_root(root)
        self._signers[root.id] = signer
        self._audit(tx, actor=actor, action="root.create", subject=root.id, key_type=key_type.value,
                    status=status.value, key=self.keys.describe(key_ref))
        return root

    def list_roots(self) -> list[Root]:
        with self.store.read() as tx:
            return sorted(tx.list_roots(), key=lambda r: (r.created_at, r.id))

    def add_root(self, *, key_type: KeyType | None, actor: str) -> Root:
        now = self.clock()
        with self._new_key_discarded_on_failure() as created, self._write() as tx:
            root = self._generate_root(
                tx, key_type=key_type or self.policy.root_key_type, status=RootStatus.TRUSTED, now=now, actor=actor,
                created=created,
            )
            self._sign_crl(tx, root, now=now, actor=actor)
            self._changed(tx)
        self.notify_changed()
        return root

    def activate_root(self, root_id: str, *, actor: str) -> Root:
        with self._write() as tx:
            root = self._must_root(tx, root_id)
            if root.status == RootStatus.RETIRED:
                raise Conflict("a retired root cannot be activated")
            if root.status == RootStatus.ACTIVE:
                return root
            for other in tx.list_roots():
                if other.status == RootStatus.ACTIVE:
                    tx.set_root_status(other.id, RootStatus.TRUSTED.value)
            tx.set_root_status(root.id, RootStatus.ACTIVE.value)
            root.status = RootStatus.ACTIVE
            current = tx.current_certificates()
            moved = []
            for c in tx.list_clusters():
                rec = current.get(c.name)
                if c.status != ClusterStatus.ACTIVE or rec is None or rec.root_id == root.id:
                    continue
                locked = tx.get_cluster(c.name, for_update=True)
                assert locked is not None
                if not locked.rotation_pending:
                    locked.generation += 1
                    locked.rotation_pending = True
                    tx.save_cluster(locked)
                moved.append(c.name)
            self._audit(tx, actor=actor, action="root.activate", subject=root.id, rotated=sorted(moved))
            self._changed(tx)
        self.notify_changed()
        return root

    def retire_root(self, root_id: str, *, actor: str) -> Root:
        with self._write() as tx:
            root = self._must_root(tx, root_id)
            if root.status == RootStatus.RETIRED:
                return root
            if root.status == RootStatus.ACTIVE:
                raise Conflict("the active root cannot be retired: activate another root first")
            current = tx.current_certificates()
            clusters = {c.name: c for c in tx.list_clusters()}
            still = sorted(
                n for n, rec in current.items()
                if rec.root_id == root.id and clusters[n].status == ClusterStatus.ACTIVE
            )
            if still:
                raise Conflict(f"clusters still hold intermediates under this root: {', '.join(still)}")
            tx.set_root_status(root.id, RootStatus.RETIRED.value)
            root.status = RootStatus.RETIRED
            self._audit(tx, actor=actor, action="root.retire", subject=root.id)
            self._changed(tx)
        self.notify_changed()
        return root

    # ------------------------------------------------------------------ clusters
    def create_cluster(
        self, *, name: str, trust_domain: str, gateway: dict[str, Any] | None, actor: str
    ) -> NewCluster:
        require_dns_label(name, what="cluster name")
        require_trust_domain(trust_domain)
        now = self.clock()
        with self._write() as tx:
            if tx.get_cluster(name) is not None:
                raise Conflict(f"cluster {name} exists")
            cluster = Cluster(
                name=name, trust_domain=trust_domain, status=ClusterStatus.PENDING, generation=0,
                rotation_pending=False, gateway=gateway, created_at=now,
            )
            tx.add_cluster(cluster)
            self._audit(tx, actor=actor, action="cluster.create", subject=name, trust_domain=trust_domain,
                        gateway=gateway)
            token, expires = self._new_bootstrap(tx, cluster, now=now, actor=actor)
            self._changed(tx)
        self.notify_changed()
        return NewCluster(cluster, token, expires)

    def _new_bootstrap(self, tx: Tx, cluster: Cluster, *, now: datetime, actor: str) -> tuple[str, datetime]:
        tok = tk.new_token("boot")
        expires = now + self.policy.bootstrap_ttl
        tx.add_bootstrap_token(BootstrapToken(tok.token_id, cluster.name, tok.token_hash, expires, now))
        self._audit(tx, actor=actor, action="bootstrap_token.create", subject=cluster.name,
                    token_id=tok.token_id, expires_at=expires.isoformat())
        return tok.plaintext, expires

    def new_bootstrap_token(self, name: str, *, actor: str) -> tuple[str, datetime]:
        now = self.clock()
        with self._write() as tx:
            cluster = self._must_cluster(tx, name, for_update=True)
            if cluster.status == ClusterStatus.REVOKED:
                raise Conflict(f"cluster {name} is revoked")
            return self._new_bootstrap(tx, cluster, now=now, actor=actor)

    @staticmethod
    def _must_root(tx: Tx, root_id: str) -> Root:
        root = tx.get_root(root_id)
        if root is None:
            raise NotFound(f"no root {root_id}")
        return root

    @staticmethod
    def _must_cluster(tx: Tx, name: str, *, for_update: bool = False) -> Cluster:
        cluster = tx.get_cluster(name, for_update=for_update)
        if cluster is None:
            raise NotFound(f"no cluster named {name}")
        return cluster

    def get_cluster(self, name: str) -> tuple[Cluster, CertificateRecord | None]:
        with self.store.read() as tx:
            cluster = self._must_cluster(tx, name)
            latest = tx.latest_certificate(name)
        return cluster, latest

    def list_clusters(self) -> list[tuple[Cluster, CertificateRecord | None]]:
        with self.store.read() as tx:
            current = tx.current_certificates()
            return [(c, current.get(c.name)) for c in sorted(tx.list_clusters(), key=lambda c: c.name)]

    def intermediate_not_after(self) -> dict[str, datetime]:
        """notAfter of every active cluster's current intermediate (for the metrics)."""
        with self.store.read() as tx:
            current = tx.current_certificates()
            return {c.name: current[c.name].not_after for c in tx.list_clusters()
                    if c.status == ClusterStatus.ACTIVE and c.name in current}

    def rotate(self, name: str, *, actor: str) -> int:
        with self._write() as tx:
            cluster = self._must_cluster(tx, name, for_update=True)
            if cluster.status == ClusterStatus.REVOKED:
                raise Conflict(f"cluster {name} is revoked")
            if cluster.status == ClusterStatus.PENDING:
                raise Conflict(f"cluster {name} has never enrolled")
            if cluster.rotation_pending:
                return cluster.generation
            cluster.generation += 1
            cluster.rotation_pending = True
            tx.save_cluster(cluster)
            self._audit(tx, actor=actor, action="cluster.rotate", subject=name, generation=cluster.generation)
            self._changed(tx)
        self.notify_changed()
        return cluster.generation

    def revoke_cluster(self, name: str, *, reason: str, actor: str) -> Cluster:
        require_reason(reason)
        now = self.clock()
        with self._write() as tx:
            cluster = self._must_cluster(tx, name, for_update=True)
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
            self._audit(tx, actor=actor, action="cluster.revoke", subject=name, reason=reason,
                        serials=[r.serial for r in revoked])
            self._resign_crls_for(tx, {r.root_id for r in revoked}, now=now, actor=actor)
            self._changed(tx)
        self.notify_changed()
        return cluster

    def revoke_certificate(self, serial: str, *, reason: str, actor: str) -> CertificateRecord:
        require_serial(serial)
        require_reason(reason)
        now = self.clock()
        with self._write() as tx:
            rec = tx.get_certificate(serial)
            if rec is None:
                raise NotFound(f"no certificate with serial {serial}")
            if rec.revoked_at is not None:
                return rec
            tx.revoke_certificate(serial, at=now, reason=reason)
            rec.revoked_at, rec.revocation_reason = now, reason
            self._audit(tx, actor=actor, action="certificate.revoke", subject=serial, cluster=rec.cluster,
                        reason=reason)
            self._resign_crls_for(tx, {rec.root_id}, now=now, actor=actor)
            self._changed(tx)
        self.notify_changed()
        return rec

    # ------------------------------------------------------------------ issuance
    def enroll(self, *, cluster_name: str, bootstrap_token: str, csr_pem: str) -> Enrolled:
        tok = tk.parse_token(bootstrap_token)
        if tok is None or tok.kind != "boot":
            raise Unauthenticated("bootstrap token is not valid")
        require_dns_label(cluster_name, what="cluster")
        csr, csr_key = xp.parse_csr_and_key(csr_pem)  # bad CSR: 4xx before the token is touched
        now = self.clock()
        with self._write() as tx:
            rec = tx.get_bootstrap_token(tok.token_id, for_update=True)
            if rec is None or not tk.secret_matches(tok, rec.token_hash) or rec.cluster != cluster_name:
                raise Unauthenticated("bootstrap token is not valid for this cluster")
            if rec.used_at is not None:
                raise Unauthenticated("bootstrap token was already used: ask the operator for a new one")
            if rec.expires_at <= now:
                raise Unauthenticated("bootstrap token has expired: ask the operator for a new one")
            cluster = self._must_cluster(tx, cluster_name, for_update=True)
            if cluster.status == ClusterStatus.REVOKED:
                raise Unauthenticated("bootstrap token is not valid: the cluster is revoked")
            cluster.generation += 1
            cluster.rotation_pending = False
            cluster.status = ClusterStatus.ACTIVE
            agent = tk.new_token("agent")
            cluster.agent_token_id, cluster.agent_token_hash = agent.token_id, agent.token_hash
            roots = tx.list_roots()
            cert, root = self._sign_intermediate(cluster.name, cluster.trust_domain, csr, csr_key, roots, now=now)
            issued = self._record_issue(tx, cluster, cert, root, csr_key, roots=roots, crl_pem=None, now=now,
                                        actor=f"bootstrap:{tok.token_id}", action="enroll")
            tx.mark_bootstrap_used(tok.token_id, now)
            tx.save_cluster(cluster)
            self._changed(tx)
        self.notify_changed()
        return Enrolled(issued, agent.plaintext)

    @property
    def renewal_is_cpu_bound(self) -> bool:
        """Whether a renewal is pure CPU work here (embedded database, key in memory): an event loop
        then runs it inline, as a thread pool hand-off would cost more than it frees."""
        return self.store.embedded and self.keys.in_memory

    def renew(self, *, cluster_name: str, agent_token: str, csr_pem: str, proof_b64: str) -> Issued:
        """A new intermediate for an enrolled cluster, for its agent token and a proof of possession
        of the key of a valid intermediate of that cluster.

        Signing and path validation are drafted before the write transaction, from the cached roots,
        once the token is known good, so the single writer slot is held only for reads, one proof
        check and inserts. Inside, everything is decided on what the store holds now: the token, the
        cluster, the proving intermediate (newest first: an agent proves with the key it installed
        last) and the active root — a draft made under a root that is no longer active is signed
        again. Nothing is returned or stored that the transaction did not confirm."""
        tok = self._parse_agent_token(agent_token)
        known = self._agent_for_draft(tok, cluster_name)
        csr, csr_key = xp.parse_csr_and_key(csr_pem)
        proof = _decode_proof(proof_b64)
        csr_der = csr.public_bytes(serialization.Encoding.DER)
        now = self.clock()
        pki = self._pki
        draft = self._sign_intermediate(known.cluster, known.trust_domain, csr, csr_key, pki[1], now=now) \
            if pki is not None else None
        with self._write() as tx:
            locked = self._must_cluster(tx, cluster_name, for_update=True)
            self._require_agent(tok, locked)
            roots, crl_pem = self._pki_state(tx)
            self._check_proof(tx, locked, csr_der, proof, now=now, roots=roots)
            if draft is None or not self._draft_holds(draft, known, locked, roots):
                draft = self._sign_intermediate(locked.name, locked.trust_domain, csr, csr_key, roots, now=now)
            cert, root = draft
            ended = locked.rotation_pending
            locked.rotation_pending = False
            issued = self._record_issue(tx, locked, cert, root, csr_key, roots=roots, crl_pem=crl_pem, now=now,
                                        actor=f"agent:{locked.name}", action="renew")
            if ended:
                tx.save_cluster(locked)
                self._changed(tx)
        self._remember_key(issued.serial, csr_key)  # the intermediate's key: the agent proves with it next time
        if ended:
            self.notify_changed()
        return issued

    def _agent_for_draft(self, tok: tk.PresentedToken, cluster_name: str) -> _KnownAgent:
        """Authenticate before any signing happens: from the token last confirmed by the store,
        else from the store. Only a pre-filter: the write transaction decides."""
        known = self._known_agents.get(tok.token_id)
        if known is None:
            cluster = self._authenticate_agent(tok, cluster_name)
            known = _KnownAgent(cluster.name, cluster.trust_domain, cluster.agent_token_hash or "")
            self._known_agents[tok.token_id] = known
        elif not tk.secret_matches(tok, known.token_hash):
            raise Unauthenticated("agent token is not valid")
        if known.cluster != cluster_name:
            raise Forbidden("this agent token belongs to another cluster")
        return known

    def _require_agent(self, tok: tk.PresentedToken, cluster: Cluster) -> None:
        """The authoritative check, on the row the write transaction holds."""
        if cluster.agent_token_id != tok.token_id or cluster.status != ClusterStatus.ACTIVE or \
                not tk.secret_matches(tok, cluster.agent_token_hash):
            self._known_agents.pop(tok.token_id, None)
            raise Unauthenticated("agent token is no longer valid")

    def _draft_holds(self, draft: tuple[x509.Certificate, Root], known: _KnownAgent, cluster: Cluster,
                     roots: Sequence[Root]) -> bool:
        """Whether the certificate signed ahead is the one the transaction would sign: same active
        root (certificate and chain), same trust domain."""
        active, signed_under = self._active_root(roots), draft[1]
        return (active.id == signed_under.id and active.cert_pem == signed_under.cert_pem
                and active.chain_pem == signed_under.chain_pem and cluster.trust_domain == known.trust_domain)

    @staticmethod
    def _may_prove(rec: CertificateRecord, cluster: Cluster, roots: Sequence[Root], *, now: datetime) -> bool:
        retired = {r.id for r in roots if r.status == RootStatus.RETIRED}
        return (rec.cluster == cluster.name and rec.revoked_at is None and rec.not_after > now
                and rec.root_id not in retired)

    def _public_key(self, rec: CertificateRecord) -> Any:
        """The certificate's public key, parsed once per process (bounded cache)."""
        key = self._keys.get(rec.serial)
        if key is None:
            key = x509.load_pem_x509_certificate(rec.cert_pem.encode()).public_key()
            self._remember_key(rec.serial, key)
        return key

    def _remember_key(self, serial: str, key: Any) -> None:
        if len(self._keys) >= _KEY_CACHE:
            self._keys.clear()
        self._keys[serial] = key

    def _pki_state(self, tx: Tx) -> tuple[list[Root], str]:
        """The roots and the trust bundle's PEM CRLs, read once per fleet revision: every change to
        either bumps the revision in the same transaction, so a matching revision means unchanged."""
        revision = tx.get_revision()
        cached = self._pki
        if cached is not None and cached[0] == revision:
            return cached[1], cached[2]
        roots = tx.list_roots()
        crl_pem = self._crl_pem_from(tx, roots)
        self._pki = (revision, roots, crl_pem)
        return roots, crl_pem

    def _check_proof(self, tx: Tx, cluster: Cluster, csr_der: bytes, proof: bytes, *, now: datetime,
                     roots: Sequence[Root]) -> None:
        """BadProof unless the key of a valid intermediate of the cluster made ``proof``, trying the
        newest first (the first read fetches only the newest: it is almost always the one)."""
        for rec in tx.usable_certificates(cluster.name, now=now, page=1):
            if self._may_prove(rec, cluster, roots, now=now) and \
                    xp.verify_proof(self._public_key(rec), csr_der, proof):
                return
        raise BadProof("proof does not verify with the key of any valid intermediate of this cluster")

    def _sign_intermediate(self, name: str, trust_domain: str, csr: x509.CertificateSigningRequest,
                           csr_key: Any, roots: Sequence[Root], *, now: datetime) -> tuple[x509.Certificate, Root]:
        """Sign and path-validate an intermediate under the active root (nothing stored)."""
        root = self._active_root(roots)
        issuer = self._cert(root.cert_pem)
        cert = xp.issue_intermediate(
            csr=csr,
            issuer=issuer,
            signer=self._signer(root),
            subject=xp.intermediate_subject(name, trust_domain, self.policy.org),
            trust_domain=trust_domain,
            now=now,
            validity=self.policy.intermediate_validity,
            csr_key=csr_key,
        )
        chain_above = xp.load_pem_certificates(root.chain_pem) if root.chain_pem else []
        self._verifier([root]).verify(cert, intermediates=[issuer, *chain_above], now=now)
        return cert, root

    def _record_issue(
        self, tx: Tx, cluster: Cluster, cert: x509.Certificate, root: Root, public_key: Any, *,
        roots: Sequence[Root], crl_pem: str | None, now: datetime, actor: str, action: str,
    ) -> Issued:
        """Store and audit a signed intermediate (``public_key``: its key, as the CSR gave it); the
        bundle the agent installs."""
        pem = xp.cert_pem(cert)
        rec = CertificateRecord(
            serial=xp.serial_hex(cert), cluster=cluster.name, root_id=root.id, generation=cluster.generation,
            cert_pem=pem, public_key_fp=xp.public_key_fingerprint(public_key),
            not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, issued_at=now,
        )
        tx.add_certificate(rec)
        self._audit(tx, actor=actor, action=f"intermediate.{action}", subject=cluster.name, serial=rec.serial,
                    generation=cluster.generation, root=root.id, not_after=rec.not_after.isoformat())
        bundle = Bundle(
            ca_cert=pem,
            cert_chain=pem + root.cert_pem + root.chain_pem,
            root_cert=self.trust_bundle_from(roots),
            crl=self._crl_pem_from(tx, roots) if crl_pem is None else crl_pem,
        )
        return Issued(cluster.name, cluster.generation, rec.serial, rec.not_after, bundle)

    def issue_server_certificate(
        self, public_key: Any, *, dns_names: Sequence[str], ip_addresses: Sequence[str]
    ) -> tuple[x509.Certificate, Root]:
        now = self.clock()
        with self.store.read() as tx:
            root = self._active_root(tx.list_roots())
        cert = xp.issue_server_cert(
            issuer=self._cert(root.cert_pem), signer=self._signer(root), public_key=public_key,
            dns_names=list(dns_names), ip_addresses=[ipaddress.ip_address(i) for i in ip_addresses], now=now,
        )
        return cert, root

    # ------------------------------------------------------------------ CRLs
    def _sign_crl(self, tx: Tx, root: Root, *, now: datetime, actor: str) -> CRLRecord:
        previous = [c for c in tx.list_crls() if c.root_id == root.id]
        number = max((c.number for c in previous), default=0) + 1
        revoked = [
            xp.RevokedEntry(serial=int(r.serial, 16), revoked_at=r.revoked_at or now,
                            reason=r.revocation_reason)
            for r in tx.revoked_certificates(root.id, not_expired_at=now)
        ]
        crl = xp.build_crl(
            issuer=self._cert(root.cert_pem), signer=self._signer(root), revoked=revoked, now=now,
            next_update=self.policy.crl_validity, crl_number=number,
        )
        rec = CRLRecord(
            root_id=root.id, number=number, der=crl.public_bytes(serialization.Encoding.DER),
            pem=crl.public_bytes(serialization.Encoding.PEM).decode(), this_update=now,
            next_update=now + self.policy.crl_validity,
        )
        tx.put_crl(rec)
        self._audit(tx, actor=actor, action="crl.sign", subject=root.id, number=number, entries=len(revoked))
        return rec

    def _resign_crls_for(self, tx: Tx, root_ids: set[str], *, now: datetime, actor: str) -> None:
        for root in tx.list_roots():
            if root.id in root_ids and root.status != RootStatus.RETIRED:
                self._sign_crl(tx, root, now=now, actor=actor)

    def refresh_crls(self, *, actor: str = "scheduler") -> int:
        """Re-sign every CRL past half of its validity. Safe to call from every replica."""
        now = self.clock()
        with self._write() as tx:
            crls = {c.root_id: c for c in tx.list_crls()}
            due = [
                r for r in self._bundle_roots(tx.list_roots())
                if r.id not in crls or crls[r.id].next_update - now < self.policy.crl_validity / 2
            ]
            for root in due:
                self._sign_crl(tx, root, now=now, actor=actor)
            if due:
                self._changed(tx)
        if due:
            self.notify_changed()
        return len(due)

    def crl_der(self) -> bytes:
        with self.store.read() as tx:
            roots = tx.list_roots()
            active = self._active_root(roots)
            for c in tx.list_crls():
                if c.root_id == active.id:
                    return c.der
        raise Unavailable("no CRL has been signed yet")

    # ------------------------------------------------------------------ fleet exchange
    def snapshot(self) -> FleetSnapshot:
        with self.store.read() as tx:
            revision = tx.get_revision()
            snap = self._snapshot
            if snap is not None and snap.revision == revision:
                return snap
        head = self.store.audit_head()  # read before the data, so this watermark is never ahead of it
        with self.store.read() as tx:
            revision = tx.get_revision()
            prev = self._snapshot
            if prev is not None and prev.revision == revision:
                return prev
            delta = self._snapshot_delta(tx, prev, revision) if prev is not None and prev.audit_id >= 0 else None
            if delta is not None:
                snap = delta
            else:
                roots = tx.list_roots()
                snap = FleetSnapshot(
                    revision=revision,
                    trust_bundle=self.trust_bundle_from(roots),
                    crl_pem=self._crl_pem_from(tx, roots),
                    clusters={c.name: c for c in tx.list_clusters()},
                    audit_id=head[0] if head else -1,
                )
        build_fleet_index(snap)
        with self._lock:
            if self._snapshot is None or self._snapshot.revision <= snap.revision:
                self._snapshot = snap
        return snap

    @staticmethod
    def _snapshot_delta(tx: Tx, prev: FleetSnapshot, revision: int) -> FleetSnapshot | None:
        """``prev`` with the rows of the clusters named by the audit entries since it re-read, when
        every change since touched only its subject cluster's row (renewals, rotations,
        enrollments, exports); None when anything else happened (roots, CRLs, revocations …) or
        too much did: then the caller reads the whole fleet. Keeps unchanged Cluster objects."""
        entries = tx.list_audit(after=prev.audit_id, limit=_MAX_DELTA + 1)
        if not entries or len(entries) > _MAX_DELTA or any(e.action not in _CLUSTER_ACTIONS for e in entries):
            return None
        clusters = dict(prev.clusters)
        for name in {e.subject for e in entries}:
            cluster = tx.get_cluster(name)
            if cluster is None:
                clusters.pop(name, None)
            else:
                clusters[name] = cluster
        return FleetSnapshot(revision=revision, trust_bundle=prev.trust_bundle, crl_pem=prev.crl_pem,
                             clusters=clusters, audit_id=entries[-1].id)

    def desired(self, cluster_name: str) -> dict[str, Any]:
        snap = self.snapshot()
        cluster = snap.clusters.get(cluster_name)
        if cluster is None:
            raise NotFound(f"no cluster named {cluster_name}")
        return desired_state(snap, cluster)

    def imports(self, cluster_name: str) -> list[dict[str, Any]]:
        return self.desired(cluster_name)["imports"]  # type: ignore[no-any-return]

    def put_exports(self, cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        for role, ident in sorted(body.get("identities", {}).items()):
            if not identity_in_trust_domain(ident, cluster.trust_domain):
                raise InvalidInput(
                    f"identities.{role} must be a SPIFFE ID in the cluster's trust domain "
                    f"(spiffe://{cluster.trust_domain}/...)"
                )
        names = [s["name"] for s in body.get("services", [])]
        if len(names) != len(set(names)):
            raise InvalidInput("services: each name may appear once")
        with self._write() as tx:
            locked = self._must_cluster(tx, cluster.name, for_update=True)
            if _canon(locked.exports) == _canon(body) and locked.gateway == body.get("gateway"):
                return body
            locked.exports = body
            locked.gateway = body.get("gateway")
            tx.save_cluster(locked)
            self._audit(tx, actor=f"agent:{cluster.name}", action="exports.update", subject=cluster.name,
                        services=names, gateway=body.get("gateway"))
            self._changed(tx)
        self.notify_changed()
        return body

    def put_status(self, cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        with self._write() as tx:
            locked = self._must_cluster(tx, cluster.name, for_update=True)
            locked.agent_status = body
            tx.save_cluster(locked)
        return body

    # ------------------------------------------------------------------ audit
    def audit(self, *, after: int, limit: int) -> list[Any]:
        if limit < 1 or limit > 1000:
            raise InvalidInput("limit must be between 1 and 1000")
        if after < 0:
            raise InvalidInput("after must be 0 or more")
        with self.store.read() as tx:
            return tx.list_audit(after=after, limit=limit)
