"""The agent's Kubernetes side against a real API server: Lease election between two replicas,
MCS ServiceExport discovery, pruning only what it owns, and the Corefile merged into `coredns`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightkube import Client, KubeConfig

from cluster_agent.config import parse_config
from cluster_agent.kube import KubeApplier, LeaseElector
from tests.e2e.clusters import Clusters

SERVICE_EXPORT_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "serviceexports.multicluster.x-k8s.io"},
    "spec": {
        "group": "multicluster.x-k8s.io",
        "scope": "Namespaced",
        "names": {"plural": "serviceexports", "singular": "serviceexport", "kind": "ServiceExport"},
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


def client_for(kubeconfig: Path) -> Client:
    return Client(KubeConfig.from_file(str(kubeconfig)), field_manager="meshbridge")


def config_for(kubeconfig: Path, cluster: str = "b") -> object:
    return parse_config(
        {
            "cluster": cluster,
            "ca": {"url": "https://127.0.0.1:1", "trust_anchor": "/dev/null"},
            "istio": {"trust_domain": "b.mesh", "ingress_gateway": {"address": "127.0.0.12", "port": 15443}},
            "kubernetes": {"kubeconfig": str(kubeconfig)},
        }
    )


def test_lease_elects_one_replica_and_fails_over(clusters: Clusters) -> None:
    kube = client_for(clusters["b"].kubeconfig)
    one = LeaseElector(kube, "istio-system", name="meshbridge-agent-e2e", identity="replica-1", duration=2)
    two = LeaseElector(kube, "istio-system", name="meshbridge-agent-e2e", identity="replica-2", duration=2)
    assert one.is_leader()
    assert not two.is_leader()
    assert one.is_leader()  # renewing its own lease
    time.sleep(3.5)  # replica-1 stops renewing: the lease expires
    two._held_until = 0.0
    assert two.is_leader()
    one._held_until = 0.0
    assert not one.is_leader()
    holder = json.loads(
        clusters["b"].kubectl("get", "lease", "meshbridge-agent-e2e", "-n", "istio-system", "-o", "json").stdout
    )["spec"]["holderIdentity"]
    assert holder == "replica-2"


def test_service_exports_are_discovered_where_the_crd_exists(clusters: Clusters) -> None:
    c = clusters["b"]
    kube = client_for(c.kubeconfig)
    cfg = config_for(c.kubeconfig)
    applier = KubeApplier(kube, cfg)  # type: ignore[arg-type]
    assert applier.service_exports() == []  # no CRD: nothing, no error
    c.kubectl("apply", "-f", "-", input=json.dumps(SERVICE_EXPORT_CRD))
    c.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/serviceexports.multicluster.x-k8s.io")
    c.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "multicluster.x-k8s.io/v1alpha1",
                "kind": "ServiceExport",
                "metadata": {
                    "name": "ratings",
                    "namespace": "bookinfo",
                    "annotations": {"meshbridge.io/consumers": "a"},
                },
            }
        ),
    )
    found = applier.service_exports()
    assert found == [
        {
            "name": "ratings.bookinfo",
            "namespace": "bookinfo",
            "service": "ratings",
            "ports": [{"number": 9080, "protocol": "HTTP"}],
            "consumers": ["a"],
        }
    ]


def test_apply_prunes_only_its_own_objects(clusters: Clusters) -> None:
    c = clusters["b"]
    kube = client_for(c.kubeconfig)
    cfg = config_for(c.kubeconfig, cluster="prune-e2e")  # its own cluster label: the fleet's objects stay
    applier = KubeApplier(kube, cfg)  # type: ignore[arg-type]
    foreign = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "not-ours", "namespace": "istio-system"},
        "spec": {
            "hosts": ["example.com"],
            "location": "MESH_EXTERNAL",
            "resolution": "DNS",
            "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
        },
    }
    c.kubectl("apply", "-f", "-", input=json.dumps(foreign))
    ours = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {
            "name": "meshbridge-e2e-prune",
            "namespace": "istio-system",
            "labels": {"app.kubernetes.io/managed-by": "meshbridge", "meshbridge.io/cluster": "prune-e2e"},
        },
        "spec": {
            "hosts": ["x.remote"],
            "location": "MESH_EXTERNAL",
            "resolution": "STATIC",
            "addresses": ["240.240.9.9"],
            "endpoints": [{"address": "127.0.0.11"}],
            "ports": [{"number": 80, "name": "http-80", "protocol": "HTTP"}],
        },
    }
    report = applier.apply([ours], corefile_block=None)
    assert "serviceentry/istio-system/meshbridge-e2e-prune" in report.created
    again = applier.apply([ours], corefile_block=None)
    assert "serviceentry/istio-system/meshbridge-e2e-prune" in again.unchanged and again.writes == 0
    gone = applier.apply([], corefile_block=None)
    assert "serviceentry/istio-system/meshbridge-e2e-prune" in gone.pruned
    names = c.kubectl("get", "serviceentries.networking.istio.io", "-n", "istio-system", "-o", "name").stdout
    assert "not-ours" in names and "meshbridge-e2e-prune" not in names
