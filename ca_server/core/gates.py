"""What each cluster's istiod serves, read from its agent's last report on the CA's clock, and the
gates of root phases 3 (activate) and 4 (retire) built on it (issue 12, items 4 and 5).

Why "written into `cacerts`" is not enough (the pinned Istio module's source):

- istiod ignores a changed `root-cert.pem` unless ISTIO_MULTIROOT_MESH is on, and then drops the
  whole update, the new intermediate included (pilot/pkg/bootstrap/istio_ca.go, ``handleEvent``:
  "Multi root is disabled, updating new ROOT-CA not supported"). Workloads trust the bundle istiod
  writes into the `istio-ca-root-cert` ConfigMap of every namespace
  (pilot/pkg/serviceregistry/kube/controller/namespacecontroller.go, ``reconcileCACertAndCRL``).
  So phase 3 waits until every istiod serves the new root: a cluster whose istiod does not would
  refuse every workload certificate signed under it elsewhere.
- A workload takes istiod's bundle only with its next certificate: istiod appends its root bundle
  to every signing answer (security/pkg/server/ca/server.go, ``CreateCertificate``), istio-agent
  takes the answer's last element as the workload's ROOTCA (security/pkg/nodeagent/cache/
  secretcache.go, ``generateNewSecret``; the Citadel client's ``GetRootCertBundle`` is empty) and
  serves ROOTCA from that cached certificate (``getCachedSecret``), renewing it at about half its
  lifetime (``rotateTime``, SECRET_GRACE_PERIOD_RATIO 0.5). So phase 3 also waits one workload
  certificate lifetime (plus the margin) after every istiod serves the new root.
- istiod signs each workload certificate with the intermediate it holds at that moment
  (security/pkg/pki/ca/ca.go, ``IstioCA.sign``) and gives it notAfter = its clock + the TTL the
  workload asked for, clamped to the intermediate's notAfter
  (security/pkg/pki/util/generate_cert.go, ``genCertTemplateFromCSR``); istio-agent asks for
  SECRET_TTL, 24 h (pilot/cmd/pilot-agent/options/options.go), istiod's default and cap are
  DEFAULT_WORKLOAD_CERT_TTL 24 h and MAX_WORKLOAD_CERT_TTL 90 d (pilot/pkg/bootstrap/istio_ca.go).
  So a certificate under the old root lives up to one lifetime after istiod stopped signing under
  it: phase 4 waits that long, plus the margin, after every istiod signs under another root.

The agent is trusted for its own cluster only, and only to the extent that a false report can
hurt nothing but its own cluster's traffic. Its times are read on the CA's clock: a signing time
is moved later by as much as the agent's clock seems to run behind the CA's (the receipt time
minus the observation time, never negative, so a clock running ahead cannot make a cluster ready
early), and it is never taken as earlier than the CA issued that intermediate (a bundle: than the
CA created the root).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

from ca_server.core.auditsize import capped
from ca_server.core.context import Context
from ca_server.core.errors import Conflict, FleetNotReady
from ca_server.core.models import CertificateRecord, Cluster, ClusterStatus, Root, RootStatus
from ca_server.core.ports import Tx
from ca_server.core.rootkeys import active_root
from meshbridge_wire.pem import certificate_fingerprints

Phase = Literal["activate", "retire"]

# The margin on top of the workload-certificate lifetime, as a fraction of it. The agent sees a new
# signing intermediate only after istiod switched (late, so on the safe side); the margin covers
# clock differences between istiod (which sets notAfter), the CA and the peers that verify, and a
# lifetime set a little below what workloads really ask for. Proportional, so tests can use
# seconds; at Istio's 24 h it is 2 h 24 min.
MARGIN_FRACTION = 0.1
DETAIL_LISTS_AT_MOST = 10  # lagging clusters named in a refusal's detail (the problem lists all)

_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})")
_HEX = re.compile(r"[0-9a-fA-F]{1,64}")


def margin(lifetime: timedelta) -> timedelta:
    return lifetime * MARGIN_FRACTION


def phase_wait(lifetime: timedelta) -> timedelta:
    """How long after every istiod serves a new root it may sign (phase 3), and after every istiod
    signs under another root the old one may leave the bundle (phase 4)."""
    return lifetime + margin(lifetime)


# ----------------------------------------------------------------------------- reading a report
def parse_time(value: object) -> datetime | None:
    """An RFC 3339 date-time (offset required; 'T' or space, any case; up to 9 fraction digits,
    microseconds kept; a leap second read as the next second) in UTC; None for anything else."""
    if not isinstance(value, str):
        return None
    m = _RFC3339.fullmatch(value.strip())
    if m is None:
        return None
    y, mo, d, h, mi, s, frac, off = m.groups()
    leap = s == "60"
    try:
        tz = UTC if off.upper() == "Z" else _offset(off)
        micro = int((frac or "0")[:6].ljust(6, "0"))
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), 59 if leap else int(s), micro, tzinfo=tz)
        return (dt + timedelta(seconds=1) if leap else dt).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _offset(text: str) -> timezone:
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 23 or minutes > 59:
        raise ValueError("offset out of range")
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if text[0] == "-" else delta)


def format_time(dt: datetime) -> str:
    """RFC 3339 in UTC with microseconds (the CA's receipt time of a report)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def normal_serial(value: object) -> str | None:
    """A serial in the API's form (lowercase hex, no leading zeros); None if it is not hex."""
    if not isinstance(value, str) or not _HEX.fullmatch(value.strip()):
        return None
    return format(int(value.strip(), 16), "x")


@functools.lru_cache(maxsize=256)
def fingerprint(pem: str) -> str:
    """SHA-256 of the first certificate's DER, lowercase hex (what `served.bundle` holds)."""
    return certificate_fingerprints(pem)[0]


def root_fingerprint(root: Root) -> str:
    """The fingerprint of the certificate ``root`` puts in the trust bundle (its anchor)."""
    return fingerprint(root.anchor_pem or root.cert_pem)


@dataclass(frozen=True)
class Report:
    """A cluster's last report of what its istiod serves (``served`` in its status)."""

    received_at: datetime | None  # the CA's clock
    observed_at: datetime | None  # the agent's clock
    bundle: frozenset[str]
    bundle_since: datetime | None  # the agent's clock
    signing_serial: str | None
    signing_since: datetime | None  # the agent's clock
    problems: tuple[str, ...]

    def on_ca_clock(self, at: datetime | None, *, not_before: datetime | None = None) -> datetime | None:
        """``at`` (the agent's clock) on the CA's clock: moved later by ``behind``, never earlier
        than ``not_before`` (when what it dates came to exist at the CA)."""
        behind = self.behind
        if at is None or behind is None:
            return None
        return max(at + behind, not_before) if not_before is not None else at + behind

    @property
    def behind(self) -> timedelta | None:
        """How far the agent's clock may run behind the CA's: receipt minus observation, never
        negative (None when either time is unreadable)."""
        if self.received_at is None or self.observed_at is None:
            return None
        return max(timedelta(0), self.received_at - self.observed_at)


def report_of(status: Mapping[str, Any] | None) -> Report | None:
    """The ``served`` part of a stored status; None when the last report has none."""
    served = status.get("served") if status else None
    if not isinstance(served, dict):
        return None
    assert status is not None
    bundle = served.get("bundle")
    return Report(
        received_at=parse_time(status.get("received_at")),
        observed_at=parse_time(served.get("observed_at")),
        bundle=frozenset(fp for fp in bundle if isinstance(fp, str)) if isinstance(bundle, list) else frozenset(),
        bundle_since=parse_time(served.get("bundle_since")),
        signing_serial=normal_serial(served.get("signing_serial")),
        signing_since=parse_time(served.get("signing_since")),
        problems=tuple(str(p) for p in served.get("problems") or []),
    )


def signing_since(report: Report, rec: CertificateRecord) -> datetime | None:
    """Since when istiod signs with ``rec``, on the CA's clock (never before the CA issued it)."""
    return report.on_ca_clock(report.signing_since, not_before=rec.issued_at)


def signing_record(
    tx: Tx, cluster: Cluster, report: Report, current: CertificateRecord | None
) -> CertificateRecord | None:
    """The certificate record of the intermediate istiod signs with, if the CA issued it to ``cluster``."""
    serial = report.signing_serial
    if serial is None:
        return None
    rec = current if current is not None and current.serial == serial else tx.get_certificate(serial)
    return rec if rec is not None and rec.cluster == cluster.name else None


# ----------------------------------------------------------------------------- the served view
@dataclass(frozen=True)
class ServedView:
    """What the CA makes of a cluster's last served report (the `served` of the REST Cluster)."""

    observed_at: datetime | None
    received_at: datetime | None
    report_age: timedelta | None
    bundle_roots: list[str]
    bundle_since: datetime | None  # on the CA's clock
    signing_serial: str | None
    signing: CertificateRecord | None
    signing_since: datetime | None
    problems: list[str]


def served_view(
    tx: Tx, cluster: Cluster, roots_by_fp: Mapping[str, str], current: CertificateRecord | None, now: datetime
) -> ServedView | None:
    report = report_of(cluster.agent_status)
    if report is None:
        return None
    rec = signing_record(tx, cluster, report, current)
    return ServedView(
        observed_at=report.observed_at,
        received_at=report.received_at,
        report_age=now - report.received_at if report.received_at is not None else None,
        bundle_roots=sorted(roots_by_fp.get(fp, f"unknown:{fp[:16]}") for fp in report.bundle),
        bundle_since=report.on_ca_clock(report.bundle_since),
        signing_serial=report.signing_serial,
        signing=rec,
        signing_since=signing_since(report, rec) if rec is not None else None,
        problems=list(report.problems),
    )


# ----------------------------------------------------------------------------- the gates
@dataclass(frozen=True)
class ClusterGate:
    name: str
    waiting_for: list[str] = field(default_factory=list)
    ready_at: datetime | None = None
    overridable: bool = True

    @property
    def ready(self) -> bool:
        return not self.waiting_for


@dataclass(frozen=True)
class Gate:
    root_id: str
    phase: Phase
    clusters: list[ClusterGate]

    @property
    def ready(self) -> bool:
        return all(c.ready for c in self.clusters)

    @property
    def lagging(self) -> list[ClusterGate]:
        return [c for c in self.clusters if not c.ready]


def _active(tx: Tx) -> list[Cluster]:
    """The clusters the gates wait for: active ones (pending and revoked clusters have no istiod of ours)."""
    return sorted((c for c in tx.list_clusters() if c.status == ClusterStatus.ACTIVE), key=lambda c: c.name)


def _no_report(cluster: Cluster) -> str:
    if cluster.agent_status is None:
        return "a status report from its agent (none yet)"
    return "its agent to report what istiod serves (its last status has no `served`)"


def _activation(cluster: Cluster, root: Root, *, now: datetime, wait: timedelta) -> ClusterGate:
    report = report_of(cluster.agent_status)
    if report is None:
        return ClusterGate(cluster.name, [_no_report(cluster)])
    if root_fingerprint(root) not in report.bundle:
        seen = f"; the agent reports {len(report.problems)} problem(s) observing istiod" if report.problems else ""
        return ClusterGate(
            cluster.name,
            [
                f"istiod to serve root {root.id} in its trust bundle (istio-ca-root-cert){seen}; without "
                "ISTIO_MULTIROOT_MESH=true istiod keeps its old bundle until it restarts"
            ],
        )
    since = report.on_ca_clock(report.bundle_since, not_before=root.created_at)
    if since is None:
        return ClusterGate(cluster.name, ["its agent to report readable times for istiod's trust bundle"])
    ready_at = since + wait
    if now >= ready_at:
        return ClusterGate(cluster.name, ready_at=ready_at)
    return ClusterGate(
        cluster.name,
        [
            f"workloads to take root {root.id} with their next certificate: istiod serves it since "
            f"{_iso(since)} on the CA's clock{_ahead(since, now)}; ready at {_iso(ready_at)}"
        ],
        ready_at=ready_at,
    )


def _ahead(since: datetime, now: datetime) -> str:
    return " (the report's time lies ahead of the CA's clock)" if since > now else ""


def activation_gate(tx: Tx, root: Root, *, now: datetime, lifetime: timedelta) -> Gate:
    """Phase 3: every active cluster's istiod serves a bundle holding ``root``, and has for the
    workload-certificate lifetime plus the margin (its workloads take the bundle as they renew)."""
    wait = phase_wait(lifetime)
    return Gate(root.id, "activate", [_activation(c, root, now=now, wait=wait) for c in _active(tx)])


def holders(tx: Tx, root: Root) -> dict[str, CertificateRecord]:
    """The active clusters whose current intermediate was issued under ``root`` (not overridable)."""
    current = tx.current_certificates()
    return {c.name: current[c.name] for c in _active(tx) if c.name in current and current[c.name].root_id == root.id}


def _retirement(
    tx: Tx, cluster: Cluster, root: Root, current: CertificateRecord | None, *, now: datetime, wait: timedelta
) -> ClusterGate:
    held = [] if current is None or current.root_id != root.id else [_holding(current, root)]
    report = report_of(cluster.agent_status)
    if report is None:
        return ClusterGate(cluster.name, [*held, _no_report(cluster)], overridable=not held)
    why, ready_at = _signing_wait(tx, cluster, report, root, current, now=now, wait=wait)
    return ClusterGate(cluster.name, held + why, ready_at=ready_at, overridable=not held)


def _holding(current: CertificateRecord, root: Root) -> str:
    return (
        f"a renewal: its current intermediate (generation {current.generation}) is under root {root.id} "
        "(force cannot override this)"
    )


def _signing_wait(
    tx: Tx,
    cluster: Cluster,
    report: Report,
    root: Root,
    current: CertificateRecord | None,
    *,
    now: datetime,
    wait: timedelta,
) -> tuple[list[str], datetime | None]:
    """What ``cluster`` still waits for before ``root`` may retire, and when that wait ends."""
    if report.signing_serial is None:
        return ["its agent to tell which intermediate istiod signs with (the report does not say)"], None
    rec = signing_record(tx, cluster, report, current)
    if rec is None:
        return ["istiod to sign with an intermediate this CA issued to this cluster (it reports another)"], None
    if rec.root_id == root.id:
        return [
            f"istiod to sign under another root: it signs with generation {rec.generation}, under root {root.id}"
        ], None
    since = signing_since(report, rec)
    if since is None:
        return [f"its agent to report readable times for istiod's signing with generation {rec.generation}"], None
    ready_at = since + wait
    if now >= ready_at:
        return [], ready_at
    return [
        f"workload certificates under root {root.id} to expire: istiod signs with generation {rec.generation} "
        f"under root {rec.root_id} since {_iso(since)} on the CA's clock{_ahead(since, now)}; "
        f"ready at {_iso(ready_at)}"
    ], ready_at


def retirement_gate(tx: Tx, root: Root, *, now: datetime, lifetime: timedelta) -> Gate:
    """Phase 4: every active cluster's istiod signs under a root other than ``root``, and has for
    the workload-certificate lifetime plus the margin; clusters still holding an intermediate under
    ``root`` wait for a renewal (that part is not overridable)."""
    current = tx.current_certificates()
    wait = phase_wait(lifetime)
    return Gate(
        root.id,
        "retire",
        [_retirement(tx, c, root, current.get(c.name), now=now, wait=wait) for c in _active(tx)],
    )


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def passed(gate: Gate, *, force: bool) -> dict[str, Any]:
    """FleetNotReady unless ``gate`` is ready or ``force``; with ``force``, the audit details that
    record it (``forced`` and the lagging clusters with what each waited for)."""
    lagging = gate.lagging
    if lagging and not force:
        raise FleetNotReady(_refusal(gate), lagging=[(c.name, "; ".join(c.waiting_for)) for c in lagging])
    if not force:
        return {}
    reasons = {c.name: "; ".join(c.waiting_for) for c in lagging}
    return {"forced": True, "lagging": sorted(reasons), "waiting_for": capped(reasons)}


def _refusal(gate: Gate) -> str:
    lagging = gate.lagging
    named = "; ".join(f"{c.name} waits for {', '.join(c.waiting_for)}" for c in lagging[:DETAIL_LISTS_AT_MOST])
    more = f"; and {len(lagging) - DETAIL_LISTS_AT_MOST} more" if len(lagging) > DETAIL_LISTS_AT_MOST else ""
    return (
        f"{len(lagging)} active cluster(s) not ready to {gate.phase} root {gate.root_id}: {named}{more}. "
        "See `meshbridge-ca root status`; `force` overrides (audited)"
    )


def refuse_holders(held: Mapping[str, CertificateRecord]) -> None:
    """The retirement check force never overrides: a cluster still holding an intermediate under the root."""
    if held:
        raise Conflict(f"clusters still hold intermediates under this root: {', '.join(sorted(held))}")


# ----------------------------------------------------------------------------- the reads
@dataclass(frozen=True)
class RootGates:
    active_root: str
    lifetime: timedelta
    margin: timedelta
    gates: list[Gate]


class Gates:
    """Reads for operators: every trusted root's two gates, and each cluster's served view."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def status(self) -> RootGates:
        lifetime = self.ctx.policy.workload_cert_lifetime
        now = self.ctx.clock()
        with self.ctx.store.read() as tx:
            roots = sorted(tx.list_roots(), key=lambda r: (r.created_at, r.id))
            gates = []
            for r in roots:
                if r.status == RootStatus.TRUSTED:
                    gates += [
                        activation_gate(tx, r, now=now, lifetime=lifetime),
                        retirement_gate(tx, r, now=now, lifetime=lifetime),
                    ]
            return RootGates(active_root(roots).id, lifetime, margin(lifetime), gates)

    def served(self, clusters: Sequence[Cluster]) -> dict[str, ServedView]:
        """The served view of each of ``clusters`` whose last report has one."""
        now = self.ctx.clock()
        with self.ctx.store.read() as tx:
            by_fp = {root_fingerprint(r): r.id for r in tx.list_roots()}
            current = tx.current_certificates()
            views = {c.name: served_view(tx, c, by_fp, current.get(c.name), now) for c in clusters}
        return {name: v for name, v in views.items() if v is not None}
