"""Name and identity checks every boundary shares: pure predicates on strings, nothing raised.

Each side turns a `False` into its own error (the CA core's `InvalidInput`, the agent's
`ConfigError`, a pydantic `ValueError`), so the rule is written once and the message where it is used.
Every check is a full match: a trailing newline is not a valid name.
"""

from __future__ import annotations

import re
from functools import lru_cache

# RFC 1123 label (a Kubernetes namespace or a cluster name) and subdomain (a trust domain).
DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_NAME = rf"{DNS_LABEL}(\.{DNS_LABEL})*"
# RFC 1035 label: a Kubernetes Service name.
SERVICE_LABEL = r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"
# An exported name: `<service>.<namespace>`.
SERVICE_NAME = rf"{SERVICE_LABEL}\.{DNS_LABEL}"
SERIAL = r"[0-9a-f]{1,64}"

_DNS_LABEL = re.compile(DNS_LABEL)
_DNS_NAME = re.compile(DNS_NAME)
_SERVICE_LABEL = re.compile(SERVICE_LABEL)
_SERIAL = re.compile(SERIAL)
_SPIFFE_PATH = re.compile(r"\S+")


def is_dns_label(value: str) -> bool:
    """RFC 1123 label: what Kubernetes accepts as a namespace or meshbridge as a cluster name."""
    return _DNS_LABEL.fullmatch(value) is not None


def is_dns_name(value: str) -> bool:
    """Lowercase DNS name (RFC 1123 subdomain), at most 253 characters, no trailing dot."""
    return len(value) <= 253 and _DNS_NAME.fullmatch(value) is not None


def is_service_label(value: str) -> bool:
    """RFC 1035 label: a Kubernetes Service name (starts with a letter)."""
    return _SERVICE_LABEL.fullmatch(value) is not None


def is_service_name(value: str) -> bool:
    """`<service>.<namespace>`: the name under which a service is exported."""
    service, dot, namespace = value.partition(".")
    return bool(dot) and is_service_label(service) and is_dns_label(namespace)


def is_serial(value: str) -> bool:
    """A certificate serial as the API spells it: lowercase hex without separators."""
    return _SERIAL.fullmatch(value) is not None


def spiffe_trust_domain(uri: str) -> str | None:
    """The trust domain of a well-formed `spiffe://<td>/<path>` URI, else None."""
    if not uri.startswith("spiffe://"):
        return None
    trust_domain, slash, path = uri[len("spiffe://") :].partition("/")
    if not slash or _SPIFFE_PATH.fullmatch(path) is None or not is_dns_name(trust_domain):
        return None
    return trust_domain


# Thousands of imports share a few dozen gateways and identities: parse each distinct one once.
@lru_cache(maxsize=4096)
def workload_identity(uri: str) -> tuple[str, str, str] | None:
    """(trust domain, namespace, service account) of exactly `spiffe://<td>/ns/<ns>/sa/<sa>`, else None.

    The form Istio gives every workload (istio `pkg/spiffe/spiffe.go` `Identity.String`); a Kubernetes
    namespace is a DNS label and a service account name a DNS subdomain (apimachinery
    `pkg/api/validation/generic.go`: `ValidateServiceAccountName = NameIsDNSSubdomain`). No wildcard,
    no extra path segment.
    """
    trust_domain = spiffe_trust_domain(uri)
    if trust_domain is None:
        return None
    parts = uri[len("spiffe://") + len(trust_domain) + 1 :].split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        return None
    namespace, account = parts[1], parts[3]
    if not is_dns_label(namespace) or not is_dns_name(account):
        return None
    return trust_domain, namespace, account


def identity_in_trust_domain(identity: str, trust_domain: str) -> bool:
    """`identity` is exactly a workload identity (`spiffe://<td>/ns/<ns>/sa/<sa>`) of `trust_domain`."""
    parsed = workload_identity(identity)
    return parsed is not None and parsed[0] == trust_domain
