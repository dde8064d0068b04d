"""A small fleet for the dashboard's tests, built through the Authority as the agents and the
operator would: a and b enrolled and exporting to each other (a also to c), c registered but never
enrolled, a's istiod reporting what it serves, b's agent reporting an installed generation only,
and a second root added (so the activation phase waits for clusters)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ca_server.core.authority import Authority
from cluster_agent import pki
from tests.support.served import report_served


@dataclass(frozen=True)
class UIFleet:
    viewer_token: str
    a_not_after: datetime  # a's intermediate
    a_generation: int
    new_root: str


def exports(name: str, services: dict[str, list[str]]) -> dict[str, object]:
    td = f"{name}.test"
    return {
        "gateway": {"address": "198.51.100.1", "port": 15443},
        "identities": {
            "ingress": f"spiffe://{td}/ns/istio-system/sa/ingress",
            "egress": f"spiffe://{td}/ns/istio-system/sa/egress",
        },
        "services": [
            {"name": s, "ports": [{"port": 9080, "protocol": "http"}], "consumers": c} for s, c in services.items()
        ],
    }


def build(auth: Authority) -> UIFleet:
    issued = {}
    for name in ("a", "b", "c"):
        made = auth.create_cluster(name=name, trust_domain=f"{name}.test", gateway=None, actor="test")
        if name == "c":
            continue
        key = pki.new_key("ecdsa-p256")
        done = auth.enroll(cluster_name=name, bootstrap_token=made.bootstrap_token, csr_pem=pki.make_csr(key, name))
        issued[name] = done.issued
    auth.put_exports(auth.get_cluster("a")[0], exports("a", {"reviews": ["b", "c"]}))
    auth.put_exports(auth.get_cluster("b")[0], exports("b", {"ratings": ["a"]}))
    a = issued["a"]
    auth.put_status(auth.get_cluster("a")[0], {"installed_generation": a.generation, "installed_serial": a.serial})
    report_served(auth, "a", a.bundle.as_files())
    auth.put_status(auth.get_cluster("b")[0], {"installed_generation": issued["b"].generation, "errors": ["kube: 503"]})
    root = auth.add_root(key_type=None, actor="test")
    _, viewer = auth.create_admin_token(name="oncall", role="viewer", lifetime=None, actor="test")
    return UIFleet(viewer_token=viewer, a_not_after=a.not_after, a_generation=a.generation, new_root=root.id)
