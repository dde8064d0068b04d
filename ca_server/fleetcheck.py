"""`meshbridge-ca fleet check`: the fleet's health from the REST API, one result per check and cluster.

``gather`` fetches what the checks read (GET /v1/clusters, /v1/trust-bundle, /v1/crl?format=pem);
``check_fleet`` is a pure function from that to a list of results; ``render`` and ``exit_code`` turn
the results into what the command prints and returns. Nothing here writes.

Why the served side matters (read in the pinned Istio module, as ca_server/core/gates.py cites):
workloads trust the bundle istiod publishes in `istio-ca-root-cert`
(pilot/pkg/serviceregistry/kube/controller/namespacecontroller.go, ``reconcileCACertAndCRL``), not
what the agent wrote into `cacerts`, and istiod keeps its old bundle and intermediate on a root
change without ISTIO_MULTIROOT_MESH (pilot/pkg/bootstrap/istio_ca.go, ``handleEvent``); istiod
signs with the intermediate it holds (security/pkg/pki/ca/ca.go, ``IstioCA.sign``). So the checks
compare what the agent reports istiod serves, not only what it installed. The CRLs istiod publishes
to sidecars are the `istio-ca-crl` ConfigMap (same ``reconcileCACertAndCRL``, key ``ca-crl.pem``,
pkg/config/constants/constants.go), on unless PILOT_ENABLE_CA_CRL=false (pilot/pkg/features/pilot.go,
``EnableCACRL``); a proxy fails every chain whose CRL is past nextUpdate (envoyproxy/envoy#31320, as
ca_server/core/crls.py notes), hence the --min-days margin on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from ca_server.core.gates import parse_time
from meshbridge_wire.pem import certificate_fingerprints, load_crls

Status = Literal["ok", "warn", "fail", "skip"]
SYMBOL: dict[Status, str] = {"ok": "✓", "warn": "!", "fail": "✗", "skip": "-"}
FLEET = "*"  # the "cluster" of a fleet-wide result
NO_PEER_DATA = "not checked: agents do not report peer reachability"


@dataclass(frozen=True)
class Result:
    cluster: str
    check: str
    status: Status
    detail: str


@dataclass(frozen=True)
class Limits:
    max_report_age: timedelta = timedelta(minutes=10)
    min_days: float = 14.0


@dataclass(frozen=True)
class FleetData:
    clusters: list[dict[str, Any]]  # GET /v1/clusters items
    trust_bundle: frozenset[str]  # SHA-256 of each root's DER in GET /v1/trust-bundle, lowercase hex
    crls: list[tuple[str, datetime | None]]  # (issuer, nextUpdate) of each CRL in GET /v1/crl?format=pem


# ----------------------------------------------------------------------------- fetching
def gather(get_json: Callable[[str], Any], get_text: Callable[[str], str]) -> FleetData:
    """What the checks read, through the operator's client (``get_json``/``get_text`` of a path)."""
    return FleetData(
        clusters=list(get_json("/v1/clusters")["items"]),
        trust_bundle=frozenset(certificate_fingerprints(get_text("/v1/trust-bundle"))),
        crls=crl_next_updates(get_text("/v1/crl?format=pem")),
    )


def crl_next_updates(pem: str) -> list[tuple[str, datetime | None]]:
    return [(c.issuer.rfc4514_string(), c.next_update_utc) for c in load_crls(pem)]


# ----------------------------------------------------------------------------- the checks
def check_fleet(data: FleetData, *, now: datetime, limits: Limits) -> list[Result]:
    """Every check's result: fleet-wide ones first, then each registered cluster's, by name."""
    out = [*_ca_crls(data, now, limits), Result(FLEET, "gateway-reachability", "skip", NO_PEER_DATA)]
    names = {c["name"]: c["status"] for c in data.clusters}
    for c in sorted(data.clusters, key=lambda c: str(c["name"])):
        out += list(_cluster(c, data, names, now, limits))
    return out


