"""Two real Kubernetes control planes on loopback, for the e2e tests.

Each cluster is its own etcd plus a kube-apiserver (RBAC on, TLS on 127.0.0.1, an admin client
certificate in ``system:masters``, a service-account signing key pair generated here), with the
Istio 1.30.3 CRDs installed, so every object written to it passes the real API server's schema and
CEL validation. No controller manager, scheduler or kubelet runs: objects are stored and validated,
pods never start, ServiceAccounts are only those created explicitly, and deleted namespaces stay
Terminating.

What is created in each cluster: namespaces ``istio-system`` and ``bookinfo``; in ``kube-system``
kubeadm's ``coredns`` ConfigMap; in ``istio-system`` the ``istio-ingressgateway`` /
``istio-egressgateway`` Services, Deployments and ServiceAccounts (both also exposing 15444, the
TLS port for plain-TCP imports and exports); in ``bookinfo`` the ``ratings`` Service (9080,
``http``) and the ``mongodb`` Service (27017, ``tcp``), with their Deployments.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import ipaddress
import json
import os
import random
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e.testbin import REPO, require

ISTIO_CRDS = Path(os.environ.get("MESHBRIDGE_ISTIO_CRDS", REPO / "tests" / "data" / "istio-crds-1.30.3.yaml"))
SERVICE_CIDRS = {"a": "10.96.0.0/16", "b": "10.97.0.0/16"}
STARTUP_TIMEOUT = 60.0

# kubeadm's Corefile (cmd/kubeadm/app/phases/addons/dns), as a kubeadm cluster has it.
KUBEADM_COREFILE = """\
.:53 {
    errors
    health {
       lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    prometheus :9153
    forward . /etc/resolv.conf {
       max_concurrent 1000
    }
    cache 30 {
       disable success cluster.local
       disable denial cluster.local
    }
    loop
    reload
    loadbalance
}
"""


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_low() -> int:
    """The lowest port the kernel gives an outgoing connection as its source port (0: unknown)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port free now, below the kernel's ephemeral range when that is known, and never
    handed out before by this process. A port from the range (``bind(0)`` gives one) can become the
    source port of any outgoing connection, and this suite opens thousands to its kube-apiservers:
    one took the port an istiod was about to bind ("listen tcp 127.0.0.1:35955: bind: address
    already in use"; istiod keeps its ports across restarts). Below the range only another listener
    can take it, and the ones this suite starts are kept apart by remembering what was handed out:
    istiod's five ports are chosen before any is bound, and a port free while its istiod restarts
    is still that istiod's (one CI run's istiod bed failed to bind a port handed out twice)."""
    low = ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low) if low > 2048 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen = int(s.getsockname()[1])
        if chosen not in _HANDED_OUT:
            _HANDED_OUT.add(chosen)
            return chosen
    raise RuntimeError(f"no free loopback port below the ephemeral range ({low})")


# ---------------------------------------------------------------------------------------------
# PKI for one cluster: serving CA + serving cert, client CA + admin cert, SA signing key.


def _write_key(path: Path, key: Any) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_ca(cn: str) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: Any, ca_cert: x509.Certificate, subject: x509.Name, *, server: bool, sans: Sequence[str] = ()
) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if sans:
        names: list[x509.GeneralName] = []
        for s in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                names.append(x509.DNSName(s))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


# ---------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    """One running control plane. ``server`` is its https URL, ``kubeconfig`` an admin kubeconfig."""

    name: str
    workdir: Path
    kubectl_bin: Path
    etcd_bin: Path
    apiserver_bin: Path
    server: str = ""
    kubeconfig: Path = field(default_factory=Path)
    ca_file: Path = field(default_factory=Path)
    etcd_url: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts etcd and kube-apiserver (returns without waiting for readiness)."""
        w = self.workdir
        (w / "pki").mkdir(parents=True, exist_ok=True)
        self._make_pki()
        client_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [
                str(self.etcd_bin),
                f"--name={self.name}",
                f"--data-dir={w / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster={self.name}={peer}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        pki = w / "pki"
        self.server = f"https://127.0.0.1:{api_port}"
        self._spawn(
            "kube-apiserver",
            [
                str(self.apiserver_bin),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'client-ca.crt'}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDRS.get(self.name, '10.98.0.0/16')}",
                "--profiling=false",
                "--v=1",
            ],
        )
        self.ca_file = pki / "serving-ca.crt"
        self.kubeconfig = w / "admin.kubeconfig"
        self._write_kubeconfig(
            self.kubeconfig,
            "admin",
            {
                "client-certificate-data": _b64((pki / "admin.crt").read_bytes()),
                "client-key-data": _b64((pki / "admin.key").read_bytes()),
            },
        )

    def _spawn(self, what: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{what}.log", "wb")  # noqa: SIM115 - owned by the process
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"cluster {self.name}: {_argv0(p)} exited ({p.returncode}); "
                        f"see logs in {self.workdir}\n{self.log_tail()}"
                    )
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=2) as r:  # noqa: S310
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except Exception as e:  # connection refused, 500 while post-start hooks run
                last = str(e)
            time.sleep(0.1)
        raise RuntimeError(f"cluster {self.name}: /readyz not OK after {timeout}s ({last})\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for f in sorted(self.workdir.glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        stop_processes(self.procs)

    # -- setup ----------------------------------------------------------------------------------

    def _make_pki(self) -> None:
        pki = self.workdir / "pki"
        ca_key, ca_cert = _make_ca(f"meshbridge-e2e-{self.name}-serving-ca")
        (pki / "serving-ca.crt").write_bytes(_cert_pem(ca_cert))
        key, cert = _issue(
            ca_key,
            ca_cert,
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
            server=True,
            sans=[
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        )
        (pki / "apiserver.crt").write_bytes(_cert_pem(cert))
        _write_key(pki / "apiserver.key", key)

        cca_key, cca_cert = _make_ca(f"meshbridge-e2e-{self.name}-client-ca")
        (pki / "client-ca.crt").write_bytes(_cert_pem(cca_cert))
        key, cert = _issue(
            cca_key,
            cca_cert,
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "meshbridge-e2e-admin"),
                ]
            ),
            server=False,
        )
        (pki / "admin.crt").write_bytes(_cert_pem(cert))
        _write_key(pki / "admin.key", key)

        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(pki / "sa.key", sa_key)
        (pki / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def _write_kubeconfig(self, path: Path, user: str, creds: dict[str, str]) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": self.name,
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": _b64((self.workdir / "pki" / "serving-ca.crt").read_bytes()),
                    },
                }
            ],
            "users": [{"name": user, "user": creds}],
            "contexts": [{"name": f"{user}@{self.name}", "context": {"cluster": self.name, "user": user}}],
            "current-context": f"{user}@{self.name}",
        }
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        path.chmod(0o600)

    def install_base(self) -> None:
        """Istio CRDs (server-side apply, wait Established) and the objects every cluster has."""
        if not ISTIO_CRDS.exists():
            raise RuntimeError(f"Istio CRDs not found at {ISTIO_CRDS} (set MESHBRIDGE_ISTIO_CRDS)")
        self.kubectl("apply", "--server-side", "--field-manager=meshbridge-e2e", "-f", str(ISTIO_CRDS))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        self.kubectl(
            "apply",
            "--server-side",
            "--field-manager=meshbridge-e2e",
            "-f",
            "-",
            input=yaml.safe_dump_all(base_objects()),
        )

    # -- helpers for tests ----------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the built kubectl against this cluster (admin unless ``kubeconfig``)."""
        argv = [str(self.kubectl_bin), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        res = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, env={**os.environ, "KUBECONFIG": ""}
        )
        if check and res.returncode != 0:
            raise KubectlError(self.name, argv, res)
        return res

    def kubeconfig_for_service_account(
        self,
        namespace: str,
        name: str,
        *,
        path: Path | None = None,
        duration: str = "1h",
        create: bool = True,
    ) -> Path:
        """A kubeconfig authenticating as ServiceAccount namespace/name with a token from the
        TokenRequest API (`kubectl create token`). Creates the ServiceAccount unless it exists."""
        if create and self.kubectl("get", "serviceaccount", "-n", namespace, name, check=False).returncode:
            self.kubectl("create", "serviceaccount", "-n", namespace, name)
        token = self.kubectl("create", "token", "-n", namespace, name, f"--duration={duration}").stdout.strip()
        path = path or self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        self._write_kubeconfig(path, f"system:serviceaccount:{namespace}:{name}", {"token": token})
        return path


