"""The Helm charts under deploy/: they lint, render, validate their values, and grant least privilege.

Runs the real `helm` (built by `make testbin`); without it these tests fail rather than skip, so a
missing binary never passes for a green chart check. Also reads docker-compose.yml, which cannot be
run here (no Docker engine), for the parts that must hold by construction.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster_agent.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "deploy" / "meshbridge-agent"
CA = ROOT / "deploy" / "meshbridge-ca"
AGENT_FULL = AGENT / "ci" / "full-values.yaml"
AGENT_MINIMAL = AGENT / "ci" / "minimal-values.yaml"
CA_POSTGRES = CA / "ci" / "postgres-values.yaml"

# What the agent may touch by name (cluster_agent/kube.py).
AGENT_SECRETS = {"cacerts", "meshbridge-agent-state"}
READ_VERBS = {"get", "list", "watch"}
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}


# ----------------------------------------------------------------------------- helm


def _find_helm() -> str:
    if importlib.util.find_spec("tests.e2e.testbin") is not None:
        from tests.e2e import testbin

        return str(testbin.require("helm"))
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    roots = [os.environ["MESHBRIDGE_TESTBIN"]] if os.environ.get("MESHBRIDGE_TESTBIN") else []
    roots += sorted(glob.glob(os.path.expanduser("~/.cache/meshbridge/testbin/*")))
    for root in roots:
        candidate = Path(root) / "bin" / "helm"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("helm not found (tests/e2e/testbin.py, PATH, ~/.cache/meshbridge/testbin/*/bin): run `make testbin`")


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    binary = _find_helm()
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=120, check=False)
        if check and proc.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    yield run


def render(helm: Any, chart: Path, *args: str, namespace: str = "meshbridge") -> list[dict[str, Any]]:
    out = helm("template", "mb", str(chart), "--namespace", namespace, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def only(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def rules_of(docs: list[dict[str, Any]], kind: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(d, rule) for d in docs if d["kind"] == kind for rule in d.get("rules", [])]


def agent_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = only(docs, "ConfigMap", "-config")
    config: dict[str, Any] = yaml.safe_load(cm["data"]["agent.yaml"])
    return config


# ----------------------------------------------------------------------------- lint and schema


@pytest.mark.parametrize(
    ("chart", "values"),
    [(AGENT, AGENT_FULL), (AGENT, AGENT_MINIMAL), (CA, None), (CA, CA_POSTGRES)],
    ids=["agent-full", "agent-minimal", "ca-defaults", "ca-postgres"],
)
def test_charts_lint_cleanly(helm: Any, chart: Path, values: Path | None) -> None:
    args = ["lint", "--strict", str(chart)] + (["--values", str(values)] if values else [])
    proc = helm(*args)
    assert "0 chart(s) failed" in proc.stdout


def test_agent_schema_rejects_values_without_cluster(helm: Any, tmp_path: Path) -> None:
    values = yaml.safe_load(AGENT_MINIMAL.read_text())
    del values["cluster"]
    path = tmp_path / "no-cluster.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = helm("template", "mb", str(AGENT), "--values", str(path), check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert "cluster" in proc.stderr


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("ca.url=http://ca.example:8443", "url"),
        ("istio.trustDomain=", "trustDomain"),
        ("replicaCount=3", "replicaCount"),
        ("dns.mode=kube-dns", "mode"),
        ("unknownKey=1", "unknownKey"),
    ],
)
def test_agent_schema_rejects_bad_values(helm: Any, override: str, field: str) -> None:
    proc = helm("template", "mb", str(AGENT), "--values", str(AGENT_MINIMAL), "--set", override, check=False)
    assert proc.returncode != 0
    assert field in proc.stderr


def test_agent_needs_exactly_one_trust_anchor(helm: Any) -> None:
    proc = helm(
        "template",
        "mb",
        str(AGENT),
        "--values",
        str(AGENT_MINIMAL),
        "--set",
        "ca.trustAnchor.existingSecret=also",
        check=False,
    )
    assert proc.returncode != 0
    assert "give exactly one of pem, existingConfigMap or existingSecret" in proc.stderr


def test_ca_refuses_replicas_without_postgres(helm: Any) -> None:
    proc = helm(
        "template",
        "mb",
        str(CA),
        "--set",
        "replicaCount=2",
        "--set",
        "persistence.accessModes={ReadWriteMany}",
        check=False,
    )
    assert proc.returncode != 0
    assert "no PostgreSQL is configured" in proc.stderr
    assert "postgresql.url or postgresql.existingSecret" in proc.stderr


def test_ca_refuses_replicas_on_a_single_writer_volume(helm: Any) -> None:
    proc = helm(
        "template",
        "mb",
        str(CA),
        "--set",
        "replicaCount=2",
        "--set",
        "postgresql.url=postgresql+psycopg://u:p@db:5432/mb",
        check=False,
    )
    assert proc.returncode != 0
    assert "ReadWriteMany" in proc.stderr


# ----------------------------------------------------------------------------- agent: RBAC


def test_agent_rbac_has_no_wildcards(helm: Any) -> None:
    docs = render(helm, AGENT, "--values", str(AGENT_FULL))
    for doc, rule in rules_of(docs, "Role") + rules_of(docs, "ClusterRole"):
        for key in ("verbs", "resources", "apiGroups", "resourceNames"):
            assert "*" not in rule.get(key, []), f"{doc['metadata']['name']}: '*' in {key}: {rule}"
        assert not any("/" in r for r in rule["resources"]), f"subresource granted: {rule}"


def test_agent_secrets_only_by_name(helm: Any) -> None:
    docs = render(helm, AGENT, "--values", str(AGENT_FULL))
    secret_rules = [
        (d, r) for d, r in rules_of(docs, "Role") + rules_of(docs, "ClusterRole") if "secrets" in r["resources"]
    ]
    assert secret_rules, "the agent must be able to write cacerts"
    for doc, rule in secret_rules:
        assert doc["kind"] == "Role" and doc["metadata"]["namespace"] == "istio-system"
        verbs = set(rule["verbs"])
        assert not verbs & {"list", "watch", "deletecollection", "delete", "patch"}, rule
        if verbs == {"create"}:  # create cannot be narrowed by name in RBAC
            assert "resourceNames" not in rule
        else:
            assert verbs <= {"get", "update"}, rule
            assert set(rule["resourceNames"]) == AGENT_SECRETS, rule


def test_agent_named_objects_are_narrowed(helm: Any) -> None:
    docs = render(helm, AGENT, "--values", str(AGENT_FULL))
    dns_role = only(docs, "Role", "-coredns")
    assert dns_role["metadata"]["namespace"] == "kube-system"
    by_names = {tuple(r.get("resourceNames", [])): set(r["verbs"]) for r in dns_role["rules"]}
    assert by_names[("coredns",)] == {"get", "update"}
    assert by_names[("meshbridge-coredns",)] == {"get", "patch", "delete"}
    assert by_names[()] == {"create", "list"}
    assert all(r["resources"] == ["configmaps"] for r in dns_role["rules"])

    istio_role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == "istio-system")
    leases = [r for r in istio_role["rules"] if "leases" in r["resources"]]
    assert {tuple(r.get("resourceNames", [])): tuple(r["verbs"]) for r in leases} == {
        ("meshbridge-agent",): ("get", "update"),
        (): ("create",),
    }
    for rule in istio_role["rules"]:
        if rule.get("resourceNames"):
            continue
        assert set(rule["verbs"]) <= {"get", "list", "create", "patch", "delete"}, rule
        if "update" in rule["verbs"]:
            pytest.fail(f"update without resourceNames: {rule}")


def test_agent_roles_live_in_their_namespaces_only(helm: Any) -> None:
    docs = render(helm, AGENT, "--values", str(AGENT_FULL))
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] in ("Role", "RoleBinding")} == {
        "istio-system",
        "kube-system",
    }
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "mb-meshbridge-agent", "namespace": "meshbridge"}
        ]


def test_agent_cluster_role_is_read_only_and_optional(helm: Any) -> None:
    docs = render(helm, AGENT, "--values", str(AGENT_FULL))
    cluster_role = only(docs, "ClusterRole")
    for rule in cluster_role["rules"]:
        assert set(rule["verbs"]) <= READ_VERBS and not set(rule["verbs"]) & WRITE_VERBS, rule
    granted = {
        (g, r): set(rule["verbs"])
        for rule in cluster_role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert granted == {("multicluster.x-k8s.io", "serviceexports"): {"get", "list"}, ("", "services"): {"get"}}

    minimal = render(helm, AGENT, "--values", str(AGENT_MINIMAL))
    assert not [d for d in minimal if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


@pytest.mark.parametrize("mode", ["istio", "none", None])
def test_agent_without_coredns_gets_no_kube_system_access(helm: Any, mode: str | None) -> None:
    extra = ["--set", f"dns.mode={mode}"] if mode else []  # None: the chart's default, istio
    docs = render(helm, AGENT, "--values", str(AGENT_MINIMAL), *extra)
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] in ("Role", "RoleBinding")} == {"istio-system"}
    config = yaml.safe_load(only(docs, "ConfigMap", "-config")["data"]["agent.yaml"])
    assert config["dns"]["mode"] == (mode or "istio") and config["dns"]["vip_range"] == "241.0.0.0/16"


# ----------------------------------------------------------------------------- agent: workload


def assert_hardened(pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod.get("initContainers", []) + pod["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert container["resources"]["requests"], container["name"]


def test_agent_deployment(helm: Any) -> None:
    docs = render(helm, AGENT, "--values", str(AGENT_FULL))
    deploy = only(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    pod = deploy["spec"]["template"]["spec"]
    assert_hardened(pod)
    (agent,) = pod["containers"]
    assert agent["image"] == "localhost/meshbridge:0.1.0"
    assert agent["command"] == ["meshbridge-agent"]
    assert "run" in agent["args"] and "--config=/etc/meshbridge/agent.yaml" in agent["args"]
    assert "--no-leader-election" not in agent["args"]
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert agent["ports"] == [{"name": "http-health", "containerPort": 9090, "protocol": "TCP"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["bootstrap-token"]["secret"]["secretName"] == "meshbridge-bootstrap-token"
    assert volumes["trust-anchor"]["configMap"]["name"] == "mb-meshbridge-agent-trust-anchor"

    service = only(docs, "Service", "-metrics")
    assert service["spec"]["ports"][0]["port"] == 9090
    assert only(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "http-metrics"


def test_agent_image_is_configurable(helm: Any) -> None:
    docs = render(
        helm,
        AGENT,
        "--values",
        str(AGENT_MINIMAL),
        "--set",
        "image.repository=registry.example/mb",
        "--set",
        "image.tag=0.2.0",
    )
    assert only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/mb:0.2.0"


@pytest.mark.parametrize("values", [AGENT_FULL, AGENT_MINIMAL], ids=["full", "minimal"])
def test_agent_config_is_accepted_by_the_agent(helm: Any, values: Path) -> None:
    config = agent_config(render(helm, AGENT, "--values", str(values)))
    parsed = parse_config(config, source="rendered agent.yaml")
    assert parsed.ca.trust_anchor == Path("/etc/meshbridge/trust-anchor/root-cert.pem")
    assert parsed.ca.bootstrap_token_file == Path("/etc/meshbridge/bootstrap/token")


def test_agent_config_carries_the_values(helm: Any) -> None:
    config = agent_config(render(helm, AGENT, "--values", str(AGENT_FULL)))
    assert config["cluster"] == "b"
    assert config["ca"]["url"] == "https://meshbridge-ca.example.com:8443"
    assert config["ca"]["key_type"] == "ecdsa-p384"
    assert config["istio"]["trust_domain"] == "b.mesh"
    assert config["istio"]["ingress_gateway"]["address"] == "198.51.100.20"
    assert config["istio"]["ingress_gateway"]["port"] == 15443
    assert config["exports"][0] == {"service": "ratings", "namespace": "bookinfo", "ports": [9080], "consumers": ["a"]}
    assert config["imports"][1]["egress_gateway"]["service"] == "egress-to-c"


def test_agent_chart_reaches_every_later_key(helm: Any) -> None:
    """The keys added to the agent after the chart was written (CRL set, TCP port, target ports,
    consumer namespaces, istiod address, NodeLocal DNSCache) are set from values, as the agent reads them."""
    config = agent_config(render(helm, AGENT, "--values", str(AGENT_FULL)))
    parsed = parse_config(config, source="rendered agent.yaml")
    assert parsed.ca.ca_crl is False
    assert parsed.ca.workload_cert_ttl.total_seconds() == 36 * 3600
    assert parsed.istio.cross_cluster_tcp_port == 15446
    assert parsed.istio.consumer_namespaces == ["bookinfo", "frontend"]
    assert parsed.istio.istiod_address == "istiod-canary.istio-system.svc:15012"
    assert parsed.istio.ingress_target_ports() == (16443, 16446)
    assert parsed.istio.ingress_gateway.tcp_port == 31446
    assert parsed.dns.nodelocal_dns is not None
    assert parsed.dns.nodelocal_dns.bind == ["169.254.20.10", "10.96.0.10"]


def test_agent_chart_takes_several_gateway_addresses(helm: Any) -> None:
    docs = render(
        helm,
        AGENT,
        "--values",
        str(AGENT_MINIMAL),
        "--set-json",
        'istio.ingressGateway.addresses=["198.51.100.20","gw-b.example.net"]',
    )
    parsed = parse_config(agent_config(docs), source="rendered agent.yaml")
    assert parsed.istio.ingress_gateway.published_addresses == ["198.51.100.20", "gw-b.example.net"]


def test_agent_chart_defaults_leave_the_agent_defaults(helm: Any) -> None:
    config = agent_config(render(helm, AGENT, "--values", str(AGENT_MINIMAL)))
    assert config["ca"]["ca_crl"] is True
    assert "workload_cert_ttl" not in config["ca"]
    assert "consumer_namespaces" not in config["istio"]
    assert "istiod_address" not in config["istio"]
    assert "nodelocal_dns" not in config["dns"]
    assert config["istio"]["cross_cluster_tcp_port"] == 15444


# ----------------------------------------------------------------------------- CA service


def test_ca_deployment(helm: Any) -> None:
    docs = render(helm, CA)
    deploy = only(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    pod = deploy["spec"]["template"]["spec"]
    assert_hardened(pod)
    assert pod["automountServiceAccountToken"] is False
    (init,) = pod["initContainers"]
    script = init["args"][0]
    assert "[ -f /data/ca.json ]" in script and "meshbridge-ca init --data-dir /data" in script
    (ca,) = pod["containers"]
    assert ca["command"] == ["meshbridge-ca"]
    assert ca["args"][:3] == ["serve", "--data-dir=/data", "--listen=0.0.0.0:8443"]
    assert ca["args"][3] == "--server-name=mb-meshbridge-ca.meshbridge.svc"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert ca[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    for container in (init, ca):
        env = {e["name"]: e for e in container["env"]}
        assert "MESHBRIDGE_DATABASE_URL" not in env
    assert only(docs, "Service")["spec"]["ports"][0]["port"] == 8443
    assert only(docs, "PersistentVolumeClaim")["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]


PASSPHRASE_DIR = "/etc/meshbridge/key-passphrase"
PASSPHRASE_ARG = f"--passphrase-file={PASSPHRASE_DIR}/passphrase"


def passphrase_delivery(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """How the pod gets the root key's passphrase: volume, mounts, arguments and environment."""
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    (init,), (ca,) = pod["initContainers"], pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {
        "volume": volumes.get("key-passphrase"),
        "mounts": [[m for m in c["volumeMounts"] if m["name"] == "key-passphrase"] for c in (init, ca)],
        "data_mounts": {m["mountPath"] for c in (init, ca) for m in c["volumeMounts"] if m["name"] == "data"},
        "init_script": init["args"][0],
        "serve_args": ca["args"],
        "env": [{e["name"] for e in c["env"]} for c in (init, ca)],
    }


