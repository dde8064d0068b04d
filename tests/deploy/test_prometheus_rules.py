"""deploy/prometheus (alert rules and their promtool unit tests) and deploy/grafana (dashboard).

Runs the real `promtool` (built by `make testbin`; the test fails, never skips, without it), and
checks that every metric the rules and the dashboard name is one the CA service or the agent
registers, read from their registries rather than from a list kept here.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from ca_server.api.metrics import Metrics
from cluster_agent.metrics import AgentMetrics
from tests.e2e.testbin import require

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "meshbridge-rules.yaml"
RULES_TEST = RULES_DIR / "meshbridge-rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "meshbridge.json"
METRIC = re.compile(r"\bmeshbridge_[a-z0-9_]+")
# The series names a family of each type exposes (prometheus_client strips _total from a counter
# family's name).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def _series_names(registry: CollectorRegistry) -> set[str]:
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


def registered() -> set[str]:
    return _series_names(Metrics().registry) | _series_names(AgentMetrics().registry)


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs(panels: list[dict[str, Any]]) -> Iterator[str]:
    for panel in panels:
        yield from (t["expr"] for t in panel.get("targets", []))
        yield from _dashboard_exprs(panel.get("panels", []))


def _promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(require("promtool")), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules() -> None:
    r = _promtool("check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in r.stdout


def test_promtool_test_rules() -> None:
    r = _promtool("test", "rules", RULES_TEST.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_test_rules_catches_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: the same file with one expected severity changed does."""
    wrong = RULES_TEST.read_text().replace("severity: critical, cluster: b", "severity: warning, cluster: b", 1)
    assert wrong != RULES_TEST.read_text()
    (tmp_path / "meshbridge-rules.yaml").write_text(RULES.read_text())
    (tmp_path / RULES_TEST.name).write_text(wrong)
    r = _promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert r.returncode != 0 and "MeshbridgeIntermediateExpiringSoon" in r.stdout + r.stderr


def test_every_alert_is_unit_tested() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in _rules()} == tested


def test_every_alert_has_severity_summary_description_and_an_existing_runbook() -> None:
    for rule in _rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        assert re.fullmatch(r"docs/runbooks/[a-z0-9-]+\.md", notes["runbook_url"]), rule["alert"]
        assert (ROOT / notes["runbook_url"]).is_file(), f"{rule['alert']}: {notes['runbook_url']} does not exist"


def test_registries_yield_the_documented_names() -> None:
    """The name derivation below sees counters, gauges and histograms (else the next test is void)."""
    names = registered()
    assert {
        "meshbridge_ca_errors_total",
        "meshbridge_ca_ready",
        "meshbridge_agent_cacerts_not_after_seconds",
        "meshbridge_ca_issuance_seconds_bucket",
    } <= names
    assert "meshbridge_ca_errors" not in names


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_used_is_registered(source: str) -> None:
    if source == "rules":
        exprs = [text for rule in _rules() for text in (rule["expr"], *rule["annotations"].values())]
    else:
        exprs = list(_dashboard_exprs(json.loads(DASHBOARD.read_text())["panels"]))
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert len(used) >= 5
    assert not used - registered(), f"{source} use metrics nobody registers: {sorted(used - registered())}"


def test_dashboard_is_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "meshbridge" and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
