"""bench/agent_routes.py runs both paths (the agent shortcut and FastAPI's routes) on every engine
and reports the CPU of each route."""

from __future__ import annotations

from pathlib import Path

from tests.support.benchrun import bench_report


def test_the_bench_reports_both_paths_on_both_engines(tmp_path: Path) -> None:
    report = bench_report("agent_routes.py", ["--clusters", "5", "--engine", "sqlite,postgres"], tmp_path)
    assert report["machine"]["nproc"] >= 1 and report["clusters"] == 5
    for engine in ("sqlite", "postgres"):
        rows = report["results"][engine]
        assert set(rows) == {"shortcut", "fastapi"}
        for path in rows.values():
            assert path["desired"] > 0 and path["status"] > 0
