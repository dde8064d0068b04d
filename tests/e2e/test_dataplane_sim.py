"""Issue 11 item 11 in Istio's own simulation (TestDataplane, tests/e2e/go/dataplane_test.go) over
what the renderers produce: one HTTP hop retries, the destination sees its own Host, several TCP
ports of one name cross on SNIs of their own to the TCP port the exporter published. The mutations
show the checker fails on the shapes this item replaced."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.dataplane_fixture import render_clusters
from tests.e2e.gocheck import GoCheckFailed, run_dataplane_simulation
from tests.e2e.testbin import require


def test_dataplane_simulation_over_rendered_objects(tmp_path: Path) -> None:
    out = run_dataplane_simulation(*render_clusters(tmp_path))
    assert "--- PASS: TestDataplane" in out
    assert "Host ratings.bookinfo.remote:9080 -> ratings.bookinfo.svc.cluster.local:9080" in out
    assert "SNI 5433.pg.data.remote -> 198.51.100.20:15444 -> outbound|5433||pg.data.svc.cluster.local" in out


def test_istio_admission_validation_accepts_the_per_port_tcp_objects(tmp_path: Path) -> None:
    """`<port>.<host>` SNIs as Gateway hosts and VirtualService hosts, portLevelSettings TLS: what
    istiod's own validation (`istioctl validate`) says."""
    files = [str(f) for d in render_clusters(tmp_path) for f in sorted(d.glob("*.yaml")) if "configmap" not in f.name]
    assert any("tcp-5433" in f for f in files)
    args = [a for f in files for a in ("-f", f)]
    r = subprocess.run([str(require("istioctl")), "validate", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).count(" is valid") == len(files), r.stdout + r.stderr


@pytest.mark.parametrize(
    ("side", "file", "old", "new", "message"),
    [
        (
            "a",
            "virtualservice-istio-system-meshbridge-import-ratings-bookinfo.yaml",
            "    retries:\n      attempts: 0\n",
            "",
            "only b's ingress should",
        ),
        (
            "b",
            "virtualservice-istio-system-meshbridge-export-ratings-bookinfo.yaml",
            "    rewrite:\n      authority: ratings.bookinfo.svc.cluster.local:9080\n",
            "",
            'b\'s ingress forwards Host "ratings.bookinfo.remote:9080"',
        ),
        (
            "a",
            "serviceentry-istio-system-meshbridge-import-pg-data.yaml",
            "tcp-5433: 15444",
            "tcp-5433: 16000",
            "want [198.51.100.20:15444] (b's published TCP port)",
        ),
        (
            "b",
            "virtualservice-istio-system-meshbridge-export-pg-data-tcp-5433.yaml",
            "- 5433.pg.data.remote",
            "- pg.data.remote",
            "ingress SNI 5433.pg.data.remote",
        ),
    ],
    ids=["retries-on-every-hop", "no-host-rewrite", "assumed-tcp-port", "tcp-route-not-per-sni"],
)
def test_dataplane_simulation_catches_the_old_shapes(
    tmp_path: Path, side: str, file: str, old: str, new: str, message: str
) -> None:
    dirs = dict(zip("ab", render_clusters(tmp_path), strict=True))
    path = dirs[side] / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    with pytest.raises(GoCheckFailed) as e:
        run_dataplane_simulation(dirs["a"], dirs["b"])
    assert message in e.value.output
