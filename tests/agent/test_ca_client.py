"""The CA client speaks the contract's models: requests built from them, answers parsed into them,
and an answer that does not fit is a clear CAAnswerInvalid (never a KeyError in the pass)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from cluster_agent.ca_client import CAAnswerInvalid, CAClient
from meshbridge_wire.models import DesiredOut, EnrollIn, StatusIn

TOKEN = "mbagent.0123456789abcdef.not-a-real-secret"


def client_answering(status: int, body: Any, seen: list[httpx.Request] | None = None) -> CAClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(status, json=body)

    client = CAClient("http://ca.invalid", trust_pem="", cluster="a", transport=httpx.MockTransport(handler))
    client.set_token(TOKEN)
    return client


def test_desired_state_is_parsed_into_its_model() -> None:
    body = {
        "revision": "r1",
        "generation": 2,
        "rotate_required": False,
        "trust_bundle": "",
        "crl": "",
        "imports": [
            {
                "name": "ratings.bookinfo",
                "cluster": "b",
                "ports": [{"number": 9080, "protocol": "HTTP"}],
                "gateway": {"address": "198.51.100.20", "port": 15443},
                "identity": None,
            }
        ],
        "peers": [],
        "status": "active",
    }
    desired = client_answering(200, body).desired()
    assert isinstance(desired, DesiredOut)
    assert desired.generation == 2 and desired.imports[0].name == "ratings.bookinfo"


@pytest.mark.parametrize("body", [{"revision": "r1"}, {"revision": "r1", "generation": "two"}, [], "ok"])
def test_a_malformed_desired_state_is_a_ca_answer_error(body: Any) -> None:
    with pytest.raises(CAAnswerInvalid, match=r"GET /v1/clusters/a/desired .* does not fit DesiredOut"):
        client_answering(200, body).desired()


def test_a_malformed_enrollment_answer_names_what_is_wrong_but_never_the_token() -> None:
    client = client_answering(201, {"agent_token": TOKEN, "generation": 1, "bundle": {"ca-cert.pem": "x"}})
    with pytest.raises(CAAnswerInvalid, match="does not fit EnrollOut") as info:
        client.enroll(EnrollIn(cluster="a", bootstrap_token="mbboot.x", csr="csr"))
    assert "bundle.cert-chain.pem" in str(info.value)
    assert TOKEN not in str(info.value) and "mbboot" not in str(info.value)


def test_requests_are_the_models_as_json() -> None:
    seen: list[httpx.Request] = []
    client_answering(200, {}, seen).put_status(StatusIn(installed_generation=3, errors=["x"]))
    (request,) = seen
    assert request.method == "PUT" and request.url.path == "/v1/clusters/a/status"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert json.loads(request.content) == {"installed_generation": 3, "errors": ["x"]}
