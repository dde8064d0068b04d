"""Run one of ``bench/``'s scripts as a user would and read the JSON report it writes (``--out``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def bench_report(script: str, args: list[str], tmp_path: Path) -> dict[str, Any]:
    """``bench/<script> <args> --out FILE`` in a new interpreter (failing the test if it fails), and its report."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    report: dict[str, Any] = json.loads(out.read_text())
    return report
