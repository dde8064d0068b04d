"""Runs the prebuilt Go checkers of tests/e2e/go (built by `make testbin`, `go test -c`).

- ``run_cacerts_check(dir)``: istiod's own plugged-in-CA checks on a ``cacerts`` directory
  (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem, optional ca-crl.pem), plus a workload
  certificate signed by istiod's CA code and, optionally, a given workload chain.
- ``run_simulation(a_dir, b_dir)``: Istio's xDS simulation of the import path a → b over the
  rendered objects of both clusters.
- ``run_policy_verdicts(dir, host, admit=, deny=)``: whom one exporter's ingress gateway, as Istio
  builds it from the rendered objects, admits for one exported host.
- ``sidecar_clusters(a_dir, namespaces)``: what a sidecar in each namespace of cluster a builds
  from a's rendered objects (clusters, those of `.remote` hosts, listeners).
- ``run_dataplane_simulation(a_dir, b_dir)``: the same simulation of the data-plane details of
  issue 11 item 11 (retries on one hop, the Host at the destination, several TCP ports per name,
  the exporter's published TCP port) over ``tests/e2e/dataplane_fixture.render_clusters``.

All return the Go test output on success and raise ``GoCheckFailed`` (with that output) otherwise.
A missing or stale binary fails the calling test with a hint to run `make testbin`.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.e2e.testbin import GO_CHECKER_DIR, go_checker


class GoCheckFailed(AssertionError):
    def __init__(self, test: str, returncode: int, output: str) -> None:
        super().__init__(f"Go check {test} failed (exit {returncode}):\n{output}")
        self.test = test
        self.returncode = returncode
        self.output = output


def _run(test: str, env: Mapping[str, str], timeout: float = 300) -> str:
    binary = go_checker()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MESHBRIDGE_")}
    full_env.update(env)
    res = subprocess.run(
        [str(binary), "-test.run", f"^{test}$", "-test.v", "-test.count=1"],
        cwd=GO_CHECKER_DIR,  # the default testdata paths are relative to the package
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = res.stdout + res.stderr
    if res.returncode != 0:
        raise GoCheckFailed(test, res.returncode, _trim(out))
    if not re.search(rf"^--- PASS: {test}\b", out, re.M):
        raise GoCheckFailed(test, res.returncode, "test did not run (skipped?):\n" + _trim(out))
    return out


def _trim(out: str, limit: int = 20000) -> str:
    # The fake discovery server logs a lot at info level; keep the test's own lines first.
    mine = [
        ln
        for ln in out.splitlines()
        if ln.lstrip().startswith(("---", "===", "FAIL", "PASS", "ok")) or "_test.go:" in ln
    ]
    text = "\n".join(mine) if mine else out
    return text if len(text) <= limit else text[:limit] + "\n…(truncated)"


def run_cacerts_check(
    directory: str | os.PathLike[str],
    workload_chain: str | os.PathLike[str] | None = None,
    expect_fail: bool = False,
    trust_domain: str | None = None,
) -> str:
    """istiod's verification of a cacerts directory; with ``workload_chain`` (PEM file: leaf first)
    also x509 verification of that chain against root-cert.pem, which must fail if ``expect_fail``."""
    env = {"MESHBRIDGE_CACERTS_DIR": str(Path(directory).resolve())}
    if workload_chain is not None:
        env["MESHBRIDGE_WORKLOAD_CERT"] = str(Path(workload_chain).resolve())
        if expect_fail:
            env["MESHBRIDGE_EXPECT_FAIL"] = "1"
    elif expect_fail:
        raise ValueError("expect_fail needs a workload_chain")
    if trust_domain:
        env["MESHBRIDGE_TRUST_DOMAIN"] = trust_domain
    return _run("TestCacertsBundle", env)


def run_simulation(a_dir: str | os.PathLike[str], b_dir: str | os.PathLike[str], **overrides: str | int) -> str:
    """Simulates the import path over the rendered objects of a (importer) and b (exporter).

    ``overrides`` map to MESHBRIDGE_SIM_<NAME>: host (the imported name, default
    ratings.bookinfo.remote), port (9080), refused_host (a name b does not export), gateway_address /
    gateway_port (b's ingress, 198.51.100.20:15443), destination (ratings.bookinfo.svc.cluster.local),
    a_trust_domain / b_trust_domain (a.mesh, b.mesh), egress_service / egress_labels (a's egress
    gateway Service in istio-system and its pods' labels as "k=v,k=v"); the plain-TCP path: tcp_host
    (mongodb.bookinfo.remote, whose VIP is read from a's ServiceEntry), tcp_port (27017),
    tcp_gateway_port (b's ingress TCP port, 15444), tcp_destination (mongodb.bookinfo.svc.cluster.local);
    gateway_target_port / tcp_gateway_target_port: the container ports b's ingress Service maps the
    two cross-cluster ports to (default: the same numbers), where its listeners bind.
    """
    env = {
        "MESHBRIDGE_SIM_A_DIR": str(Path(a_dir).resolve()),
        "MESHBRIDGE_SIM_B_DIR": str(Path(b_dir).resolve()),
    }
    for k, v in overrides.items():
        env[f"MESHBRIDGE_SIM_{k.upper()}"] = str(v)
    return _run("TestSimulation", env)


def run_end_to_end(a_dir: str | os.PathLike[str], b_dir: str | os.PathLike[str], **overrides: str | int) -> str:
    """Follows an end-to-end export's call hop by hop over the rendered objects of a (importer) and b
    (exporter) (TestEndToEnd). ``overrides`` map to MESHBRIDGE_E2E_<NAME>: host, port, protocol
    (HTTP or TCP), sni, workload (the destination's SPIFFE ID), destination, destination_ip,
    destination_app, allowed / denied (callers' SPIFFE IDs, comma-separated), refused_sni."""
    env = {
        "MESHBRIDGE_SIM_A_DIR": str(Path(a_dir).resolve()),
        "MESHBRIDGE_SIM_B_DIR": str(Path(b_dir).resolve()),
    }
    for k, v in overrides.items():
        env[f"MESHBRIDGE_E2E_{k.upper()}"] = str(v)
    return _run("TestEndToEnd", env)


def run_policy_verdicts(
    directory: str | os.PathLike[str],
    host: str,
    *,
    admit: Sequence[str] = (),
    deny: Sequence[str] = (),
    trust_domain: str = "b.mesh",
    port: int = 15443,
) -> str:
    """Istio's build of one exporter's ingress gateway from the rendered objects in ``directory``:
    an mTLS call for ``host`` on ``port`` must route, and the RBAC Istio generated for it must admit
    every SPIFFE URI in ``admit`` and deny every one in ``deny`` (TestPolicyVerdicts)."""
    env = {
        "MESHBRIDGE_VERDICT_DIR": str(Path(directory).resolve()),
        "MESHBRIDGE_VERDICT_HOST": host,
        "MESHBRIDGE_VERDICT_PORT": str(port),
        "MESHBRIDGE_VERDICT_TRUST_DOMAIN": trust_domain,
        "MESHBRIDGE_VERDICT_ADMIT": ",".join(admit),
        "MESHBRIDGE_VERDICT_DENY": ",".join(deny),
    }
    return _run("TestPolicyVerdicts", env)


def run_issue_workload_cert(
    *,
    address: str,
    roots: str | os.PathLike[str],
    token: str | os.PathLike[str],
    identity: str,
    out_dir: str | os.PathLike[str],
    ttl: int = 3600,
) -> str:
    """A workload certificate from a running istiod, requested as istio-agent requests it
    (TestIssueWorkloadCert): writes key.pem, cert-chain.pem (leaf first) and root-cert.pem into
    ``out_dir``. ``roots`` verifies istiod's serving certificate; ``token`` is a ServiceAccount token
    with audience istio-ca."""
    env = {
        "MESHBRIDGE_ISTIOD_ADDR": address,
        "MESHBRIDGE_ISTIOD_ROOTS": str(Path(roots).resolve()),
        "MESHBRIDGE_ISTIOD_TOKEN": str(Path(token).resolve()),
        "MESHBRIDGE_ISTIOD_IDENTITY": identity,
        "MESHBRIDGE_ISTIOD_OUT": str(Path(out_dir).resolve()),
        "MESHBRIDGE_ISTIOD_TTL": str(ttl),
    }
    return _run("TestIssueWorkloadCert", env, timeout=60)


_SIDECAR_LINE = re.compile(r"sidecar namespace=(\S+) clusters=(\d+) remote_clusters=(\d+) listeners=(\d+)")


def sidecar_clusters(
    a_dir: str | os.PathLike[str], namespaces: list[str], suffix: str = "remote"
) -> dict[str, dict[str, int]]:
    """Per namespace: ``{"clusters", "remote_clusters", "listeners"}`` of a sidecar there (no Sidecar
    resource), from Istio's own xDS generation over the objects in ``a_dir`` (TestSidecarClusters)."""
    env = {
        "MESHBRIDGE_SIM_A_DIR": str(Path(a_dir).resolve()),
        "MESHBRIDGE_SIDECAR_NAMESPACES": ",".join(namespaces),
        "MESHBRIDGE_SIM_SUFFIX": suffix,
    }
    out = _run("TestSidecarClusters", env, timeout=900)
    found = {
        m[1]: {"clusters": int(m[2]), "remote_clusters": int(m[3]), "listeners": int(m[4])}
        for m in _SIDECAR_LINE.finditer(out)
    }
    if sorted(found) != sorted(namespaces):
        raise GoCheckFailed("TestSidecarClusters", 0, "no count for every namespace:\n" + _trim(out))
    return found


def run_dataplane_simulation(a_dir: str | os.PathLike[str], b_dir: str | os.PathLike[str]) -> str:
    """TestDataplane (tests/e2e/go/dataplane_test.go) over a's and b's rendered objects."""
    env = {
        "MESHBRIDGE_SIM_A_DIR": str(Path(a_dir).resolve()),
        "MESHBRIDGE_SIM_B_DIR": str(Path(b_dir).resolve()),
    }
    return _run("TestDataplane", env)


def run_multi_export(
    a_dir: str | os.PathLike[str],
    expect: Mapping[str, Sequence[str]],
    sans: Mapping[str, Sequence[str]],
    remote: Mapping[str, str] | None = None,
    egress_locality: str | None = None,
) -> str:
    """Istio's build of cluster a's egress gateway for imports with several exporters
    (TestMultiExport): per host, ``expect`` lists its egress cluster's endpoints as
    ``address:port@priority`` and ``sans`` the identities it must pin; the cluster must carry
    meshbridge's outlier detection. ``remote`` maps a host served under an alias to the exported
    host the egress gateway must send on (SNI and authority); ``egress_locality`` places a's egress
    gateway (region[/zone]) for Istio's locality failover."""
    env = {
        "MESHBRIDGE_SIM_A_DIR": str(Path(a_dir).resolve()),
        "MESHBRIDGE_MULTI_EXPECT": ";".join(f"{h}={','.join(v)}" for h, v in expect.items()),
        "MESHBRIDGE_MULTI_SANS": ";".join(f"{h}={','.join(v)}" for h, v in sans.items()),
        "MESHBRIDGE_MULTI_REMOTE": ";".join(f"{h}={r}" for h, r in (remote or {}).items()),
        "MESHBRIDGE_MULTI_EGRESS_LOCALITY": egress_locality or "",
    }
    return _run("TestMultiExport", env)


def run_multi_export_end_to_end(
    a_dir: str | os.PathLike[str],
    expect: Mapping[str, Sequence[str]],
    sans: Mapping[str, Sequence[str]],
    snis: Mapping[str, str],
) -> str:
    """TestMultiExportEndToEnd: per host, the SNI a's sidecar must send (``snis``), the destination
    workloads it must pin (``sans``), and the endpoints ``address:port@priority`` of the cluster a's
    egress gateway forwards that SNI to, unopened, with outlier detection (``expect``)."""
    env = {
        "MESHBRIDGE_SIM_A_DIR": str(Path(a_dir).resolve()),
        "MESHBRIDGE_MULTI_EXPECT": ";".join(f"{h}={','.join(v)}" for h, v in expect.items()),
        "MESHBRIDGE_MULTI_SANS": ";".join(f"{h}={','.join(v)}" for h, v in sans.items()),
        "MESHBRIDGE_MULTI_SNI": ";".join(f"{h}={s}" for h, s in snis.items()),
    }
    return _run("TestMultiExportEndToEnd", env)
