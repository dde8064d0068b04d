"""The default (human) form of `meshbridge-ca`'s results: tables for lists, ``key: value`` lines
for one object, one line for an action. Pure: API objects in, text out (the ``--json`` form is
the API object itself, see docs/api.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ca_server.fleetcheck import duration_text
from meshbridge_wire.cliout import fields, table

CLUSTER_COLUMNS = [
    "NAME",
    "STATUS",
    "TRUST DOMAIN",
    "DESIRED",
    "INSTALLED",
    "SERVED",
    "ROTATING",
    "SERIAL",
    "DAYS LEFT",
    "ERRORS",
    "ISTIOD ROOTS",
    "REPORT AGE",
]


def or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def days_left(not_after: str | None) -> str:
    if not not_after:
        return "-"
    end = datetime.strptime(not_after, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return f"{(end - datetime.now(UTC)).total_seconds() / 86400:.1f}"


# ----------------------------------------------------------------------------- init
def init_text(out: dict[str, str], root_id: str, key_type: str, data_dir: Path, passphrase_file: Path | None) -> str:
    """`init`: where everything went (never the admin token itself)."""
    lines = [
        f"CA initialised in {data_dir}",
        f"  root {root_id} ({key_type}), key: {out['key']}",
        f"  trust anchor: {out['root_cert']}",
        f"  admin token:  {out['admin_token_file']} (mode 0600)",
    ]
    if passphrase_file is not None:
        lines.append(f"  key passphrase: {passphrase_file} — back it up separately")
        if passphrase_file.resolve().is_relative_to(data_dir.resolve()):
            lines.append(
                "    it lies beside the key it unlocks: a copy of the data directory carries both; "
                "keep it elsewhere and pass --passphrase-file (docs/security.md)"
            )
    lines.append(f"  audit key: {out['audit_key_file']} — back it up separately (backups do not hold it)")
    lines.append(f"  database: {out['database']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- clusters
def cluster_table(items: list[dict[str, Any]]) -> str:
    """`cluster list`: a row per cluster, then, when any cluster imports, a row per imported name
    with the exporters that serve it (several exporters of one name fail over between them)."""
    text = table([_cluster_row(c) for c in items], CLUSTER_COLUMNS)
    served = [
        [c["name"], name, ", ".join(exporters)] for c in items for name, exporters in (c.get("imports") or {}).items()
    ]
    if served:
        text += "\n\n" + table(served, ["CONSUMER", "IMPORTS", "EXPORTED BY"])
    return text


def _cluster_row(c: dict[str, Any]) -> list[str]:
    st = c.get("agent_status") or {}
    inter = c.get("intermediate") or {}
    installed = c.get("installed") or {}
    signing, roots, age = served_cells(c.get("served"))
    return [
        c["name"],
        c["status"],
        c["trust_domain"],
        str(c["generation"]),
        or_dash(installed.get("generation")),
        signing,
        "yes" if c["rotation_pending"] else "no",
        inter.get("serial", "-")[:16],
        days_left(inter.get("not_after")),
        str(len(st.get("errors") or [])) if st else "-",
        roots,
        age,
    ]


def served_cells(served: dict[str, Any] | None) -> tuple[str, str, str]:
    """SERVED (the generation istiod signs with; "?" for an intermediate the CA did not issue to
    the cluster), ISTIOD ROOTS (root ids of istiod's bundle, 8 digits each) and REPORT AGE."""
    if not served:
        return "-", "-", "-"
    gen = served.get("signing_generation")
    signing = str(gen) if gen is not None else ("?" if served.get("signing_serial") else "-")
    roots = ",".join(r[:8] if not r.startswith("unknown:") else "unknown" for r in served.get("bundle_roots") or [])
    age = served.get("report_age_s")
    return signing, roots or "none", duration_text(age) if age is not None else "-"


def cluster_text(c: dict[str, Any]) -> str:
    """`cluster show` and `cluster revoke`: the cluster's state, one field a line."""
    inter = c.get("intermediate") or {}
    gw = c.get("gateway")
    st = c.get("agent_status") or {}
    signing, roots, age = served_cells(c.get("served"))
    exports = (c.get("exports") or {}).get("services") or []
    pairs: list[tuple[str, Any]] = [
        ("cluster", c["name"]),
        ("status", c["status"]),
        ("trust domain", c["trust_domain"]),
        ("gateway", f"{gw['address']}:{gw['port']}" if gw else None),
        ("generation", f"{c['generation']} desired, {or_dash((c.get('installed') or {}).get('generation'))} installed"),
        ("rotation pending", "yes" if c["rotation_pending"] else "no"),
        ("intermediate", _intermediate(inter) if inter else None),
        ("istiod signs with", f"generation {signing}" if c.get("served") else None),
        ("istiod roots", roots if c.get("served") else None),
        ("last report", f"{age} ago" if c.get("served") else _received(st)),
        ("exports", len(exports)),
    ]
    lines = [fields(pairs)]
    lines += [f"  agent error: {e}" for e in st.get("errors") or []]
    return "\n".join(lines)


def _intermediate(inter: dict[str, Any]) -> str:
    return (
        f"serial {inter['serial'][:16]}, root {inter.get('root_id', '-')}, "
        f"until {inter['not_after']} ({days_left(inter['not_after'])} days)"
    )


def _received(st: dict[str, Any]) -> str | None:
    at = st.get("received_at")
    return f"received at {at}" if at else None


def bootstrap_text(name: str, out: dict[str, Any], *, written_to: str | None, registered: bool) -> str:
    """`cluster add` / `cluster token`: the one-time token, printed here once (or where it went)."""
    head = (
        f"cluster {name} registered ({out['status']}); its agent enrolls with this bootstrap token"
        if registered
        else f"new bootstrap token for cluster {name} (its agent re-enrolls with it)"
    )
    where = (
        f"bootstrap token: written to {written_to} (mode 0600)"
        if written_to
        else f"bootstrap token: {out['bootstrap_token']}"
    )
    return f"{head}\n{where}\nexpires:         {out['bootstrap_expires_at']} (one use)"


# ----------------------------------------------------------------------------- roots
def roots_table(items: list[dict[str, Any]]) -> str:
    return table([[r["id"], r["status"], r["not_after"]] for r in items], ["ID", "STATUS", "NOT AFTER"])


ROOT_DONE = {
    "add": "added: it joins every trust bundle; the active root still signs (phase 2)",
    "activate": "activated: it signs, and every cluster renews under it (phase 3)",
    "retire": "retired: it leaves the trust bundle (phase 4)",
}


def root_text(op: str, r: dict[str, Any]) -> str:
    return f"root {r['id']} {ROOT_DONE[op]}\n" + fields([("status", r["status"]), ("not after", r["not_after"])])


def root_status_text(out: dict[str, Any]) -> str:
    """One table per gate: each active cluster, whether it is ready, what it waits for."""
    life, margin = out["workload_cert_lifetime_s"], out["margin_s"]
    lines = [
        f"active root {out['active_root']}; workload certificate lifetime {duration_text(life)} + margin "
        f"{duration_text(margin)}: activating waits {duration_text(life + margin)} after every istiod serves "
        "the root, retiring after every istiod signs under another root"
    ]
    if not out["gates"]:
        lines.append("no trusted root: no phase to gate (`root add` starts a rotation)")
    for g in out["gates"]:
        ready = sum(1 for c in g["clusters"] if c["ready"])
        verdict = "READY" if g["ready"] else "NOT READY"
        number = 3 if g["phase"] == "activate" else 4
        lines.append(
            f"\nphase {number}: root {g['phase']} {g['root_id']}: {verdict} "
            f"({ready} of {len(g['clusters'])} active clusters ready)"
        )
        if g["clusters"]:
            lines.append(table([_gate_row(c) for c in g["clusters"]], ["CLUSTER", "READY", "READY AT", "WAITING FOR"]))
    return "\n".join(lines)


def _gate_row(c: dict[str, Any]) -> list[str]:
    why = "; ".join(c["waiting_for"]) or "-"
    return [c["name"], "yes" if c["ready"] else "no", c.get("ready_at") or "-", why]


# ----------------------------------------------------------------------------- operator tokens
def tokens_table(items: list[dict[str, Any]]) -> str:
    rows = [[t["id"], t["name"], t["role"], t["state"], t["created_at"], or_dash(t["expires_at"])] for t in items]
    return table(rows, ["ID", "NAME", "ROLE", "STATE", "CREATED", "EXPIRES"])


def token_created_text(t: dict[str, Any], *, written_to: str | None) -> str:
    """`token create`: the secret printed here once (or where it went)."""
    secret = f"written to {written_to} (mode 0600)" if written_to else t["token"]
    return f"token {t['name']} created ({t['role']}); it is shown only this once\n" + fields(
        [("id", t["id"]), ("expires", t["expires_at"] or "never"), ("token", secret)]
    )


def token_revoked_text(t: dict[str, Any]) -> str:
    return f"token {t['id']} ({t['name']}, {t['role']}) revoked: it is refused from now on"
