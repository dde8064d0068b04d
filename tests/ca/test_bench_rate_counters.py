"""bench/rate_counters.py runs and reports every engine, size and shape it was asked for."""

from __future__ import annotations

from pathlib import Path

from tests.support.benchrun import bench_report


def test_the_bench_reports_each_size_and_shape(tmp_path: Path) -> None:
    report = bench_report("rate_counters.py", ["--keys", "10,200", "--engine", "sqlite,postgres"], tmp_path)
    assert report["machine"]["nproc"] >= 1 and report["rounds"] == 7
    for engine in ("sqlite", "postgres"):
        rows = report["results"][engine]
        assert [r["keys"] for r in rows] == [10, 200]
        for row in rows:
            for shape in ("all_moved", "none_moved"):
                assert row[shape]["cpu_ms"] >= 0 and row[shape]["wall_ms"] > 0
