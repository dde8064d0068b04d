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
