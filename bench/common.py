"""Shared pieces of the benchmarks: a throwaway CA (SQLite or a real PostgreSQL), a running
`meshbridge-ca serve` subprocess on a free loopback port, enrolled clusters, machine facts."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cluster_agent import pki  # noqa: E402

BIN = Path(sys.executable).parent
CA = str(BIN / "meshbridge-ca") if (BIN / "meshbridge-ca").exists() else "meshbridge-ca"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants: the live ones' own,
    plus what the ended ones used, which their parents' reaping added to the parents' ``cutime``
    and ``cstime`` (proc(5)). Without those, a PostgreSQL backend that ended during the measured
    interval (its connection closed) took its CPU out of the total, and the database's figure came
    out negative."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / CLK_TCK)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _) in stats.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(stats[p][1] for p in tree if p in stats)


def proc_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with suppress(OSError), open(f"/proc/{entry}/stat") as f:
                raw = f.read()
                parents[int(entry)] = int(raw[raw.rindex(")") + 2 :].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = [c for c, pp in parents.items() if pp == parent and c not in tree]
        tree += children
        frontier += children
    return tree


def proc_tree_rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of ``pid`` and its descendants, MiB: ``VmRSS`` now, or ``VmHWM`` (each
    process's own peak: their sum bounds the tree's peak from above)."""
    kib = 0
    for p in proc_tree(pid):
        with suppress(OSError), open(f"/proc/{p}/status") as f:
            kib += sum(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))
    return round(kib / 1024, 1)


