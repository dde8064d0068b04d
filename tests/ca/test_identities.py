"""Issue 10 item 7: identities and names are exact.

Before: `identities.egress: spiffe://a.mesh/*` was accepted (a prefix check) and the exporter's
policy became `notPrincipals: ["a.mesh/*"]`; a consumer `"b\\n"` passed the `re.match(...$)` label check.
"""

from __future__ import annotations

from typing import Any

import pytest

from meshbridge_wire.names import identity_in_trust_domain, workload_identity
from tests.ca.conftest import Harness

IDENT = {"ingress": "spiffe://a.mesh/ns/istio-system/sa/in", "egress": "spiffe://a.mesh/ns/istio-system/sa/eg"}
GW = {"address": "198.51.100.1", "port": 15443}
SVC = {"name": "ratings.bookinfo", "namespace": "bookinfo", "service": "ratings",
       "ports": [{"number": 9080, "protocol": "HTTP"}], "consumers": ["b"]}

NOT_WORKLOAD_IDENTITIES = [
    "spiffe://a.mesh/*",
    "spiffe://a.mesh/ns/*/sa/*",
    "spiffe://a.mesh/ns/istio-system/sa/eg/extra",
    "spiffe://a.mesh/ns/istio-system",
    "spiffe://a.mesh/sa/eg/ns/istio-system",
    "spiffe://a.mesh/ns/Istio-System/sa/eg",
    "spiffe://a.mesh/ns/istio-system/sa/eg\n",
    "spiffe://a.mesh//ns/istio-system/sa/eg",
]


@pytest.mark.parametrize("identity", NOT_WORKLOAD_IDENTITIES)
def test_only_exact_workload_identities_parse(identity: str) -> None:
    assert workload_identity(identity) is None
    assert not identity_in_trust_domain(identity, "a.mesh")


def test_workload_identities_parse() -> None:
    assert workload_identity("spiffe://a.mesh/ns/istio-system/sa/istio-egressgateway-service-account") == (
        "a.mesh", "istio-system", "istio-egressgateway-service-account")
    assert workload_identity("spiffe://a.mesh/ns/gw/sa/egress.v2") == ("a.mesh", "gw", "egress.v2")


@pytest.mark.parametrize("identity", NOT_WORKLOAD_IDENTITIES)
def test_published_identities_must_be_exact(harness: Harness, identity: str) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    before = harness.state()
    body: dict[str, Any] = {"gateway": GW, "identities": {**IDENT, "egress": identity}, "services": [SVC]}
    r = harness.client.put("/v1/clusters/a/exports", json=body, headers=a.headers)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert harness.state() == before


@pytest.mark.parametrize("consumer", ["b\n", "b\r\n", " b"])
def test_consumers_are_checked_with_full_matches(harness: Harness, consumer: str) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    body = {"gateway": GW, "identities": IDENT, "services": [{**SVC, "consumers": [consumer]}]}
    r = harness.client.put("/v1/clusters/a/exports", json=body, headers=a.headers)
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("name", ["b\n", "b%0A"])
def test_cluster_names_are_checked_with_full_matches(harness: Harness, name: str) -> None:
    r = harness.client.post("/v1/clusters", json={"name": name, "trust_domain": "b.mesh"}, headers=harness.admin)
    assert r.status_code == 400, r.text