def test_ca_passphrase_is_a_read_only_file_outside_the_data_volume(helm: Any) -> None:
    """Before: MESHBRIDGE_CA_KEY_PASSPHRASE in both containers' environment, which child processes
    inherit and /proc/<pid>/environ shows. Now its own Secret volume, mounted read-only away from /data."""
    got = passphrase_delivery(render(helm, CA))
    assert got["volume"] == {
        "name": "key-passphrase",
        "secret": {
            "secretName": "mb-meshbridge-ca-key-passphrase",
            "items": [{"key": "passphrase", "path": "passphrase"}],
            "defaultMode": 0o440,
        },
    }
    for mounts in got["mounts"]:
        assert mounts == [{"name": "key-passphrase", "mountPath": PASSPHRASE_DIR, "readOnly": True}]
    assert got["data_mounts"] and not any(PASSPHRASE_DIR.startswith(data) for data in got["data_mounts"])
    assert (
        f'meshbridge-ca init --data-dir /data --key-type "$CA_KEY_TYPE" --org "$CA_ORG" {PASSPHRASE_ARG}'
        in got["init_script"]
    )
    assert PASSPHRASE_ARG in got["serve_args"]
    assert all("MESHBRIDGE_CA_KEY_PASSPHRASE" not in env for env in got["env"])


