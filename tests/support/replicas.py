"""Real `meshbridge-ca serve` processes sharing one data directory and one database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.pgserver import free_port

CLI = [sys.executable, "-m", "ca_server.cli"]


def init_ca(data_dir: Path, *, database_url: str | None = None, extra: list[str] | None = None) -> None:
    cmd = [
        *CLI,
        "init",
        "--data-dir",
        str(data_dir),
        *(["--database-url", database_url] if database_url else []),
        *(extra or []),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"init failed: {r.stderr}")


class Replica:
    def __init__(self, data_dir: Path, *, database_url: str | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.database_url = database_url
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / f"serve-{self.port}.log"

    def start(self) -> Replica:
        cmd = [
            *CLI,
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            *(["--database-url", self.database_url] if self.database_url else []),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=open(self.log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        self.wait_healthy()
        return self

    def client(self, token: str | None = None, timeout: float = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=self.url, verify=str(self.data_dir / "root-cert.pem"), headers=headers, timeout=timeout
        )

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log.read_text()[-3000:]}")
            try:
                with self.client(timeout=2) as c:
                    if c.get("/healthz").status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"serve did not come up: {self.log.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None


def admin_token(data_dir: Path) -> str:
    return (data_dir / "admin-token").read_text().strip()
