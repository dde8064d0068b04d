"""Issue 11 items 3 and 7 against a real API server: the agent reads the gateways' Services and pods
and istiod's ConfigMap and pods (`KubeApplier.mesh_facts`), refuses to install cacerts while istiod's
trust domain is another one (nothing written, a clear status error), reports a missing cross-cluster
port, another service account, istiod without ISTIO_MULTIROOT_MESH and istiod started before cacerts,
and once all is fixed installs cacerts with its policy in the ingress gateway's namespace.

Its own namespaces (`istio-pre`, `istio-ingress-pre`) in cluster b: the fleet tests' objects stay as
they are. The harness runs no kubelet, so pods are created directly and their status (phase,
startTime) written through the status subresource, as a kubelet would."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cluster_agent.ca_client import CAClient
from cluster_agent.config import AgentConfig, load_config
from cluster_agent.errors import IstioPreconditionFailed
from cluster_agent.kube import KubeApplier, SecretStateStore, make_client
from cluster_agent.loop import AgentLoop
from cluster_agent.meshcheck import Traffic, check_mesh
from cluster_agent.reconcile import Reconciler
from tests.e2e.clusters import Cluster, Clusters, apply, pod, run_pod
from tests.support.caservice import CAService

NS = "istio-pre"
GW_NS = "istio-ingress-pre"
HELM_GATEWAY_PORTS = [  # Istio's Helm gateway chart's Service (manifests/charts/gateway/values.yaml)
    {"name": "status-port", "port": 15021, "targetPort": 15021, "protocol": "TCP"},
    {"name": "http2", "port": 80, "targetPort": 80, "protocol": "TCP"},
    {"name": "https", "port": 443, "targetPort": 443, "protocol": "TCP"},
]


def mesh_configmap(trust_domain: str) -> dict[str, Any]:
    mesh = f"trustDomain: {trust_domain}\ndefaultConfig:\n  discoveryAddress: istiod.{NS}.svc:15012\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": NS},
        "data": {"mesh": mesh},
    }


def ingress_service(ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "istio-ingress", "namespace": GW_NS},
        "spec": {"selector": {"istio": "ingress"}, "ports": ports},
    }


@pytest.fixture(scope="module")
def mesh(clusters: Clusters) -> Cluster:
    """istiod without ISTIO_MULTIROOT_MESH and with the default trust domain, started an hour ago;
    an ingress gateway from the Helm chart (release istio-ingress), without port 15443."""
    c = clusters["b"]
    for ns in (NS, GW_NS):
        c.kubectl("create", "namespace", ns, check=False)
    for ns, sa in ((NS, "istiod"), (GW_NS, "istio-ingress"), (GW_NS, "istio-ingressgateway-service-account")):
        c.kubectl("create", "serviceaccount", sa, "-n", ns, check=False)
    apply(c, mesh_configmap("cluster.local"), ingress_service(HELM_GATEWAY_PORTS))
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    labels = {"app": "istiod", "istio.io/rev": "default"}
    run_pod(
        c,
        pod(NS, "istiod-1", labels, "istiod", "discovery", [{"name": "PILOT_TRACE_SAMPLING", "value": "1"}]),
        an_hour_ago,
    )
    run_pod(
        c,
        pod(GW_NS, "istio-ingress-1", {"istio": "ingress", "app": "istio-ingress"}, "istio-ingress", "istio-proxy", []),
        an_hour_ago,
    )
    return c


def agent_config(tmp: Path, c: Cluster, ca: CAService | None = None) -> AgentConfig:
    tmp.mkdir(parents=True, exist_ok=True)
    url = ca.url if ca is not None else "https://127.0.0.1:1"
    anchor = ca.data_dir / "root-cert.pem" if ca is not None else "/dev/null"
    (tmp / "agent.yaml").write_text(f"""cluster: pre
ca: {{url: "{url}", trust_anchor: {anchor}, bootstrap_token_file: bootstrap-token}}
istio:
  namespace: {NS}
  trust_domain: pre.mesh
  ingress_gateway: {{helm_release: istio-ingress, namespace: {GW_NS}, address: 127.0.0.14, port: 15443}}
dns: {{mode: none}}
exports:
  - {{service: ratings, namespace: bookinfo, ports: [9080], consumers: [b]}}
