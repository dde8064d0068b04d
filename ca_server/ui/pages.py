"""The dashboard's HTML pages (pure: data in, a document string out). Everything taken from the
data is escaped with ``html.escape``; the pages carry no script and no inline style (the
Content-Security-Policy is ``default-src 'self'``), only links, a GET filter form and the login form."""

from __future__ import annotations

import json
from collections.abc import Iterable
from html import escape
from urllib.parse import quote, urlencode

from ca_server.core.gates import parse_time
from ca_server.fleetcheck import FLEET, Limits, Result, duration_text
from ca_server.ui import svg
from ca_server.ui.view import AuditView, FleetView
from meshbridge_wire import models as w

NAV = (
    ("fleet", "/ui/", "Fleet"),
    ("roots", "/ui/roots", "Roots"),
    ("graph", "/ui/graph", "Graph"),
    ("audit", "/ui/audit", "Audit"),
)
TOKEN_FIELD = "token"


def layout(title: str, body: str, *, active: str = "", signed_in: bool = True) -> str:
    current = ' class="active"'
    links = "".join(f'<a href="{href}"{current if key == active else ""}>{text}</a>' for key, href, text in NAV)
    nav = f'<nav>{links}<a class="logout" href="/ui/logout">Log out</a></nav>' if signed_in else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{escape(title)} · meshbridge</title><link rel="stylesheet" href="/ui/static/ui.css">'
        '<link rel="icon" href="/ui/static/favicon.svg"></head>'
        f"<body><header><h1>meshbridge</h1>{nav}</header><main><h2>{escape(title)}</h2>{body}</main></body></html>"
    )


def login_page(message: str = "") -> str:
    """The sign-in form: the token is POSTed to /ui/login (the dashboard's only POST)."""
    note = f'<p class="error" role="alert">{escape(message)}</p>' if message else ""
    form = (
        f'{note}<form method="post" action="/ui/login" class="login">'
        f'<label for="token">Operator token (admin or viewer)</label>'
        f'<input id="token" name="{TOKEN_FIELD}" type="password" autocomplete="off" required>'
        '<button type="submit">Sign in</button></form>'
        "<p>Scripts may send <code>Authorization: Bearer &lt;token&gt;</code> instead.</p>"
    )
    return layout("Sign in", form, signed_in=False)


def _cell(field: str, value: object, cls: str = "") -> str:
    klass = f' class="{escape(cls)}"' if cls else ""
    return f'<td data-field="{escape(field)}"{klass}>{escape(str(value))}</td>'


def _table(head: Iterable[str], rows: Iterable[str], cls: str) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f'<table class="{escape(cls)}"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _opt(value: object) -> str:
    return "—" if value is None else str(value)


def days_text(c: w.ClusterOut, v: FleetView) -> tuple[str, str]:
    """The intermediate's days left as text, and the cell's class (short: under `fleet check`'s minimum)."""
    end = parse_time(c.intermediate.not_after) if c.intermediate else None
    if end is None:
        return "—", ""
    left = svg.days_left(end, v.now)
    return f"{left:.1f}", "short" if left < Limits().min_days else ""


def last_report(c: w.ClusterOut, v: FleetView) -> str:
    at = parse_time((c.agent_status or {}).get("received_at"))
    return "never" if at is None else f"{duration_text((v.now - at).total_seconds())} ago"


def _problems(results: list[Result]) -> str:
    bad = [r for r in results if r.status in ("fail", "warn")]
    if not bad:
        return '<td data-field="problems" class="ok">none</td>'
    items = "".join(f'<li class="{r.status}">{escape(r.check)}: {escape(r.detail)}</li>' for r in bad)
    return f'<td data-field="problems"><ul>{items}</ul></td>'


def _cluster_row(c: w.ClusterOut, v: FleetView) -> str:
    days, days_cls = days_text(c, v)
    served = c.served.signing_generation if c.served else None
    installed = c.installed.generation if c.installed else None
    return (
        f'<tr data-cluster="{escape(c.name)}">'
        f'<td data-field="name"><a href="/ui/graph?cluster={quote(c.name)}">{escape(c.name)}</a></td>'
        + _cell("status", c.status, c.status)
        + _cell("desired", c.generation)
        + _cell("installed", _opt(installed), "" if installed == c.generation else "lag")
        + _cell("served", _opt(served), "" if served == c.generation else "lag")
        + _cell("days", days, days_cls)
        + _cell("report", last_report(c, v))
        + _problems([r for r in v.results if r.cluster == c.name])
        + "</tr>"
    )


def _summary(v: FleetView) -> str:
    counts = {
        "clusters": len(v.clusters),
        "active": sum(1 for c in v.clusters if c.status == "active"),
        "pending": sum(1 for c in v.clusters if c.status == "pending"),
        "revoked": sum(1 for c in v.clusters if c.status == "revoked"),
        "failing": sum(1 for r in v.results if r.status == "fail"),
    }
    items = "".join(f'<div><dt>{escape(k)}</dt><dd data-count="{escape(k)}">{n}</dd></div>' for k, n in counts.items())
    return f'<dl class="summary">{items}</dl>'


