"""What `meshbridge-agent` prints for a pass and a config check: the ``--json`` form (stable keys,
docs/agent-config.md) and the default summary. Pure: results in, an ``Output`` out."""

from __future__ import annotations

from typing import Any

from cluster_agent.config import AgentConfig
from cluster_agent.reconcile import ReconcileResult
from meshbridge_wire.cliout import Output


def pass_output(cluster: str, result: ReconcileResult | None, *, where: str, diff: str | None = None) -> Output:
    """One pass of `render --once` / `run --once`. JSON keys: created, updated, unchanged, pruned
    (object or file names), imports, import_modes (per imported host: its mode and exporters),
    renewed, warnings, istio_problems, revision; `render --dry-run`
    adds ``diff`` (the unified diff it would apply, Secrets shown only as changed)."""
    if result is None:  # the desired state had not changed: nothing was rendered
        return Output({"reconciled": False}, f"{cluster}: nothing changed since the last pass")
    rep = result.report
    data: dict[str, Any] = {
        "created": rep.created,
        "updated": rep.updated,
        "unchanged": rep.unchanged,
        "pruned": rep.pruned,
        "imports": result.imports_applied,
        "import_modes": result.imports,
        "renewed": result.renewed,
        "warnings": result.warnings,
        "istio_problems": result.istio_problems,
        "revision": result.desired_revision,
    }
    lines = [diff.rstrip("\n")] if diff else []
    summary = rep.summary() if diff is None else f"{rep.summary()} (dry run: nothing written)"
    lines.append(f"{cluster}: {summary} {where} ({result.imports_applied} imports)")
    lines += [f"  import {host}: {how}" for host, how in sorted(result.imports.items())]
    if result.renewed:
        lines.append("  intermediate renewed")
    lines += [f"  warning: {w}" for w in result.warnings]
    lines += [f"  problem: {p}" for p in result.istio_problems]
    if diff is not None:
        data["diff"] = diff
    return Output(data, "\n".join(lines))


def config_output(path: str, cfg: AgentConfig) -> Output:
    """`check-config`. JSON keys: config, valid (true), cluster, exports, import_rules, notes."""
    notes = list(cfg.advisories())
    data = {
        "config": path,
        "valid": True,
        "cluster": cfg.cluster,
        "exports": len(cfg.exports),
        "import_rules": len(cfg.imports),
        "notes": notes,
    }
    lines = [f"note: {n}" for n in notes]
    lines.append(f"{path}: valid (cluster {cfg.cluster}, {len(cfg.exports)} exports, {len(cfg.imports)} import rules)")
    return Output(data, "\n".join(lines))
