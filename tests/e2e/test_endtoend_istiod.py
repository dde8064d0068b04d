"""End-to-end mode with istiod-issued certificates (issue 13 item 3): two control planes, a real CA
service, the agents in run mode writing through the API servers, and one real istiod per cluster
(tests/e2e/istiod.py). a and b export ratings.bookinfo to each other end to end, each admitting only
the other's bookinfo-productpage workload. The caller certificate is istiod a's, the destination's
istiod b's, each for a real ServiceAccount token; the handshake runs through two SNI relays
standing for the gateways, each side checking the other's chain against the roots and the CRLs its
own istiod publishes to sidecars (`istio-ca-root-cert`, `istio-ca-crl`), as Envoy does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from meshbridge_wire.pem import load_crls
from tests.e2e.clusters import Cluster
from tests.e2e.test_agents_e2e import PEER, TD
from tests.e2e.test_endtoend_handshake import handshake
from tests.e2e.test_istiod_bed import Bed, istiod_bed

RATINGS = "{{service: ratings, namespace: bookinfo, ports: [9080], consumers: [{peer}]}}"
RATINGS_E2E = (
    "{{service: ratings, namespace: bookinfo, ports: [9080], mode: end-to-end, service_accounts: [bookinfo-ratings], "
    "consumers: [{{cluster: {peer}, principals: [ns/bookinfo/sa/bookinfo-productpage]}}]}}"
)


def _end_to_end_exports(name: str, config: str) -> str:
    old, new = RATINGS.format(peer=PEER[name]), RATINGS_E2E.format(peer=PEER[name])
    assert old in config
    return config.replace(old, new)


def _service_accounts(cluster: Cluster) -> None:
    existing = cluster.kubectl("get", "serviceaccounts", "-n", "bookinfo", "-o", "name").stdout.split()
    for sa in ("bookinfo-productpage", "bookinfo-ratings"):
        if f"serviceaccount/{sa}" not in existing:
            cluster.kubectl("create", "serviceaccount", sa, "-n", "bookinfo")


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    # two passes before istiod: both agents see their end-to-end imports, then publish their CRLs,
    # which each adds to its ca-crl.pem
    yield from istiod_bed(
        tmp_path_factory.mktemp("istiod-e2e-bed"),
        workload_lifetime_s=0,
        edit_config=_end_to_end_exports,
        prepare=_service_accounts,
        settles_before_istiod=2,
        label="istiod end-to-end bed",
    )


def _sidecar_tls(bed: Bed, name: str) -> dict[str, object]:
    out = (
        bed.clusters[name]
        .kubectl("get", "destinationrules.networking.istio.io", "-n", "istio-system", "-o", "json")
        .stdout
    )
    [rule] = [r for r in json.loads(out)["items"] if r["spec"]["host"] == "ratings.bookinfo.remote"]
    tls: dict[str, object] = rule["spec"]["trafficPolicy"]["tls"]
    return tls


def test_istiod_publishes_the_peers_crl_to_sidecars(bed: Bed) -> None:
    for me, peer in (("a", "b"), ("b", "a")):
        issuers = {c.issuer.rfc4514_string() for c in load_crls(bed.istiod[me].served_crls())}
        assert f"CN={peer},OU={TD[peer]},O=meshbridge" in issuers, (me, issuers)


def test_istiod_issued_caller_reaches_the_istiod_issued_destination_end_to_end(bed: Bed) -> None:
    tls = _sidecar_tls(bed, "a")
    sni, pinned = str(tls["sni"]), [str(s) for s in tls["subjectAltNames"]]  # type: ignore[attr-defined]
    assert sni == "9080.ratings.bookinfo.mb-e2e" and pinned == [f"spiffe://{TD['b']}/ns/bookinfo/sa/bookinfo-ratings"]
    caller = bed.istiod["a"].issue("bookinfo-productpage", namespace="bookinfo")
    destination = bed.istiod["b"].issue("bookinfo-ratings", namespace="bookinfo")
    ok, detail, seen = handshake(
        caller=caller,
        destination=destination,
        roots=bed.istiod["a"].served_bundle(),
        caller_crls=bed.istiod["a"].served_crls(),
        destination_crls=bed.istiod["b"].served_crls(),
        sni=sni,
        pinned=pinned,
        exported=[sni],
    )
    assert ok, detail
    assert seen == [(sni, True)]
