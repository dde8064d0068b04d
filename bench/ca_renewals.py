#!/usr/bin/env python3
"""Renewal throughput of `meshbridge-ca serve` (issue 2, item 11).

Sets up a CA in a temporary data dir (SQLite, or a real PostgreSQL with ``--engine postgres``),
starts ``meshbridge-ca serve`` on a free 127.0.0.1 port, registers and enrolls K clusters through
the API, pre-builds renewal requests as each cluster's agent would send them (a fresh ECDSA P-256
CSR plus a proof signed by the key of the intermediate the cluster's previous renewal asked for:
each cluster's requests form a key chain, resumed before every run from the certificate the CA
issued last), and replays them with ``wrk`` and ``bench/renew.lua`` at each concurrency. With K
clusters round-robin, a cluster's next request leaves only after K/2 others on its wrk thread, so
its predecessor has been answered. Every request is a full renewal:
authenticated, proof-checked, signed, verified against the root, stored and audited.

Afterwards it checks that the certificates in the database are exactly the enrollments plus the
201s, and that ``meshbridge-ca audit verify`` passes. A run with any non-201 answer or socket
error fails. Exit status 0 only when every check passes (targets are reported, not enforced,
unless ``--enforce-targets``).

    python bench/ca_renewals.py --engine sqlite --duration 10 --concurrency 4,16 [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchCA, CpuMeter, calibrate, machine, raise_nofile, save_report

from ca_server.core.x509profiles import public_key_fingerprint
from cluster_agent import pki

HERE = Path(__file__).resolve().parent
TARGETS = {4: {"rps": 1000.0, "p99_ms": 50.0}, 16: {"rps": 600.0, "p99_ms": 50.0}}


def _build(job: tuple[str, str, str, int]) -> tuple[list[str], dict[str, str]]:
    """``count`` renewals of one cluster as its agent would send them: each proves with the key of
    the intermediate the previous one asked for (the first with the cluster's current key).
    Returns the request lines and, by public-key fingerprint, the private keys they introduce."""
    name, token, key_pem, count = job
    key = pki.load_key(key_pem)
    path = f"/v1/clusters/{name}/intermediate"
    lines, keys = [], {}
    for _ in range(count):
        new = pki.new_key("ecdsa-p256")
        csr = pki.make_csr(new, name)
        body = json.dumps({"csr": csr, "proof": pki.prove(key, csr)}, separators=(",", ":"))
        lines.append(f"{path}\t{token}\t{body}")
        keys[public_key_fingerprint(new.public_key())] = pki.key_pem(new)
        key = new
    return lines, keys


class KeyChains:
    """Each cluster's current key: the one whose certificate the CA issued last."""

    def __init__(self, enrolled: list[Any]) -> None:
        self.tokens = {e.name: e.token for e in enrolled}
        self.current = {e.name: pki.key_pem(e.key) for e in enrolled}
        self.known: dict[str, str] = {}

    def build_prelude(self, count: int, out: Path) -> None:
        """``count`` stand-alone renewals (see renew.lua): each proves with its cluster's current key
        and no other request proves with the key it introduces."""
        names = list(self.current)
        with out.open("w") as f:
            for i in range(count):
                name = names[i % len(names)]
                new = pki.new_key("ecdsa-p256")
                csr = pki.make_csr(new, name)
                body = json.dumps(
                    {"csr": csr, "proof": pki.prove(pki.load_key(self.current[name]), csr)}, separators=(",", ":")
                )
                f.write(f"/v1/clusters/{name}/intermediate\t{self.tokens[name]}\t{body}\n")
                self.known[public_key_fingerprint(new.public_key())] = pki.key_pem(new)

    def build(self, total: int, out: Path) -> int:
        """``total`` requests, clusters interleaved round-robin, one per line in ``out``."""
        per = -(-total // len(self.current))
        jobs = [(name, self.tokens[name], key, per) for name, key in self.current.items()]
        with multiprocessing.Pool() as pool:
            built = pool.map(_build, jobs)
        for _, keys in built:
            self.known.update(keys)
        n = 0
        with out.open("w") as f:
            for i in range(per):
                for lines, _ in built:
                    if n < total:
                        f.write(lines[i] + "\n")
                        n += 1
        return n

    def follow(self, latest_fps: dict[str, str]) -> None:
        """Move every cluster to the key of its newest certificate (after a run)."""
        for name, fp in latest_fps.items():
            if fp in self.known:
                self.current[name] = self.known[fp]
        self.known.clear()


def run_wrk(
    url: str,
    reqfile: Path,
    *,
    connections: int,
    threads: int,
    duration: float,
    timeout: float = 5.0,
    prelude: Path | None = None,
) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if not wrk:
        raise SystemExit("wrk not found: run `make sysdeps` (Debian package wrk)")
    threads = max(1, min(threads, connections))
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        f"--timeout={timeout:g}s",
        "-s",
        str(HERE / "renew.lua"),
        url,
        "--",
        str(reqfile),
        str(threads),
        *([str(prelude)] if prelude else []),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}")
    res: dict[str, Any] = json.loads(line[len("RESULT ") :])
    secs = res["duration_us"] / 1e6
    ok = int(res["statuses"].get("201", 0))
    sock = sum(res["socket_errors"][k] for k in ("connect", "read", "write", "timeout"))
    lat = res["latency_us"]
    return {
        "concurrency": connections,
        "threads": threads,
        "seconds": round(secs, 2),
        "responses": res["requests"],
        "created_201": ok,
        "failures": {k: v for k, v in res["statuses"].items() if k != "201"},
        "socket_errors": sock,
        "rps": round(ok / secs, 1),
        "p50_ms": round(lat["p50"] / 1000, 2),
        "p90_ms": round(lat["p90"] / 1000, 2),
        "p99_ms": round(lat["p99"] / 1000, 2),
        "max_ms": round(lat["max"] / 1000, 2),
        "prepared": res["prepared"],
        "wrapped": res["sent"] > res["prepared"],
        # requests written whose answer wrk never read (in flight when the run ended): the server
        # may still have issued them, so they widen the expected certificate count
        "unanswered": max(res["sent"] - res["requests"], 0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--clusters", type=int, default=256, help="clusters enrolled (K)")
    p.add_argument(
        "--requests", type=int, default=0, help="pre-built requests per run (default: 2000 per second of --duration)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of c=4 warm-up before the runs (0: none)")
    p.add_argument("--concurrency", default="4,16")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (at most 2 on a 2-core machine)")
    p.add_argument("--insecure-http", action="store_true", help="serve plain HTTP (default: HTTPS)")
    p.add_argument("--workers", type=int, default=0, help="pass --workers N to serve (0: its default)")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for serve (repeatable)")
    p.add_argument("--enforce-targets", action="store_true", help="exit non-zero when a target is missed")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--out", help="also write the JSON report to this file")
    args = p.parse_args(argv)
    raise_nofile()
    conc = [int(c) for c in args.concurrency.split(",") if c]
    per_run = args.requests or int(2000 * args.duration)
    serve_args = list(args.serve_arg)
    if args.workers:
        serve_args += ["--workers", str(args.workers)]
    ca = BenchCA(engine=args.engine, insecure_http=args.insecure_http, serve_args=serve_args)
    report: dict[str, Any] = {
        "engine": args.engine,
        "transport": "http" if args.insecure_http else "https",
        "serve_args": serve_args,
        "clusters": args.clusters,
        "machine": machine(),
        "runs": [],
    }
    try:
        ca.init().start()
        t0 = time.monotonic()
        enrolled = ca.enroll_clusters([f"c{i:04d}" for i in range(args.clusters)])
        plan = ([("warmup", 4, args.warmup)] if args.warmup > 0 else []) + [(f"c{c}", c, args.duration) for c in conc]
        chains = KeyChains(enrolled)
        report["setup_seconds"] = round(time.monotonic() - t0, 1)
        for label, c, dur in plan:
            reqfile = ca.workdir / f"requests-{label}.tsv"
            prelude = ca.workdir / f"prelude-{label}.tsv"
            chains.build_prelude(4 * c + 8, prelude)  # a few per connection; wrk may drop one each
            chains.build(per_run if label != "warmup" else int(2000 * dur), reqfile)
            assert ca.proc is not None
            speed_before = calibrate()["py_loop_cpu_s"]  # the CPU's speed right now (it varies on a VM)
            with CpuMeter(ca.proc.pid, ca.db_pid) as meter:
                res = run_wrk(ca.url, reqfile, connections=c, threads=args.threads, duration=dur, prelude=prelude)
            res.update(meter.report(res["responses"]))
            res["label"] = label
            res["py_loop_cpu_s"] = [speed_before, calibrate()["py_loop_cpu_s"]]
            report["runs"].append(res)
            chains.follow(ca.latest_public_key_fps())
        ca.stop()
        created = sum(r["created_201"] for r in report["runs"])
        unanswered = sum(r["unanswered"] for r in report["runs"])
        in_db = ca.count_certificates()
        renew_audits = ca.count_audit("intermediate.renew")
        audit_ok, audit_msg = ca.audit_verify()
        lo = args.clusters + created
        report["checks"] = {
            "certificates_in_db": in_db,
            "expected_min": lo,
            "expected_max": lo + unanswered,
            "renewal_audit_entries": renew_audits,
            "certificates_match": lo <= in_db <= lo + unanswered and renew_audits == in_db - args.clusters,
            "audit_verify": audit_ok,
            "audit_message": audit_msg,
        }
    finally:
        if args.keep:
            report["workdir"] = str(ca.workdir)
            ca.stop()
        else:
            ca.cleanup()

    ok = report["checks"]["certificates_match"] and report["checks"]["audit_verify"]
    targets_met = True
    for r in report["runs"]:
        r["errors"] = sum(r["failures"].values()) + r["socket_errors"]
        ok = ok and r["errors"] == 0
        tgt = TARGETS.get(r["concurrency"]) if r["label"] != "warmup" else None
        if tgt:
            r["target"] = tgt
            r["target_met"] = r["errors"] == 0 and r["rps"] >= tgt["rps"] and r["p99_ms"] <= tgt["p99_ms"]
            targets_met = targets_met and r["target_met"]
    report["pass"] = ok
    report["targets_met"] = targets_met
    if not save_report(report, args.out, args.json):
        m = report["machine"]
        print(
            f"engine={args.engine} transport={report['transport']} serve_args={' '.join(serve_args) or '-'} "
            f"clusters={args.clusters}  [{m['nproc']} cpu {m['cpu']}, {m['mem_gib']} GiB, Python {m['python']}; "
            f"loadavg {m['loadavg']}, py-loop {m['calibration']['py_loop_cpu_s']} s cpu / "
            f"{m['calibration']['py_loop_wall_s']} s wall]"
        )
        print(
            f"{'run':8} {'conc':>4} {'secs':>6} {'201s':>7} {'errors':>6} {'req/s':>8} {'p50 ms':>7} "
            f"{'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'srv ms/req':>10} {'wrk ms/req':>10} {'db ms/req':>9} "
            f"{'others':>6} {'steal':>5} {'py-loop s':>11}  target"
        )
        for r in report["runs"]:
            verdict = ("met" if r["target_met"] else "MISSED") if "target_met" in r else ""
            print(
                f"{r['label']:8} {r['concurrency']:>4} {r['seconds']:>6} {r['created_201']:>7} {r['errors']:>6} "
                f"{r['rps']:>8} {r['p50_ms']:>7} {r['p90_ms']:>7} {r['p99_ms']:>7} {r['max_ms']:>7} "
                f"{r['server_cpu_ms_per_req']:>10} {r['client_cpu_ms_per_req']:>10} {r['db_cpu_ms_per_req']:>9} "
                f"{r['other_cores']:>6} {r['steal_cores']:>5} {'/'.join(map(str, r['py_loop_cpu_s'])):>11}  {verdict}"
                + (f"  failures={r['failures']}" if r["failures"] else "")
                + ("  (requests replayed)" if r["wrapped"] else "")
            )
        ch = report["checks"]
        print(
            f"certificates in DB: {ch['certificates_in_db']} (enrollments + 201s = {ch['expected_min']}, "
            f"+ unanswered at the end of runs <= {ch['expected_max']}; renewal audit entries "
            f"{ch['renewal_audit_entries']}: {'ok' if ch['certificates_match'] else 'MISMATCH'}); audit verify: "
            f"{'ok' if ch['audit_verify'] else 'FAILED'} ({ch['audit_message']})"
        )
        print("PASS" if ok else "FAIL", "— targets", "met" if targets_met else "missed")
    if not ok:
        return 1
    return 2 if args.enforce_targets and not targets_met else 0


if __name__ == "__main__":
    sys.exit(main())
