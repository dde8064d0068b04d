"""Issue 4 (f): the agent runs with only the Helm chart's ServiceAccount and RBAC, succeeds, and is
denied outside its role; `helm lint` and `helm template | kubectl apply --dry-run=server` pass."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from cluster_agent.ca_client import CAClient
from cluster_agent.config import load_config
from cluster_agent.istiod import LiveIstiodView
from cluster_agent.kube import KubeApplier, SecretStateStore, make_client
from cluster_agent.loop import AgentLoop
from cluster_agent.reconcile import Reconciler
from tests.e2e.clusters import Clusters, free_port
from tests.e2e.testbin import require
from tests.support.caservice import CAService

CHART = Path(__file__).resolve().parents[2] / "deploy" / "meshbridge-agent"
NS = "istio-rbac"  # its own Istio namespace, so this test shares nothing with the fleet tests


def chart_values(tmp: Path) -> Path:
    values = {
        "cluster": "rbac",
        "ca": {"url": "https://meshbridge-ca.meshbridge.svc:8443", "trustAnchor": {"existingConfigMap": "ca-root"}},
        "istio": {
            "namespace": NS,
            "trustDomain": "rbac.mesh",
            "ingressGateway": {"address": "127.0.0.13", "port": 15443},
        },
        "exports": [{"service": "ratings", "namespace": "bookinfo", "ports": [9080], "consumers": ["b"]}],
        "dns": {"mode": "coredns"},  # so the chart's kube-system Role (the coredns ConfigMap) is tested too
    }
    path = tmp / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_helm_lint_and_server_dry_run(clusters: Clusters, tmp_path: Path) -> None:
    helm = require("helm")
    values = chart_values(tmp_path)
    lint = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), "-f", str(values)], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    rendered = subprocess.run(
        [str(helm), "template", "agent", str(CHART), "-n", NS, "-f", str(values)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    c = clusters["a"]
    c.kubectl("create", "namespace", NS, check=False)
    res = c.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
    assert res.returncode == 0, res.stderr


def test_agent_works_with_only_the_charts_rbac_and_is_denied_outside(clusters: Clusters, tmp_path: Path) -> None:
    helm = require("helm")
    c = clusters["a"]
    c.kubectl("create", "namespace", NS, check=False)
    rendered = subprocess.run(
        [str(helm), "template", "agent", str(CHART), "-n", NS, "-f", str(chart_values(tmp_path))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    rbac = [
        d for d in docs if d["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    assert {d["kind"] for d in rbac} >= {"ServiceAccount", "Role", "RoleBinding"}
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
    sa = next(d for d in rbac if d["kind"] == "ServiceAccount")["metadata"]["name"]
    kubeconfig = c.kubeconfig_for_service_account(NS, sa, create=False)

    ca = CAService(tmp_path / "ca").start()
    try:
        d = tmp_path / "agent"
        d.mkdir()
        ca.add_cluster("rbac", "rbac.mesh", d / "bootstrap-token")
        (d / "ca-root.pem").write_text((tmp_path / "ca" / "root-cert.pem").read_text())
        (d / "agent.yaml").write_text(f"""cluster: rbac
ca: {{url: "{ca.url}", trust_anchor: ca-root.pem, bootstrap_token_file: bootstrap-token}}
istio:
  namespace: {NS}
  trust_domain: rbac.mesh
  ingress_gateway: {{address: 127.0.0.13, port: 15443}}
dns: {{suffix: remote, mode: coredns}}
exports:
  - {{service: ratings, namespace: bookinfo, ports: [9080], consumers: [b]}}
kubernetes: {{kubeconfig: {kubeconfig}}}
""")
        cfg = load_config(d / "agent.yaml")
        kube = make_client(cfg)
        applier = KubeApplier(kube, cfg)
        loop = AgentLoop(
            Reconciler(
                cfg,
                client=CAClient(ca.url, trust_pem=(d / "ca-root.pem").read_text(), cluster="rbac"),
                applier=applier,
                state_store=SecretStateStore(kube, NS),
                # what istiod serves: its two ConfigMaps through the chart's RBAC (no istiod runs here)
                istiod=LiveIstiodView(applier.configmap_data, namespace=NS, address=("127.0.0.1", free_port())),
            )
        )
        result = loop.step()
        assert result is not None and result.report.created
        # Istio's preconditions were all readable with the chart's RBAC (nothing installed here to check)
        assert not [p for p in result.istio_problems if "cannot read" in p], result.istio_problems
        assert any(f"ConfigMap {NS}/istio not found" in p for p in result.istio_problems)
        served = loop.r.served
        assert served is not None
        assert not [p for p in served.problems if "forbidden" in p.lower()], served.problems
        assert f"ConfigMap {NS}/istio-ca-root-cert has no root-cert.pem: istiod has not published it" in served.problems
        secret = c.kubectl("get", "secret", "cacerts", "-n", NS, "-o", "jsonpath={.data}").stdout
        assert "ca-cert.pem" in secret and "ca-crl.pem" in secret
        # a second pass with nothing changed: zero writes against the real API server
        before = applier.write_calls
        loop.revision = None
        again = loop.step()
        assert again is not None and again.report.writes == 0 and applier.write_calls == before
    finally:
        ca.stop()

    def denied(*args: str) -> None:
        r = c.kubectl(*args, check=False, kubeconfig=kubeconfig)
        assert r.returncode != 0 and "forbidden" in r.stderr.lower(), (args, r.stdout, r.stderr)

    denied("get", "secret", "cacerts", "-n", "istio-system")  # another namespace's CA
    denied("get", "secrets", "-n", NS)  # no listing of Secrets, even in its own namespace
    denied("create", "secret", "generic", "x", "-n", "default", "--from-literal=a=b")
    denied("get", "configmap", "kube-proxy", "-n", "kube-system")  # only the coredns ConfigMaps by name
    denied("delete", "configmap", "coredns", "-n", "kube-system")
    denied("get", "pod", "istiod-1", "-n", NS)  # pods are listed (meshcheck), never read one by one
    denied("get", "pods", "-n", "default")
    denied("get", "configmap", "istio-sidecar-injector", "-n", NS)  # of Istio's ConfigMaps only those it reads
    denied("get", "service", "ratings", "-n", "bookinfo")  # of Services only the gateways', by name
