"""`make demo` runs: a CA and two agents in render mode, cluster a exporting ratings.bookinfo to b.

The demo is the first thing a newcomer runs; it once failed at load (its VIP range became refused) and
no test noticed. This runs the script itself and checks what it leaves behind."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path) -> dict[str, object]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def test_demo_renders_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    env = {**os.environ, "MESHBRIDGE_DEMO_OUT": str(out)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ratings.bookinfo.remote" in run.stdout

    se = _load(next((out / "b" / "out").glob("serviceentry-*.yaml")))
    spec = se["spec"]
    assert isinstance(spec, dict)
    assert spec["hosts"] == ["ratings.bookinfo.remote"]
    (vip,) = spec["addresses"]
    assert ipaddress.ip_address(vip) in ipaddress.ip_network("241.0.0.0/16")

    policy = _load(next((out / "a" / "out").glob("authorizationpolicy-*.yaml")))
    principals = str(policy["spec"])
    assert "b.mesh/ns/istio-system/sa/istio-egressgateway-service-account" in principals
    cacerts = [p.name for p in (out / "a" / "out").glob("*.yaml") if "cacerts" in p.name]
    assert cacerts, "no cacerts Secret rendered for a"
