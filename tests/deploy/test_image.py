"""The container image, built from the repository's Dockerfile and run (issue 14, item 6).

`scripts/image.sh build` builds it with buildah on a Debian bookworm base that mmdebstrap makes and
caches under ~/.cache/meshbridge/image/ (the registry serving python:3.11-slim is not reachable
here); podman runs it as the charts do: uid 10001, a read-only root filesystem, /data the only
writable path. Cold and warm build times are in docs/image.md. Needs root, buildah, podman,
mmdebstrap and runc (scripts/sysdeps.sh installs them); without them these tests fail, never skip.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.test_charts import AGENT, AGENT_MINIMAL, CA, ROOT, helm, render

__all__ = ["helm"]  # the module-scoped fixture, shared with test_charts.py

pytestmark = pytest.mark.timeout(1800)  # a cold build makes the base first (docs/image.md)

IMAGE_SH = ROOT / "scripts" / "image.sh"
UID = 10001
# What the charts and docker-compose.yml ask of the container (deploy/*/values.yaml securityContext).
HARDENED = ("--rm", "--read-only", "--user", f"{UID}:{UID}", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")


def image_sh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(IMAGE_SH), *args], capture_output=True, text=True, timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def image() -> str:
    return ok(image_sh("build", timeout=1500)).split()[-1]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty /data as a fresh volume with the chart's fsGroup is: owned by 10001, mode 0700."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, UID, UID)
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- one name


def test_the_build_tags_the_image_the_charts_and_compose_default_to(helm: Any) -> None:
    """One source of truth: pyproject's version. Before: the charts said `meshbridge:0.1.0`, which
    Kubernetes reads as Docker Hub's library/meshbridge (k8s.io/kubernetes pkg/util/parsers/parsers.go
    ParseImageName → github.com/distribution/reference normalize.go splitDockerDomain: a one-element
    name is Docker Hub's library/, "localhost/" is kept as a domain), never the local build."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    name = ok(image_sh("name")).strip()
    assert name == f"localhost/meshbridge:{version}"
    for chart in (CA, AGENT):
        assert yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"] == version
        docs = render(helm, chart, *(["--values", str(AGENT_MINIMAL)] if chart == AGENT else []))
        assert _images(docs) == {name}, chart.name
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["ca"]["image"] == name


def _images(docs: list[dict[str, Any]]) -> set[str]:
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    return {c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])}


# ----------------------------------------------------------------------------- the built image


def test_image_config(image: str) -> None:
    (inspect,) = json.loads(ok(image_sh("podman", "image", "inspect", image)))
    config = inspect["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["WorkingDir"] == "/data"
    assert config["Cmd"] == ["meshbridge-ca", "--help"]
    assert not config.get("Entrypoint")
    assert set(config["ExposedPorts"]) == {"8443/tcp", "9090/tcp"}
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PATH"].startswith("/opt/meshbridge/venv/bin:")
    assert "PIP_CERT" not in env  # a build argument only


@pytest.fixture
def rootfs(image: str) -> Iterator[Path]:
    path = Path(ok(image_sh("podman", "image", "mount", image)).strip())
    try:
        yield path
    finally:
        ok(image_sh("podman", "image", "unmount", image))


def test_image_filesystem_holds_no_secrets_and_an_empty_data_dir(rootfs: Path) -> None:
    data = rootfs / "data"
    assert list(data.iterdir()) == []
    st = data.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (UID, UID, 0o700)
    assert not (rootfs / "src").exists(), "the build context stays out of the image"
    assert list(rootfs.rglob("meshbridge-build-ca.pem")) == [], "the build's CA mount point stays out"
    for bad in ("*.key.pem", "admin-token", "key-passphrase", "audit-key", "ca.json"):
        found = [p for p in rootfs.rglob(bad) if not p.is_relative_to(rootfs / "proc")]
        assert found == [], bad
    # The build trusts this machine's CAs (a TLS-intercepting proxy's) through a bind mount only.
    bundle = (rootfs / "etc/ssl/certs/ca-certificates.crt").read_text()
    local = Path("/usr/local/share/ca-certificates")
    for cert in local.rglob("*.crt") if local.is_dir() else []:
        body = "".join(cert.read_text().split("-----")[2].split())
        assert body[64:128] not in "".join(bundle.split()), f"{cert} baked into the image"
    user = (rootfs / "etc/passwd").read_text()
    assert f"meshbridge:x:{UID}:{UID}:" in user


def test_root_filesystem_is_read_only_for_uid_10001(image: str) -> None:
    """So that the CA test below proves serve needs no writable path but /data."""
    proc = image_sh("run", *HARDENED, "--network", "none", image, "python", "-c", "open('/opt/meshbridge/x', 'w')")
    assert proc.returncode != 0
    assert "Read-only file system" in proc.stderr


def test_agent_and_ca_help(image: str) -> None:
    agent = ok(image_sh("run", *HARDENED, "--network", "none", image, "meshbridge-agent", "--help"))
    assert agent.startswith("usage: meshbridge-agent")
    default = ok(image_sh("run", *HARDENED, "--network", "none", image))  # CMD: meshbridge-ca --help
    assert default.startswith("usage: meshbridge-ca")


def test_ca_init_and_serve_as_uid_10001_on_a_read_only_root(image: str, data_dir: Path) -> None:
    volume = ("-v", f"{data_dir}:/data")
    ok(image_sh("run", *HARDENED, "--network", "none", *volume, image, "meshbridge-ca", "init", "--data-dir", "/data"))
    written = {p.name: p.stat() for p in data_dir.iterdir()}
    assert {"ca.json", "root-cert.pem", "admin-token"} <= set(written)
    assert {(s.st_uid, s.st_gid) for s in written.values()} == {(UID, UID)}

    port, name = _free_port(), f"meshbridge-image-test-{os.getpid()}"
    listen = ("--listen", f"127.0.0.1:{port}", "--server-name", "localhost")  # loopback, host network
    detached = ("-d", "--name", name, *HARDENED[1:])  # no --rm: its logs outlive a crash
    serve = ("meshbridge-ca", "serve", "--data-dir", "/data", *listen)
    ok(image_sh("run", *detached, "--network", "host", *volume, image, *serve))
    try:
        ready = _wait_ready(f"https://localhost:{port}", data_dir / "root-cert.pem", name)
        assert ready.json() == {"status": "ready"}
        anchor = _trusting(data_dir / "root-cert.pem")
        health = httpx.get(f"https://localhost:{port}/healthz", verify=anchor, timeout=10)
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
    finally:
        image_sh("podman", "rm", "--force", "--time", "5", name)


def _trusting(anchor: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(anchor))


def _wait_ready(base: str, anchor: Path, container: str) -> httpx.Response:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{base}/readyz", verify=_trusting(anchor), timeout=5)
            if resp.status_code == 200:
                return resp
        except httpx.TransportError:
            pass
        state = image_sh("podman", "inspect", "--format", "{{.State.Status}}", container).stdout.strip()
        if state not in ("running", "created"):
            logs = image_sh("podman", "logs", container)
            pytest.fail(f"the CA container is {state or 'gone'}:\n{logs.stdout}\n{logs.stderr}")
        time.sleep(0.5)
    logs = image_sh("podman", "logs", container)
    pytest.fail(f"/readyz not 200 within 120 s:\n{logs.stdout}\n{logs.stderr}")
