"""The agent's own errors, drawn once (the CA client's are in ``ca_client``)::

    AgentError
    ├── NotEnrolled           no agent token yet and no usable bootstrap token file
    ├── ExportsInvalid        the exports to publish do not fit the CA service's model
    ├── BundleRejected        the bundle would fail istiod's own checks: nothing was written
    │   └── TrustRefused      an answer would change the agent's trust without proof: nothing changed
    ├── IstioPreconditionFailed  istiod would misuse cacerts (trust domain, multi-root): nothing was written
    └── KubeError             a request to the Kubernetes API server failed
        ├── KubeRetryLater    429, 5xx or no answer: try again, after ``delay`` seconds when the server said
        ├── KubeConflict      409: written meanwhile by someone else (re-read, then write again)
        ├── KubeForbidden     403: RBAC does not allow it
        └── KubeNotFound      404: the object, or its kind (a CRD not installed), does not exist

``kube.py`` alone turns lightkube's exceptions into these, from the status code of the answer
(as kopf classifies API errors); nothing else in the agent sees lightkube's.
"""

from __future__ import annotations

from pydantic import ValidationError

__all__ = [
    "AgentError",
    "BundleRejected",
    "ExportsInvalid",
    "IstioPreconditionFailed",
    "KubeConflict",
    "KubeError",
    "KubeForbidden",
    "KubeNotFound",
    "KubeRetryLater",
    "NotEnrolled",
    "TrustRefused",
    "validation_problems",
]


class AgentError(Exception):
    """Base of the agent's own errors."""


class NotEnrolled(AgentError):
    """The agent has no agent token, and no bootstrap token to enroll with."""


class ExportsInvalid(AgentError):
    """What this cluster would publish does not fit the CA service's model: nothing was sent."""


class BundleRejected(AgentError):
    """The bundle would fail istiod's own checks: nothing was written."""


class TrustRefused(BundleRejected):
    """An answer would add a root no trusted root endorses, drop every trusted root, or install a
    chain that does not end at a trusted root: trust, cacerts and state were left unchanged."""


class IstioPreconditionFailed(AgentError):
    """istiod, as installed, would misuse what the agent is about to write (`meshcheck`: its trust
    domain is not the cluster's, or it would ignore a root change): nothing was written."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class KubeError(AgentError):
    """A request to the Kubernetes API server failed; ``status`` is its HTTP status (None: no answer)."""

    def __init__(self, message: str, *, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class KubeRetryLater(KubeError):
    """The API server pushed back (429), failed (5xx) or did not answer: the same request may pass
    later, after ``delay`` seconds when the server named them (Retry-After)."""

    def __init__(self, message: str, *, status: int | None, delay: float | None = None) -> None:
        super().__init__(message, status=status)
        self.delay = delay


class KubeConflict(KubeError):
    """409: the object changed since it was read, or already exists."""


class KubeForbidden(KubeError):
    """403: the agent's RBAC does not allow the request."""


class KubeNotFound(KubeError):
    """404: no such object, or no such kind (its CRD is not installed)."""


def validation_problems(exc: ValidationError, *, limit: int = 5) -> str:
    """``<field path>: <what is wrong>`` for the first problems of a model's validation, without the
    values themselves (an answer or a body may carry a token or a key)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or 'body'}: {e['msg']}"
        for e in exc.errors(include_input=False)[:limit]
    )
