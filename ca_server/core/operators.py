"""Operator tokens of the admin API and their roles (issue 14).

``admin`` may do everything the admin API offers; ``viewer`` only reads (its GET endpoints, and the
operator endpoints /metrics and /openapi.json). A token has a name (a DNS label, unique among the
live tokens), an optional expiry, and is revoked in place so the audit keeps naming it. Only the
SHA-256 of a token's secret is stored (core/tokens.py); the plaintext leaves ``create`` once.
A request outside its role's rights is refused (Forbidden) and audited as ``authz.denied``.
The audit's actor of an operator is ``<role>:<name>/<token id>``: never the secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from ca_server.core import tokens as tk
from ca_server.core.context import Context
from ca_server.core.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from ca_server.core.models import AdminToken
from ca_server.core.ports import Tx
from ca_server.core.validation import require_dns_label

ADMIN = "admin"
VIEWER = "viewer"
ROLES = (ADMIN, VIEWER)
# what each role may do; a role's rights include those of the roles after it
RIGHTS: dict[str, frozenset[str]] = {ADMIN: frozenset({ADMIN, VIEWER}), VIEWER: frozenset({VIEWER})}
INITIAL_NAME = "initial"
MAX_LIFETIME = timedelta(days=3650)


@dataclass(frozen=True)
class Operator:
    """An authenticated operator token."""

    token_id: str
    name: str
    role: str

    @property
    def actor(self) -> str:
        return f"{self.role}:{self.name}/{self.token_id}"


TokenState = Literal["live", "expired", "revoked"]


def state_of(rec: AdminToken, now: datetime) -> TokenState:
    if rec.revoked_at is not None:
        return "revoked"
    return "live" if rec.expires_at is None or rec.expires_at > now else "expired"


def is_live(rec: AdminToken, now: datetime) -> bool:
    return state_of(rec, now) == "live"


class Operators:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def authenticate(self, presented: str) -> Operator:
        """The operator behind ``presented``; Unauthenticated when unknown, wrong, revoked or expired."""
        tok = tk.parse_token(presented)
        if tok is None or tok.kind != "admin":
            raise Unauthenticated("admin token required")
        with self.ctx.store.read() as tx:
            rec = tx.get_admin_token(tok.token_id)
        if rec is None or not tk.secret_matches(tok, rec.token_hash):
            raise Unauthenticated("admin token is not valid")
        if rec.revoked_at is not None:
            raise Unauthenticated(f"admin token {rec.name!r} was revoked")
        if rec.expires_at is not None and rec.expires_at <= self.ctx.clock():
            raise Unauthenticated(f"admin token {rec.name!r} has expired")
        return Operator(rec.token_id, rec.name, rec.role)

    def authorize(self, presented: str, *, role: str, what: str) -> str:
        """The actor of ``presented`` if its role has ``role``'s rights; else Forbidden, audited
        (``what``: the refused request, e.g. ``POST /v1/clusters``)."""
        op = self.authenticate(presented)
        if role in RIGHTS[op.role]:
            return op.actor
        with self.ctx.write() as tx:
            self.ctx.audit(tx, actor=op.actor, action="authz.denied", subject=what, role=op.role, needs=role)
        raise Forbidden(f"a {op.role} token may not do this: {what} needs the {role} role")

    def create(self, *, name: str, role: str, lifetime: timedelta | None, actor: str) -> tuple[AdminToken, str]:
        """A new token; returns its record and its plaintext (shown once, stored only hashed)."""
        require_dns_label(name, what="token name")
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if lifetime is not None and not timedelta(minutes=1) <= lifetime <= MAX_LIFETIME:
            raise InvalidInput("expires_in_s must be between 60 seconds and 10 years (or null: never)")
        now = self.ctx.clock()
        with self.ctx.write() as tx:
            if any(r.name == name and is_live(r, now) for r in tx.list_admin_tokens(for_update=True)):
                raise Conflict(f"a live token is already named {name!r}; revoke it or choose another name")
            expires = now + lifetime if lifetime is not None else None
            issued = add_token(self.ctx, tx, name=name, role=role, expires_at=expires, now=now, actor=actor)
            rec = tx.get_admin_token(issued.token_id)
        assert rec is not None
        return rec, issued.plaintext

    def list(self) -> list[AdminToken]:
        with self.ctx.store.read() as tx:
            return tx.list_admin_tokens()

    def revoke(self, ref: str, *, actor: str) -> AdminToken:
        """Revoke the token whose id or live name is ``ref``; refused for the last live admin token."""
        now = self.ctx.clock()
        with self.ctx.write() as tx:
            # locked: two revocations at once must not leave no admin token between them
            recs = tx.list_admin_tokens(for_update=True)
            rec = _find(recs, ref, now)
            if rec.revoked_at is not None:
                raise Conflict(f"token {rec.name!r} ({rec.token_id}) is already revoked")
            admins = [r for r in recs if r.role == ADMIN and is_live(r, now)]
            if admins == [rec]:
                raise Conflict(
                    f"token {rec.name!r} is the last admin token: create another admin token "
                    "(meshbridge-ca token create NAME --role admin) before revoking it"
                )
            tx.revoke_admin_token(rec.token_id, now)
            self.ctx.audit(tx, actor=actor, action="admin_token.revoke", subject=rec.token_id, name=rec.name)
            out = tx.get_admin_token(rec.token_id)
        assert out is not None
        return out


def first_admin_token(ctx: Context, tx: Tx, *, now: datetime, actor: str) -> tk.IssuedToken:
    """The admin token ``init`` writes to D/admin-token (named ``initial``, never expires)."""
    return add_token(ctx, tx, name=INITIAL_NAME, role=ADMIN, expires_at=None, now=now, actor=actor)


def add_token(
    ctx: Context, tx: Tx, *, name: str, role: str, expires_at: datetime | None, now: datetime, actor: str
) -> tk.IssuedToken:
    """Store a new token's hash in ``tx``, audited; the plaintext is only in the returned value."""
    issued = tk.new_token("admin")
    tx.add_admin_token(
        AdminToken(issued.token_id, issued.token_hash, now, f"{role} token {name}", name, role, expires_at)
    )
    expires = expires_at.isoformat() if expires_at else None
    ctx.audit(
        tx, actor=actor, action="admin_token.create", subject=issued.token_id, name=name, role=role, expires=expires
    )
    return issued


def _find(recs: list[AdminToken], ref: str, now: datetime) -> AdminToken:
    """By id; else by name, the live token of that name first."""
    for r in recs:
        if r.token_id == ref:
            return r
    named = sorted((r for r in recs if r.name == ref), key=lambda r: (is_live(r, now), r.created_at), reverse=True)
    if not named:
        raise NotFound(f"no admin token has the id or name {ref!r} (meshbridge-ca token list shows them)")
    return named[0]
