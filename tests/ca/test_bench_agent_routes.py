"""bench/agent_routes.py runs both paths (the agent shortcut and FastAPI's routes) on every engine
and reports the CPU of each route."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_reports_both_paths_on_both_engines(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "bench/agent_routes.py"), "--clusters", "5", "--engine", "sqlite,postgres"]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["machine"]["nproc"] >= 1 and report["clusters"] == 5
    for engine in ("sqlite", "postgres"):
        rows = report["results"][engine]
        assert set(rows) == {"shortcut", "fastapi"}
        for path in rows.values():
            assert path["desired"] > 0 and path["status"] > 0
