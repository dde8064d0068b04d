"""The e2e clusters are real: API servers answer, Istio's CRD schemas are enforced, RBAC is on."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.clusters import Cluster, Clusters

VALID_VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: smoke-valid, namespace: bookinfo}
spec:
  hosts: [ratings.bookinfo.svc.cluster.local]
  http:
  - route:
    - destination: {host: ratings.bookinfo.svc.cluster.local, port: {number: 9080}}
"""

# Structural schema: `hosts` must be a list of strings, `weight` an integer.
INVALID_VS_SCHEMA = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: smoke-invalid-schema, namespace: bookinfo}
spec:
  hosts: ratings.bookinfo.svc.cluster.local
  http:
  - route:
    - destination: {host: ratings.bookinfo.svc.cluster.local}
      weight: "heavy"
"""

# CEL rule (x-kubernetes-validations) of the CRD: timeouts must be at least 1ms.
INVALID_VS_CEL = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: smoke-invalid-cel, namespace: bookinfo}
spec:
  hosts: [ratings.bookinfo.svc.cluster.local]
  http:
  - timeout: 500us
    route:
    - destination: {host: ratings.bookinfo.svc.cluster.local, port: {number: 9080}}
"""


def test_both_api_servers_answer(clusters: Clusters) -> None:
    seen = set()
    for c in clusters:
        v = json.loads(c.kubectl("version", "-o", "json").stdout)
        assert v["serverVersion"]["gitVersion"].startswith("v1."), v
        assert v["serverVersion"]["major"] == "1", v
        assert c.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
        seen.add(c.server)
    assert len(seen) == 2, "the two clusters must be distinct API servers"


def test_base_objects(clusters: Clusters) -> None:
    for c in clusters:
        cm = json.loads(c.kubectl("get", "configmap", "-n", "kube-system", "coredns", "-o", "json").stdout)
        assert "kubernetes cluster.local in-addr.arpa ip6.arpa" in cm["data"]["Corefile"]
        svc = json.loads(c.kubectl("get", "svc", "-n", "istio-system", "istio-ingressgateway", "-o", "json").stdout)
        assert {"name": "tls", "port": 15443} in [{"name": p["name"], "port": p["port"]} for p in svc["spec"]["ports"]]
        c.kubectl("get", "svc", "-n", "istio-system", "istio-egressgateway")
        c.kubectl("get", "deployment", "-n", "istio-system", "istio-ingressgateway", "istio-egressgateway")
        ratings = json.loads(c.kubectl("get", "svc", "-n", "bookinfo", "ratings", "-o", "json").stdout)
        assert ratings["spec"]["ports"][0]["name"] == "http"
        assert ratings["spec"]["ports"][0]["port"] == 9080


def test_istio_crds_installed(clusters: Clusters) -> None:
    for c in clusters:
        names = c.kubectl("get", "crd", "-o", "name").stdout.split()
        for crd in ("virtualservices", "destinationrules", "gateways", "serviceentries", "sidecars"):
            assert f"customresourcedefinition.apiextensions.k8s.io/{crd}.networking.istio.io" in names
        assert "customresourcedefinition.apiextensions.k8s.io/authorizationpolicies.security.istio.io" in names


@pytest.mark.parametrize(
    ("manifest", "message"),
    [(INVALID_VS_SCHEMA, ".spec.hosts: expected list"), (INVALID_VS_CEL, "must be a valid duration greater than 1ms")],
    ids=["structural-schema", "cel-rule"],
)
def test_istio_schema_enforced(clusters: Clusters, manifest: str, message: str) -> None:
    c: Cluster = clusters.a
    res = c.kubectl("apply", "--server-side", "-f", "-", input=manifest, check=False)
    assert res.returncode != 0, f"the API server accepted an invalid VirtualService:\n{res.stdout}"
    assert message in res.stderr, res.stderr


def test_valid_virtualservice_accepted(clusters: Clusters) -> None:
    c = clusters.b
    c.kubectl("apply", "--server-side", "-f", "-", input=VALID_VS)
    got = json.loads(c.kubectl("get", "virtualservice", "-n", "bookinfo", "smoke-valid", "-o", "json").stdout)
    assert got["spec"]["hosts"] == ["ratings.bookinfo.svc.cluster.local"]
    c.kubectl("delete", "virtualservice", "-n", "bookinfo", "smoke-valid")


def test_rbac_denies_unbound_service_account(clusters: Clusters) -> None:
    c = clusters.a
    kc = c.kubeconfig_for_service_account("bookinfo", "smoke-nobody")
    res = c.kubectl("get", "configmaps", "-n", "kube-system", kubeconfig=kc, check=False)
    assert res.returncode != 0
    assert "forbidden" in res.stderr.lower(), res.stderr
    assert "system:serviceaccount:bookinfo:smoke-nobody" in res.stderr, res.stderr
    who = c.kubectl("auth", "whoami", "-o", "json", kubeconfig=kc)
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == "system:serviceaccount:bookinfo:smoke-nobody"
    # The same request as admin works, so the denial is RBAC, not a broken server.
    c.kubectl("get", "configmaps", "-n", "kube-system")
    # And a binding makes it pass: RBAC is evaluated, not just denying everything. (An explicit Role:
    # the aggregated ClusterRoles view/edit/admin stay empty without kube-controller-manager.)
    c.kubectl("create", "role", "-n", "kube-system", "smoke-cm-reader", "--verb=get,list", "--resource=configmaps")
    c.kubectl(
        "create",
        "rolebinding",
        "-n",
        "kube-system",
        "smoke-nobody-cm-reader",
        "--role=smoke-cm-reader",
        "--serviceaccount=bookinfo:smoke-nobody",
    )
    deadline = time.monotonic() + 10  # the RBAC authorizer sees the binding through an informer
    while c.kubectl("get", "configmaps", "-n", "kube-system", kubeconfig=kc, check=False).returncode:
        assert time.monotonic() < deadline, "the RoleBinding never took effect"
        time.sleep(0.1)