class KubectlError(subprocess.CalledProcessError):
    def __init__(self, cluster: str, argv: list[str], res: subprocess.CompletedProcess[str]) -> None:
        super().__init__(res.returncode, argv, res.stdout, res.stderr)
        self.cluster = cluster

    def __str__(self) -> str:
        return (
            f"cluster {self.cluster}: kubectl {' '.join(map(str, self.cmd[2:]))} exited {self.returncode}:\n"
            f"{self.stderr.strip() or self.stdout.strip()}"
        )


def _argv0(p: subprocess.Popen[bytes]) -> str:
    args = p.args
    return str(args[0]) if isinstance(args, list) else str(args)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _labels(app: str, istio: str | None = None) -> dict[str, str]:
    d = {"app": app}
    if istio:
        d["istio"] = istio
    return d


def _deployment(ns: str, name: str, labels: dict[str, str], sa: str, image: str, ports: list[int]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": sa,
                    "containers": [
                        {
                            "name": "istio-proxy" if ns == "istio-system" else name.split("-")[0],
                            "image": image,
                            "ports": [{"containerPort": p, "protocol": "TCP"} for p in ports],
                        }
                    ],
                },
            },
        },
    }


def base_objects() -> list[dict[str, Any]]:
    """Namespaces and objects a cluster with Istio and bookinfo has before meshbridge arrives."""
    proxy = "docker.io/istio/proxyv2:1.30.3"
    ing = _labels("istio-ingressgateway", "ingressgateway")
    egr = _labels("istio-egressgateway", "egressgateway")
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}},
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "bookinfo", "labels": {"istio-injection": "enabled"}},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": KUBEADM_COREFILE},
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "istio-ingressgateway-service-account", "namespace": "istio-system"},
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "istio-egressgateway-service-account", "namespace": "istio-system"},
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "bookinfo-ratings", "namespace": "bookinfo"},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "istio-ingressgateway", "namespace": "istio-system", "labels": ing},
            "spec": {
                "type": "LoadBalancer",
                "selector": ing,
                "ports": [
                    {"name": "status-port", "port": 15021, "targetPort": 15021, "protocol": "TCP"},
                    {"name": "http2", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                    {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"},
                    {"name": "tls", "port": 15443, "targetPort": 15443, "protocol": "TCP"},
                    {"name": "tls-meshbridge-tcp", "port": 15444, "targetPort": 15444, "protocol": "TCP"},
                ],
            },
        },
        _deployment(
            "istio-system",
            "istio-ingressgateway",
            ing,
            "istio-ingressgateway-service-account",
            proxy,
            [15021, 8080, 8443, 15443, 15444],
        ),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "istio-egressgateway", "namespace": "istio-system", "labels": egr},
            "spec": {
                "type": "ClusterIP",
                "selector": egr,
                "ports": [
                    {"name": "http2", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                    {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"},
                    {"name": "tls-meshbridge-tcp", "port": 15444, "targetPort": 15444, "protocol": "TCP"},
                ],
            },
        },
        _deployment(
            "istio-system",
            "istio-egressgateway",
            egr,
            "istio-egressgateway-service-account",
            proxy,
            [8080, 8443, 15444],
        ),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "ratings",
                "namespace": "bookinfo",
                "labels": {"app": "ratings", "service": "ratings"},
            },
            "spec": {
                "selector": {"app": "ratings"},
                "ports": [{"name": "http", "port": 9080, "targetPort": 9080, "protocol": "TCP"}],
            },
        },
        _deployment(
            "bookinfo",
            "ratings-v1",
            {"app": "ratings", "version": "v1"},
            "bookinfo-ratings",
            "docker.io/istio/examples-bookinfo-ratings-v1:1.20.3",
            [9080],
        ),
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "bookinfo-mongodb", "namespace": "bookinfo"},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "mongodb",
                "namespace": "bookinfo",
                "labels": {"app": "mongodb", "service": "mongodb"},
            },
            "spec": {
                "selector": {"app": "mongodb"},
                "ports": [{"name": "tcp-mongo", "port": 27017, "targetPort": 27017, "protocol": "TCP"}],
            },
        },
        _deployment(
            "bookinfo",
            "mongodb-v1",
            {"app": "mongodb", "version": "v1"},
            "bookinfo-mongodb",
            "docker.io/istio/examples-bookinfo-mongodb:1.20.3",
            [27017],
        ),
    ]


