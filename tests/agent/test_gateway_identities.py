"""Issue 11 item 3: published identities follow the gateways' own namespaces and service accounts,
every egress gateway an import uses is published and admitted, and the export AuthorizationPolicy
lives in the ingress gateway's namespace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster_agent.config import parse_config
from cluster_agent.render import render_all
from cluster_agent.render.inputs import parse_peers
from meshbridge_wire.models import ExportsIn
from tests.agent.conftest import COREFILE, agent_yaml
from tests.agent.test_agent_flow import load_objects, make_agent, step
from tests.support.caservice import CAService

# b runs Istio's Helm gateway charts: ingress release `istio-ingress` in namespace istio-ingress,
# egress release `istio-egress` in istio-egress, and a second egress gateway for a's traffic.
# (explicit keys, as `helm_release` would fill them in: see test_config)
B_GATEWAYS = """\
  ingress_gateway: {selector: {istio: ingress}, service: istio-ingress, service_account: istio-ingress, namespace: istio-ingress, address: 198.51.100.20, port: 15443}
  egress_gateway: {selector: {istio: egress}, service: istio-egress, service_account: istio-egress, namespace: istio-egress}
"""
B_IMPORTS = (
    '[{from: a, names: ["*"], egress_gateway: {selector: {istio: egress-to-a}, service: egress-to-a, '
    "service_account: egress-to-a, namespace: istio-egress}}]"
)
B_INGRESS = "spiffe://b.mesh/ns/istio-ingress/sa/istio-ingress"
B_EGRESS = "spiffe://b.mesh/ns/istio-egress/sa/istio-egress"
B_EGRESS_TO_A = "spiffe://b.mesh/ns/istio-egress/sa/egress-to-a"


def b_yaml(url: str) -> str:
    text = agent_yaml(name="b", td="b.mesh", url=url, address="198.51.100.20", imports=B_IMPORTS)
    lines = [
        line
        for line in text.splitlines(keepends=True)
        if not line.startswith(("  ingress_gateway:", "  egress_gateway:"))
    ]
    at = next(i for i, line in enumerate(lines) if line.startswith("  trust_domain:")) + 1
    return "".join(lines[:at]) + B_GATEWAYS + "".join(lines[at:])


@pytest.fixture
def fleet(ca_service: CAService, tmp_path: Path) -> dict[str, Path]:
    """a (istioctl layout, gateways in istio-system) exports ratings.bookinfo to b (Helm layout)."""
    paths = {}
    for name, td, text in (
        (
            "a",
            "a.mesh",
            agent_yaml(
                name="a",
                td="a.mesh",
                url=ca_service.url,
                address="198.51.100.10",
                exports="[{service: ratings, namespace: bookinfo, ports: [9080], consumers: [b]}]",
            ),
        ),
        ("b", "b.mesh", b_yaml(ca_service.url)),
    ):
        d = tmp_path / name
        d.mkdir()
        ca_service.add_cluster(name, td, d / "bootstrap-token")
        (d / "agent.yaml").write_text(text)
        paths[name] = d / "agent.yaml"
    (tmp_path / "Corefile").write_text(COREFILE)
    return paths


def test_published_identities_use_each_gateways_namespace_and_service_account(fleet: dict[str, Path]) -> None:
    """Before: both identities said ns/istio-system (istio.namespace), whatever the gateways' namespace,
    and the dedicated egress gateway was not published at all."""
    loop, _ = make_agent(fleet["b"])
    body = loop.r.exports_body()
    assert body.identities.ingress == B_INGRESS
    assert body.identities.egress == B_EGRESS
    assert body.identities.egress_additional == [B_EGRESS_TO_A]


def test_without_further_egress_gateways_the_body_is_what_older_ca_services_accept(fleet: dict[str, Path]) -> None:
    loop, _ = make_agent(fleet["a"])
    sent = loop.r.exports_body().model_dump(mode="json", exclude_none=True)  # as ca_client sends it
    assert set(sent["identities"]) == {"ingress", "egress"}
    assert sent["identities"]["ingress"] == "spiffe://a.mesh/ns/istio-system/sa/istio-ingressgateway-service-account"


def test_exporter_admits_every_egress_gateway_and_puts_its_policy_in_the_ingress_namespace(
    fleet: dict[str, Path], tmp_path: Path
) -> None:
    a, out_a = make_agent(fleet["a"], corefile=tmp_path / "Corefile")
    b, out_b = make_agent(fleet["b"], corefile=tmp_path / "Corefile")
    step(a)
    step(b)  # b publishes its three identities; the CA checks each is in b.mesh
    step(a)
    objs_a = load_objects(out_a)
    (policy,) = [o for o in objs_a.values() if o["kind"] == "AuthorizationPolicy"]
    assert policy["metadata"]["namespace"] == "istio-system"  # a's ingress gateway's namespace
    principals = policy["spec"]["rules"][0]["from"][0]["source"]["notPrincipals"]
    assert principals == sorted(uri.removeprefix("spiffe://") for uri in (B_EGRESS, B_EGRESS_TO_A))
    objs_b = load_objects(out_b)
    (se,) = [o for o in objs_b.values() if o["kind"] == "ServiceEntry"]
    assert se["spec"]["subjectAltNames"] == ["spiffe://a.mesh/ns/istio-system/sa/istio-ingressgateway-service-account"]


def test_the_ca_refuses_an_additional_egress_identity_outside_the_trust_domain(
    fleet: dict[str, Path], ca_service: CAService
) -> None:
    from cluster_agent.ca_client import CARejected

    loop, _ = make_agent(fleet["b"])
    loop.r.intermediate.ensure_enrolled()
    body = loop.r.exports_body().model_dump(mode="json", exclude_none=True)
    body["identities"]["egress_additional"] = [B_EGRESS_TO_A, "spiffe://a.mesh/ns/istio-egress/sa/egress-to-a"]
    with pytest.raises(CARejected, match=r"identities\.egress_additional\[1\] must be a SPIFFE ID"):
        loop.r.client.put_exports(ExportsIn.model_validate(body))


def policy_namespace(ingress: dict[str, Any]) -> str:
    config = parse_config(
        {
            "cluster": "a",
            "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/ca-root.pem"},
            "istio": {"trust_domain": "a.mesh", "ingress_gateway": {"address": "198.51.100.10", **ingress}},
            "exports": [{"service": "ratings", "namespace": "bookinfo", "ports": [9080], "consumers": ["b"]}],
        }
    )
    result = render_all(config, imports=[], peers=[], vips={})
    (policy,) = [o for o in result.objects if o["kind"] == "AuthorizationPolicy"]
    (gateway,) = [o for o in result.objects if o["kind"] == "Gateway"]
    assert gateway["metadata"]["namespace"] == "istio-system"  # Gateways select pods in any namespace
    return str(policy["metadata"]["namespace"])


def test_the_authorization_policy_follows_the_ingress_gateways_namespace() -> None:
    """Before: always istio.namespace; a selector policy binds only in its own namespace (or the root
    namespace), so with the gateway in istio-ingress it bound nothing when the root namespace differs."""
    assert policy_namespace({}) == "istio-system"
    ingress = {"selector": {"istio": "ingress"}, "service": "istio-ingress", "service_account": "istio-ingress"}
    assert policy_namespace({**ingress, "namespace": "istio-ingress"}) == "istio-ingress"


def test_peers_egress_identities_include_the_additional_ones() -> None:
    peers, warnings = parse_peers(
        [
            {
                "name": "b",
                "trust_domain": "b.mesh",
                "identities": {
                    "ingress": B_INGRESS,
                    "egress": B_EGRESS,
                    "egress_additional": [B_EGRESS_TO_A, "spiffe://c.mesh/ns/x/sa/y"],
                },
            }
        ]
    )
    assert peers["b"].egress_identities == (B_EGRESS_TO_A, B_EGRESS)  # sorted
    assert warnings == [
        "peer b: egress identity 'spiffe://c.mesh/ns/x/sa/y' is not a spiffe:// URI of one workload in its trust domain 'b.mesh'; left out"
    ]


def test_b_config_puts_each_gateway_in_its_own_namespace(fleet: dict[str, Path]) -> None:
    data = yaml.safe_load(fleet["b"].read_text())
    assert data["istio"]["ingress_gateway"]["namespace"] == "istio-ingress"
    assert data["imports"][0]["egress_gateway"]["service"] == "egress-to-a"


def test_identities_stay_compatible_and_bounded() -> None:
    from pydantic import ValidationError

    from meshbridge_wire.models import Identities

    old = Identities.model_validate({"ingress": B_INGRESS, "egress": B_EGRESS})  # an older agent's body
    assert old.egress_additional is None and old.model_dump(exclude_none=True) == {
        "ingress": B_INGRESS,
        "egress": B_EGRESS,
    }
    with pytest.raises(ValidationError):
        Identities.model_validate({"ingress": B_INGRESS, "egress": B_EGRESS, "egress_additional": [B_EGRESS] * 33})
    with pytest.raises(ValidationError):
        Identities.model_validate({"ingress": B_INGRESS, "egress": B_EGRESS, "egress_additional": ["short"]})
