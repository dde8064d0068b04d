"""The one contract: what the agent's config accepts, the server's models accept, and back.

Before `meshbridge_wire`, the agent accepted `protocol: grpc-web` and sent `GRPC-Web`, which the
server's model refused with 400 on every pass: that cluster's exports were never published.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster_agent.ca_client import CAClient
from cluster_agent.config import ConfigError, ExportPortConfig, load_config
from cluster_agent.loop import AgentLoop
from cluster_agent.output import DirectoryWriter
from cluster_agent.reconcile import Reconciler
from cluster_agent.state import DirStateStore
from meshbridge_wire import models
from meshbridge_wire.names import is_dns_label, is_dns_name, is_service_name, spiffe_trust_domain
from meshbridge_wire.protocols import GATEWAY_CARRIED, Protocol
from tests.agent.conftest import agent_yaml
from tests.support.caservice import CAService

IDENTITIES = {"ingress": "spiffe://a.mesh/ns/istio-system/sa/in", "egress": "spiffe://a.mesh/ns/istio-system/sa/eg"}


def _spellings(protocol: Protocol) -> list[str]:
    return sorted({protocol.value, protocol.value.lower(), protocol.value.upper()})


@pytest.mark.parametrize("spelling", [s for p in sorted(GATEWAY_CARRIED) for s in _spellings(p)])
def test_every_protocol_the_agent_accepts_passes_the_servers_model(spelling: str) -> None:
    port = ExportPortConfig.model_validate({"number": 8080, "protocol": spelling})
    body = {
        "gateway": {"address": "198.51.100.10", "port": 15443},
        "identities": IDENTITIES,
        "services": [
            {
                "name": "web.shop",
                "namespace": "shop",
                "service": "web",
                "ports": [{"number": port.number, "protocol": port.protocol.value}],
            }
        ],
    }
    parsed = models.ExportsIn.model_validate_json(models.ExportsIn.model_validate(body).model_dump_json())
    assert parsed.services[0].ports[0].protocol is port.protocol


@pytest.mark.parametrize("spelling", ["HTTPS", "tls", "UDP", "mongo", "", "GRPC-WEB\n"])
def test_protocols_the_gateways_cannot_carry_are_config_errors(spelling: str) -> None:
    with pytest.raises(ValueError, match="cannot cross clusters"):
        ExportPortConfig.model_validate({"number": 8080, "protocol": spelling})


@pytest.mark.parametrize("value", ["b\n", "B", "-b", "b-", "a" * 64, "", "b.c"])
def test_names_are_checked_with_full_matches(value: str) -> None:
    assert not is_dns_label(value)


def test_name_checks_accept_what_they_should() -> None:
    assert is_dns_label("b") and is_dns_label("a" * 63) and is_dns_label("0a-1")
    assert is_dns_name("a.mesh") and not is_dns_name("a.mesh.") and not is_dns_name("a.mesh\n")
    assert is_service_name("ratings.bookinfo") and not is_service_name("9ratings.bookinfo")
    assert spiffe_trust_domain("spiffe://a.mesh/ns/x/sa/y") == "a.mesh"
    assert spiffe_trust_domain("spiffe://a.mesh/") is None and spiffe_trust_domain("spiffe://A.mesh/x") is None


def test_a_config_with_a_protocol_the_gateways_cannot_carry_is_refused_at_load(
    ca_service: CAService, tmp_path: Path
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        agent_yaml(
            name="a",
            td="a.mesh",
            url=ca_service.url,
            address="198.51.100.10",
            exports="[{service: ratings, namespace: bookinfo, ports: [{number: 9080, protocol: udp}], consumers: [b]}]",
            imports="[]",
        )
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert any("exports[0].ports[0].protocol" in p for p in err.value.problems)


def _agent(path: Path) -> tuple[AgentLoop, Path]:
    cfg = load_config(path)
    out = path.parent / "out"
    client = CAClient(cfg.ca.url, trust_pem=Path(cfg.ca.trust_anchor).read_text(), cluster=cfg.cluster)
    writer = DirectoryWriter(out, state_dir=out / ".meshbridge", stream=io.StringIO())
    return AgentLoop(
        Reconciler(cfg, client=client, applier=writer, state_store=DirStateStore(out / ".meshbridge")), poll_wait=1
    ), out


def _step(loop: AgentLoop) -> Any:
    loop.revision = None
    return loop.step()


def test_grpc_web_exports_are_published_and_imported_end_to_end(ca_service: CAService, tmp_path: Path) -> None:
    paths = {}
    for name, td, addr, exp, imp in (
        (
            "a",
            "a.mesh",
            "198.51.100.10",
            "[{service: chat, namespace: web, ports: [{number: 8080, protocol: grpc-web}], consumers: [b]}]",
            "[]",
        ),
        ("b", "b.mesh", "198.51.100.20", "[]", '[{from: a, names: ["*"]}]'),
    ):
        (tmp_path / name).mkdir()
        ca_service.add_cluster(name, td, tmp_path / name / "bootstrap-token")
        paths[name] = tmp_path / name / "agent.yaml"
        paths[name].write_text(agent_yaml(name=name, td=td, url=ca_service.url, address=addr, exports=exp, imports=imp))
    a, _ = _agent(paths["a"])
    b, out_b = _agent(paths["b"])
    _step(a)  # PUT /exports answered 400 (CARejected) here before the fix
    res_b = _step(b)
    assert res_b.imports_applied == 1
    entries = [yaml.safe_load(p.read_text()) for p in out_b.glob("*.yaml")]
    se = [o for o in entries if o["kind"] == "ServiceEntry"]
    assert [p["protocol"] for p in se[0]["spec"]["ports"]] == ["GRPC-Web"]
    assert se[0]["spec"]["hosts"] == ["chat.web.remote"]


def test_the_exporters_tcp_port_reaches_the_importers_service_entry(ca_service: CAService, tmp_path: Path) -> None:
    """Issue 11 item 11: a's TCP exports listen on its own cross_cluster_tcp_port (16000); b, whose own
    is 15444, used to send TCP there; now a publishes it and b's ServiceEntry uses it, for each of the
    two TCP ports of the name."""
    paths = {}
    for name, td, addr, exp, imp in (
        (
            "a",
            "a.mesh",
            "198.51.100.10",
            "[{service: pg, namespace: data, ports: [{number: 5432, protocol: tcp}, {number: 5433, protocol: TCP}],"
            " consumers: [b]}]",
            "[]",
        ),
        ("b", "b.mesh", "198.51.100.20", "[]", '[{from: a, names: ["*"]}]'),
    ):
        (tmp_path / name).mkdir()
        ca_service.add_cluster(name, td, tmp_path / name / "bootstrap-token")
        paths[name] = tmp_path / name / "agent.yaml"
        text = agent_yaml(name=name, td=td, url=ca_service.url, address=addr, exports=exp, imports=imp)
        if name == "a":
            text = text.replace(
                "  namespace: istio-system\n", "  namespace: istio-system\n  cross_cluster_tcp_port: 16000\n"
            )
        paths[name].write_text(text)
    a, _ = _agent(paths["a"])
    b, out_b = _agent(paths["b"])
    assert a.r.exports_body().gateway.tcp_port == 16000
    assert b.r.exports_body().gateway.tcp_port is None  # no TCP export: a CA service before the field accepts it
    _step(a)
    assert _step(b).imports_applied == 1
    (se,) = [o for o in (yaml.safe_load(p.read_text()) for p in out_b.glob("*.yaml")) if o["kind"] == "ServiceEntry"]
    assert se["spec"]["endpoints"] == [{"address": "198.51.100.10", "ports": {"tcp-5432": 16000, "tcp-5433": 16000}}]