@dataclass
class Clusters:
    """What the ``clusters`` fixture yields: ``clusters.a``, ``clusters["b"]``, iteration."""

    a: Cluster
    b: Cluster

    def __getitem__(self, name: str) -> Cluster:
        return {"a": self.a, "b": self.b}[name]

    def __iter__(self) -> Iterator[Cluster]:
        return iter((self.a, self.b))


def start_clusters(workdir: Path, names: Sequence[str] = ("a", "b")) -> list[Cluster]:
    """Starts the clusters in parallel and installs the base objects; raises with logs on failure."""
    etcd, apiserver, kubectl = require("etcd"), require("kube-apiserver"), require("kubectl")
    clusters = [
        Cluster(name=n, workdir=workdir / n, kubectl_bin=kubectl, etcd_bin=etcd, apiserver_bin=apiserver) for n in names
    ]
    try:
        for c in clusters:
            c.start()
        with concurrent.futures.ThreadPoolExecutor(len(clusters)) as ex:
            list(ex.map(lambda c: (c.wait_ready(), c.install_base()), clusters))
    except BaseException:
        for c in clusters:
            c.stop()
        raise
    return clusters


def stop_clusters(clusters: Sequence[Cluster]) -> None:
    stop_processes([p for c in clusters for p in c.procs])


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = 3.0) -> None:
    """SIGTERM every process (apiservers before etcds), SIGKILL what is left after ``grace``.
    The clusters hold nothing worth a slow graceful shutdown."""
    live = [p for p in reversed(procs) if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    procs.clear()


# ------------------------------------------------------------------------------ pods without a kubelet
def apply(c: Cluster, *objects: dict[str, Any]) -> None:
    """kubectl apply of ``objects`` as one List."""
    c.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def pod(
    ns: str, name: str, labels: dict[str, str], sa: str, container: str, env: list[dict[str, str]]
) -> dict[str, Any]:
    """A Pod object with one container: what a workload's or istiod's Deployment would create."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "serviceAccountName": sa,
            "containers": [{"name": container, "image": "docker.io/istio/pilot:1.30.3", "env": env}],
        },
    }


def run_pod(c: Cluster, obj: dict[str, Any], started: dt.datetime) -> None:
    """Create the pod and mark it Running since ``started``, as its kubelet would."""
    apply(c, obj)
    status = {"status": {"phase": "Running", "startTime": started.strftime("%Y-%m-%dT%H:%M:%SZ")}}
    meta = obj["metadata"]
    c.kubectl(
        "patch",
        "pod",
        meta["name"],
        "-n",
        meta["namespace"],
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