def fleet_page(v: FleetView) -> str:
    head = [
        "cluster",
        "status",
        "desired gen",
        "installed gen",
        "istiod signs gen",
        "days left",
        "last report",
        "problems",
    ]
    table = _table(head, (_cluster_row(c, v) for c in v.clusters), "fleet")
    fleetwide = [r for r in v.results if r.cluster == FLEET and r.status in ("fail", "warn")]
    notes = "".join(f'<li class="{r.status}">{escape(r.check)}: {escape(r.detail)}</li>' for r in fleetwide)
    expiries = [
        svg.Expiry(c.name, end, "intermediate")
        for c in v.clusters
        if c.status == "active" and c.intermediate and (end := parse_time(c.intermediate.not_after)) is not None
    ] + [
        svg.Expiry(f"root {r.id[:12]}", end, "root")
        for r in v.roots
        if r.status != "retired" and (end := parse_time(r.not_after)) is not None
    ]
    timeline = svg.timeline(expiries, now=v.now, min_days=Limits().min_days)
    return layout(
        "Fleet",
        _summary(v)
        + (f'<ul class="fleetwide">{notes}</ul>' if notes else "")
        + table
        + f"<h3>Expiry timeline</h3>{timeline}"
        + f'<p class="asof">as of {escape(v.now.strftime("%Y-%m-%d %H:%M:%S UTC"))} (the CA\'s clock)</p>',
        active="fleet",
    )


def _gate(g: w.RootGateOut) -> str:
    rows = (
        f'<tr data-cluster="{escape(c.name)}">'
        + _cell("name", c.name)
        + _cell("ready", "ready" if c.ready else "waiting", "ok" if c.ready else "lag")
        + _cell("waiting_for", "; ".join(c.waiting_for) or "—")
        + _cell("ready_at", _opt(c.ready_at))
        + _cell("overridable", "yes" if c.overridable else "no")
        + "</tr>"
        for c in g.clusters
    )
    verdict = "ready" if g.ready else f"waits for {sum(1 for c in g.clusters if not c.ready)} cluster(s)"
    return (
        f'<section class="gate" data-root="{escape(g.root_id)}" data-phase="{escape(g.phase)}">'
        f"<h4>{escape(g.phase)} root {escape(g.root_id)}: {escape(verdict)}</h4>"
        + _table(["cluster", "state", "waiting for", "ready at", "force may override"], rows, "gate-clusters")
        + "</section>"
    )


def roots_page(v: FleetView) -> str:
    s = v.root_status
    rows = (
        f'<tr data-root="{escape(r.id)}">'
        + _cell("id", r.id)
        + _cell("status", r.status, r.status)
        + _cell("not_after", r.not_after)
        + "</tr>"
        for r in v.roots
    )
    gates = "".join(_gate(g) for g in s.gates) or "<p>No root phase is pending: every root is active or retired.</p>"
    body = (
        _table(["root", "status", "not after"], rows, "roots")
        + f"<p>Active root <code>{escape(s.active_root)}</code>; workload certificates live "
        f"{escape(duration_text(s.workload_cert_lifetime_s))}, margin {escape(duration_text(s.margin_s))}.</p>"
        + f"<h3>Root phases</h3>{gates}"
    )
    return layout("Roots", body, active="roots")


def graph_page(v: FleetView, selected: str | None) -> str:
    names = [c.name for c in v.clusters if c.status != "revoked"]
    chosen = selected if selected in names else None
    picture = svg.graph(names, v.edges, selected=chosen)
    if chosen is None:
        detail = "<p>Select a cluster to highlight what it exports (to whom) and imports (from whom).</p>"
    else:
        out = [e for e in v.edges if e.exporter == chosen]
        inn = [e for e in v.edges if e.consumer == chosen]
        detail = (
            f"<h3>{escape(chosen)}</h3>"
            + _table(
                ["exports", "to"],
                (f"<tr>{_cell('service', e.service)}{_cell('consumer', e.consumer)}</tr>" for e in out),
                "exports",
            )
            + _table(
                ["imports", "from"],
                (f"<tr>{_cell('service', e.service)}{_cell('exporter', e.exporter)}</tr>" for e in inn),
                "imports",
            )
        )
    return layout("Exports and imports", f'<div class="graphbox">{picture}</div>{detail}', active="graph")


def _audit_form(av: AuditView) -> str:
    f = av.filter
    options = "".join(
        f'<option value="{escape(a)}"{" selected" if a == f.action else ""}>{escape(a)}</option>'
        for a in ["", *av.actions]
    )
    return (
        '<form method="get" action="/ui/audit" class="filters">'
        f'<label>action <select name="action">{options}</select></label>'
        f'<label>actor contains <input name="actor" value="{escape(f.actor)}"></label>'
        f'<label>subject contains <input name="subject" value="{escape(f.subject)}"></label>'
        f'<label>show <input name="limit" type="number" min="1" max="1000" value="{f.limit}"></label>'
        '<button type="submit">Filter</button></form>'
    )


def audit_page(av: AuditView) -> str:
    rows = (
        f'<tr data-id="{e.id}">'
        + _cell("id", e.id)
        + _cell("at", e.at)
        + _cell("actor", e.actor)
        + _cell("action", e.action)
        + _cell("subject", e.subject)
        + f'<td data-field="details"><code>{escape(json.dumps(e.details, sort_keys=True))}</code></td></tr>'
        for e in av.entries
    )
    f = av.filter
    more = ""
    if av.scanned_from > 1:
        query = urlencode(
            {"action": f.action, "actor": f.actor, "subject": f.subject, "limit": f.limit, "before": av.scanned_from}
        )
        more = f'<p><a class="older" href="/ui/audit?{escape(query)}">older entries</a></p>'
    body = (
        _audit_form(av)
        + f'<p class="count">{len(av.entries)} matching entr{"y" if len(av.entries) == 1 else "ies"}, newest first</p>'
        + _table(["id", "at", "actor", "action", "subject", "details"], rows, "audit")
        + more
    )
    return layout("Audit log", body, active="audit")