def machine_busy() -> float:
    """CPU seconds all cores have spent not idle since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / CLK_TCK


def machine_steal() -> float:
    """CPU seconds the hypervisor gave to others while this VM wanted to run (from /proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return (vals[7] if len(vals) > 7 else 0) / CLK_TCK


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


class CpuMeter:
    """Where the CPU went during a measured interval: the server's process tree, this process's
    waited-for children (the load generator), and everything else on the machine."""

    def __init__(
        self, server_pid: int | list[int], db_pid: int | None = None, client_pids: list[int] | None = None
    ) -> None:
        self.pids = server_pid if isinstance(server_pid, list) else [server_pid]  # every replica's
        self.db_pid = db_pid
        self.client_pids = client_pids  # live client processes, else this process's waited-for children

    def _client_cpu(self) -> float:
        if self.client_pids is not None:
            return sum(proc_tree_cpu(p) for p in self.client_pids)
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def _server_cpu(self) -> float:
        return sum(proc_tree_cpu(p) for p in self.pids)

    def __enter__(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.s0 = self._server_cpu()
        self.d0 = proc_tree_cpu(self.db_pid) if self.db_pid else 0.0
        self.c0 = self._client_cpu()
        self.b0 = machine_busy()
        self.st0 = machine_steal()
        self.load0 = loadavg()
        return self

    def __exit__(self, *_: Any) -> None:
        self.seconds = time.monotonic() - self.t0
        self.server = self._server_cpu() - self.s0
        self.db = (proc_tree_cpu(self.db_pid) - self.d0) if self.db_pid else 0.0
        self.client = self._client_cpu() - self.c0
        self.busy = machine_busy() - self.b0
        self.steal = machine_steal() - self.st0
        self.load1 = loadavg()

    def report(self, requests: int) -> dict[str, Any]:
        per = max(requests, 1)
        return {
            "server_cpu_ms_per_req": round(self.server * 1000 / per, 3),
            "client_cpu_ms_per_req": round(self.client * 1000 / per, 3),
            "db_cpu_ms_per_req": round(self.db * 1000 / per, 3),
            "server_cores": round(self.server / self.seconds, 2),
            "client_cores": round(self.client / self.seconds, 2),
            "db_cores": round(self.db / self.seconds, 2),
            "other_cores": round(max(self.busy - self.server - self.client - self.db, 0) / self.seconds, 2),
            "steal_cores": round(self.steal / self.seconds, 2),
            "loadavg": [self.load0, self.load1],
        }


def save_report(report: dict[str, Any], out: str | None, as_json: bool) -> bool:
    """Write the JSON report to ``out`` (when given) and print it (when ``as_json``); whether it
    was printed, so the caller prints its table otherwise."""
    text = json.dumps(report, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    if as_json:
        print(text)
    return as_json


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    wrk = shutil.which("wrk")
    wrk_v = ""
    if wrk:
        r = subprocess.run([wrk, "-v"], capture_output=True, text=True)
        wrk_v = (r.stdout + r.stderr).splitlines()[0] if (r.stdout + r.stderr) else ""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": wrk_v,
        "loadavg": loadavg(),
        "calibration": calibrate(),
    }


def calibrate() -> dict[str, float]:
    """CPU and wall time of a fixed pure-Python loop (10**7 additions): how fast this machine runs
    Python right now, and how much of a core this process gets (a shared machine shows it)."""
    t, w = time.process_time(), time.perf_counter()
    total = 0
    for i in range(10**7):
        total += i
    cpu, wall = time.process_time() - t, time.perf_counter() - w
    return {"py_loop_cpu_s": round(cpu, 3), "py_loop_wall_s": round(wall, 3)}


@dataclass
class Enrolled:
    name: str
    token: str
    key: pki.PrivateKey


@dataclass
class BenchCA:
    """A CA in a temporary data dir; ``start()`` serves it, ``stop()`` ends the server."""

    engine: str = "sqlite"
    insecure_http: bool = False
    serve_args: list[str] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="meshbridge-bench-")))
    pg: Any = None
    db_url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.workdir / "ca"

    def init(self) -> BenchCA:
        if self.engine == "postgres":
            from tests.support.pgserver import PgServer

            self.pg = PgServer().start()
            self.db_url = self.pg.create_database("meshbridge_bench")
        elif self.engine != "sqlite":
            raise SystemExit(f"unknown engine {self.engine!r}: sqlite or postgres")
        self.env = {**os.environ, "MESHBRIDGE_CA_KEY_PASSPHRASE": "bench-passphrase-not-secret"}
        cmd = [CA, "init", "--data-dir", str(self.data)]
        if self.db_url:
            cmd += ["--database-url", self.db_url]
        subprocess.run(cmd, check=True, capture_output=True, env=self.env)
        return self

    def save_setup(self, to: Path) -> None:
        """Keep the data dir (and a PostgreSQL database's dump) as they are now, for ``adopt_setup``."""
        shutil.copytree(self.data, to / "ca")
        if self.pg is not None:
            self._pg_tool("pg_dump", "-Fc", "-f", str(to / "db.dump"), "meshbridge_bench")

    def adopt_setup(self, saved: Path) -> BenchCA:
        """Instead of ``init``: a copy of what ``save_setup`` kept (not timed: setup only); on
        PostgreSQL a new server with the dump restored, and the data dir's settings pointed at it."""
        self.env = {**os.environ, "MESHBRIDGE_CA_KEY_PASSPHRASE": "bench-passphrase-not-secret"}
        shutil.copytree(saved / "ca", self.data)
        if self.engine == "postgres":
            from ca_server.runtime import SETTINGS_FILE
            from tests.support.pgserver import PgServer

            self.pg = PgServer().start()
            self.db_url = self.pg.create_database("meshbridge_bench")
            self._pg_tool("pg_restore", "-d", "meshbridge_bench", str(saved / "db.dump"))
            settings = self.data / SETTINGS_FILE
            settings.write_text(json.dumps({**json.loads(settings.read_text()), "database_url": self.db_url}))
        return self

    def _pg_tool(self, tool: str, *args: str) -> None:
        pg = self.pg
        subprocess.run(
            [str(pg.bindir / tool), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", *args], check=True
        )

    def replica(self) -> BenchCA:
        """Another `serve` of the same data dir and database (start it; stop it, never clean it up)."""
        return BenchCA(
            engine=self.engine,
            insecure_http=self.insecure_http,
            serve_args=self.serve_args,
            workdir=self.workdir,
            db_url=self.db_url,
            env=self.env,
        )

    @property
    def admin_token(self) -> str:
        return (self.data / "admin-token").read_text().strip()

    def start(self, *, wait: float = 60) -> BenchCA:
        self.port = free_port()
        cmd = [
            CA,
            "serve",
            "--data-dir",
            str(self.data),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--log-level",
            "warning",
            *self.serve_args,
        ]
        if self.insecure_http:
            cmd.append("--insecure-http")
        self.log = open(self.workdir / "serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=self.log, env=self.env, preexec_fn=lambda: raise_nofile()
        )
        self.url = f"{'http' if self.insecure_http else 'https'}://127.0.0.1:{self.port}"
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {(self.workdir / 'serve.log').read_text()[-3000:]}")
            try:
                with self.client(timeout=2) as c:
                    if c.get("/readyz").status_code == 200:
                        return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("serve did not become ready")

    @property
    def db_pid(self) -> int | None:
        return self.pg.proc.pid if self.pg is not None and self.pg.proc is not None else None

    def client(self, **kw: Any) -> httpx.Client:
        verify: Any = False if self.insecure_http else str(self.data / "root-cert.pem")
        return httpx.Client(base_url=self.url, verify=verify, **kw)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self.pg is not None:
            self.pg.cleanup()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ setup through the API
    def enroll_clusters(self, names: list[str], *, key_type: str = "ecdsa-p256") -> list[Enrolled]:
        out = []
        with (
            self.client(timeout=30, headers={"Authorization": f"Bearer {self.admin_token}"}) as c,
            self.client(timeout=30) as anon,
        ):
            for name in names:
                r = c.post("/v1/clusters", json={"name": name, "trust_domain": f"{name}.mesh"})
                r.raise_for_status()
                boot = r.json()["bootstrap_token"]
                key = pki.new_key(key_type)
                r = anon.post(
                    "/v1/enroll", json={"cluster": name, "bootstrap_token": boot, "csr": pki.make_csr(key, name)}
                )
                r.raise_for_status()
                out.append(Enrolled(name, r.json()["agent_token"], key))
        return out

    # ------------------------------------------------------------------ checks afterwards
    def _engine_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data / 'meshbridge.db'}"

    def count_certificates(self) -> int:
        from ca_server.storage import tables as t

        eng = create_engine(self._engine_url())
        try:
            with eng.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(t.certificates)).scalar_one())
        finally:
            eng.dispose()

    def latest_public_key_fps(self) -> dict[str, str]:
        """Each cluster's newest certificate's public-key fingerprint."""
        from ca_server.storage import tables as t

        c = t.certificates.c
        newest = select(func.max(c.id)).group_by(c.cluster).scalar_subquery()
        eng = create_engine(self._engine_url())
        try:
            with eng.connect() as conn:
                return {
                    r.cluster: r.public_key_fp
                    for r in conn.execute(select(c.cluster, c.public_key_fp).where(c.id.in_(newest)))
                }
        finally:
            eng.dispose()

    def count_audit(self, action: str) -> int:
        from ca_server.storage import tables as t

        eng = create_engine(self._engine_url())
        try:
            with eng.connect() as conn:
                q = select(func.count()).select_from(t.audit).where(t.audit.c.action == action)
                return int(conn.execute(q).scalar_one())
        finally:
            eng.dispose()

    def audit_verify(self) -> tuple[bool, str]:
        cmd = [CA, "audit", "verify", "--data-dir", str(self.data)]
        if self.db_url:
            cmd += ["--database-url", self.db_url]
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        return r.returncode == 0, (r.stdout + r.stderr).strip()
