"""Issue 11 items 3 and 7 in the agent chart: gateways of Istio's Helm `gateway` chart (`helmRelease`)
and revisions render into the agent's configuration, and the agent gets exactly the reads its
checks need (istiod's mesh ConfigMap by name, pods listed, gateway Services by name) plus the
AuthorizationPolicies in the ingress gateway's own namespace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cluster_agent.config import parse_config
from tests.deploy.test_charts import AGENT, AGENT_FULL, AGENT_MINIMAL, agent_config, helm, render

__all__ = ["helm"]  # the module-scoped fixture, shared with test_charts.py

HELM_LAYOUT = [
    "--set", "istio.revision=canary",
    "--set", "istio.ingressGateway.helmRelease=istio-ingress",
    "--set", "istio.ingressGateway.namespace=istio-ingress",
    "--set", "istio.egressGateway.helmRelease=istio-egress",
    "--set", "istio.egressGateway.namespace=istio-egress",
]  # fmt: skip


def rules_by_resource(role: dict[str, Any]) -> dict[tuple[str, tuple[str, ...]], set[str]]:
    return {
        (resource, tuple(rule.get("resourceNames", []))): set(rule["verbs"])
        for rule in role["rules"]
        for resource in rule["resources"]
    }


def test_the_istio_role_reads_exactly_what_meshcheck_needs(helm: Any) -> None:
    docs = render(helm, AGENT, "--values", str(AGENT_FULL))
    istio_role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == "istio-system")
    rules = rules_by_resource(istio_role)
    assert rules[("configmaps", ("istio",))] == {"get"}
    assert rules[("configmaps", ("istio-ca-root-cert", "istio-ca-crl"))] == {"get"}  # what istiod serves
    assert rules[("pods", ())] == {"list"}
    assert rules[("services", ("istio-ingressgateway", "istio-egressgateway", "egress-to-c"))] == {"get"}
    assert not [k for k in rules if k[0] == "services" and not k[1]]  # Services only by name


def test_helm_gateways_get_a_role_in_their_namespaces(helm: Any, tmp_path: Path) -> None:
    docs = render(helm, AGENT, "--values", str(AGENT_MINIMAL), *HELM_LAYOUT)
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    # dns.mode defaults to istio: no Role in kube-system (the coredns ConfigMap is not touched)
    assert set(roles) == {"istio-system", "istio-ingress", "istio-egress"}
    assert rules_by_resource(roles["istio-ingress"]) == {
        ("services", ("istio-ingress",)): {"get"},
        ("pods", ()): {"list"},
        ("authorizationpolicies", ()): {"get", "list", "create", "patch", "delete"},
    }
    assert rules_by_resource(roles["istio-egress"]) == {
        ("services", ("istio-egress",)): {"get"},
        ("pods", ()): {"list"},
    }
    assert rules_by_resource(roles["istio-system"])[("configmaps", ("istio-canary",))] == {"get"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert bindings["istio-ingress"]["roleRef"]["name"] == roles["istio-ingress"]["metadata"]["name"]

    config = agent_config(docs)
    assert config["istio"]["revision"] == "canary"
    assert config["istio"]["ingress_gateway"]["helm_release"] == "istio-ingress"
    assert "service" not in config["istio"]["ingress_gateway"]
    config["ca"]["trust_anchor"] = str(tmp_path / "root.pem")
    config["istio"]["ingress_gateway"]["address"] = "198.51.100.20"
    istio = parse_config(yaml.safe_load(yaml.safe_dump(config))).istio
    assert istio.identity(istio.ingress_gateway) == f"spiffe://{istio.trust_domain}/ns/istio-ingress/sa/istio-ingress"
    assert istio.egress_gateway.selector == {"istio": "egress"}


def test_end_to_end_exports_get_a_policy_role_in_their_namespaces(helm: Any, tmp_path: Path) -> None:
    """Issue 13: the agent writes an end-to-end export's workload AuthorizationPolicy in the export's
    own namespace; the chart grants exactly that there, and nothing for hop-by-hop exports."""
    values = tmp_path / "exports.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "exports": [
                    {"service": "ratings", "namespace": "bookinfo", "ports": [9080], "consumers": ["c"]},
                    {
                        "service": "reviews",
                        "namespace": "shop",
                        "ports": [9080],
                        "consumers": [{"cluster": "c", "principals": ["ns/web/sa/frontend"]}],
                        "mode": "end-to-end",
                        "service_accounts": ["reviews"],
                    },
                ]
            }
        )
    )
    docs = render(helm, AGENT, "--values", str(AGENT_MINIMAL), "--values", str(values))
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    assert "bookinfo" not in roles
    assert rules_by_resource(roles["shop"]) == {
        ("authorizationpolicies", ()): {"get", "list", "create", "patch", "delete"},
    }
    [binding] = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == "shop"]
    assert binding["roleRef"]["name"] == roles["shop"]["metadata"]["name"]
    parse_config(agent_config(docs))  # the rendered config file still loads
