"""HTTP routes: parse → authorise → call the core → render. Nothing else happens here."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from ca_server import gcsettings
from ca_server.api.longpoll import DesiredWaiters as DesiredWaiters  # app.py builds routes.DesiredWaiters
from ca_server.api.longpoll import long_poll_desired
from ca_server.api.metrics import Metrics
from ca_server.api.problems import fleet_not_ready_responses
from ca_server.api.ratelimit import budget_spent, spending
from ca_server.core.authority import Authority, Issued
from ca_server.core.context import Joined
from ca_server.core.errors import Unauthenticated
from ca_server.core.gates import RootGates, ServedView
from ca_server.core.issuance import RenewalDraft
from ca_server.core.keytypes import parse_key_type
from ca_server.core.models import AdminToken, AuditEntry, CertificateRecord, Cluster, Root
from ca_server.core.operators import ADMIN, VIEWER, state_of
from ca_server.core.validation import require_dns_label
from meshbridge_wire import models as w

PEM = "application/x-pem-file"
NamePath = Annotated[str, Path(min_length=1, max_length=63, pattern=w.DNS_LABEL)]


def iso(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ") if dt else ""


def authority(request: Request) -> Authority:
    return request.app.state.authority  # type: ignore[no-any-return]


def metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


def _bearer(authorization: str | None) -> str:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthenticated("an 'Authorization: Bearer <token>' header is required")
    return authorization[7:].strip()


def _operator(role: str) -> Callable[..., str]:
    """The dependency admitting an operator token whose role has ``role``'s rights (core/operators.py);
    any other operator token is refused 403, audited with the request's method and path."""

    def dependency(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
        token = _bearer(authorization)
        what = f"{request.method} {request.url.path}"
        return spending(lambda: authority(request).authorize_operator(token, role=role, what=what))

    return dependency


def agent(request: Request, name: NamePath, authorization: Annotated[str | None, Header()] = None) -> Cluster:
    require_dns_label(name, what="cluster name")
    token = _bearer(authorization)
    return spending(lambda: authority(request).authenticate_agent(token, name))


Admin = Annotated[str, Depends(_operator(ADMIN))]  # the admin API's writes
Viewer = Annotated[str, Depends(_operator(VIEWER))]  # its reads (GET): viewer and admin tokens
Agent = Annotated[Cluster, Depends(agent)]


def cluster_out(
    c: Cluster,
    cert: CertificateRecord | None,
    served: ServedView | None = None,
    imports: dict[str, list[str]] | None = None,
) -> w.ClusterOut:
    inter = None
    if cert is not None:
        inter = w.IntermediateOut(
            serial=cert.serial, not_before=iso(cert.not_before), not_after=iso(cert.not_after), root_id=cert.root_id
        )
    return w.ClusterOut(
        name=c.name,
        status=c.status.value,
        generation=c.generation,
        trust_domain=c.trust_domain,
        gateway=c.gateway,
        rotation_pending=c.rotation_pending,
        intermediate=inter,
        agent_status=c.agent_status,
        installed=installed_out(c.agent_status),
        served=served_out(served) if served is not None else None,
        exports=c.exports,
        imports=imports or {},
    )


def installed_out(status: dict[str, Any] | None) -> w.InstalledOut | None:
    if status is None:
        return None
    gen, serial = status.get("installed_generation"), status.get("installed_serial")
    return w.InstalledOut(
        generation=gen if isinstance(gen, int) else None, serial=serial if isinstance(serial, str) else None
    )


def served_out(v: ServedView) -> w.ServedOut:
    rec = v.signing
    return w.ServedOut(
        observed_at=iso(v.observed_at) or None,
        received_at=iso(v.received_at) or None,
        report_age_s=max(0, int(v.report_age.total_seconds())) if v.report_age is not None else None,
        bundle_roots=v.bundle_roots,
        bundle_since=iso(v.bundle_since) or None,
        signing_serial=v.signing_serial,
        signing_generation=rec.generation if rec is not None else None,
        signing_root_id=rec.root_id if rec is not None else None,
        signing_since=iso(v.signing_since) or None,
        problems=v.problems,
    )


def clusters_out(a: Authority, rows: list[tuple[Cluster, CertificateRecord | None]]) -> list[w.ClusterOut]:
    served = a.served([c for c, _ in rows])
    return [cluster_out(c, cert, served.get(c.name), a.exporters_by_name(c.name)) for c, cert in rows]


def root_status_out(s: RootGates) -> w.RootStatusOut:
    return w.RootStatusOut(
        active_root=s.active_root,
        workload_cert_lifetime_s=int(s.lifetime.total_seconds()),
        margin_s=int(s.margin.total_seconds()),
        gates=[
            w.RootGateOut(
                root_id=g.root_id,
                phase=g.phase,
                ready=g.ready,
                clusters=[
                    w.GateClusterOut(
                        name=c.name,
                        ready=c.ready,
                        waiting_for=c.waiting_for,
                        ready_at=iso(c.ready_at) or None,
                        overridable=c.overridable,
                    )
                    for c in g.clusters
                ],
            )
            for g in s.gates
        ],
    )


def root_out(r: Root) -> w.RootOut:
    return w.RootOut(id=r.id, status=r.status.value, not_after=iso(r.not_after), certificate=r.cert_pem)


def bundle_out(issued: Issued) -> w.BundleOut:
    b = issued.bundle
    return w.BundleOut.model_validate(b.as_files())


public = APIRouter(tags=["public"])
admin_api = APIRouter(prefix="/v1", tags=["admin"])
agent_api = APIRouter(prefix="/v1", tags=["agent"])


# ----------------------------------------------------------------------------- public
@public.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/readyz", responses={503: {"description": "database or signing key not usable"}})
def readyz(request: Request) -> dict[str, str]:
    request.app.state.check_ready()
    return {"status": "ready"}


@public.get("/metrics", response_class=Response)
def metrics_endpoint(request: Request) -> Response:
    body, ctype = metrics(request).render()
    return Response(body, media_type=ctype)


@public.get("/v1/trust-bundle", response_class=Response, responses={200: {"content": {PEM: {}}}})
def trust_bundle(request: Request) -> Response:
    return Response(authority(request).snapshot().trust_bundle, media_type=PEM)


@public.get("/v1/crl", response_class=Response, responses={200: {"content": {"application/pkix-crl": {}, PEM: {}}}})
def crl(request: Request, format: Annotated[str, Query(pattern="^(der|pem)$")] = "der") -> Response:
    a = authority(request)
    if format == "pem":
        return Response(a.snapshot().crl_pem, media_type=PEM)
    return Response(a.crl_der(), media_type="application/pkix-crl")


# ----------------------------------------------------------------------------- admin
@admin_api.post("/clusters", status_code=201, response_model=w.ClusterCreated)
def create_cluster(request: Request, body: w.ClusterCreate, actor: Admin) -> w.ClusterCreated:
    made = authority(request).create_cluster(
        name=body.name,
        trust_domain=body.trust_domain,
        gateway=body.gateway.model_dump() if body.gateway else None,
        actor=actor,
        share_trust_domain=body.share_trust_domain,
    )
    return w.ClusterCreated(
        name=made.cluster.name,
        status=made.cluster.status.value,
        generation=made.cluster.generation,
        bootstrap_token=made.bootstrap_token,
        bootstrap_expires_at=iso(made.bootstrap_expires_at),
    )


@admin_api.get("/clusters", response_model=w.ClusterList)
def list_clusters(request: Request, actor: Viewer) -> w.ClusterList:
    a = authority(request)
    return w.ClusterList(items=clusters_out(a, a.list_clusters()))


@admin_api.get("/clusters/{name}", response_model=w.ClusterOut)
def get_cluster(request: Request, name: NamePath, actor: Viewer) -> w.ClusterOut:
    require_dns_label(name, what="cluster name")
    a = authority(request)
    return clusters_out(a, [a.get_cluster(name)])[0]


@admin_api.post("/clusters/{name}/bootstrap-token", status_code=201, response_model=w.BootstrapTokenOut)
def bootstrap_token(request: Request, name: NamePath, actor: Admin) -> w.BootstrapTokenOut:
    require_dns_label(name, what="cluster name")
    token, expires = authority(request).new_bootstrap_token(name, actor=actor)
    return w.BootstrapTokenOut(bootstrap_token=token, bootstrap_expires_at=iso(expires))


@admin_api.post("/clusters/{name}/rotate", status_code=202, response_model=w.RotateOut)
def rotate(request: Request, name: NamePath, actor: Admin, body: w.Empty | None = None) -> w.RotateOut:
    require_dns_label(name, what="cluster name")
    return w.RotateOut(generation=authority(request).rotate(name, actor=actor))


@admin_api.post("/clusters/{name}/revoke", response_model=w.ClusterOut)
def revoke_cluster(request: Request, name: NamePath, actor: Admin, body: w.RevokeIn | None = None) -> w.ClusterOut:
    require_dns_label(name, what="cluster name")
    a = authority(request)
    a.revoke_cluster(name, reason=(body or w.RevokeIn()).reason, actor=actor)
    metrics(request).forget_cluster(name)
    return clusters_out(a, [a.get_cluster(name)])[0]


@admin_api.post("/certificates/{serial}/revoke", response_model=w.CertRevoked)
def revoke_certificate(
    request: Request,
    serial: Annotated[str, Path(min_length=1, max_length=64, pattern="^[0-9a-f]+$")],
    actor: Admin,
    body: w.RevokeIn | None = None,
) -> w.CertRevoked:
    rec = authority(request).revoke_certificate(serial, reason=(body or w.RevokeIn()).reason, actor=actor)
    return w.CertRevoked(serial=rec.serial, revoked_at=iso(rec.revoked_at), reason=rec.revocation_reason or "")


@admin_api.get("/roots", response_model=w.RootList)
def list_roots(request: Request, actor: Viewer) -> w.RootList:
    return w.RootList(items=[root_out(r) for r in authority(request).list_roots()])


@admin_api.post("/roots", status_code=201, response_model=w.RootOut)
def add_root(request: Request, actor: Admin, body: w.RootIn | None = None) -> w.RootOut:
    kt = parse_key_type(body.key_type) if body and body.key_type else None
    return root_out(authority(request).add_root(key_type=kt, actor=actor))


@admin_api.get("/roots/status", response_model=w.RootStatusOut)
def root_status(request: Request, actor: Viewer) -> w.RootStatusOut:
    return root_status_out(authority(request).root_status())


@admin_api.post("/roots/{root_id}/activate", response_model=w.RootOut, responses=fleet_not_ready_responses())
def activate_root(
    request: Request, root_id: Annotated[str, Path(max_length=64)], actor: Admin, body: w.RootPhaseIn | None = None
) -> w.RootOut:
    force = (body or w.RootPhaseIn()).force
    with gcsettings.paused():  # it reads every cluster's reported state
        return root_out(authority(request).activate_root(root_id, actor=actor, force=force))


@admin_api.post("/roots/{root_id}/retire", response_model=w.RootOut, responses=fleet_not_ready_responses())
def retire_root(
    request: Request, root_id: Annotated[str, Path(max_length=64)], actor: Admin, body: w.RootPhaseIn | None = None
) -> w.RootOut:
    force = (body or w.RootPhaseIn()).force
    with gcsettings.paused():  # it reads every cluster's reported state
        return root_out(authority(request).retire_root(root_id, actor=actor, force=force))


@admin_api.get("/audit", response_model=w.AuditList)
def audit(
    request: Request,
    actor: Viewer,
    after: Annotated[int, Query(ge=0, le=2**53)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> w.AuditList:
    return w.AuditList(items=[audit_out(e) for e in authority(request).audit(after=after, limit=limit)])


def audit_out(e: AuditEntry) -> w.AuditOut:
    return w.AuditOut(
        id=e.id, at=e.at.isoformat(), actor=e.actor, action=e.action, subject=e.subject, details=e.details, hash=e.hash
    )


@admin_api.post("/admin-tokens", status_code=201, response_model=w.AdminTokenCreated)
def create_admin_token(request: Request, body: w.AdminTokenIn, actor: Admin) -> w.AdminTokenCreated:
    lifetime = timedelta(seconds=body.expires_in_s) if body.expires_in_s is not None else None
    a = authority(request)
    rec, plaintext = a.create_admin_token(name=body.name, role=body.role, lifetime=lifetime, actor=actor)
    return w.AdminTokenCreated(**admin_token_out(rec, a.now()).model_dump(), token=plaintext)


@admin_api.get("/admin-tokens", response_model=w.AdminTokenList)
def list_admin_tokens(request: Request, actor: Viewer) -> w.AdminTokenList:
    a = authority(request)
    now = a.now()
    return w.AdminTokenList(items=[admin_token_out(r, now) for r in a.list_admin_tokens()])


@admin_api.post("/admin-tokens/{ref}/revoke", response_model=w.AdminTokenOut)
def revoke_admin_token(
    request: Request, ref: Annotated[str, Path(min_length=1, max_length=63)], actor: Admin, body: w.Empty | None = None
) -> w.AdminTokenOut:
    a = authority(request)
    return admin_token_out(a.revoke_admin_token(ref, actor=actor), a.now())


def admin_token_out(r: AdminToken, now: datetime) -> w.AdminTokenOut:
    return w.AdminTokenOut(
        id=r.token_id,
        name=r.name,
        role=r.role,
        created_at=iso(r.created_at),
        expires_at=iso(r.expires_at) or None,
        revoked_at=iso(r.revoked_at) or None,
        state=state_of(r, now),
    )


# ----------------------------------------------------------------------------- agent
@agent_api.post("/enroll", status_code=201, response_model=w.EnrollOut)
def enroll(request: Request, body: w.EnrollIn) -> w.EnrollOut:
    m = metrics(request)
    started = time.perf_counter()
    done = authority(request).enroll(cluster_name=body.cluster, bootstrap_token=body.bootstrap_token, csr_pem=body.csr)
    m.issued("enroll", time.perf_counter() - started, done.issued)
    return w.EnrollOut(agent_token=done.agent_token, generation=done.issued.generation, bundle=bundle_out(done.issued))


@agent_api.post("/clusters/{name}/intermediate", status_code=201, response_model=w.RenewOut)
async def renew(
    request: Request, name: NamePath, body: w.RenewIn, authorization: Annotated[str | None, Header()] = None
) -> Response:
    # well-formed requests to this route, the desired state's and the status report's are answered
    # by api/fastpath.AgentShortcut with the same functions; these routes document the operations
    # and answer what the shortcut hands over
    return await renewal_answer(request.app.state, name, authorization, body)


async def renewal_answer(state: Any, name: str, authorization: str | None, body: w.RenewIn) -> Response:
    """The renewal. The authority authenticates the agent token itself, inside the renewal's write
    transaction; with an embedded database and an in-memory key the renewal runs inline (pure CPU
    work, a thread hand-off would cost more than it frees), else it is drafted on the agents'
    renewal threads and its write awaited (``_renewed_off_loop``)."""
    require_dns_label(name, what="cluster name")
    a: Authority = state.authority
    m: Metrics = state.metrics
    fields = dict(cluster_name=name, agent_token=_bearer(authorization), csr_pem=body.csr, proof_b64=body.proof)
    seen = state.watcher.snapshot  # its row for the cluster spares the token's pre-filter a store read
    started = time.perf_counter()
    if a.renewal_is_cpu_bound:
        issued = spending(functools.partial(a.renew, **fields, seen=seen))
    else:
        with budget_spent():
            draft = functools.partial(a.draft_renewal, **fields, seen=seen)
            issued = await _renewed_off_loop(a, state.agent_threads.writes, draft)
    m.issued("renew", time.perf_counter() - started, issued)
    out = {"generation": issued.generation, "bundle": issued.bundle.as_files()}
    return Response(json.dumps(out, separators=(",", ":")).encode(), status_code=201, media_type="application/json")


async def _renewed_off_loop(a: Authority, threads: anyio.CapacityLimiter, draft: Callable[[], RenewalDraft]) -> Issued:
    """A renewal checked and signed on the agents' own threads (a renewal storm does not queue ahead
    of the operator API; the checks may read the store), whose write is then awaited holding no
    thread: on PostgreSQL it waits for its group commit, and a thread per waiting renewal only made
    32 threads take turns at the interpreter lock (bench/RESULTS.md). Not cancelled while its write
    is under way, as the thread it replaces was not."""
    drafted, written = await anyio.to_thread.run_sync(_submitted, a, draft, limiter=threads)
    with anyio.CancelScope(shield=True):
        outcome = await asyncio.wrap_future(written)
    return a.finish_renewal(drafted, outcome)


def _submitted(a: Authority, draft: Callable[[], RenewalDraft]) -> tuple[RenewalDraft, Future[Joined[Issued]]]:
    """The drafted renewal and its write (SQLite's done on this thread, PostgreSQL's in a group commit)."""
    drafted = draft()
    return drafted, a.submit_renewal(drafted)


@agent_api.get("/clusters/{name}/desired", response_model=w.DesiredOut)
async def desired(
    request: Request,
    name: NamePath,
    revision: Annotated[str | None, Query(max_length=64)] = None,
    wait: Annotated[float, Query(ge=0)] = 0,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    return await desired_answer(request.app.state, name, authorization, revision, wait, request.is_disconnected)


async def desired_answer(
    state: Any,
    name: str,
    authorization: str | None,
    revision: str | None,
    wait: float,
    is_disconnected: Callable[[], Awaitable[bool]],
) -> Response:
    """The desired-state long-poll, authenticated by ``long_poll_desired`` against the fleet
    snapshot it answers from (the `Agent` dependency would cost every long-poll a thread hop and a
    store read of its own)."""
    require_dns_label(name, what="cluster name")
    body = await long_poll_desired(
        state.authority,
        state.watcher,
        getattr(state, "desired_waiters", None),
        name,
        token=_bearer(authorization),
        revision=revision,
        wait=wait,
        is_disconnected=is_disconnected,
        threads=state.agent_threads.reads,
    )
    return _model_response(w.DesiredOut, body)


@agent_api.put("/clusters/{name}/exports", response_model=w.ExportsIn)
def put_exports(request: Request, body: w.ExportsIn, cluster: Agent) -> dict[str, Any]:
    return authority(request).put_exports(cluster, body.model_dump(exclude_none=True))


@agent_api.get("/clusters/{name}/imports", response_model=w.ImportList)
def imports(request: Request, cluster: Agent) -> dict[str, Any]:
    return {"items": authority(request).imports(cluster.name)}


@agent_api.put("/clusters/{name}/status", response_model=w.StatusIn)
def put_status(request: Request, body: w.StatusIn, cluster: Agent) -> Response:
    return _status_stored(authority(request), cluster, body)


async def status_answer(state: Any, name: str, authorization: str | None, body: w.StatusIn) -> Response:
    """The status report as the shortcut answers it: the token authenticated (as the `Agent`
    dependency does) and the report stored in one hop to the agents' own threads."""
    require_dns_label(name, what="cluster name")
    a: Authority = state.authority
    token = _bearer(authorization)

    def report() -> Response:
        return _status_stored(a, spending(lambda: a.authenticate_agent(token, name)), body)

    return await anyio.to_thread.run_sync(report, limiter=state.agent_threads.writes)


def _status_stored(a: Authority, cluster: Cluster, body: w.StatusIn) -> Response:
    return _model_response(w.StatusIn, a.put_status(cluster, body.model_dump()))


def _model_response(model: type[BaseModel], content: dict[str, Any]) -> Response:
    """``content`` as FastAPI renders a route's ``response_model``: validated by the model, then
    serialised by pydantic (the same bytes from the shortcut and from the route)."""
    body = model.model_validate(content, from_attributes=True).model_dump_json(by_alias=True)
    return Response(body, media_type="application/json")
