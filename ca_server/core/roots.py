"""Root phases: the first root (created or imported), new roots, activation, retirement."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime

from cryptography import x509

from ca_server.core import gates
from ca_server.core import tokens as tk
from ca_server.core import x509profiles as xp
from ca_server.core.context import Context, log
from ca_server.core.crls import Crls
from ca_server.core.errors import Conflict, InvalidInput, NotFound
from ca_server.core.importca import check_importable_ca
from ca_server.core.keytypes import KeyType
from ca_server.core.models import Root, RootStatus
from ca_server.core.operators import first_admin_token
from ca_server.core.ports import Tx
from ca_server.core.rootkeys import RootKeys, active_root


def must_root(tx: Tx, root_id: str) -> Root:
    root = tx.get_root(root_id)
    if root is None:
        raise NotFound(f"no root {root_id}")
    return root


class Roots:
    def __init__(self, ctx: Context, rootkeys: RootKeys, crls: Crls) -> None:
        self.ctx = ctx
        self.rootkeys = rootkeys
        self.crls = crls

    def init_root(self, *, key_type: KeyType, actor: str = "init") -> tuple[Root, str]:
        """Create the first root and the first admin token. Returns (root, admin token)."""
        now = self.ctx.clock()
        with self._new_key_discarded_on_failure() as created, self.ctx.write() as tx:
            if tx.list_roots():
                raise Conflict("this CA already has a root")
            root = self._generate_root(
                tx, key_type=key_type, status=RootStatus.ACTIVE, now=now, actor=actor, created=created
            )
            admin = first_admin_token(self.ctx, tx, now=now, actor=actor)
            self.crls.sign(tx, root, now=now, actor=actor)
            self.ctx.changed(tx)
        return root, admin.plaintext

    def import_root(self, *, cert_pem: str, chain_pem: str, key_ref: str, actor: str = "init") -> tuple[Root, str]:
        """Adopt an existing root, or an issuing CA below an offline root (chain checked)."""
        certs = xp.load_pem_certificates(cert_pem)  # InvalidInput for anything but PEM certificates
        if len(certs) != 1:
            raise InvalidInput("give exactly one CA certificate to import; the ones above it go into the chain")
        cert = certs[0]
        chain = xp.load_pem_certificates(chain_pem) if chain_pem.strip() else []
        check_importable_ca(cert, chain, self.ctx.keys.load(key_ref), now=self.ctx.clock())
        now = self.ctx.clock()
        with self.ctx.write() as tx:
            if tx.list_roots():
                raise Conflict("this CA already has a root")
            root = _imported_root(cert, chain, key_ref, now=now)
            tx.add_root(root)
            self.ctx.audit(tx, actor=actor, action="root.import", subject=root.id, self_signed=not chain)
            admin = first_admin_token(self.ctx, tx, now=now, actor=actor)
            self.crls.sign(tx, root, now=now, actor=actor)
            self.ctx.changed(tx)
        return root, admin.plaintext

    @contextlib.contextmanager
    def _new_key_discarded_on_failure(self) -> Iterator[list[tuple[str, str]]]:
        """For a transaction that generates root keys: each (key_ref, root id) appended to the
        yielded list is discarded from the key backend if the transaction fails, so a refused or
        failed change leaves no orphan key behind (best effort: a failure to discard is logged)."""
        created: list[tuple[str, str]] = []
        keys = self.ctx.keys
        try:
            yield created
        except BaseException:
            for key_ref, root_id in created:
                self.rootkeys.signers.pop(root_id, None)
                try:
                    keys.discard(key_ref)
                except Exception as exc:  # the original failure is what the caller must see
                    log.warning(
                        "could not discard the key of a root that was not created: %s",
                        type(exc).__name__,
                        extra={"key": keys.describe(key_ref)},
                    )
            raise

    def _generate_root(
        self,
        tx: Tx,
        *,
        key_type: KeyType,
        status: RootStatus,
        now: datetime,
        actor: str,
        created: list[tuple[str, str]],
        endorser: Root | None = None,
    ) -> Root:
        """A new self-signed root, stored; ``endorser`` (the active root) cross-signs it."""
        suffix = tk.new_token("admin").token_id[:6]
        label = f"root-{now.strftime('%Y%m%d%H%M%S')}-{suffix}"
        key_ref, signer = self.ctx.keys.generate(key_type, label)
        created.append((key_ref, ""))
        # every root gets its own subject: two roots in one trust bundle must not share a name
        subject = xp.default_root_subject(self.ctx.policy.org, label=f"{now.strftime('%Y-%m-%d')} {suffix}")
        cert = xp.build_root(signer, subject=subject, now=now, validity=self.ctx.policy.root_validity)
        pem = xp.cert_pem(cert)
        endorsement = self._endorsement(cert, endorser, now=now) if endorser is not None else ""
        root = Root(
            id=xp.serial_hex(cert)[:16],
            status=status,
            cert_pem=pem,
            chain_pem="",
            key_ref=key_ref,
            not_after=cert.not_valid_after_utc,
            created_at=now,
            anchor_pem=pem,
            endorsement_pem=endorsement,
        )
        created[-1] = (key_ref, root.id)
        tx.add_root(root)
        self.rootkeys.signers[root.id] = signer
        self.ctx.audit(
            tx,
            actor=actor,
            action="root.create",
            subject=root.id,
            key_type=key_type.value,
            status=status.value,
            key=self.ctx.keys.describe(key_ref),
            endorsed_by=endorser.id if endorser is not None else None,
        )
        return root

    def _endorsement(self, cert: x509.Certificate, endorser: Root, *, now: datetime) -> str:
        """``cert`` cross-signed by ``endorser``, followed by the endorser's own certificate when that
        sits below an offline root (so the endorsement chains to the anchor agents hold)."""
        cross = xp.build_endorsement(
            root=cert, issuer=self.rootkeys.cert(endorser.cert_pem), signer=self.rootkeys.signer(endorser), now=now
        )
        return xp.cert_pem(cross) + (endorser.cert_pem if endorser.chain_pem else "")

    def list_roots(self) -> list[Root]:
        with self.ctx.store.read() as tx:
            return sorted(tx.list_roots(), key=lambda r: (r.created_at, r.id))

    def check_signing_key(self) -> None:
        """Raise Unavailable unless the active root's key can sign now (for /readyz)."""
        with self.ctx.store.read() as tx:
            root = active_root(tx.list_roots())
        self.rootkeys.check(root)

    def add_root(self, *, key_type: KeyType | None, actor: str) -> Root:
        now = self.ctx.clock()
        with self._new_key_discarded_on_failure() as created, self.ctx.write() as tx:
            root = self._generate_root(
                tx,
                key_type=key_type or self.ctx.policy.root_key_type,
                status=RootStatus.TRUSTED,
                now=now,
                actor=actor,
                created=created,
                endorser=active_root(tx.list_roots()),
            )
            self.crls.sign(tx, root, now=now, actor=actor)
            self.ctx.changed(tx)
        return root

    def activate_root(self, root_id: str, *, actor: str, force: bool = False) -> Root:
        """Phase 3. Refused (FleetNotReady) until every active cluster's istiod has served ``root``
        for the workload-certificate lifetime plus the margin (``core.gates``), unless ``force``:
        then the lagging clusters are audited."""
        now = self.ctx.clock()
        with self.ctx.write() as tx:
            root = must_root(tx, root_id)
            if root.status == RootStatus.RETIRED:
                raise Conflict("a retired root cannot be activated")
            if root.status == RootStatus.ACTIVE:
                return root
            gate = gates.activation_gate(tx, root, now=now, lifetime=self.ctx.policy.workload_cert_lifetime)
            forced = gates.passed(gate, force=force)
            for other in tx.list_roots():
                if other.status == RootStatus.ACTIVE:
                    tx.set_root_status(other.id, RootStatus.TRUSTED.value)
            tx.set_root_status(root.id, RootStatus.ACTIVE.value)
            root.status = RootStatus.ACTIVE
            moved = rotate_clusters(tx, off_root=root.id)
            self.ctx.audit(tx, actor=actor, action="root.activate", subject=root.id, rotated=moved, **forced)
            self.ctx.changed(tx)
        return root

    def retire_root(self, root_id: str, *, actor: str, force: bool = False) -> Root:
        """Phase 4. Refused while an active cluster still holds an intermediate under ``root``
        (never overridable), and (FleetNotReady) until every active cluster's istiod has signed
        under another root for the workload-certificate lifetime plus the margin (``core.gates``),
        unless ``force``: then the lagging clusters are audited."""
        now = self.ctx.clock()
        with self.ctx.write() as tx:
            root = must_root(tx, root_id)
            if root.status == RootStatus.RETIRED:
                return root
            if root.status == RootStatus.ACTIVE:
                raise Conflict("the active root cannot be retired: activate another root first")
            gates.refuse_holders(gates.holders(tx, root))
            gate = gates.retirement_gate(tx, root, now=now, lifetime=self.ctx.policy.workload_cert_lifetime)
            forced = gates.passed(gate, force=force)
            tx.set_root_status(root.id, RootStatus.RETIRED.value)
            root.status = RootStatus.RETIRED
            self.ctx.audit(tx, actor=actor, action="root.retire", subject=root.id, **forced)
            self.ctx.changed(tx)
        return root


def _imported_root(cert: x509.Certificate, chain: list[x509.Certificate], key_ref: str, *, now: datetime) -> Root:
    """The Root record of an imported CA certificate; its anchor is the top of ``chain`` (or itself)."""
    anchor = chain[-1] if chain else cert
    return Root(
        id=xp.serial_hex(cert)[:16],
        status=RootStatus.ACTIVE,
        cert_pem=xp.cert_pem(cert),
        chain_pem="".join(xp.cert_pem(c) for c in chain),
        key_ref=key_ref,
        not_after=cert.not_valid_after_utc,
        created_at=now,
        anchor_pem=xp.cert_pem(anchor),
    )


def rotate_clusters(tx: Tx, *, off_root: str | None = None) -> list[str]:
    """Mark every active cluster whose current intermediate is under another root than
    ``off_root`` (every active cluster holding one, when None) as due for rotation: one generation
    up, unless already pending. One set-based update in the store, whatever the fleet size (a
    loop of per-cluster locked reads and writes took 17.5 s at 10,000 clusters); returns their
    names, sorted."""
    return tx.mark_rotation(off_root=off_root)
