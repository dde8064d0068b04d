"""The hand-written render fixture (tests/e2e/go/testdata) passes the real API server (Istio's CRD
schemas and CEL rules) and Istio's own offline validation and analyzers, as renderer output must."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.clusters import Clusters, base_objects
from tests.e2e.testbin import GO_CHECKER_DIR, require

FIXTURE = GO_CHECKER_DIR / "testdata"


@pytest.mark.parametrize("name", ["a", "b"])
def test_fixture_accepted_by_api_server(clusters: Clusters, name: str) -> None:
    c = clusters[name]
    for f in sorted((FIXTURE / name).glob("*.yaml")):
        c.kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts", "-f", str(f))


@pytest.mark.parametrize("name", ["a", "b"])
def test_fixture_istioctl_validate_and_analyze(tmp_path: Path, name: str) -> None:
    istioctl = require("istioctl")
    files = sorted(str(f) for f in (FIXTURE / name).glob("*.yaml"))
    for f in files:
        res = subprocess.run([str(istioctl), "validate", "-f", f], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump_all(base_objects()))
    res = subprocess.run(
        [str(istioctl), "analyze", "--use-kube=false", "--failure-threshold=Info", str(base), *files],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, f"istioctl analyze (exit {res.returncode}):\n{res.stdout}{res.stderr}"


def test_end_to_end_objects_accepted_by_api_server(clusters: Clusters, tmp_path: Path) -> None:
    """Issue 13: the end-to-end objects (PASSTHROUGH Gateways, `tls` routes, MESH_EXTERNAL forwarding
    ServiceEntries without endpoint ports, the workload policy in the export's namespace) pass Istio's
    CRD schemas and CEL rules in a real API server, beside hop-by-hop objects."""
    from tests.support.simscenario import render_e2e_exporter, render_e2e_importer, render_exporter, render_importer

    dirs = {
        "a": [render_importer(tmp_path / "a", e2e_details=True), render_e2e_importer(tmp_path / "a2")],
        "b": [
            render_exporter(tmp_path / "b", e2e_details=True),
            render_e2e_exporter(tmp_path / "b2", authorization_mode="allow"),
        ],
    }
    for name, rendered in dirs.items():
        files = [f for d in rendered for f in sorted(d.glob("*.yaml")) if "configmap" not in f.name]
        assert any("e2e" in f.name for f in files)
        for f in files:
            clusters[name].kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts", "-f", str(f))
