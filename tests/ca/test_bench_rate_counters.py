"""bench/rate_counters.py runs and reports every engine, size and shape it was asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_reports_each_size_and_shape(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "bench/rate_counters.py"), "--keys", "10,200", "--engine", "sqlite,postgres"]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["machine"]["nproc"] >= 1 and report["rounds"] == 7
    for engine in ("sqlite", "postgres"):
        rows = report["results"][engine]
        assert [r["keys"] for r in rows] == [10, 200]
        for row in rows:
            for shape in ("all_moved", "none_moved"):
                assert row[shape]["cpu_ms"] >= 0 and row[shape]["wall_ms"] > 0
