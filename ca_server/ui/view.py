"""What the dashboard's pages are rendered from: the admin API's own response models, the results
of `fleet check`, and the import edges of the CA's fleet index, gathered once per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from ca_server.fleetcheck import Result
from meshbridge_wire import models as w


@dataclass(frozen=True)
class Edge:
    """``exporter`` exports ``service`` to ``consumer`` (an entry of the consumer's imports)."""

    exporter: str
    consumer: str
    service: str


@dataclass(frozen=True)
class FleetView:
    now: datetime  # the CA's clock
    clusters: list[w.ClusterOut]  # as GET /v1/clusters
    results: list[Result]  # as `meshbridge-ca fleet check`
    roots: list[w.RootOut]  # as GET /v1/roots
    root_status: w.RootStatusOut  # as GET /v1/roots/status
    edges: list[Edge] = field(default_factory=list)


@dataclass(frozen=True)
class AuditFilter:
    action: str = ""  # an action, or a prefix ending in "." (e.g. "cluster.")
    actor: str = ""  # a substring of the actor
    subject: str = ""  # a substring of the subject
    before: int | None = None  # only entries with a smaller id (None: up to the newest)
    limit: int = 100

    def matches(self, e: w.AuditOut) -> bool:
        action_ok = (
            not self.action
            or e.action == self.action
            or (self.action.endswith(".") and e.action.startswith(self.action))
        )
        return action_ok and self.actor in e.actor and self.subject in e.subject


@dataclass(frozen=True)
class AuditView:
    entries: list[w.AuditOut]  # the matching entries, newest first
    filter: AuditFilter
    scanned_from: int  # the oldest id looked at (the next page's `before`)
    actions: list[str]  # the actions seen in the scanned window, for the filter's choices
