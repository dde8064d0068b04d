"""Issue 14 item 7: `meshbridge-agent` prints a readable summary by default and JSON with `--json`
(the keys docs/agent-config.md lists); an error is one line on stderr, plus a JSON error object
with `--json`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from cluster_agent.cli import main

PASS_KEYS = {
    "created",
    "updated",
    "unchanged",
    "pruned",
    "imports",
    "import_modes",
    "renewed",
    "warnings",
    "istio_problems",
    "revision",
}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    handlers = logging.getLogger().handlers[:]
    try:  # main() logs to this test's captured stderr: hand the root logger back after it
        code = main(["--log-level", "warning", *argv])
    finally:
        logging.getLogger().handlers[:] = handlers
    out, err = capsys.readouterr()
    return code, out, err


def test_render_once_both_forms(two_clusters: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = two_clusters["a"]
    out = cfg.parent / "out"
    base = ("render", "--config", str(cfg), "--out", str(out), "--once", "--wait", "0")
    code, text, _ = run(capsys, *base, "--dry-run")
    assert code == 0 and "+++ b/" in text and "~ secret-istio-system-cacerts.yaml (Secret: content changed" in text
    [summary] = [line for line in text.splitlines() if line.startswith("a: ")]
    assert summary.endswith(f"(dry run: nothing written) in {out} (0 imports)")
    assert "  warning: consumer b has not published its egress identity yet" in text
    assert "PRIVATE KEY" not in text and not list(out.glob("*.yaml"))
    code, text, _ = run(capsys, *base, "--dry-run", "--json")
    dry = json.loads(text)  # the diff is a key, stdout stays one JSON document
    assert code == 0 and set(dry) == PASS_KEYS | {"diff"} and "+++ b/" in dry["diff"] and not list(out.glob("*.yaml"))
    code, text, _ = run(capsys, *base)
    summary = text.strip().splitlines()[0]
    assert code == 0 and summary.startswith("a: ") and summary.endswith(f"unchanged, 0 pruned in {out} (0 imports)")
    assert "created" in summary and (out / "secret-istio-system-cacerts.yaml").exists()
    code, text, _ = run(capsys, *base, "--json")
    again = json.loads(text)
    assert code == 0 and set(again) == PASS_KEYS and again["created"] == [] and again["unchanged"]


def test_check_config_both_forms_and_errors(two_clusters: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = two_clusters["b"]
    code, text, _ = run(capsys, "check-config", "--config", str(cfg))
    assert code == 0 and text.strip().endswith(f"{cfg}: valid (cluster b, 0 exports, 1 import rules)")
    code, text, _ = run(capsys, "check-config", "--config", str(cfg), "--json")
    assert code == 0
    assert json.loads(text) == {
        "config": str(cfg),
        "valid": True,
        "cluster": "b",
        "exports": 0,
        "import_rules": 1,
        "notes": json.loads(text)["notes"],
    }
    bad = yaml.safe_load(cfg.read_text())
    bad["dns"]["mode"] = "bogus"
    cfg.write_text(yaml.safe_dump(bad))
    code, text, err = run(capsys, "check-config", "--config", str(cfg), "--json")
    assert code == 2 and err.startswith("meshbridge-agent: config error: ") and "dns.mode" in err
    error = json.loads(text)
    assert error["exit_code"] == 2 and error["error"] == f"config error: {cfg} is invalid:"
    assert [p.split(":")[0] for p in error["problems"]] == ["dns.mode"]
    code, text, err = run(capsys, "check-config", "--config", str(cfg))
    assert code == 2 and text == "" and "dns.mode" in err


def test_every_command_says_in_its_help_what_it_prints(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "render", "check-config"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "prints" in text.lower() and "--json" in text, command
