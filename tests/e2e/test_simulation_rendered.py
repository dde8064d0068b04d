"""Istio's own xDS simulation over what the renderer writes for the two scenario clusters, without a
CA service or an API server (tests/support/simscenario.py).

Issue 11 item 1: b's ingress gateway is shared with another tenant (TestSimulation's base objects:
a public HTTPS site, a TLS-passthrough backend, a plain-TCP server, in namespace `tenant`); the RBAC
Istio generates from meshbridge's policies must admit that tenant's clients, who have no peer
identity, while the export chains still admit only the consumers.
Issue 11 item 10: a sidecar builds clusters only for the imports exported to its namespace.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.gocheck import GoCheckFailed, run_simulation, sidecar_clusters
from tests.support.simscenario import render_exporter, render_importer


def test_simulation_over_rendered_objects_on_a_shared_ingress_gateway(tmp_path: Path) -> None:
    out = run_simulation(render_importer(tmp_path / "a"), render_exporter(tmp_path / "b"))
    assert "--- PASS: TestSimulation/9_" in out, out
    for what in ("public HTTPS (SIMPLE TLS)", "TLS passthrough", "plain TCP on 31400"):
        assert f"{what}" in out and "admitted" in out, out


def test_policies_name_the_container_ports_the_gateway_listens_on(tmp_path: Path) -> None:
    """b's ingress Service maps 15443 → 16443 and 15444 → 16444: Envoy's listeners (and RBAC's
    destination_port) see the container ports, so the policies must name those."""
    a = render_importer(tmp_path / "a")
    mapped = {"gateway_target_port": 16443, "tcp_gateway_target_port": 16444}
    b = render_exporter(
        tmp_path / "b", ingress_gateway={"address": "198.51.100.20", "target_port": 16443, "tcp_target_port": 16444}
    )
    assert "--- PASS: TestSimulation/8_" in run_simulation(a, b, **mapped)
    # Policies naming the Service ports instead: non-consumers get through on both chains.
    http_wrong = render_exporter(
        tmp_path / "b-http", ingress_gateway={"address": "198.51.100.20", "tcp_target_port": 16444}
    )
    with pytest.raises(GoCheckFailed) as failed:
        run_simulation(a, http_wrong, **mapped)
    assert "RBAC on b's ingress admits a non-consumer" in failed.value.output
    tcp_wrong = render_exporter(tmp_path / "b-tcp", ingress_gateway={"address": "198.51.100.20", "target_port": 16443})
    with pytest.raises(GoCheckFailed) as failed:
        run_simulation(a, tcp_wrong, **mapped)
    assert "RBAC on b's ingress TCP chain admits a non-consumer" in failed.value.output


def test_sidecars_build_only_the_imports_exported_to_their_namespace(tmp_path: Path) -> None:
    scoped = sidecar_clusters(render_importer(tmp_path / "scoped", extra_imports=20), ["bookinfo", "frontend"])
    # 22 imports in namespace bookinfo, one port each: one cluster per port
    assert scoped["bookinfo"]["remote_clusters"] == 22, scoped
    assert scoped["frontend"]["remote_clusters"] == 0, scoped
    everywhere = sidecar_clusters(
        render_importer(tmp_path / "all", extra_imports=20, consumer_namespaces=["*"]), ["frontend"]
    )
    assert everywhere["frontend"]["remote_clusters"] == 22, everywhere
    listed = sidecar_clusters(
        render_importer(tmp_path / "listed", extra_imports=20, consumer_namespaces=["frontend"]),
        ["bookinfo", "frontend"],
    )
    assert listed["frontend"]["remote_clusters"] == 22 and listed["bookinfo"]["remote_clusters"] == 0, listed
