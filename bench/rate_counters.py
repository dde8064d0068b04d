#!/usr/bin/env python3
"""Cost of one rate-limit sync (``SqlRateCounters.add_and_read``) as the fleet grows.

Every replica syncs its rate-limit counts every 0.2 s: it adds the counts that moved since the
last sync and reads back the fleet-wide totals of every key it saw in the current window. In a
fleet event every agent's credential is one key. This times one sync with N keys, on SQLite (a
file in a temporary directory) and on a real PostgreSQL (``tests/support/pgserver``), in two
shapes: every key moved (a burst: every agent's long-poll answered in the same second) and
nothing moved (the keys are only read back). CPU is this process's (on SQLite it includes the
database's own work, in-process); wall includes the PostgreSQL round trip.

    python bench/rate_counters.py [--keys 100,1000,10000] [--engine sqlite,postgres] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, save_report
from sqlalchemy import create_engine

from ca_server.storage.ratecounters import SqlRateCounters
from ca_server.storage.tables import metadata

ROUNDS = 7


def _timed(counters: SqlRateCounters, window: int, deltas: dict[str, int]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    totals = counters.add_and_read(window, deltas)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if len(totals) != len(deltas):
        raise SystemExit(f"a sync of {len(deltas)} keys read back {len(totals)} totals")
    return cpu, wall


def measure(url: str, keys: int) -> dict[str, Any]:
    engine = create_engine(url)
    metadata.create_all(engine)
    counters = SqlRateCounters(engine)
    moved = {f"cred:mbagent.{i:016x}": 1 for i in range(keys)}
    still = dict.fromkeys(moved, 0)
    counters.add_and_read(1, moved)  # warm: connection, statement cache, rows present
    row: dict[str, Any] = {"keys": keys}
    for shape, deltas in (("all_moved", moved), ("none_moved", still)):
        runs = [_timed(counters, 1, deltas) for _ in range(ROUNDS)]
        row[shape] = {
            "cpu_ms": round(1000 * statistics.median(c for c, _ in runs), 2),
            "wall_ms": round(1000 * statistics.median(w for _, w in runs), 2),
        }
    engine.dispose()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", default="100,1000,10000", help="comma-separated key counts (default: %(default)s)")
    p.add_argument("--engine", default="sqlite,postgres", help="comma-separated engines (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--out", help="also write the JSON report to this file")
    args = p.parse_args()
    sizes = [int(k) for k in args.keys.split(",")]
    report: dict[str, Any] = {"machine": machine(), "rounds": ROUNDS, "results": {}}
    for name in args.engine.split(","):
        report["results"][name] = _engine_rows(name, sizes)
    if not save_report(report, args.out, args.json):
        print(f"{'engine':10} {'keys':>6} {'all moved cpu/wall ms':>24} {'none moved cpu/wall ms':>24}")
        for name, rows in report["results"].items():
            for r in rows:
                cells = [f"{r[s]['cpu_ms']:>11} / {r[s]['wall_ms']:<10}" for s in ("all_moved", "none_moved")]
                print(f"{name:10} {r['keys']:>6} {cells[0]} {cells[1]}")
    return 0


def _engine_rows(name: str, sizes: list[int]) -> list[dict[str, Any]]:
    if name == "sqlite":
        with tempfile.TemporaryDirectory(prefix="meshbridge-bench-") as d:
            return [measure(f"sqlite:///{d}/counters-{n}.db", n) for n in sizes]
    if name == "postgres":
        from tests.support.pgserver import PgServer

        pg = PgServer().start()
        try:
            return [measure(pg.create_database(f"counters_{n}"), n) for n in sizes]
        finally:
            pg.cleanup()
    raise SystemExit(f"unknown engine {name!r}: sqlite or postgres")


if __name__ == "__main__":
    sys.exit(main())