def _ca_crls(data: FleetData, now: datetime, limits: Limits) -> list[Result]:
    if not data.crls:
        return [Result(FLEET, "ca-crl", "fail", "the CA serves no CRL (GET /v1/crl)")]
    return [_far_enough(FLEET, "ca-crl", f"CRL of {issuer}", nu, now, limits) for issuer, nu in data.crls]


def _cluster(
    c: dict[str, Any], data: FleetData, names: dict[str, str], now: datetime, limits: Limits
) -> Iterator[Result]:
    name = c["name"]
    if c["status"] != "active":
        status: Status = "warn" if c["status"] == "pending" else "skip"
        why = "registered, never enrolled" if c["status"] == "pending" else "revoked: not checked"
        yield Result(name, "enrolled", status, why)
        return
    st = c.get("agent_status")
    yield _reported(name, st, now, limits)
    yield _generation(c)
    yield _intermediate(c, now, limits)
    served = (st or {}).get("served")
    if not isinstance(served, dict):
        yield Result(name, "served", "warn", "no istiod report: the agent does not report what istiod serves")
    else:
        yield _signing(c)
        yield _bundle(name, served, data.trust_bundle)
        problems = [str(p) for p in served.get("problems") or []]
        if problems:
            yield Result(name, "served", "warn", f"observing istiod: {'; '.join(problems)}")
        yield from _served_crls(name, served, now, limits)
    yield from _exports(name, c.get("exports"), names)
    yield _errors(name, st)


def _reported(name: str, st: dict[str, Any] | None, now: datetime, limits: Limits) -> Result:
    if st is None:
        return Result(name, "agent-report", "fail", "its agent has never reported a status")
    at = parse_time(st.get("received_at"))
    if at is None:
        return Result(name, "agent-report", "fail", "its last report has no readable receipt time")
    age = now - at
    limit = f"(limit {duration_text(limits.max_report_age.total_seconds())})"
    if age > limits.max_report_age:
        return Result(
            name,
            "agent-report",
            "fail",
            f"last report {duration_text(age.total_seconds())} ago {limit}: is the agent running?",
        )
    return Result(name, "agent-report", "ok", f"last report {duration_text(age.total_seconds())} ago {limit}")


def _generation(c: dict[str, Any]) -> Result:
    installed = (c.get("installed") or {}).get("generation")
    desired = c["generation"]
    if installed == desired:
        return Result(c["name"], "generation", "ok", f"installed generation {installed} is the desired one")
    have = "none reported" if installed is None else f"installed {installed}"
    return Result(c["name"], "generation", "fail", f"{have}, desired {desired}")


def _intermediate(c: dict[str, Any], now: datetime, limits: Limits) -> Result:
    inter = c.get("intermediate") or {}
    end = parse_time(inter.get("not_after"))
    if end is None:
        return Result(c["name"], "intermediate", "fail", "the CA holds no intermediate for it")
    return _far_enough(c["name"], "intermediate", f"intermediate {inter.get('serial', '')[:16]}", end, now, limits)


def _far_enough(cluster: str, check: str, what: str, end: datetime | None, now: datetime, limits: Limits) -> Result:
    if end is None:
        return Result(cluster, check, "fail", f"{what} has no expiry date (nextUpdate)")
    days = (end - now).total_seconds() / 86400
    text = f"{what}: {days:.1f} days left (minimum {limits.min_days:g})"
    return Result(cluster, check, "ok" if days >= limits.min_days else "fail", text)


def _signing(c: dict[str, Any]) -> Result:
    served, installed = c.get("served") or {}, (c.get("installed") or {}).get("serial")
    signing = served.get("signing_serial")
    if signing is None:
        return Result(c["name"], "istiod-signing", "fail", "the agent cannot tell which intermediate istiod signs with")
    if signing == installed:
        return Result(c["name"], "istiod-signing", "ok", f"istiod signs with the installed intermediate {signing[:16]}")
    gen = served.get("signing_generation")
    which = f"generation {gen}" if gen is not None else "one the CA did not issue to this cluster"
    return Result(
        c["name"],
        "istiod-signing",
        "fail",
        f"istiod signs with {signing[:16]} ({which}), the agent installed {(installed or 'none')[:16]}: "
        "istiod has not loaded cacerts (restart it, or set ISTIO_MULTIROOT_MESH=true for root changes)",
    )