kubernetes: {{kubeconfig: {c.kubeconfig}}}
""")
    return load_config(tmp / "agent.yaml")


def test_the_agent_reads_what_istio_and_the_gateways_really_are(mesh: Cluster, tmp_path: Path) -> None:
    cfg = agent_config(tmp_path, mesh)
    facts = KubeApplier(make_client(cfg), cfg).mesh_facts()
    assert facts.unreadable == ()
    assert facts.mesh_config is not None and "trustDomain: cluster.local" in facts.mesh_config
    (istiod,) = facts.istiod_pods
    assert istiod.name == "istiod-1" and istiod.started_at is not None and "ISTIO_MULTIROOT_MESH" not in istiod.env
    ingress = facts.gateways[(GW_NS, "istio-ingress")]
    assert ingress.ports is not None and {p.number for p in ingress.ports} == {15021, 80, 443}
    assert [(p.name, p.service_account) for p in ingress.pods] == [("istio-ingress-1", "istio-ingress")]
    assert facts.cacerts_created is None

    report = check_mesh(cfg, facts, needs=Traffic(http_exports=True), root_cert_to_install=None)
    (blocking,) = report.blocking
    assert blocking.startswith(f"istio: istiod's meshConfig.trustDomain is 'cluster.local' (ConfigMap {NS}/istio)")
    assert report.problems == [
        "istio: istiod pod(s) istiod-1 run without ISTIO_MULTIROOT_MESH=true; istiod ignores every cacerts change "
        "whose root-cert.pem differs (root phases 2 to 4) unless ISTIO_MULTIROOT_MESH=true; set it in istiod's env "
        f"(istiod Helm chart: env.ISTIO_MULTIROOT_MESH=true; istioctl: values.pilot.env.ISTIO_MULTIROOT_MESH=true) and restart istiod (kubectl -n {NS} rollout restart "
        "deployment/istiod), before a root rotation",
        f"istio: Service {GW_NS}/istio-ingress has no port 15443 (istio.cross_cluster_port): other clusters cannot "
        "reach the Gateway server there; add it to the gateway's Service (Istio's gateway charts expose 15021, 80 and "
        "443 only)",
    ]


def test_another_service_account_is_reported(mesh: Cluster, tmp_path: Path) -> None:
    cfg = agent_config(tmp_path, mesh)
    data = cfg.model_dump(by_alias=True)
    data["istio"]["ingress_gateway"]["service_account"] = "istio-ingressgateway-service-account"
    cfg = type(cfg).model_validate(data)
    facts = KubeApplier(make_client(cfg), cfg).mesh_facts()
    report = check_mesh(cfg, facts, needs=Traffic(http_exports=True), root_cert_to_install=None)
    assert any(
        p.startswith(
            "istio: istio.ingress_gateway.service_account is 'istio-ingressgateway-service-account' but pod(s) "
            "istio-ingress-1 run as 'istio-ingress'"
        )
        for p in report.problems
    )


def test_cacerts_waits_for_the_trust_domain_then_istiod_needs_a_restart(mesh: Cluster, tmp_path: Path) -> None:
    ca = CAService(tmp_path / "ca").start()
    try:
        (tmp_path / "agent").mkdir()
        ca.add_cluster("pre", "pre.mesh", tmp_path / "agent" / "bootstrap-token")
        cfg = agent_config(tmp_path / "agent", mesh, ca)
        kube = make_client(cfg)
        client = CAClient(ca.url, trust_pem=(ca.data_dir / "root-cert.pem").read_text(), cluster="pre")
        loop = AgentLoop(
            Reconciler(cfg, client=client, applier=KubeApplier(kube, cfg), state_store=SecretStateStore(kube, NS))
        )

        with pytest.raises(IstioPreconditionFailed) as info:
            loop.step()
        loop.r.failed(str(info.value))  # what the loop does with it: the CA sees it in the status
        status = {c.name: c for c, _ in ca.authority.list_clusters()}["pre"].agent_status
        assert status is not None
        assert any(e.startswith("istio: istiod's meshConfig.trustDomain is 'cluster.local'") for e in status["errors"])
        assert mesh.kubectl("get", "secret", "cacerts", "-n", NS, check=False).returncode != 0  # nothing written
        policies = mesh.kubectl("get", "authorizationpolicies.security.istio.io", "-n", GW_NS, "-o", "name").stdout
        assert policies.strip() == ""

        apply(
            mesh,
            mesh_configmap("pre.mesh"),
            ingress_service(
                [*HELM_GATEWAY_PORTS, {"name": "tls", "port": 15443, "targetPort": 15443, "protocol": "TCP"}]
            ),
        )
        loop.revision = None
        result = loop.step()
        assert result is not None and "secret/istio-pre/cacerts" in result.report.created
        (problem, adoption) = result.istio_problems
        assert problem.startswith("istio: istiod pod(s) istiod-1 run without ISTIO_MULTIROOT_MESH=true")
        assert adoption.startswith("istio: istiod pod(s) istiod-1 started before cacerts existed")
        assert (
            f"restart istiod (kubectl -n {NS} rollout restart deployment/istiod), then roll out every workload"
            in adoption
        )
        policy = json.loads(
            mesh.kubectl("get", "authorizationpolicies.security.istio.io", "-n", GW_NS, "-o", "json").stdout
        )
        (item,) = policy["items"]
        assert item["spec"]["selector"]["matchLabels"] == {"istio": "ingress"}
        status = {c.name: c for c, _ in ca.authority.list_clusters()}["pre"].agent_status
        assert status is not None and adoption in status["errors"]

        # istiod restarted with ISTIO_MULTIROOT_MESH=true after cacerts: nothing left to report
        mesh.kubectl("delete", "pod", "istiod-1", "-n", NS, "--grace-period=0", "--force")
        labels = {"app": "istiod", "istio.io/rev": "default"}
        env = [{"name": "ISTIO_MULTIROOT_MESH", "value": "true"}]
        run_pod(mesh, pod(NS, "istiod-2", labels, "istiod", "discovery", env), datetime.now(UTC) + timedelta(seconds=1))
        loop.revision = None
        again = loop.step()
        assert again is not None and again.istio_problems == [] and again.report.writes == 0

        # the policy is found for pruning in the ingress gateway's namespace
        report = KubeApplier(kube, cfg).apply([], corefile_block=None)
        assert any(k.startswith(f"authorizationpolicy/{GW_NS}/meshbridge-export-") for k in report.pruned)
        assert mesh.kubectl("get", "authorizationpolicies.security.istio.io", "-n", GW_NS, "-o", "name").stdout == ""
    finally:
        ca.stop()
