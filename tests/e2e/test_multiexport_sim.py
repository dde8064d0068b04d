"""Issue 13 items 4 and 5 through Istio's own xDS generation (TestMultiExport): every exporter and
every gateway address of an imported name is an endpoint of a's egress cluster, with the Envoy
priority its exporter's `imports[].priority` rank gives, outlier detection on, and every exporter's
ingress identity pinned; over STATIC (EDS) and DNS (STRICT_DNS) ServiceEntries alike."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from cluster_agent.config import parse_config
from cluster_agent.render import render_all, to_yaml
from tests.e2e.clusters import Clusters
from tests.e2e.gocheck import GoCheckFailed, run_multi_export, run_multi_export_end_to_end
from tests.e2e.testbin import require
from tests.support.multiscenario import render_multi_importer, workload
from tests.support.simscenario import INGRESS

RATINGS = "ratings.bookinfo.remote"
DETAILS = "details.bookinfo.remote"
SANS = {h: [INGRESS.format(td="b.mesh"), INGRESS.format(td="c.mesh")] for h in (RATINGS, DETAILS)}


def test_exporters_are_endpoints_with_their_priorities(tmp_path: Path) -> None:
    expect = {
        RATINGS: ["198.51.100.20:15443@0", "198.51.100.21:15443@0", "198.51.100.30:15443@1"],
        DETAILS: ["gw.b.example:15443@0", "198.51.100.30:15443@1"],
    }
    out = run_multi_export(render_multi_importer(tmp_path / "a"), expect, SANS)
    assert "--- PASS: TestMultiExport/ratings.bookinfo.remote" in out, out
    assert "--- PASS: TestMultiExport/details.bookinfo.remote" in out, out


def test_preferring_c_swaps_the_priorities(tmp_path: Path) -> None:
    expect = {
        RATINGS: ["198.51.100.20:15443@1", "198.51.100.21:15443@1", "198.51.100.30:15443@0"],
        DETAILS: ["gw.b.example:15443@1", "198.51.100.30:15443@0"],
    }
    run_multi_export(render_multi_importer(tmp_path / "a", {"b": 7, "c": 2}), expect, SANS)


def test_equal_priorities_share_priority_zero(tmp_path: Path) -> None:
    expect = {
        RATINGS: ["198.51.100.20:15443@0", "198.51.100.21:15443@0", "198.51.100.30:15443@0"],
        DETAILS: ["gw.b.example:15443@0", "198.51.100.30:15443@0"],
    }
    run_multi_export(render_multi_importer(tmp_path / "a", {"b": 0, "c": 0}), expect, SANS)


def test_equal_priorities_follow_the_egress_gateways_locality(tmp_path: Path) -> None:
    """`imports[].locality` with equal priorities: Istio's default locality failover (outlier
    detection on, mesh localityLbSetting enabled) prefers the exporter sharing the egress gateway's
    region (loadbalancer.go applyLocalityFailover)."""
    localities = {"b": "eu-west1/b", "c": "us-east1/a"}
    directory = render_multi_importer(tmp_path / "a", {"b": 0, "c": 0}, localities=localities)
    in_us = {
        RATINGS: ["198.51.100.20:15443@1", "198.51.100.21:15443@1", "198.51.100.30:15443@0"],
        DETAILS: ["gw.b.example:15443@1", "198.51.100.30:15443@0"],
    }
    run_multi_export(directory, in_us, SANS, egress_locality="us-east1/a")
    in_eu = {
        RATINGS: ["198.51.100.20:15443@0", "198.51.100.21:15443@0", "198.51.100.30:15443@1"],
        DETAILS: ["gw.b.example:15443@0", "198.51.100.30:15443@1"],
    }
    run_multi_export(directory, in_eu, SANS, egress_locality="eu-west1/b")


def test_an_alias_is_called_locally_and_the_exported_name_goes_on(tmp_path: Path) -> None:
    """Issue 13 item 5: ratings.bookinfo served in a as stars.bookinfo.remote (the alias's namespace
    is the simulated caller's); a's egress gateway sends
    SNI and Host ratings.bookinfo.remote on to the exporters, which route on them (TestSimulation)."""
    stars = "stars.bookinfo.remote"
    expect = {
        stars: ["198.51.100.20:15443@0", "198.51.100.21:15443@0", "198.51.100.30:15443@1"],
        DETAILS: ["gw.b.example:15443@0", "198.51.100.30:15443@1"],
    }
    directory = render_multi_importer(tmp_path / "a", aliases={"ratings.bookinfo": "stars.bookinfo"})
    out = run_multi_export(directory, expect, {stars: SANS[RATINGS], DETAILS: SANS[DETAILS]}, remote={stars: RATINGS})
    assert "SNI and Host on to the exporter ratings.bookinfo.remote" in out, out
    with pytest.raises(GoCheckFailed) as failed:  # without the rewrite/SNI the check refuses it
        run_multi_export(directory, expect, {stars: SANS[RATINGS]}, remote={stars: "stars.bookinfo.remote.example"})
    assert "SNI" in failed.value.output


def test_the_check_can_fail(tmp_path: Path) -> None:
    """A wrong expectation (c preferred while b is) is refused: the check reads the priorities."""
    expect = {RATINGS: ["198.51.100.20:15443@1", "198.51.100.21:15443@1", "198.51.100.30:15443@0"]}
    with pytest.raises(GoCheckFailed) as failed:
        run_multi_export(render_multi_importer(tmp_path / "a"), expect, SANS)
    assert "endpoints@priority" in failed.value.output


def test_rendered_objects_pass_the_api_server_and_istioctl_validate(clusters: Clusters, tmp_path: Path) -> None:
    """The CRDs' schemas and CEL rules (a real kube-apiserver, server-side dry run) and istiod's
    admission validation (`istioctl validate`) accept endpoints with labels and locality, mixed
    IP/DNS endpoints, outlier detection and failoverPriority."""
    directory = render_multi_importer(tmp_path / "a")
    for i, obj in enumerate(_with_locality_and_tcp()):
        (tmp_path / "a" / f"extra-{i}.yaml").write_text(to_yaml(obj))
    aliased = render_multi_importer(tmp_path / "alias", aliases={"ratings.bookinfo": "stars.bookinfo"})
    e2e = render_multi_importer(tmp_path / "e2e", mode="end-to-end")
    istioctl = require("istioctl")
    forwarding = sorted(e2e.glob("*e2e-import*forward*.yaml"))
    assert len(forwarding) == 6  # per name: the egress route, the forwarding host, its failover DestinationRule
    for f in sorted([*directory.glob("*.yaml"), *aliased.glob("*stars*.yaml"), *forwarding]):
        clusters["a"].kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts", "-f", str(f))
        res = subprocess.run([str(istioctl), "validate", "-f", str(f)], capture_output=True, text=True)
        assert res.returncode == 0 and "Warning" not in res.stdout + res.stderr, res.stdout + res.stderr


def _with_locality_and_tcp() -> list[dict[str, Any]]:
    """The ServiceEntry and DestinationRule of a name with two TCP ports (so `portLevelSettings`
    repeating the failover settings) from exporters with `imports[].locality` and priorities."""
    cfg = parse_config(
        {
            "cluster": "a",
            "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/etc/meshbridge/ca-root.pem"},
            "istio": {"trust_domain": "a.mesh", "ingress_gateway": {"address": "198.51.100.10"}},
            "imports": [
                {"from": "b", "names": ["*"], "locality": "eu-west1/b/rack-1", "priority": 1},
                {"from": "c", "names": ["*"], "locality": "us-east1"},
            ],
        }
    )
    imports = [
        {
            "name": "reviews.bookinfo",
            "cluster": c,
            "ports": [{"number": n, "protocol": p} for n, p in ((9080, "HTTP"), (5432, "TCP"), (5433, "TCP"))],
            "gateway": {"address": f"198.51.100.{i}", "port": 15443, "tcp_port": 15444},
            "identity": INGRESS.format(td=f"{c}.mesh"),
        }
        for i, c in ((20, "b"), (30, "c"))
    ]
    result = render_all(cfg, imports=imports, peers=[], vips={})
    (entry,) = [o for o in result.objects if o["kind"] == "ServiceEntry"]
    assert [e["locality"] for e in entry["spec"]["endpoints"]] == ["us-east1", "eu-west1/b/rack-1"]
    (rule,) = [o for o in result.objects if o["kind"] == "DestinationRule" and "import" in o["metadata"]["name"]]
    assert all("loadBalancer" in level for level in rule["spec"]["trafficPolicy"]["portLevelSettings"])
    return [entry, rule]


def test_end_to_end_exporters_are_endpoints_of_the_forwarded_sni(tmp_path: Path) -> None:
    """Issue 13 item 4 in end-to-end mode: one SNI per name whichever exporter answers, every
    exporter's workloads pinned, and a's egress gateway forwarding the SNI unopened to every address
    of b (priority 0) and c (priority 1), each on the TCP port it published."""
    expect = {
        RATINGS: ["198.51.100.20:15444@0", "198.51.100.21:15444@0", "198.51.100.30:15446@1"],
        DETAILS: ["gw.b.example:15444@0", "198.51.100.30:15446@1"],
    }
    sans = {
        h: [workload("b", n), workload("c", n)]
        for h, n in ((RATINGS, "ratings.bookinfo"), (DETAILS, "details.bookinfo"))
    }
    snis = {RATINGS: "9080.ratings.bookinfo.mb-e2e", DETAILS: "9080.details.bookinfo.mb-e2e"}
    out = run_multi_export_end_to_end(render_multi_importer(tmp_path / "a", mode="end-to-end"), expect, sans, snis)
    assert "--- PASS: TestMultiExportEndToEnd/ratings.bookinfo.remote" in out, out
    swapped = {
        RATINGS: ["198.51.100.20:15444@1", "198.51.100.21:15444@1", "198.51.100.30:15446@0"],
        DETAILS: ["gw.b.example:15444@1", "198.51.100.30:15446@0"],
    }
    directory = render_multi_importer(tmp_path / "swapped", {"b": 5, "c": 1}, mode="end-to-end")
    run_multi_export_end_to_end(directory, swapped, sans, snis)
    with pytest.raises(GoCheckFailed, match="endpoints@priority"):
        run_multi_export_end_to_end(directory, expect, sans, snis)