def _bundle(name: str, served: dict[str, Any], trust_bundle: frozenset[str]) -> Result:
    have = frozenset(fp for fp in served.get("bundle") or [] if isinstance(fp, str))
    if have == trust_bundle:
        return Result(name, "trust-bundle", "ok", f"istiod serves the CA's trust bundle ({len(have)} root(s))")
    missing, extra = sorted(trust_bundle - have), sorted(have - trust_bundle)
    parts = [f"lacks {', '.join(fp[:16] for fp in missing)}" if missing else ""]
    parts += [f"has {', '.join(fp[:16] for fp in extra)} the CA no longer trusts" if extra else ""]
    return Result(
        name, "trust-bundle", "fail", f"istiod's bundle (istio-ca-root-cert) {'; '.join(p for p in parts if p)}"
    )


def _served_crls(name: str, served: dict[str, Any], now: datetime, limits: Limits) -> Iterator[Result]:
    crls = [c for c in served.get("crls") or [] if isinstance(c, dict)]
    if not crls:
        yield Result(name, "istiod-crl", "warn", "the agent reports no CRL in istio-ca-crl")
    for crl in crls:
        what = f"istio-ca-crl of {crl.get('issuer', '?')}"
        yield _far_enough(name, "istiod-crl", what, parse_time(crl.get("next_update")), now, limits)


def _exports(name: str, exports: dict[str, Any] | None, names: dict[str, str]) -> Iterator[Result]:
    services = (exports or {}).get("services") or []
    if not services:
        yield Result(name, "exports", "ok", "exports nothing")
    for svc in services:
        bad = [
            f"{c} ({names.get(c, 'not registered')})" for c in svc.get("consumers") or [] if names.get(c) != "active"
        ]
        label = f"export {svc.get('name', '?')}"
        if bad:
            yield Result(name, "exports", "fail", f"{label}: consumers not active: {', '.join(bad)}")
        else:
            yield Result(name, "exports", "ok", f"{label}: {len(svc.get('consumers') or [])} consumer(s), all active")


def _errors(name: str, st: dict[str, Any] | None) -> Result:
    errors = [str(e) for e in (st or {}).get("errors") or []]
    if not errors:
        return Result(name, "agent-errors", "ok", "the agent reports no errors")
    return Result(name, "agent-errors", "fail", f"{len(errors)} error(s): {'; '.join(errors)}")


def duration_text(seconds: float) -> str:
    """1d2h, 3h4m, 5m6s, 7s."""
    s = max(0, int(seconds))
    for big, small, b, sm in ((86400, 3600, "d", "h"), (3600, 60, "h", "m"), (60, 1, "m", "s")):
        if s >= big:
            rest = (s % big) // small
            return f"{s // big}{b}{rest}{sm}" if rest else f"{s // big}{b}"
    return f"{s}s"


# ----------------------------------------------------------------------------- output
def exit_code(results: list[Result]) -> int:
    """1 when any check failed; warnings and skipped checks alone give 0."""
    return 1 if any(r.status == "fail" for r in results) else 0


def as_data(results: list[Result]) -> list[dict[str, str]]:
    """``fleet check --json``: one ``{"cluster", "check", "status", "detail"}`` per result."""
    return [asdict(r) for r in results]


def render(results: list[Result]) -> str:
    width = max((len(r.cluster) for r in results), default=1)
    check_width = max((len(r.check) for r in results), default=1)
    lines = [f"{SYMBOL[r.status]} {r.cluster.ljust(width)}  {r.check.ljust(check_width)}  {r.detail}" for r in results]
    count = {s: sum(1 for r in results if r.status == s) for s in SYMBOL}
    verdict = "PROBLEMS" if exit_code(results) else "OK"
    lines.append(
        f"\n{verdict}: {count['ok']} ok, {count['fail']} failed, {count['warn']} warning(s), "
        f"{count['skip']} not checked"
    )
    return "\n".join(lines)


def now_utc() -> datetime:
    return datetime.now(UTC)
