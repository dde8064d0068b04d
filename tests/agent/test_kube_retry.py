"""retry_transient: the API server's 409 and 429 answers are retried, everything else is not."""

from __future__ import annotations

import time
from typing import Any

import httpx2
import pytest
from lightkube import ApiError

from cluster_agent.kube import retry_transient


def api_error(code: int, headers: dict[str, str] | None = None) -> ApiError:
    request = httpx2.Request("GET", "https://127.0.0.1:6443/apis/security.istio.io/v1/authorizationpolicies")
    response = httpx2.Response(
        code,
        headers=headers or {},
        request=request,
        json={"kind": "Status", "code": code, "message": f"answered {code}"},
    )
    return ApiError(request=request, response=response)


def flaky(errors: list[ApiError]) -> Any:
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        if errors:
            raise errors.pop(0)
        return "ok"

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def test_429_waits_for_retry_after_then_succeeds() -> None:
    fn = flaky([api_error(429, {"Retry-After": "0.2"}), api_error(409)])
    started = time.monotonic()
    assert retry_transient(fn) == "ok"
    assert fn.calls["n"] == 3 and time.monotonic() - started >= 0.2


def test_other_errors_and_exhausted_attempts_raise() -> None:
    fn = flaky([api_error(403)])
    with pytest.raises(ApiError, match="answered 403"):
        retry_transient(fn)
    assert fn.calls["n"] == 1
    fn = flaky([api_error(429, {"Retry-After": "0"}) for _ in range(3)])
    with pytest.raises(ApiError, match="answered 429"):
        retry_transient(fn, attempts=3)
    assert fn.calls["n"] == 3
