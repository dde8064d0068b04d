"""Checks on names and identities that every boundary shares."""

from __future__ import annotations

import re

from ca_server.core.errors import InvalidInput

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$")
_SERIAL = re.compile(r"^[0-9a-f]{1,64}$")

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


def is_dns_label(name: str) -> bool:
    return bool(_DNS_LABEL.match(name))


def require_dns_label(name: str, *, what: str = "name") -> str:
    if not is_dns_label(name):
        raise InvalidInput(
            f"{what} must be a DNS label: lowercase letters, digits and '-', 1-63 characters, "
            "starting and ending with a letter or digit"
        )
    return name


def require_trust_domain(td: str) -> str:
    if not _DOMAIN.match(td):
        raise InvalidInput("trust_domain must be a DNS name such as 'a.mesh' (lowercase, dot-separated labels)")
    return td


def require_serial(serial: str) -> str:
    if not _SERIAL.match(serial):
        raise InvalidInput("serial must be lowercase hex without separators")
    return serial


def require_reason(reason: str) -> str:
    if reason not in REVOCATION_REASONS:
        raise InvalidInput(f"reason must be one of: {', '.join(REVOCATION_REASONS)}")
    return reason


def identity_in_trust_domain(identity: str, trust_domain: str) -> bool:
    prefix = f"spiffe://{trust_domain}/"
    return identity.startswith(prefix) and len(identity) > len(prefix)
