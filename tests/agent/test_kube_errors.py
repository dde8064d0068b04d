"""kube.py translates lightkube's errors once, by the status of the answer, into the agent's own
kinds; the applier, the state store and the lease elector raise only those."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx2
import pytest
from lightkube import ApiError

from cluster_agent.config import parse_config
from cluster_agent.errors import KubeConflict, KubeError, KubeForbidden, KubeNotFound, KubeRetryLater
from cluster_agent.kube import KubeApplier, LeaseElector, SecretStateStore, kube_error
from cluster_agent.state import AgentState

URL = "https://127.0.0.1:6443/api/v1/namespaces/istio-system/secrets/meshbridge-agent-state"


def api_error(code: int, headers: dict[str, str] | None = None) -> ApiError:
    request = httpx2.Request("GET", URL)
    response = httpx2.Response(
        code,
        headers=headers or {},
        request=request,
        json={"kind": "Status", "code": code, "message": f"answered {code}"},
    )
    return ApiError(request=request, response=response)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (409, KubeConflict),
        (403, KubeForbidden),
        (404, KubeNotFound),
        (429, KubeRetryLater),
        (500, KubeRetryLater),
        (503, KubeRetryLater),
    ],
)
def test_each_kind_from_a_real_api_error(code: int, kind: type[KubeError]) -> None:
    error = kube_error(api_error(code))
    assert type(error) is kind
    assert error.status == code
    assert str(error) == f"Kubernetes API server answered {code}: answered {code}"


@pytest.mark.parametrize("code", [400, 401, 410, 422])
def test_other_answers_are_plain_kube_errors(code: int) -> None:
    error = kube_error(api_error(code))
    assert type(error) is KubeError and error.status == code


@pytest.mark.parametrize(
    ("header", "delay"), [("3", 3.0), ("0.5", 0.5), ("", None), ("Fri, 04 Dec 2026 18:00:00 GMT", None), ("nan", None)]
)
def test_retry_later_carries_the_servers_retry_after(header: str, delay: float | None) -> None:
    error = kube_error(api_error(429, {"Retry-After": header} if header else {}))
    assert isinstance(error, KubeRetryLater) and error.delay == delay


def test_an_answer_without_a_status_body_is_classified_by_its_http_status() -> None:
    # a kind whose CRD is not installed: 404 with a text body, which lightkube leaves as httpx's error
    request = httpx2.Request("GET", "https://127.0.0.1:6443/apis/multicluster.x-k8s.io/v1alpha1/serviceexports")
    response = httpx2.Response(404, request=request, text="404 page not found", headers={"Content-Type": "text/plain"})
    raw = httpx2.HTTPStatusError("not found", request=request, response=response)
    error = kube_error(raw)
    assert type(error) is KubeNotFound and error.status == 404


def test_no_answer_at_all_is_retry_later_without_a_status() -> None:
    error = kube_error(httpx2.ConnectError("connection refused", request=httpx2.Request("GET", URL)))
    assert type(error) is KubeRetryLater and error.status is None and error.delay is None
    assert "unreachable" in str(error)


class FakeClient:
    """lightkube's Client as far as the adapter uses it: each method raises the next queued error."""

    def __init__(self, **errors: list[ApiError]) -> None:
        self.errors = errors
        self.calls: list[str] = []

    def _next(self, method: str) -> None:
        self.calls.append(method)
        queued = self.errors.get(method, [])
        if queued:
            raise queued.pop(0)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        self._next("get")
        return SimpleNamespace(data={}, metadata=None)

    def list(self, *args: Any, **kwargs: Any) -> list[Any]:
        self._next("list")
        return []

    def create(self, *args: Any, **kwargs: Any) -> None:
        self._next("create")

    def replace(self, *args: Any, **kwargs: Any) -> None:
        self._next("replace")


def test_the_state_store_sees_not_found_as_no_state_and_raises_the_agents_kinds() -> None:
    assert SecretStateStore(FakeClient(get=[api_error(404)]), "istio-system").load() == AgentState()  # type: ignore[arg-type]
    with pytest.raises(KubeForbidden, match="answered 403") as info:
        SecretStateStore(FakeClient(get=[api_error(403)]), "istio-system").load()  # type: ignore[arg-type]
    assert isinstance(info.value.__cause__, ApiError)  # the original stays attached for the log


def test_the_state_store_save_rereads_after_a_conflict() -> None:
    client = FakeClient(get=[api_error(404)], create=[api_error(409)])  # another replica created it meanwhile
    SecretStateStore(client, "istio-system").save(AgentState())  # type: ignore[arg-type]
    assert client.calls == ["get", "create", "get", "replace"]


def test_a_lease_race_lost_on_create_leaves_the_replica_standing_by() -> None:
    elector = LeaseElector(
        FakeClient(get=[api_error(404)], create=[api_error(409)]),  # type: ignore[arg-type]
        "istio-system",
        identity="replica-1",
    )
    assert elector.is_leader() is False


def test_service_exports_without_the_crd_or_the_right_are_none() -> None:
    config = parse_config(
        {
            "cluster": "b",
            "ca": {"url": "https://ca:8443", "trust_anchor": "/r.pem"},
            "istio": {"trust_domain": "b.mesh"},
        }
    )
    for code in (403, 404):
        assert KubeApplier(FakeClient(list=[api_error(code)]), config).service_exports() == []  # type: ignore[arg-type]
    with pytest.raises(KubeRetryLater):
        KubeApplier(FakeClient(list=[api_error(503)]), config).service_exports()  # type: ignore[arg-type]
