"""End-to-end mode proven hop by hop with Istio's simulation over the rendered objects (issue 13
item 3; tests/e2e/go TestEndToEnd): sidecar a → egress a (TLS forwarded on SNI) → b's ingress
(forwarded on SNI, unexported SNIs refused) → b's destination sidecar, which terminates the mTLS and
sees a's caller principal: admitted for the declared consumer workload, denied for another workload
of a and for another cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.gocheck import GoCheckFailed, run_end_to_end, run_simulation
from tests.e2e.testbin import require
from tests.support.simscenario import render_e2e_exporter, render_e2e_importer, render_exporter, render_importer

STEPS = ("1_sidecar_in_a", "2_egress_gateway_in_a", "3_b's_ingress", "4_b's_destination_sidecar")


def test_http_export_end_to_end_admits_only_the_declared_workload(tmp_path: Path) -> None:
    out = run_end_to_end(render_e2e_importer(tmp_path / "a"), render_e2e_exporter(tmp_path / "b"))
    for step in STEPS:
        assert f"--- PASS: TestEndToEnd/{step}" in out, out
    assert "caller spiffe://a.mesh/ns/bookinfo/sa/bookinfo-productpage: admitted" in out
    assert "caller spiffe://a.mesh/ns/bookinfo/sa/bookinfo-other: denied" in out
    assert "unexported SNI outbound_.9080_._.ratings.bookinfo.svc.cluster.local: refused" in out


def test_tcp_export_end_to_end_admits_the_whole_consumer_cluster(tmp_path: Path) -> None:
    out = run_end_to_end(
        render_e2e_importer(tmp_path / "a"),
        render_e2e_exporter(tmp_path / "b"),
        host="mongodb.bookinfo.remote",
        port=27017,
        protocol="TCP",
        sni="27017.mongodb.bookinfo.mb-e2e",
        workload="spiffe://b.mesh/ns/bookinfo/sa/bookinfo-mongodb",
        destination="mongodb.bookinfo.svc.cluster.local",
        destination_ip="10.2.1.6",
        destination_app="mongodb",
        allowed="spiffe://a.mesh/ns/bookinfo/sa/bookinfo-productpage,spiffe://a.mesh/ns/other/sa/anyone",
        denied="spiffe://c.mesh/ns/bookinfo/sa/bookinfo-productpage,spiffe://b.mesh/ns/bookinfo/sa/x",
        refused_sni="27017.ratings.bookinfo.mb-e2e,outbound_.27017_._.mongodb.bookinfo.svc.cluster.local",
    )
    assert "--- PASS: TestEndToEnd/4_" in out, out


def test_the_check_fails_when_the_whole_consumer_cluster_is_admitted(tmp_path: Path) -> None:
    """Consumers without `principals` admit every workload of a: the simulation must notice."""
    b = render_e2e_exporter(tmp_path / "b", ratings_consumers=["a"])
    with pytest.raises(GoCheckFailed) as failed:
        run_end_to_end(render_e2e_importer(tmp_path / "a"), b)
    assert "the destination admits spiffe://a.mesh/ns/bookinfo/sa/bookinfo-other" in failed.value.output


def test_end_to_end_and_hop_by_hop_exports_share_the_gateways(tmp_path: Path) -> None:
    """details.bookinfo end to end beside ratings (HTTP) and mongodb (TCP) hop by hop: the
    PASSTHROUGH servers share port 15444 with the hop-by-hop TLS servers (Istio merges them into one
    listener split by SNI), every hop-by-hop step still passes, and the end-to-end call goes through."""
    a = render_importer(tmp_path / "a", e2e_details=True)
    b = render_exporter(tmp_path / "b", e2e_details=True)
    out = run_simulation(a, b)
    assert "--- PASS: TestSimulation/8_" in out and "--- PASS: TestSimulation/9_" in out, out
    out = run_end_to_end(
        a,
        b,
        host="details.bookinfo.remote",
        sni="9080.details.bookinfo.mb-e2e",
        workload="spiffe://b.mesh/ns/bookinfo/sa/bookinfo-details",
        destination="details.bookinfo.svc.cluster.local",
        destination_ip="10.2.1.7",
        destination_app="details",
        allowed="spiffe://a.mesh/ns/bookinfo/sa/bookinfo-productpage",
        denied="spiffe://c.mesh/ns/bookinfo/sa/bookinfo-productpage",
        refused_sni="9080.ratings.bookinfo.mb-e2e,mongodb.bookinfo.remote.example",
    )
    assert "--- PASS: TestEndToEnd/4_" in out, out


def test_routing_the_passthrough_straight_to_the_service_would_wrap_the_tls_again(tmp_path: Path) -> None:
    """Why b's ingress forwards to a MESH_EXTERNAL host named by the SNI: a `tls` route straight to
    `ratings.bookinfo.svc.cluster.local` takes that Service's own cluster, to which auto mTLS adds
    Istio mTLS for sidecar endpoints (cluster_tls.go applyUpstreamTLSSettings, tlsMode-istio match)."""
    b = render_e2e_exporter(tmp_path / "b")
    [vs] = b.glob("virtualservice-*-meshbridge-e2e-export-ratings-bookinfo.yaml")
    vs.write_text(
        vs.read_text().replace("host: 9080.ratings.bookinfo.mb-e2e", "host: ratings.bookinfo.svc.cluster.local")
    )
    with pytest.raises(GoCheckFailed) as failed:
        run_end_to_end(render_e2e_importer(tmp_path / "a"), b, refused_sni="9080.details.bookinfo.mb-e2e")
    assert "originates TLS" in failed.value.output and "wrapped again" in failed.value.output, failed.value.output


def test_allow_mode_admits_the_exported_snis_at_a_shared_ingress(tmp_path: Path) -> None:
    """`authorization_mode: allow`: the hop-by-hop exports' ALLOW policies select the ingress pods, so
    Envoy refuses every connection no ALLOW rule admits, passthrough chains included; the end-to-end
    exports' own ALLOW policy (SNIs on the TCP container port) lets them through. Without it, refused."""
    a = render_importer(tmp_path / "a", e2e_details=True)
    b = render_exporter(tmp_path / "b", e2e_details=True, authorization_mode="allow")
    details = {
        "host": "details.bookinfo.remote",
        "sni": "9080.details.bookinfo.mb-e2e",
        "workload": "spiffe://b.mesh/ns/bookinfo/sa/bookinfo-details",
        "destination": "details.bookinfo.svc.cluster.local",
        "destination_ip": "10.2.1.7",
        "destination_app": "details",
        "allowed": "spiffe://a.mesh/ns/bookinfo/sa/bookinfo-productpage",
        "denied": "spiffe://c.mesh/ns/bookinfo/sa/bookinfo-productpage",
        "refused_sni": "9080.ratings.bookinfo.mb-e2e",
    }
    assert "--- PASS: TestEndToEnd/4_" in run_end_to_end(a, b, **details)
    [policy] = b.glob("authorizationpolicy-istio-system-meshbridge-ingress-e2e.yaml")
    policy.unlink()
    with pytest.raises(GoCheckFailed) as failed:
        run_end_to_end(a, b, **details)
    assert "RBAC on b's ingress refuses the exported SNI" in failed.value.output


def test_istio_admission_validation_and_analysis_accept_the_end_to_end_objects(tmp_path: Path) -> None:
    """PASSTHROUGH servers, `tls` routes on `sniHosts`, MESH_EXTERNAL forwarding ServiceEntries and the
    workload policy, beside hop-by-hop objects, allow mode included: what istiod's own validation
    (`istioctl validate`) says of every rendered Istio object."""
    dirs = [
        render_importer(tmp_path / "a", e2e_details=True),
        render_exporter(tmp_path / "b", e2e_details=True),
        render_e2e_importer(tmp_path / "a2"),
        render_e2e_exporter(tmp_path / "b2", authorization_mode="allow"),
    ]
    files = [str(f) for d in dirs for f in sorted(d.glob("*.yaml")) if "configmap" not in f.name]
    assert any("e2e" in f for f in files)
    r = subprocess.run(
        [str(require("istioctl")), "validate", *[a for f in files for a in ("-f", f)]], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).count(" is valid") == len(files), r.stdout + r.stderr
