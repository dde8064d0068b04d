"""The agent's loop: long-poll desired state, reconcile on change, renew when due, periodic full
resync, capped exponential backoff with jitter while the CA service is unreachable (everything
already in the cluster stays as it is)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster_agent.ca_client import CAAuthFailed, CAClientError, CARejected, CAUnreachable
from cluster_agent.metrics import AgentMetrics
from cluster_agent.reconcile import BundleRejected, Reconciler, ReconcileResult

log = logging.getLogger("meshbridge.agent.loop")


@dataclass
class Backoff:
    base: float = 1.0
    cap: float = 60.0
    attempt: int = 0

    def next(self, *, hint: float | None = None) -> float:
        self.attempt += 1
        ceiling = min(self.cap, self.base * 2 ** (self.attempt - 1))
        delay = random.uniform(ceiling / 2, ceiling)  # jitter: replicas and agents do not retry in step
        return max(delay, hint or 0.0)

    def reset(self) -> None:
        self.attempt = 0


class AgentLoop:
    def __init__(self, reconciler: Reconciler, *, metrics: AgentMetrics | None = None, poll_wait: float = 25,
                 resync_seconds: float = 300, is_leader: Callable[[], bool] | None = None,
                 backoff: Backoff | None = None) -> None:
        self.r = reconciler
        self.metrics = metrics or AgentMetrics()
        self.poll_wait = poll_wait
        self.resync_seconds = resync_seconds
        self.is_leader = is_leader or (lambda: True)
        self.backoff = backoff or Backoff()
        self.revision: str | None = None
        self.last_full = 0.0
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.last_result: ReconcileResult | None = None
        self._status_sent: dict[str, Any] | None = None

    def step(self) -> ReconcileResult | None:
        """One iteration: returns the reconcile result when a reconcile ran."""
        r = self.r
        r.ensure_enrolled()
        r.publish()
        desired = r.client.desired(revision=self.revision, wait=self.poll_wait if self.revision else 0)
        due = (desired["revision"] != self.revision or time.monotonic() - self.last_full > self.resync_seconds
               or r.renewal_due(desired) is not None)
        result = None
        if due:
            result = r.reconcile(desired)
            self.last_full = time.monotonic()
            self.last_result = result
            self.metrics.reconciled(result, r)
        self.revision = desired["revision"]
        r.errors.clear()
        self.metrics.ca_reachable.set(1)
        self._report()
        self.ready.set()
        return result

    def _report(self) -> None:
        body = self.r.status_body()
        if body != self._status_sent:
            self.r.client.put_status(body)
            self._status_sent = body

    def _failed(self, message: str) -> None:
        self.r.errors.append(message)
        self.metrics.errors.labels(message.split(":")[0][:40]).inc()
        try:
            self._report()
        except CAClientError:
            pass

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.is_leader():
                self.ready.set()  # a standby replica is healthy; it just does not write
                self.stop.wait(2)
                continue
            try:
                self.step()
                self.backoff.reset()
                continue
            except CAUnreachable as exc:
                self.metrics.ca_reachable.set(0)
                delay = self.backoff.next(hint=exc.retry_after)
                log.warning("%s; keeping the current config, retrying in %.1fs", exc, delay)
                self.r.errors.append(str(exc))
            except CAAuthFailed as exc:
                delay = self.backoff.next()
                log.error("%s; retrying in %.1fs", exc, delay)
                self._failed(f"auth: {exc}")
            except (CARejected, BundleRejected) as exc:
                delay = self.backoff.next()
                log.error("%s; retrying in %.1fs", exc, delay)
                self._failed(f"rejected: {exc}")
            except Exception as exc:  # an API server conflict or outage: the next pass repairs it
                delay = self.backoff.next()
                log.exception("reconcile failed; retrying in %.1fs", delay)
                self._failed(f"reconcile: {type(exc).__name__}")
            self.stop.wait(delay)
