"""Prometheus metrics of the CA service (one registry per app, so tests can run several)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from ca_server.core.authority import Issued


log = logging.getLogger("meshbridge.ca.metrics")


class Metrics:
    def __init__(self, *, not_after_source: Callable[[], dict[str, datetime]] | None = None) -> None:
        """``not_after_source`` gives every active cluster's current intermediate notAfter from the
        store, read at each scrape: a replica shows the whole fleet, not only what it issued itself."""
        self.not_after_source = not_after_source
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
        if self.not_after_source is None:
            return
        try:
            current = self.not_after_source()
        except Exception as exc:  # the store is down: keep the last values; /readyz says why
            log.warning("cannot read intermediate expiries for the metrics: %s", type(exc).__name__)
            return
        self.not_after.clear()
        for cluster, not_after in current.items():
            self.not_after.labels(cluster).set(not_after.timestamp())

    def render(self) -> tuple[bytes, str]:
        self._refresh_not_after()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
