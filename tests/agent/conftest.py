"""Agent tests run against a real CA service (tests/support/caservice.py) over HTTPS."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from ca_server.core.authority import Policy
from tests.support.caservice import CAService
from tests.support.corefile import KUBEADM_COREFILE

COREFILE = KUBEADM_COREFILE


# Agent tests play istiod's reports (tests/support/served.py) but do not wait out workload
# certificates: with no lifetime, root retirement waits only for every istiod to sign under
# another root. The wait itself is tested in tests/ca/test_root_gates.py on the harness's clock.
NO_WORKLOAD_CERT_WAIT = Policy(workload_cert_lifetime=timedelta(0))


@pytest.fixture
def ca_service(tmp_path: Path) -> Iterator[CAService]:
    svc = CAService(tmp_path / "ca", policy=NO_WORKLOAD_CERT_WAIT).start()
    yield svc
    svc.stop()


def agent_yaml(*, name: str, td: str, url: str, address: str, exports: str = "[]", imports: str = "[]") -> str:
    return f"""cluster: {name}
ca:
  url: {url}
  trust_anchor: ../ca/root-cert.pem
  bootstrap_token_file: bootstrap-token
istio:
  namespace: istio-system
  trust_domain: {td}
  ingress_gateway: {{selector: {{istio: ingressgateway}}, service: istio-ingressgateway, service_account: istio-ingressgateway-service-account, address: {address}, port: 15443}}
  egress_gateway: {{selector: {{istio: egressgateway}}, service: istio-egressgateway, service_account: istio-egressgateway-service-account}}
dns: {{suffix: remote, mode: coredns, vip_range: 241.0.0.0/16}}
exports: {exports}
imports: {imports}
"""


def configure_agents(
    ca_service: CAService, tmp_path: Path, exports_to_b: str, *, b_imports: str = '[{from: a, names: ["*"]}]'
) -> dict[str, Path]:
    """Clusters a (exporting ``exports_to_b``) and b (importing ``b_imports``), each registered at
    ``ca_service`` with its bootstrap token and agent config under ``tmp_path / name``; the configs' paths."""
    paths = {}
    for name, td, addr, exp, imp in (
        ("a", "a.mesh", "198.51.100.10", exports_to_b, "[]"),
        ("b", "b.mesh", "198.51.100.20", "[]", b_imports),
    ):
        d = tmp_path / name
        d.mkdir()
        ca_service.add_cluster(name, td, d / "bootstrap-token")
        (d / "agent.yaml").write_text(
            agent_yaml(name=name, td=td, url=ca_service.url, address=addr, exports=exp, imports=imp)
        )
        paths[name] = d / "agent.yaml"
    return paths


@pytest.fixture
def two_clusters(ca_service: CAService, tmp_path: Path) -> dict[str, Path]:
    """Cluster a exports ratings.bookinfo to b; b imports everything a offers. Returns config paths."""
    paths = configure_agents(
        ca_service, tmp_path, "[{service: ratings, namespace: bookinfo, ports: [9080], consumers: [b]}]"
    )
    (tmp_path / "Corefile").write_text(COREFILE)
    return paths
