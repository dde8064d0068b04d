"""Prometheus metrics of the CA service (one registry per app, so tests can run several)."""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ca_server.core.models import Root, RootStatus

if TYPE_CHECKING:
    from ca_server.core.authority import Issued


log = logging.getLogger("meshbridge.ca.metrics")
T = TypeVar("T")


class Metrics:
    def __init__(
        self,
        *,
        not_after_source: Callable[[], dict[str, datetime]] | None = None,
        roots_source: Callable[[], list[Root]] | None = None,
        group_commit_source: Callable[[], tuple[int, int, int]] | None = None,
    ) -> None:
        """``not_after_source`` gives every active cluster's current intermediate notAfter and
        ``roots_source`` every root, from the store, read at each scrape: a replica shows the whole
        fleet, not only what it issued itself. ``group_commit_source``: this process's group-commit
        (transactions, writes, replays) so far (``Store.group_commit_stats``, ``group_commit_replays``)."""
        self.not_after_source = not_after_source
        self.roots_source = roots_source
        self.registry = CollectorRegistry()
        self.issuances = Counter(
            "meshbridge_ca_issuances_total", "Intermediate certificates issued", ["kind"], registry=self.registry
        )
        self.issuance_seconds = Histogram(
            "meshbridge_ca_issuance_seconds",
            "Time to authenticate, sign, verify, store and audit one issuance",
            ["kind"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.not_after = Gauge(
            "meshbridge_ca_intermediate_not_after_seconds",
            "notAfter of each cluster's current intermediate (Unix time)",
            ["cluster"],
            registry=self.registry,
        )
        self.requests = Counter(
            "meshbridge_ca_http_responses_total", "HTTP responses by status class", ["status"], registry=self.registry
        )
        self.errors = Counter(
            "meshbridge_ca_errors_total", "Requests answered with a problem, by type", ["type"], registry=self.registry
        )
        self._by_kind: dict[str, tuple[Any, Any]] = {}
        self.up = Gauge(
            "meshbridge_ca_ready", "1 when the database and the signing key are usable", registry=self.registry
        )
        # A root rotation left half-way (a root trusted but not signing: phase 2 or 3) shows as a
        # lasting trusted count; deploy/prometheus alerts on it (MeshbridgeRootRotationStuck).
        self.roots = Gauge("meshbridge_ca_roots", "Roots by status", ["status"], registry=self.registry)
        if group_commit_source is not None:
            self.registry.register(_GroupCommits(group_commit_source))

    def issued(self, kind: str, seconds: float, issued: Issued) -> None:
        count, duration = self._by_kind.get(kind) or self._kind(kind)
        count.inc()
        duration.observe(seconds)
        self.not_after.labels(issued.cluster).set(issued.not_after.timestamp())

    def _kind(self, kind: str) -> tuple[Any, Any]:
        """The labelled children for one issuance kind, looked up once (each ``labels()`` locks)."""
        pair = self._by_kind[kind] = (self.issuances.labels(kind), self.issuance_seconds.labels(kind))
        return pair

    def forget_cluster(self, name: str) -> None:
        with contextlib.suppress(KeyError):
            self.not_after.remove(name)

    def _refresh_not_after(self) -> None:
        current = _read(self.not_after_source, "intermediate expiries")
        if current is None:
            return
        self.not_after.clear()
        for cluster, not_after in current.items():
            self.not_after.labels(cluster).set(not_after.timestamp())

    def _refresh_roots(self) -> None:
        roots = _read(self.roots_source, "roots")
        if roots is None:
            return
        counts = collections.Counter(root.status for root in roots)
        for status in RootStatus:
            self.roots.labels(status.value).set(counts[status])

    def render(self) -> tuple[bytes, str]:
        self._refresh_not_after()
        self._refresh_roots()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _GroupCommits:
    """The group commit's counters (PostgreSQL), read from the store at each scrape: writes per
    transaction is how many renewals shared a commit, replays how many transactions were run again
    the slow way (0 where group commit is off)."""

    def __init__(self, source: Callable[[], tuple[int, int, int]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        transactions, writes, replays = self.source()
        yield CounterMetricFamily(
            "meshbridge_ca_group_commit_transactions", "Group-commit transactions run by this process", transactions
        )
        yield CounterMetricFamily(
            "meshbridge_ca_group_commit_writes", "Writes (renewals) run in group-commit transactions", writes
        )
        yield CounterMetricFamily(
            "meshbridge_ca_group_commit_replays",
            "Group-commit transactions run again with each write settled in turn (a read or write "
            "that could not be deferred)",
            replays,
        )


def _read(source: Callable[[], T] | None, what: str) -> T | None:
    """What ``source`` reads from the store now; None without a source or when the store is down
    (the gauges keep their last values; /readyz says why)."""
    if source is None:
        return None
    try:
        return source()
    except Exception as exc:
        log.warning("cannot read %s for the metrics: %s", what, type(exc).__name__)
        return None
