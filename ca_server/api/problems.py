"""The one table from core errors to HTTP status, and RFC 9457 problem responses."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from ca_server.core import errors as e
from meshbridge_wire.models import FleetNotReadyProblem, Problem

STATUS: list[tuple[type[e.CAError], int]] = [
    (e.BadProof, 403),
    (e.InvalidInput, 400),
    (e.Unauthenticated, 401),
    (e.Forbidden, 403),
    (e.NotFound, 404),
    (e.Conflict, 409),
    (e.PayloadTooLarge, 413),
    (e.RateLimited, 429),
    (e.Unavailable, 503),
]

PROBLEM_BASE = "https://meshbridge.dev/problems/"


def status_of(exc: e.CAError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    type_: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {
        "type": PROBLEM_BASE + (type_ or title.lower().replace(" ", "-")),
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def problem_for(exc: e.CAError) -> JSONResponse:
    status = status_of(exc)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, e.RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    extra: dict[str, Any] = {}
    if isinstance(exc, e.FleetNotReady):  # an RFC 9457 extension member: every lagging cluster
        extra["lagging"] = [{"cluster": name, "waiting_for": why} for name, why in exc.lagging]
    return problem(status, exc.title, exc.detail, type_=type(exc).__name__.lower(), headers=headers or None, **extra)


def problem_responses() -> dict[int | str, dict[str, Any]]:
    """Declared on every operation, so clients (and schema checkers) know what an error looks like."""
    schema = Problem.model_json_schema()
    out: dict[int | str, dict[str, Any]] = {}
    for status, text in (
        (400, "Malformed or unacceptable input"),
        (401, "Missing or invalid token"),
        (403, "Token not valid for this resource, or missing/wrong proof"),
        (404, "Unknown cluster, certificate or root"),
        (409, "Conflicts with the current state"),
        (413, "Body over 64 KiB"),
        (429, "Rate limited; see Retry-After"),
        (503, "Database or signing key unavailable"),
    ):
        out[status] = {"description": text, "content": {"application/problem+json": {"schema": schema}}}
    return out


def fleet_not_ready_responses() -> dict[int | str, dict[str, Any]]:
    """The 409 of a gated root phase: a problem document listing the lagging clusters."""
    schema = FleetNotReadyProblem.model_json_schema()
    return {
        409: {
            "description": "Retired or active root, clusters still holding intermediates under it, or "
            "(`fleetnotready`) clusters whose istiod is not ready, listed in `lagging`",
            "content": {"application/problem+json": {"schema": schema}},
        }
    }
