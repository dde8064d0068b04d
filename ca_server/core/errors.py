"""Typed errors of the CA core.

The tree, translated to HTTP exactly once in ``ca_server.api.errors``::

    CAError                      base; ``detail`` is safe to show (never holds a secret)
    ├── InvalidInput             malformed or unacceptable input              → 400
    │   ├── BadCSR               PEM/DER that does not parse, bad signature   → 400
    │   └── UnsupportedKey       key type or size outside the profile         → 400
    ├── Unauthenticated          missing, unknown, expired or used token      → 401
    ├── Forbidden                authenticated, but not for this resource     → 403
    │   └── BadProof             renewal without valid proof of possession    → 403
    ├── NotFound                 unknown cluster, serial, root                → 404
    ├── Conflict                 state does not allow it (exists, revoked)    → 409
    │   └── FleetNotReady        a root phase some clusters' istiod is not ready for → 409
    ├── PayloadTooLarge          body over the limit                          → 413
    ├── RateLimited              too many requests; ``retry_after`` seconds   → 429
    └── Unavailable              database or signing key not usable          → 503
"""

from __future__ import annotations


class CAError(Exception):
    """Base class. ``detail`` must never contain a token, key or passphrase."""

    title = "CA error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(CAError):
    title = "Invalid input"


class BadCSR(InvalidInput):
    title = "Bad certificate signing request"


class UnsupportedKey(InvalidInput):
    title = "Unsupported key"


class Unauthenticated(CAError):
    title = "Unauthenticated"


class Forbidden(CAError):
    title = "Forbidden"


class BadProof(Forbidden):
    title = "Missing or wrong proof of possession"


class NotFound(CAError):
    title = "Not found"


class Conflict(CAError):
    title = "Conflict"


class FleetNotReady(Conflict):
    """A root phase refused because some active clusters' istiod is not ready for it; ``lagging``
    holds (cluster, what it waits for), both safe to show."""

    title = "Fleet not ready"

    def __init__(self, detail: str, *, lagging: list[tuple[str, str]]) -> None:
        super().__init__(detail)
        self.lagging = lagging


class PayloadTooLarge(CAError):
    title = "Payload too large"


class RateLimited(CAError):
    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Unavailable(CAError):
    title = "Service unavailable"
