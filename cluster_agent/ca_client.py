"""The only module that touches httpx: the agent's client of the CA service.

Errors, drawn once::

    CAClientError                 base
    ├── CAUnreachable             transport failure or 5xx/429: retry later, keep everything as is
    ├── CARejected                a 4xx answer: retrying the same request will not help
    │   └── CAAuthFailed          401/403: token or proof refused (re-enrollment may be needed)
    └── CAAnswerInvalid           a 2xx answer that is not what the API promises (meshbridge_wire.models)

Requests are built from, and answers parsed into, the contract's models (``meshbridge_wire.models``),
so the agent never handles the CA service's JSON as untyped dicts.

The trust anchor: the configured file only bootstraps; once desired state has arrived, the
agent trusts the CA service through its ``trust_bundle`` (``set_trust_bundle``), so a root
rotation never cuts it off.
"""

from __future__ import annotations

import ssl
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from cluster_agent.errors import validation_problems
from meshbridge_wire.models import (
    DesiredOut,
    EnrollIn,
    EnrollOut,
    ExportsIn,
    ImportList,
    ImportOut,
    RenewIn,
    RenewOut,
    StatusIn,
)

Answer = TypeVar("Answer", bound=BaseModel)


class CAClientError(Exception):
    pass


class CAUnreachable(CAClientError):
    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CARejected(CAClientError):
    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class CAAuthFailed(CARejected):
    pass


class CAAnswerInvalid(CAClientError):
    """The CA service answered with a body that does not fit the API's model."""


def _ssl_context(trust_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=trust_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class CAClient:
    def __init__(
        self,
        url: str,
        *,
        trust_pem: str,
        cluster: str,
        timeout: float = 15.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.cluster = cluster
        self.timeout = timeout
        self._transport = transport
        self._token: str | None = None
        self._trust = trust_pem
        self._http = self._make(trust_pem)

    def __repr__(self) -> str:
        return f"CAClient(url={self.url!r}, cluster={self.cluster!r})"

    def _make(self, trust_pem: str) -> httpx.Client:
        verify: Any = _ssl_context(trust_pem) if self.url.startswith("https") else True
        return httpx.Client(base_url=self.url, verify=verify, timeout=self.timeout, transport=self._transport)

    def set_token(self, token: str | None) -> None:
        self._token = token

    def set_trust_bundle(self, trust_pem: str) -> None:
        """Follow the CA's trust bundle (every root it currently trusts)."""
        if trust_pem and trust_pem != self._trust:
            old = self._http
            self._http = self._make(trust_pem)
            self._trust = trust_pem
            old.close()

    @property
    def trust_pem(self) -> str:
        return self._trust

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ transport
    def _request(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
        auth: bool = True,
        timeout: float | None = None,
    ) -> httpx.Response:
        headers = {}
        if auth:
            if not self._token:
                raise CAAuthFailed("no agent token: the agent has not enrolled", status=401)
            headers["Authorization"] = f"Bearer {self._token}"
        json = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        try:
            r = self._http.request(
                method, path, json=json, params=params, headers=headers, timeout=timeout or self.timeout
            )
        except httpx.HTTPError as exc:
            raise CAUnreachable(f"CA service at {self.url} unreachable: {type(exc).__name__}") from exc
        if r.status_code == 429 or r.status_code >= 500:
            retry = r.headers.get("Retry-After")
            raise CAUnreachable(
                f"CA service answered {r.status_code} to {method} {path}",
                retry_after=float(retry) if retry and retry.isdigit() else None,
            )
        if r.status_code >= 400:
            detail = ""
            try:
                detail = str(r.json().get("detail", ""))
            except ValueError:
                pass
            cls = CAAuthFailed if r.status_code in (401, 403) else CARejected
            raise cls(f"CA service refused {method} {path} ({r.status_code}): {detail}", status=r.status_code)
        return r

    @staticmethod
    def _parse(model: type[Answer], r: httpx.Response) -> Answer:
        try:
            return model.model_validate_json(r.content)
        except ValidationError as exc:
            raise CAAnswerInvalid(
                f"CA service answered {r.request.method} {r.request.url.path} with a body "
                f"that does not fit {model.__name__} ({validation_problems(exc)})"
            ) from None

    # ------------------------------------------------------------------ API
    def enroll(self, request: EnrollIn) -> EnrollOut:
        return self._parse(EnrollOut, self._request("POST", "/v1/enroll", body=request, auth=False))

    def renew(self, request: RenewIn) -> RenewOut:
        return self._parse(RenewOut, self._request("POST", f"/v1/clusters/{self.cluster}/intermediate", body=request))

    def desired(self, *, revision: str | None = None, wait: float = 0) -> DesiredOut:
        params: dict[str, Any] = {}
        if revision is not None:
            params["revision"] = revision
        if wait:
            params["wait"] = int(wait)
        return self._parse(
            DesiredOut,
            self._request("GET", f"/v1/clusters/{self.cluster}/desired", params=params, timeout=self.timeout + wait),
        )

    def put_exports(self, exports: ExportsIn) -> None:
        self._request("PUT", f"/v1/clusters/{self.cluster}/exports", body=exports)

    def put_status(self, status: StatusIn) -> None:
        self._request("PUT", f"/v1/clusters/{self.cluster}/status", body=status)

    def imports(self) -> list[ImportOut]:
        return self._parse(ImportList, self._request("GET", f"/v1/clusters/{self.cluster}/imports")).items
