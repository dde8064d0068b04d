"""Checks on names and identities that every boundary shares."""

from __future__ import annotations

from ca_server.core.errors import InvalidInput
from meshbridge_wire.names import identity_in_trust_domain, is_dns_label, is_dns_name, is_serial

__all__ = [
    "REVOCATION_REASONS",
    "identity_in_trust_domain",
    "require_dns_label",
    "require_reason",
    "require_serial",
    "require_trust_domain",
]

REVOCATION_REASONS = (
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "certificateHold",
    "privilegeWithdrawn",
    "aACompromise",
)


def require_dns_label(name: str, *, what: str = "name") -> str:
    if not is_dns_label(name):
        raise InvalidInput(
            f"{what} must be a DNS label: lowercase letters, digits and '-', 1-63 characters, "
            "starting and ending with a letter or digit"
        )
    return name


def require_trust_domain(td: str) -> str:
    if not is_dns_name(td):
        raise InvalidInput("trust_domain must be a DNS name such as 'a.mesh' (lowercase, dot-separated labels)")
    return td


def require_serial(serial: str) -> str:
    if not is_serial(serial):
        raise InvalidInput("serial must be lowercase hex without separators")
    return serial


def require_reason(reason: str) -> str:
    if reason not in REVOCATION_REASONS:
        raise InvalidInput(f"reason must be one of: {', '.join(REVOCATION_REASONS)}")
    return reason