def test_ca_passphrase_from_an_existing_secret(helm: Any) -> None:
    docs = render(
        helm,
        CA,
        "--set",
        "keyPassphrase.existingSecret=ca-pass",
        "--set",
        "keyPassphrase.key=pw",
        "--set",
        "auditKey.existingSecret=ca-audit",
    )
    assert passphrase_delivery(docs)["volume"]["secret"]["secretName"] == "ca-pass"
    assert passphrase_delivery(docs)["volume"]["secret"]["items"] == [{"key": "pw", "path": "passphrase"}]
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_ca_passphrase_in_the_environment_only_when_asked(helm: Any) -> None:
    """delivery env: the chart's earlier way, for a release whose Secret value ends in a newline."""
    got = passphrase_delivery(render(helm, CA, "--set", "keyPassphrase.delivery=env"))
    assert got["volume"] is None and got["mounts"] == [[], []]
    assert "--passphrase-file" not in got["init_script"] and PASSPHRASE_ARG not in got["serve_args"]
    assert all("MESHBRIDGE_CA_KEY_PASSPHRASE" in env for env in got["env"])
    bad = helm("template", "mb", str(CA), "--set", "keyPassphrase.delivery=volume", check=False)
    assert bad.returncode != 0 and "delivery" in bad.stderr


