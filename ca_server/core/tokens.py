"""Bearer tokens: high entropy, stored only as hashes, compared in constant time.

A token reads ``mb<kind>.<token_id>.<secret>``. ``token_id`` is a public lookup key; only
SHA-256(secret) is stored. 32 random bytes of secret make a slow KDF unnecessary.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KINDS = ("admin", "agent", "boot")


@dataclass(frozen=True)
class IssuedToken:
    token_id: str
    token_hash: str
    plaintext: str

    def __repr__(self) -> str:  # never show the secret
        return f"IssuedToken(token_id={self.token_id!r})"


@dataclass(frozen=True)
class PresentedToken:
    kind: str
    token_id: str
    secret: str

    def __repr__(self) -> str:
        return f"PresentedToken(kind={self.kind!r}, token_id={self.token_id!r})"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(kind: str) -> IssuedToken:
    if kind not in KINDS:
        raise ValueError(f"unknown token kind {kind!r}")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return IssuedToken(token_id=token_id, token_hash=hash_secret(secret), plaintext=f"mb{kind}.{token_id}.{secret}")


def parse_token(text: str) -> PresentedToken | None:
    """Split a presented token; None when it does not have our shape (never echo it back)."""
    parts = text.strip().split(".")
    if len(parts) != 3 or not parts[0].startswith("mb"):
        return None
    kind = parts[0][2:]
    if kind not in KINDS or len(parts[1]) != 16 or not parts[2] or len(parts[2]) > 128:
        return None
    return PresentedToken(kind=kind, token_id=parts[1], secret=parts[2])


def secret_matches(presented: PresentedToken, stored_hash: str | None) -> bool:
    if stored_hash is None:
        # still spend the same work so a missing record is not faster than a wrong secret
        hmac.compare_digest(hash_secret(presented.secret), "0" * 64)
        return False
    return hmac.compare_digest(hash_secret(presented.secret), stored_hash)
