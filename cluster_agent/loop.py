"""The agent's loop: scheduling around the pass (`Reconciler.run_pass`). It long-polls with the
desired revision seen last, asks for a full resync every `resync_seconds`, lets only the leader
write, keeps metrics, and backs off (capped, exponential, with jitter) after a failed pass;
everything already in the cluster stays as it is meanwhile."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster_agent.ca_client import CAAnswerInvalid, CAAuthFailed, CARejected, CAUnreachable
from cluster_agent.errors import (
    BundleRejected,
    ExportsInvalid,
    IstioPreconditionFailed,
    KubeError,
    KubeRetryLater,
    NotEnrolled,
)
from cluster_agent.metrics import AgentMetrics
from cluster_agent.reconcile import Reconciler, ReconcileResult

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
    def __init__(
        self,
        reconciler: Reconciler,
        *,
        metrics: AgentMetrics | None = None,
        poll_wait: float = 25,
        resync_seconds: float = 300,
        is_leader: Callable[[], bool] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
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

    def step(self) -> ReconcileResult | None:
        """One pass: returns the reconcile result when it rendered and applied."""
        outcome = self.r.run_pass(
            revision=self.revision, wait=self.poll_wait if self.revision else 0, resync=self._resync_due
        )
        if outcome.reconciled is not None:
            self.last_full = time.monotonic()
            self.last_result = outcome.reconciled
            self.metrics.reconciled(outcome.reconciled)
        self.revision = outcome.revision
        self.metrics.ca_reachable.set(1)
        self.ready.set()
        return outcome.reconciled

    def refresh_crls_offline(self) -> None:
        """The CA service is unreachable: keep cacerts' CRLs current without it, so that its outage
        cannot expire the mesh (Envoy fails every chain whose CRL is past nextUpdate)."""
        try:
            refreshed = self.r.refresh_crls_offline()
        except Exception as exc:
            self.metrics.errors.labels("crl").inc()
            log.error("re-signing this cluster's CRLs without the CA service failed: %s", exc)
            return
        if refreshed is not None:
            self.metrics.ca_crl_installed(refreshed.ca_crl_next_update)

    def _resync_due(self) -> bool:
        return time.monotonic() - self.last_full > self.resync_seconds

    def _failed(self, message: str, *, hint: float | None = None) -> float:
        """Count and report a failed pass; the delay until the next one."""
        self.r.failed(message)
        self.metrics.errors.labels(message.split(":")[0][:40]).inc()
        return self.backoff.next(hint=hint)

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
                self.r.failed(str(exc), tell_ca=False)
                self.refresh_crls_offline()
            except (CAAuthFailed, NotEnrolled) as exc:
                delay = self._failed(f"auth: {exc}")
                log.error("%s; retrying in %.1fs", exc, delay)
            except (CARejected, CAAnswerInvalid, ExportsInvalid, BundleRejected) as exc:
                delay = self._failed(f"rejected: {exc}")
                log.error("%s; retrying in %.1fs", exc, delay)
            except IstioPreconditionFailed as exc:  # each problem reads "istio: …": the error kind is `istio`
                delay = self._failed(str(exc))
                log.error("%s; nothing written, retrying in %.1fs", exc, delay)
            except KubeError as exc:  # a conflict, pushback or outage of the API server: the next pass repairs it
                delay = self._failed(f"kubernetes: {exc}", hint=exc.delay if isinstance(exc, KubeRetryLater) else None)
                log.error("%s; retrying in %.1fs", exc, delay)
            except Exception as exc:
                delay = self._failed(f"reconcile: {type(exc).__name__}")
                log.exception("reconcile failed; retrying in %.1fs", delay)
            self.stop.wait(delay)
