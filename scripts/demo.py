"""`make demo`: a CA and two agents in render mode; cluster a exports ratings.bookinfo to b.

Everything runs on loopback; the files are kept under ./demo-out (or $MESHBRIDGE_DEMO_OUT) for a look.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("MESHBRIDGE_DEMO_OUT") or ROOT / "demo-out")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"demo: {' '.join(cmd[:3])} failed:\n{r.stderr}")
    return r.stdout


def agent_config(name: str, td: str, address: str, url: str, exports: str, imports: str) -> str:
    return f"""cluster: {name}
ca:
  url: {url}
  trust_anchor: ../ca/root-cert.pem
  bootstrap_token_file: bootstrap-token
  key_type: ecdsa-p256
istio:
  namespace: istio-system
  trust_domain: {td}
  ingress_gateway: {{selector: {{istio: ingressgateway}}, service: istio-ingressgateway, service_account: istio-ingressgateway-service-account, address: {address}, port: 15443}}
  egress_gateway: {{selector: {{istio: egressgateway}}, service: istio-egressgateway, service_account: istio-egressgateway-service-account}}
dns:
  suffix: remote
  mode: coredns
  vip_range: 241.0.0.0/16
exports: {exports}
imports: {imports}
"""


COREFILE = """.:53 {
    errors
    health
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
    }
    forward . /etc/resolv.conf
    cache 30
    loop
    reload
    loadbalance
}
"""


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    ca_dir = OUT / "ca"
    step("initialising a CA (ECDSA P-256 root, SQLite) in demo-out/ca")
    print(run(str(BIN / "meshbridge-ca"), "init", "--data-dir", str(ca_dir)))
    port = free_port()
    step(f"serving it on https://127.0.0.1:{port}")
    server = subprocess.Popen(
        [
            str(BIN / "meshbridge-ca"),
            "serve",
            "--data-dir",
            str(ca_dir),
            "--listen",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
        ],
        start_new_session=True,
    )
    try:
        url = f"https://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(f"{url}/healthz", verify=str(ca_dir / "root-cert.pem"), timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        ca = [str(BIN / "meshbridge-ca")]
        for name, td in (("a", "a.mesh"), ("b", "b.mesh")):
            d = OUT / name
            d.mkdir(parents=True)
            step(f"registering cluster {name} (trust domain {td})")
            run(
                *ca,
                "cluster",
                "add",
                name,
                "--trust-domain",
                td,
                "--data-dir",
                str(ca_dir),
                "--token-out",
                str(d / "bootstrap-token"),
            )
        (OUT / "a" / "agent.yaml").write_text(
            agent_config(
                "a",
                "a.mesh",
                "198.51.100.10",
                url,
                "[{service: ratings, namespace: bookinfo, ports: [9080], consumers: [b]}]",
                "[]",
            )
        )
        (OUT / "b" / "agent.yaml").write_text(
            agent_config("b", "b.mesh", "198.51.100.20", url, "[]", '[{from: a, names: ["*"]}]')
        )
        (OUT / "Corefile").write_text(COREFILE)
        agent = [str(BIN / "meshbridge-agent"), "--log-level", "warning", "render", "--once"]
        for name in ("a", "b", "a"):  # a again: b has published its egress identity by now
            step(f"agent {name}: enroll (first time), publish, render into demo-out/{name}/out")
            print(
                run(
                    *agent,
                    "--config",
                    str(OUT / name / "agent.yaml"),
                    "--out",
                    str(OUT / name / "out"),
                    "--corefile",
                    str(OUT / "Corefile"),
                ).strip()
            )
        for name in ("a", "b"):
            step(f"cluster {name} would get:")
            for f in sorted((OUT / name / "out").glob("*.yaml")):
                mode = oct(f.stat().st_mode & 0o777)
                print(f"  {f.name}  ({mode})")
        step("b's ServiceEntry for ratings.bookinfo.remote")
        se = next((OUT / "b" / "out").glob("serviceentry-*.yaml"))
        print(se.read_text())
        step("b's CoreDNS block (configmap-kube-system-meshbridge-coredns.yaml)")
        print((OUT / "b" / "out" / "configmap-kube-system-meshbridge-coredns.yaml").read_text())
        step("a's AuthorizationPolicy on the ingress gateway")
        ap = next((OUT / "a" / "out").glob("authorizationpolicy-*.yaml"))
        print(ap.read_text())
        step("the CA's view")
        print(run(*ca, "cluster", "list", "--data-dir", str(ca_dir)))
        print(f"\nEverything is in {OUT}. The CA has stopped; run `make run` for a long-lived one.")
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)


if __name__ == "__main__":
    sys.exit(main())
