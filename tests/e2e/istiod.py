"""A real istiod (`pilot-discovery`, built by `make testbin` from the pinned istio.io/istio module)
per test cluster: out of the cluster, against the cluster's real kube-apiserver, on loopback ports.

What stands in for Kubernetes here:
- **kubelet's Secret volume.** istiod reads its plugged-in CA from a directory (`ROOT_CA_DIR`,
  /etc/cacerts in a pod, pilot/pkg/bootstrap/istio_ca.go `LocalCertDir`) that kubelet projects from
  the `cacerts` Secret. ``SecretProjection`` polls the Secret through the API server and writes it the
  way kubelet's AtomicWriter does (k8s pkg/volume/util/atomic_writer.go `Write`): the payload in a
  new hidden timestamped directory, a `..data_tmp` symlink to it renamed over `..data`, one visible
  symlink per key into `..data`, the old directory removed. istiod's fsnotify watch on the directory
  (istio_ca.go `handleCACertsFileWatch` → `handleEvent`) then sees the same events as in a pod. The
  poll interval (0.2 s) is much shorter than kubelet's (its pod sync period, about a minute).
- **Workload identities.** istio-agent's call to istiod's CA (`CreateCertificate` with a projected
  ServiceAccount token, audience `istio-ca`) is made by the Go checker `TestIssueWorkloadCert` with
  Istio's own CA client; the token is a real TokenRequest of the kube-apiserver, which istiod checks
  by TokenReview.

istiod's settings are the ones a meshbridge cluster needs: `ISTIO_MULTIROOT_MESH=true` (without it
istiod ignores every cacerts change that alters root-cert.pem, istio_ca.go `handleEvent`), the
cluster's trust domain in meshConfig (the `istio` ConfigMap, which istiod reads when no mesh file
is mounted), `PILOT_ENABLE_CA_CRL` left at its default (true).
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lightkube import ApiError, Client, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, Secret

from cluster_agent.istiod import LiveIstiodView
from tests.e2e import gocheck
from tests.e2e.clusters import Cluster, apply, free_port, pod, run_pod, stop_processes
from tests.e2e.testbin import require
from tests.e2e.workload import Workload

log = logging.getLogger(__name__)

NAMESPACE = "istio-system"
ISTIOD_SAN = "istiod.istio-system.svc"
READY_TIMEOUT = 60.0


def _write_atomically(directory: Path, files: dict[str, bytes]) -> None:
    """One projection of ``files`` into ``directory``, as kubelet's AtomicWriter makes it."""
    directory.mkdir(parents=True, exist_ok=True)
    data_link = directory / "..data"
    old = os.readlink(data_link) if data_link.is_symlink() else None
    stamp = Path(tempfile.mkdtemp(prefix=f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.", dir=directory))
    for name, body in files.items():
        (stamp / name).write_bytes(body)
        (stamp / name).chmod(0o644)
    tmp_link = directory / "..data_tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(stamp.name)
    tmp_link.rename(data_link)
    for name in files:
        visible = directory / name
        if not visible.is_symlink():
            visible.symlink_to(f"..data/{name}")
    for visible in directory.iterdir():
        if not visible.name.startswith("..") and visible.name not in files:
            visible.unlink()
    if old is not None and old != stamp.name:
        shutil.rmtree(directory / old, ignore_errors=True)


class SecretProjection:
    """Keeps ``directory`` equal to the data of Secret ``name`` (see the module docstring)."""

    def __init__(self, kube: Client, directory: Path, *, name: str = "cacerts", interval: float = 0.2) -> None:
        self.kube = kube
        self.directory = directory
        self.name = name
        self.interval = interval
        self.current: dict[str, bytes] | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"project-{name}")

    def sync(self) -> bool:
        """One poll; True when the directory changed."""
        try:
            secret = self.kube.get(Secret, self.name, namespace=NAMESPACE)
        except ApiError as exc:
            if exc.status.code == 404:
                return False  # kubelet would not start the pod; istiod then finds no plugged-in CA
            raise
        data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        if data == self.current:
            return False
        _write_atomically(self.directory, data)
        self.current = data
        return True

    def start(self) -> SecretProjection:
        self.sync()
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.sync()
            except Exception as exc:  # an API server restart: the next poll retries, as kubelet does
                log.warning("projecting Secret %s: %s", self.name, exc)


@dataclass
class Istiod:
    cluster: Cluster
    trust_domain: str
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = field(default_factory=dict)
    projection: SecretProjection | None = None
    pod_name: str = ""

    @property
    def cacerts_dir(self) -> Path:
        return self.workdir / "cacerts"

    @property
    def ca_address(self) -> str:
        return f"127.0.0.1:{self.ports['secure_grpc']}"

    def kube(self) -> Client:
        return Client(KubeConfig.from_file(str(self.cluster.kubeconfig)), field_manager="meshbridge-e2e")

    def start(self) -> Istiod:
        """Projects `cacerts`, starts pilot-discovery and waits until it is ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.projection is None:
            self.projection = SecretProjection(self.kube(), self.cacerts_dir).start()
        self.write_mesh_config()
        if not self.ports:  # kept across restarts, as a Service address is
            self.ports = {k: free_port() for k in ("http", "https", "grpc", "secure_grpc", "monitoring")}
        env = {
            **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")},
            "POD_NAMESPACE": NAMESPACE,
            "POD_NAME": f"istiod-{self.cluster.name}",
            "REVISION": "default",
            "ROOT_CA_DIR": str(self.cacerts_dir),
            "ISTIO_MULTIROOT_MESH": "true",
            **self.env,
        }
        argv = [
            str(require("pilot-discovery")),
            "discovery",
            f"--kubeconfig={self.cluster.kubeconfig}",
            # no such file: istiod then reads meshConfig from the `istio` ConfigMap, as in a cluster
            # (pilot/pkg/bootstrap/mesh.go getConfigurationSources)
            f"--meshConfig={self.workdir / 'no-mesh-file'}",
            f"--networksConfig={self.workdir / 'mesh-networks.yaml'}",
            f"--httpAddr=127.0.0.1:{self.ports['http']}",
            f"--httpsAddr=127.0.0.1:{self.ports['https']}",
            f"--grpcAddr=127.0.0.1:{self.ports['grpc']}",
            f"--secureGRPCAddr=127.0.0.1:{self.ports['secure_grpc']}",
            f"--monitoringAddr=127.0.0.1:{self.ports['monitoring']}",
            "--ctrlz_port=0",
            "--domain=cluster.local",
        ]
        log = open(self.workdir / "istiod.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self._register_pod(env)
        self._wait_ready()
        return self

    def _register_pod(self, env: dict[str, str]) -> None:
        """Describe the running process as the Pod istiod's Deployment would have made: its labels
        (istio-discovery's deployment.yaml: app=istiod, istio.io/rev), its env and its start time —
        what the agent's checks of Istio's preconditions read (cluster_agent/meshcheck.py)."""
        self._delete_pod()
        apply(
            self.cluster,
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "istiod", "namespace": NAMESPACE}},
        )
        visible = [
            {"name": k, "value": v}
            for k, v in sorted(env.items())
            if k.isupper() and k not in ("PATH", "HOME", "TMPDIR")
        ]
        self.pod_name = f"istiod-{self.cluster.name}-{self.proc.pid if self.proc else 0}"
        labels = {"app": "istiod", "istio.io/rev": "default"}
        run_pod(
            self.cluster, pod(NAMESPACE, self.pod_name, labels, "istiod", "discovery", visible), dt.datetime.now(dt.UTC)
        )

    def _delete_pod(self) -> None:
        if self.pod_name:
            self.cluster.kubectl("delete", "pod", self.pod_name, "-n", NAMESPACE, "--ignore-not-found", "--wait=false")
            self.pod_name = ""

    def write_mesh_config(self, trust_domain: str | None = None) -> None:
        """The `istio` ConfigMap (key `mesh`) istiod reads its meshConfig from."""
        cm = ConfigMap(
            metadata=ObjectMeta(name="istio", namespace=NAMESPACE),
            data={"mesh": f"trustDomain: {trust_domain or self.trust_domain}\n"},
        )
        self.kube().apply(cm, field_manager="meshbridge-e2e", force=True)

    def view(self) -> LiveIstiodView:
        """The agent's view of this istiod (its address on loopback instead of the Service)."""
        kube = self.kube()

        def configmap_data(namespace: str, name: str) -> dict[str, str] | None:
            try:
                return dict(kube.get(ConfigMap, name, namespace=namespace).data or {})
            except ApiError as exc:
                if exc.status.code == 404:
                    return None
                raise

        return LiveIstiodView(configmap_data, namespace=NAMESPACE, address=("127.0.0.1", self.ports["secure_grpc"]))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"istiod in {self.cluster.name} exited ({self.proc.returncode})\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}/ready", timeout=2) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except Exception as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(
            f"istiod in {self.cluster.name} not ready after {READY_TIMEOUT}s ({last})\n{self.log_tail()}"
        )

    def stop(self, *, keep_projection: bool = False) -> None:
        if self.proc is not None:
            stop_processes([self.proc], grace=5)
            self.proc = None
            self._delete_pod()
        if self.projection is not None and not keep_projection:
            self.projection.stop.set()
            self.projection = None

    def restart(self) -> Istiod:
        self.stop(keep_projection=True)
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        text = (self.workdir / "istiod.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def log_has(self, needle: str) -> bool:
        return needle in (self.workdir / "istiod.log").read_text(errors="replace")

    # -- what istiod serves -----------------------------------------------------------------------

    def served_bundle(self, namespace: str = NAMESPACE) -> str:
        """The trust bundle istiod publishes (`istio-ca-root-cert`, key root-cert.pem)."""
        return self._configmap("istio-ca-root-cert", "root-cert.pem", namespace)

    def served_crls(self, namespace: str = NAMESPACE) -> str:
        """The CRLs istiod publishes for sidecars (`istio-ca-crl`, key ca-crl.pem)."""
        return self._configmap("istio-ca-crl", "ca-crl.pem", namespace)

    def _configmap(self, name: str, key: str, namespace: str) -> str:
        try:
            cm = self.kube().get(ConfigMap, name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return ""
            raise
        data: dict[str, str] = cm.data or {}
        return data.get(key, "")

    def issue(self, service_account: str, *, namespace: str = NAMESPACE, ttl: int = 3600) -> Workload:
        """A workload certificate for `spiffe://<td>/ns/<namespace>/sa/<service_account>`, issued by this
        istiod to a caller holding that ServiceAccount's token (TestIssueWorkloadCert)."""
        return self.issue_with_roots(service_account, namespace=namespace, ttl=ttl)[0]

    def issue_with_roots(
        self, service_account: str, *, namespace: str = NAMESPACE, ttl: int = 3600
    ) -> tuple[Workload, str]:
        """`issue`, and the roots istiod answered with (the last element of its answer): what
        istio-agent gives the workload as its trust bundle until its next certificate
        (security/pkg/nodeagent/cache/secretcache.go generateNewSecret)."""
        identity = f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{service_account}"
        token = self.cluster.kubectl(
            "create", "token", service_account, "-n", namespace, "--audience", "istio-ca", "--duration", "1h"
        ).stdout.strip()
        with tempfile.TemporaryDirectory(prefix="istiod-issue-") as d:
            dd = Path(d)
            (dd / "token").write_text(token)
            (dd / "roots.pem").write_text(self.served_bundle())
            out = dd / "out"
            out.mkdir()
            gocheck.run_issue_workload_cert(
                address=self.ca_address,
                roots=dd / "roots.pem",
                token=dd / "token",
                identity=identity,
                out_dir=out,
                ttl=ttl,
            )
            workload = Workload(
                key_pem=(out / "key.pem").read_bytes(), chain_pem=(out / "cert-chain.pem").read_bytes(), uri=identity
            )
            return workload, (out / "root-cert.pem").read_text()
