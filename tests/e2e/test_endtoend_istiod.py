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
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from ca_server.core.authority import Policy
from meshbridge_wire.pem import load_crls
from tests.e2e.clusters import start_clusters, stop_clusters
from tests.e2e.istiod import Istiod
from tests.e2e.test_agents_e2e import PEER, TD, agent_config, make_loop
from tests.e2e.test_endtoend_handshake import handshake
from tests.e2e.test_istiod_bed import Bed
from tests.support.caservice import CAService

RATINGS = "{{service: ratings, namespace: bookinfo, ports: [9080], consumers: [{peer}]}}"
RATINGS_E2E = (
    "{{service: ratings, namespace: bookinfo, ports: [9080], mode: end-to-end, service_accounts: [bookinfo-ratings], "
    "consumers: [{{cluster: {peer}, principals: [ns/bookinfo/sa/bookinfo-productpage]}}]}}"
)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    work = tmp_path_factory.mktemp("istiod-e2e-bed")
    t0 = time.monotonic()
    clusters = {c.name: c for c in start_clusters(work / "clusters")}
    ca = CAService(work / "ca", policy=Policy(workload_cert_lifetime=timedelta(0))).start()
    istiods: dict[str, Istiod] = {}
    try:
        loops = {}
        for name, cluster in clusters.items():
            d = work / name
            d.mkdir()
            ca.add_cluster(name, TD[name], d / "bootstrap-token")
            (d / "ca-root.pem").write_text((work / "ca" / "root-cert.pem").read_text())
            config = agent_config(name, ca.url, cluster.kubeconfig)
            old, new = RATINGS.format(peer=PEER[name]), RATINGS_E2E.format(peer=PEER[name])
            assert old in config
            (d / "agent.yaml").write_text(config.replace(old, new))
            loops[name] = make_loop(d / "agent.yaml")
            existing = cluster.kubectl("get", "serviceaccounts", "-n", "bookinfo", "-o", "name").stdout.split()
            for sa in ("bookinfo-productpage", "bookinfo-ratings"):
                if f"serviceaccount/{sa}" not in existing:
                    cluster.kubectl("create", "serviceaccount", sa, "-n", "bookinfo")
        bed = Bed(ca, clusters, loops, istiods)
        bed.settle()  # cacerts exist before istiod starts; both agents see their end-to-end imports
        bed.settle()  # ... and publish their CRLs, which each adds to its ca-crl.pem
        for name, cluster in clusters.items():
            istiods[name] = Istiod(cluster, TD[name], work / f"istiod-{name}").start()
            loops[name].r.istiod = istiods[name].view()
        bed.settle()
        print(f"\nistiod end-to-end bed ready in {time.monotonic() - t0:.1f}s")
        yield bed
    finally:
        for i in istiods.values():
            i.stop()
        ca.stop()
        stop_clusters(list(clusters.values()))


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
