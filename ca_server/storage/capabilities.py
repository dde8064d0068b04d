"""What a store may offer beyond the core's ``Store`` port. The composition roots (``app.py``,
``server.py``) ask with ``isinstance`` on these runtime-checkable protocols and do without the
capability when a store lacks it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class RateCounters(Protocol):
    def add_and_read(self, window: int, deltas: dict[str, int]) -> dict[str, int]:
        """Add this replica's counts for ``window``; the totals of all replicas for those keys."""
        ...


@runtime_checkable
class SharesRateCounters(Protocol):
    def rate_counters(self) -> RateCounters:
        """Counters every replica on this database adds to, for the rate limiter."""
        ...


@runtime_checkable
class Checkpoints(Protocol):
    def checkpoint(self) -> None:
        """Move committed log pages into the database file (SQLite's WAL), off the request path."""
        ...


@runtime_checkable
class Disposable(Protocol):
    def dispose(self) -> None:
        """Close every pooled connection (before a fork: none may cross it)."""
        ...
