"""The agent's pass against a real CA service: its steps in order, each once, renewal decided once;
and the loop around it, which handles only scheduling, errors and backoff."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cluster_agent.apply import ApplyReport
from cluster_agent.ca_client import CAClient
from cluster_agent.config import load_config
from cluster_agent.errors import ExportsInvalid, KubeConflict, KubeRetryLater
from cluster_agent.loop import AgentLoop, Backoff
from cluster_agent.output import DirectoryWriter
from cluster_agent.reconcile import PassResult, Reconciler, utcnow
from cluster_agent.state import DirStateStore
from meshbridge_wire.models import DesiredOut, EnrollIn, EnrollOut, ExportsIn, RenewIn, RenewOut, StatusIn
from tests.support.caservice import CAService


class RecordingClient(CAClient):
    def __init__(self, calls: list[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = calls

    def enroll(self, request: EnrollIn) -> EnrollOut:
        self.calls.append("enroll")
        return super().enroll(request)

    def put_exports(self, exports: ExportsIn) -> None:
        self.calls.append("put_exports")
        super().put_exports(exports)

    def desired(self, *, revision: str | None = None, wait: float = 0) -> DesiredOut:
        self.calls.append("desired")
        return super().desired(revision=revision, wait=wait)

    def renew(self, request: RenewIn) -> RenewOut:
        self.calls.append("renew")
        return super().renew(request)

    def put_status(self, status: StatusIn) -> None:
        self.calls.append("put_status")
        super().put_status(status)


class RecordingWriter(DirectoryWriter):
    def __init__(self, calls: list[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = calls

    def service_exports(self) -> list[dict[str, Any]]:
        self.calls.append("service_exports")
        return super().service_exports()

    def current_corefile(self) -> str | None:
        self.calls.append("current_corefile")  # read for the render
        return super().current_corefile()

    def apply(self, objects: list[dict[str, Any]], *, corefile_block: str | None = None) -> ApplyReport:
        self.calls.append("apply")
        return super().apply(objects, corefile_block=corefile_block)


def recording_reconciler(
    cfg_path: Path,
    calls: list[str],
    service_exports: list[dict[str, Any]] | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> Reconciler:
    cfg = load_config(cfg_path)
    out = cfg_path.parent / "out"
    client = RecordingClient(calls, cfg.ca.url, trust_pem=Path(cfg.ca.trust_anchor).read_text(), cluster=cfg.cluster)
    writer = RecordingWriter(
        calls, out, state_dir=out / ".meshbridge", stream=io.StringIO(), service_exports=service_exports
    )
    rec = Reconciler(cfg, client=client, applier=writer, state_store=DirStateStore(out / ".meshbridge"), clock=clock)
    real = rec.intermediate.renewal_due

    def counted(desired: DesiredOut) -> str | None:
        calls.append("renewal_due")
        return real(desired)

    rec.intermediate.renewal_due = counted  # type: ignore[method-assign]
    return rec


def test_the_pass_runs_its_steps_in_order_each_once(ca_service: CAService, two_clusters: dict[str, Path]) -> None:
    calls: list[str] = []
    # The status carries the last reconcile's time to the second: with the wall clock, a pass crossing a second
    # reports once more (CI saw it). The clock stands still here and moves only where the test moves it.
    now = [utcnow()]
    rec = recording_reconciler(two_clusters["a"], calls, clock=lambda: now[0])

    first = rec.run_pass(revision=None, wait=0, resync=lambda: False)
    assert calls == [
        "enroll",
        "service_exports",
        "put_exports",
        "desired",
        "renewal_due",
        "current_corefile",
        "apply",
        "put_status",
    ]
    assert first.reconciled is not None and not first.reconciled.renewed

    calls.clear()
    ca_service.authority.rotate("a", actor="test")
    second = rec.run_pass(revision=first.revision, wait=0, resync=lambda: False)
    # exports unchanged: not published again; the rotation is decided once, then renewed before the render
    assert calls == ["service_exports", "desired", "renewal_due", "renew", "current_corefile", "apply", "put_status"]
    assert second.reconciled is not None and second.reconciled.renewed

    settled = rec.run_pass(revision=second.revision, wait=0, resync=lambda: False)  # the rotation is done
    assert settled.revision != second.revision and settled.reconciled is not None
    calls.clear()
    quiet = rec.run_pass(revision=settled.revision, wait=0, resync=lambda: False)
    assert calls == ["service_exports", "desired", "renewal_due"]  # nothing changed: no render, same status
    assert quiet == PassResult(settled.revision, None)

    calls.clear()
    rec.run_pass(revision=settled.revision, wait=0, resync=lambda: True)
    assert calls == ["service_exports", "desired", "renewal_due", "current_corefile", "apply"]  # same second

    calls.clear()
    now[0] += timedelta(seconds=1)
    rec.run_pass(revision=settled.revision, wait=0, resync=lambda: True)
    assert calls == ["service_exports", "desired", "renewal_due", "current_corefile", "apply", "put_status"]


def test_exports_that_do_not_fit_the_model_are_refused_here_not_by_the_ca(
    ca_service: CAService, two_clusters: dict[str, Path]
) -> None:
    calls: list[str] = []
    service_export = {
        "name": "web.shop",
        "namespace": "shop",
        "service": "web",
        "ports": [{"number": 80, "protocol": "HTTP"}],
        "consumers": ["Cluster_B"],
    }  # from an annotation
    rec = recording_reconciler(two_clusters["a"], calls, service_exports=[service_export])
    with pytest.raises(ExportsInvalid, match=r"services\.1\.consumers: .*a cluster name"):
        rec.run_pass(revision=None, wait=0, resync=lambda: False)
    assert "put_exports" not in calls


def test_the_loop_only_schedules_the_pass(ca_service: CAService, two_clusters: dict[str, Path]) -> None:
    calls: list[str] = []
    loop = AgentLoop(recording_reconciler(two_clusters["a"], calls), poll_wait=1, resync_seconds=3600)
    assert loop.step() is not None
    revision = loop.revision
    assert revision is not None and calls.count("renewal_due") == 1
    calls.clear()
    assert loop.step() is None  # long-polled with the revision seen, which did not change
    assert loop.revision == revision and calls.count("renewal_due") == 1 and "apply" not in calls


class FailingPass:
    """A reconciler whose passes fail with the given errors; records what the loop reports."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.reported: list[tuple[str, bool]] = []
        self.stop = threading.Event()

    def run_pass(self, **_: Any) -> PassResult:
        if not self.errors:
            self.stop.set()
            return PassResult("r", None)
        raise self.errors.pop(0)

    def failed(self, message: str, *, tell_ca: bool = True) -> None:
        self.reported.append((message, tell_ca))


class RecordingBackoff(Backoff):
    def __init__(self) -> None:
        super().__init__(base=0.01, cap=0.01)
        self.hints: list[float | None] = []

    def next(self, *, hint: float | None = None) -> float:
        self.hints.append(hint)
        return 0.0


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        (KubeRetryLater("Kubernetes API server answered 429: slow down", status=429, delay=7.0), 7.0),
        (KubeConflict("Kubernetes API server answered 409: modified", status=409), None),
    ],
)
def test_the_loop_reports_kubernetes_errors_and_waits_as_the_server_asks(error: Exception, hint: float | None) -> None:
    backoff = RecordingBackoff()
    failing = FailingPass([error])
    loop = AgentLoop(failing, backoff=backoff)  # type: ignore[arg-type]
    failing.stop = loop.stop  # the pass after the failing one succeeds and ends the loop
    loop.run()
    assert failing.reported == [(f"kubernetes: {error}", True)]
    assert backoff.hints == [hint]
    assert loop.metrics.registry.get_sample_value("meshbridge_agent_errors_total", {"kind": "kubernetes"}) == 1