def test_ca_with_postgres_and_replicas(helm: Any) -> None:
    docs = render(helm, CA, "--values", str(CA_POSTGRES))
    deploy = only(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    (ca,) = deploy["spec"]["template"]["spec"]["containers"]
    assert ca["args"][3] == "--server-name=ca.meshbridge.example.com"
    env = {e["name"]: e for e in ca["env"]}
    assert env["MESHBRIDGE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "meshbridge-ca-database",
        "key": "database-url",
    }
    assert not [d for d in docs if d["kind"] == "Secret"], "existing Secrets are used, none generated"


def test_ca_database_url_never_appears_in_the_pod_spec(helm: Any) -> None:
    url = "postgresql+psycopg://mb:s3cret@db:5432/mb"
    docs = render(helm, CA, "--set", f"postgresql.url={url}")
    assert url not in yaml.safe_dump(only(docs, "Deployment"))
    assert only(docs, "Secret", "-database")["type"] == "Opaque"


# ----------------------------------------------------------------------------- docker-compose.yml


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    pg, ca = compose["services"]["postgres"], compose["services"]["ca"]
    assert pg["image"] == "postgres:15"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    check = " ".join(ca["healthcheck"]["test"])
    assert "/readyz" in check and "cafile='/data/root-cert.pem'" in check
    assert ca["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert set(compose["volumes"]) == {"ca-data", "pg-data"}
    assert (ROOT / "deploy" / "compose-entrypoint.sh").is_file()
