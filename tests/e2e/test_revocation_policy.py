"""Issue 11 item 6: what revoking a cluster does on the data plane, judged by Istio.

Gateways do not load CRLs (Istio's gateway `ISTIO_MUTUAL` servers validate client chains against
the trust bundle alone unless a server sets `tls.caCrl`, a file on the gateway pod —
pilot/pkg/networking/core/listener.go BuildListenerTLSContext →
pilot/pkg/security/model/authentication.go ApplyToCommonTLSContext), so a revoked cluster's chain,
under the shared root, still completes the handshake at every exporter's ingress gateway. What
refuses it is the exporters' AuthorizationPolicies: the CA drops the revoked cluster from every
peer list and every import at once, and each exporter's agent, long-polling, re-renders its
policies without the revoked cluster's egress identities.

Three clusters and a real CA service: x imports from b and c, b and c export to x and to each
other. x is revoked while b's and c's agents run their loops; the test measures how long until
both exporters' policies refuse x, then asks Istio's build of each exporter's ingress gateway
(TestPolicyVerdicts) that x is denied and the remaining consumer still admitted.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster_agent.ca_client import CAClient
from cluster_agent.config import load_config
from cluster_agent.loop import AgentLoop
from cluster_agent.output import DirectoryWriter
from cluster_agent.reconcile import Reconciler
from cluster_agent.state import DirStateStore
from tests.agent.conftest import agent_yaml
from tests.e2e import gocheck
from tests.support.caservice import CAService

SA = "ns/istio-system/sa/istio-egressgateway-service-account"
TD = {"x": "x.mesh", "b": "b.mesh", "c": "c.mesh"}
EGRESS = {name: f"spiffe://{td}/{SA}" for name, td in TD.items()}
EXPORTS = {
    "x": "[]",
    "b": "[{service: ratings, namespace: bookinfo, ports: [9080], consumers: [x, c]}]",
    "c": "[{service: details, namespace: bookinfo, ports: [9080], consumers: [x, b]}]",
}
IMPORTS = {
    "x": '[{from: b, names: ["*"]}, {from: c, names: ["*"]}]',
    "b": '[{from: c, names: ["*"]}]',
    "c": '[{from: b, names: ["*"]}]',
}
ADDRESS = {"x": "198.51.100.40", "b": "198.51.100.20", "c": "198.51.100.30"}
HOST = {"b": "ratings.bookinfo.remote", "c": "details.bookinfo.remote"}
# How soon every exporter must refuse a revoked cluster: one long-poll wake-up and one pass each.
DEADLINE_S = 5.0


def make_loop(cfg_path: Path) -> tuple[AgentLoop, Path]:
    cfg = load_config(cfg_path)
    out = cfg_path.parent / "out"
    client = CAClient(cfg.ca.url, trust_pem=Path(cfg.ca.trust_anchor).read_text(), cluster=cfg.cluster)
    writer = DirectoryWriter(out, state_dir=out / ".meshbridge", stream=io.StringIO())
    rec = Reconciler(cfg, client=client, applier=writer, state_store=DirStateStore(out / ".meshbridge"))
    return AgentLoop(rec, poll_wait=25), out


def policies(out: Path) -> list[dict[str, Any]]:
    docs = (yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml")))
    return [d for d in docs if d and d.get("kind") == "AuthorizationPolicy"]


def names_principal(out: Path, principal: str) -> bool:
    """Whether any of the exporter's policies names ``principal`` (as Istio writes it, no scheme)."""
    bare = principal.removeprefix("spiffe://")
    return any(bare in yaml.safe_dump(p) for p in policies(out))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[CAService, dict[str, AgentLoop], dict[str, Path]]]:
    ca = CAService(tmp_path / "ca").start()
    loops: dict[str, AgentLoop] = {}
    outs: dict[str, Path] = {}
    try:
        for name in ("x", "b", "c"):
            d = tmp_path / name
            d.mkdir()
            ca.add_cluster(name, TD[name], d / "bootstrap-token")
            text = agent_yaml(
                name=name, td=TD[name], url=ca.url, address=ADDRESS[name], exports=EXPORTS[name], imports=IMPORTS[name]
            )
            (d / "agent.yaml").write_text(text.replace("mode: coredns", "mode: none"))
            loops[name], outs[name] = make_loop(d / "agent.yaml")
        for _ in range(2):  # publish exports, then learn every peer's egress identity
            for name in ("x", "b", "c"):
                loops[name].revision = None
                loops[name].step()
        yield ca, loops, outs
    finally:
        for loop in loops.values():
            loop.stop.set()
        ca.stop()


def run_loops(loops: list[AgentLoop]) -> list[threading.Thread]:
    threads = [threading.Thread(target=loop.run, daemon=True) for loop in loops]
    for t in threads:
        t.start()
    return threads


def test_revoked_cluster_is_denied_at_every_exporter_within_seconds(
    fleet: tuple[CAService, dict[str, AgentLoop], dict[str, Path]],
) -> None:
    ca, loops, outs = fleet
    exporters = {"b": "c", "c": "b"}  # exporter -> its other consumer
    for exporter, other in exporters.items():
        assert names_principal(outs[exporter], EGRESS["x"]), f"{exporter}'s policy never named x"
        gocheck.run_policy_verdicts(
            outs[exporter], HOST[exporter], admit=[EGRESS["x"], EGRESS[other]], trust_domain=TD[exporter]
        )

    threads = run_loops([loops["b"], loops["c"]])
    try:
        time.sleep(1.0)  # both loops are now waiting in a long-poll
        t0 = time.monotonic()
        ca.authority.revoke_cluster("x", reason="keyCompromise", actor="e2e")
        pending = set(exporters)
        while pending:
            pending = {e for e in pending if names_principal(outs[e], EGRESS["x"])}
            elapsed = time.monotonic() - t0
            assert elapsed < DEADLINE_S, f"after {elapsed:.1f}s, still admitting x at: {sorted(pending)}"
            time.sleep(0.05)
        print(f"\nrevoke x → denied at both exporters in {time.monotonic() - t0:.2f}s")
    finally:
        for name in exporters:
            loops[name].stop.set()
        for t in threads:
            t.join(30)

    for exporter, other in exporters.items():
        gocheck.run_policy_verdicts(
            outs[exporter], HOST[exporter], admit=[EGRESS[other]], deny=[EGRESS["x"]], trust_domain=TD[exporter]
        )
    # x's imports are gone from nobody's view but its own: no exporter lists x as a peer any more.
    for exporter in exporters:
        assert not any("x.mesh" in p.read_text() for p in outs[exporter].glob("*.yaml"))
