"""An agent's status report (PUT /v1/clusters/{name}/status) refused for its token or its write
budget stores nothing."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from ca_server.api.ratelimit import Limits
from ca_server.app import create_app
from tests.ca.conftest import Harness

REPORT = {"installed_generation": 1, "errors": []}


@pytest.mark.parametrize(
    ("token_of", "status"),
    [("other", 403), ("wrong secret", 401), ("revoked", 401)],
)
def test_a_refused_report_writes_nothing(harness: Harness, token_of: str, status: int) -> None:
    agent, other = harness.enroll("s2"), harness.enroll("s3")
    token = {
        "other": other.token,
        "wrong secret": agent.token.rsplit(".", 1)[0] + ".not-its-secret",
        "revoked": agent.token,
    }[token_of]
    if token_of == "revoked":
        r = harness.client.post(
            f"/v1/clusters/{agent.name}/revoke", json={"reason": "keyCompromise"}, headers=harness.admin
        )
        assert r.status_code == 200, r.text
    r = harness.client.put(
        f"/v1/clusters/{agent.name}/status", json=REPORT, headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert harness.cluster(agent.name)["agent_status"] is None


def test_a_report_over_the_write_budget_writes_nothing(harness: Harness) -> None:
    """The budget is spent once the token is admitted and before the report is written: a report
    refused with 429 leaves the one before it stored."""
    agent = harness.enroll("s4")
    app = create_app(harness.authority, rate_limits=Limits(writes_per_second=0.001, writes_burst=1))
    with TestClient(app) as client:
        first = client.put(f"/v1/clusters/{agent.name}/status", json=REPORT, headers=agent.headers)
        assert first.status_code == 200, first.text
        second = {**REPORT, "installed_generation": 2}
        r = client.put(f"/v1/clusters/{agent.name}/status", json=second, headers=agent.headers)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
    assert harness.cluster(agent.name)["agent_status"]["installed_generation"] == 1
