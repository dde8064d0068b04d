"""The dashboard's pictures as SVG strings (pure): the export/import graph between clusters and the
expiry timeline. Every text and attribute value is escaped; styling is by class only (the page's
Content-Security-Policy allows no inline style), the stylesheet is /ui/static/ui.css."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from html import escape
from urllib.parse import quote

from ca_server.ui.view import Edge

NODE_R = 26
GRAPH_W, GRAPH_H = 640, 460
TIMELINE_W, LABEL_W, ROW_H = 760, 170, 22


def _attrs(**kv: object) -> str:
    return " ".join(f'{k.rstrip("_").replace("_", "-")}="{escape(str(v))}"' for k, v in kv.items())


def _positions(names: list[str]) -> dict[str, tuple[float, float]]:
    """Each cluster on a circle, by name, clockwise from the top."""
    cx, cy = GRAPH_W / 2, GRAPH_H / 2
    if len(names) == 1:
        return {names[0]: (cx, cy)}
    r = min(cx, cy) - NODE_R - 30
    step = 2 * math.pi / max(1, len(names))
    return {
        n: (round(cx + r * math.sin(i * step), 1), round(cy - r * math.cos(i * step), 1)) for i, n in enumerate(names)
    }


def _edge_class(exporter: str, consumer: str, selected: str | None) -> str:
    if selected is None:
        return "edge"
    if exporter == selected:
        return "edge out"
    if consumer == selected:
        return "edge in"
    return "edge dim"


def _segment(a: tuple[float, float], b: tuple[float, float], shift: float) -> tuple[float, ...]:
    """The line from node ``a`` to node ``b`` between their rims, moved ``shift`` to its right (so
    the two directions between one pair of clusters do not overlap)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    length = math.hypot(dx, dy) or 1.0
    ux, uy = dx / length, dy / length
    nx, ny = -uy * shift, ux * shift
    return (
        round(a[0] + ux * NODE_R + nx, 1),
        round(a[1] + uy * NODE_R + ny, 1),
        round(b[0] - ux * (NODE_R + 4) + nx, 1),
        round(b[1] - uy * (NODE_R + 4) + ny, 1),
    )


def _label_at(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """Where an arrow's label goes: a third of the way from its exporter, off to its right (the
    labels of the two directions between a pair then stand apart)."""
    dx, dy = x2 - x1, y2 - y1
    length = math.hypot(dx, dy) or 1.0
    return round(x1 + dx / 3 - dy / length * 12, 1), round(y1 + dy / 3 + dx / length * 12 + 4, 1)


def graph(names: list[str], edges: list[Edge], *, selected: str | None = None) -> str:
    """Clusters as nodes (each a link selecting it), one arrow per exporter → consumer pair labelled
    with the services; with ``selected``, its exports are class ``out``, its imports ``in``, the
    rest ``dim``."""
    pos = _positions(sorted(names))
    services: dict[tuple[str, str], list[str]] = defaultdict(list)
    for e in edges:
        if e.exporter in pos and e.consumer in pos:
            services[(e.exporter, e.consumer)].append(e.service)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" {_attrs(viewBox=f"0 0 {GRAPH_W} {GRAPH_H}", class_="graph")}'
        ' role="img" aria-label="exports and imports between clusters">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>',
    ]
    for (src, dst), svcs in sorted(services.items()):
        x1, y1, x2, y2 = _segment(pos[src], pos[dst], 5 if (dst, src) in services else 0)
        label = ", ".join(sorted(svcs))
        cls = _edge_class(src, dst, selected)
        lx, ly = _label_at(x1, y1, x2, y2)
        parts.append(
            f"<g {_attrs(class_=cls, data_from=src, data_to=dst, data_services=label)}>"
            f"<title>{escape(f'{src} exports {label} to {dst}')}</title>"
            f'<line {_attrs(x1=x1, y1=y1, x2=x2, y2=y2)} marker-end="url(#arrow)"/>'
            f"<text {_attrs(x=lx, y=ly)}>{escape(label)}</text></g>"
        )
    for name, (x, y) in pos.items():
        cls = "node selected" if name == selected else "node"
        parts.append(
            f"<a {_attrs(href=f'/ui/graph?cluster={quote(name)}', class_=cls, data_cluster=name)}>"
            f"<circle {_attrs(cx=x, cy=y, r=NODE_R)}/>"
            f"<text {_attrs(x=x, y=y + NODE_R + 16)}>{escape(name)}</text></a>"
        )
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class Expiry:
    label: str
    not_after: datetime
    kind: str  # "intermediate" or "root"


def days_left(end: datetime, now: datetime) -> float:
    return (end - now).total_seconds() / 86400


def timeline(items: list[Expiry], *, now: datetime, min_days: float) -> str:
    """One bar per item from now to its expiry, on a shared day axis; bars with fewer than
    ``min_days`` left are class ``short`` (the threshold of `fleet check`), expired ones ``expired``,
    ones past the axis's end ``beyond`` (cut at the end, their days still written);
    a dashed line marks ``min_days`` from now."""
    # the axis fits the intermediates (months); a root's bar (years) runs off its end, class "beyond"
    fitted = [i for i in items if i.kind == "intermediate"] or items
    span = max([1.0, min_days * 1.1, *(days_left(i.not_after, now) * 1.05 for i in fitted)])
    scale = (TIMELINE_W - LABEL_W - 60) / span
    height = 30 + ROW_H * max(1, len(items))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" {_attrs(viewBox=f"0 0 {TIMELINE_W} {height}", class_="timeline")}'
        ' role="img" aria-label="expiry timeline">'
    ]
    for k in range(5):
        day = span * k / 4
        x = round(LABEL_W + day * scale, 1)
        parts.append(f'<line class="tick" {_attrs(x1=x, y1=0, x2=x, y2=height - 12)}/>')
        parts.append(f'<text class="ticklabel" {_attrs(x=x, y=height - 1)}>{day:.0f}d</text>')
    x = round(LABEL_W + min_days * scale, 1)
    parts.append(f'<line class="minimum" {_attrs(x1=x, y1=0, x2=x, y2=height - 12)}><title>minimum</title></line>')
    for row, item in enumerate(sorted(items, key=lambda i: i.not_after)):
        left = days_left(item.not_after, now)
        cls = "expired" if left < 0 else "short" if left < min_days else "ok"
        cls += " beyond" if left > span else ""
        y = 8 + row * ROW_H
        width = round(min(max(0.0, left), span) * scale, 1)
        parts.append(
            f"<g {_attrs(class_=f'bar {item.kind} {cls}', data_label=item.label, data_days=f'{left:.1f}')}>"
            f'<text class="label" {_attrs(x=LABEL_W - 6, y=y + 12)}>{escape(item.label)}</text>'
            f"<rect {_attrs(x=LABEL_W, y=y, width=width, height=ROW_H - 6)}/>"
            f'<text class="days" {_attrs(x=LABEL_W + width + 4, y=y + 12)}>{left:.1f} d</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)
