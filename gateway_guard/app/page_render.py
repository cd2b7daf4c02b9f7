"""The status page's HTML, drawn from the ``/guard/capacity`` and ``/guard/history`` JSON.

``static/page.js`` draws the same markup in the browser from the same JSON: keep the two in step (the browser
test checks that both show the same ``data-k`` paths). Every number carries its JSON path in ``data-k``
(``["c", ...]`` capacity, ``["h", ...]`` history); times ("since", "seconds ago") are shown as UTC clock times.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from html import escape
from typing import Any

CHART_W, CHART_H = 360, 100
CHART_MIN_SPAN = 300.0

Path = list[str]


def _k(path: Path) -> str:
    return escape(json.dumps(path), quote=True)


def _dk(path: Path | None) -> str:
    return "" if path is None else f' data-k="{_k(path)}"'


def fmt(value: Any) -> str:
    """How a JSON value reads on the page (the browser test compares with this)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def num(path: Path, value: Any) -> str:
    return f'<b data-k="{_k(path)}">{escape(fmt(value))}</b>'


def utc(t: float | None) -> str:
    if t is None:
        return "—"
    return f'<time datetime="{time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))}">' + time.strftime(
        "%H:%M:%S", time.gmtime(t)
    ) + " UTC</time>"


def bar(label: str, in_flight: int, queued: int, limit: int | None, scale: int, cap: int | None = None) -> str:
    """An SVG meter: in flight (solid) and queued (light) against ``limit``; ``cap..limit`` shaded (headroom)."""
    scale = max(scale, limit or 0, in_flight + queued, 1)

    def x(v: float) -> str:
        return f"{100 * v / scale:.2f}"

    name = f"{label} {in_flight} in flight" if limit is None else f"{label} {in_flight} of {limit} in flight"
    name += (f", {queued} queued" if queued else "") + (" (no cap of its own)" if limit is None else "")
    parts = [f'<rect class="room" x="0" y="0" width="{x(limit or scale)}" height="10"/>']
    if cap is not None and limit is not None and cap < limit:
        parts.append(f'<rect class="headroom" x="{x(cap)}" y="0" width="{x(limit - cap)}" height="10"/>')
    parts.append(f'<rect class="inflight" x="0" y="0" width="{x(in_flight)}" height="10"/>')
    parts.append(f'<rect class="queued" x="{x(in_flight)}" y="0" width="{x(queued)}" height="10"/>')
    return (
        f'<svg class="bar" viewBox="0 0 100 10" preserveAspectRatio="none" role="meter" aria-label="{escape(name)}"'
        f' aria-valuemin="0" aria-valuemax="{limit or scale}" aria-valuenow="{in_flight}">{"".join(parts)}</svg>'
    )


def upstream_state(
    name: str, up: Mapping[str, Any], hist: Mapping[str, Any], now: float
) -> tuple[str, Path | None, float | None, str | None, Path | None]:
    """(state, its path, since as wall-clock seconds, detail, its path): the capacity view's ``state``
    (``state_since_s`` seconds ago, ``state_detail``) when it has one, else the history's."""
    if isinstance(up.get("state"), str):
        ago = up.get("state_since_s")
        since = now - ago if isinstance(ago, (int, float)) else None
        p = ["c", "upstreams", name]
        return up["state"], [*p, "state"], since, up.get("state_detail"), [*p, "state_detail"]
    h = hist.get("upstreams", {}).get(name)
    if h is None:  # not sampled yet
        return "unknown", None, None, None, None
    p = ["h", "upstreams", name]
    return h["state"], [*p, "state"], h.get("since"), h.get("detail"), [*p, "detail"]


def chart(name: str, points: list[list[float]], now: float, window: float) -> str:
    """In flight, queued and limit per history step; x spans the last hour, or the time since the first step
    (at least ``CHART_MIN_SPAN`` s) while the guard has run for less."""
    top = max([1.0] + [max(p[3], p[1], p[2]) for p in points])
    first = points[0][0] if points else now
    span = min(window, max(CHART_MIN_SPAN, now - first))

    def line(i: int) -> str:
        xy = []
        for p in [*points, [now, *points[-1][1:]]] if points else []:  # the last step lasts until now
            x = (p[0] - (now - span)) / span * CHART_W
            xy.append(f"{max(0.0, x):.1f},{CHART_H - p[i] / top * (CHART_H - 4):.1f}")
        return " ".join(xy)

    lines = "".join(
        f'<polyline class="{cls}" points="{line(i)}"/>' for i, cls in ((3, "limit"), (2, "queued"), (1, "inflight"))
    )
    when = "last hour" if span >= window else f"since {utc(first)}"
    return (
        f'<figure class="chart"><svg viewBox="0 0 {CHART_W} {CHART_H}" preserveAspectRatio="none" role="img"'
        f' aria-label="{escape(name)}: in flight, queued and limit over the last hour">{lines}</svg>'
        f'<figcaption><span class="key inflight">in flight</span> <span class="key queued">queued</span>'
        f" <span class=\"key limit\">limit</span> · {when}, top {escape(fmt(top))}</figcaption></figure>"
    )


def _counts(p: Path, v: Mapping[str, Any]) -> str:
    queued = f" · {num([*p, 'queued'], v['queued'])} queued"
    if v["limit"] is None:  # a profile with no cap of its own
        return f"{num([*p, 'in_flight'], v['in_flight'])} in flight{queued} · no cap of its own"
    return (
        f"{num([*p, 'in_flight'], v['in_flight'])} of {num([*p, 'limit'], v['limit'])} in flight{queued}"
        f" · {num([*p, 'free'], v['free'])} free"
    )


def _views(title: str, name: str, kind: str, views: Mapping[str, Any], scale: int) -> str:
    rows = []
    for key, v in views.items():
        p = ["c", "upstreams", name, kind, key]
        label = key if kind == "lanes" else f"profile {key}"
        rows.append(
            f'<li><span class="name">{escape(key)}</span>'
            f"{bar(label, v['in_flight'], v['queued'], v['limit'], scale)}"
            f'<span class="nums">{_counts(p, v)}</span></li>'
        )
    return f'<h3>{title}</h3><ul class="views">{"".join(rows)}</ul>' if rows else ""


def render_upstream(name: str, up: Mapping[str, Any], hist: Mapping[str, Any]) -> str:
    p = ["c", "upstreams", name]
    state, state_path, since, detail, detail_path = upstream_state(name, up, hist, hist.get("now", 0.0))
    h = hist.get("upstreams", {}).get(name, {})
    limit = up["limit"]
    batch = up.get("lanes", {}).get("batch")
    cap = batch["limit"] if batch and batch.get("limit") is not None else None
    out = [
        f'<section class="upstream" data-upstream="{escape(name)}"><h2>{escape(name)} '
        f'<span class="state {escape(state)}"{_dk(state_path)}>{escape(state)}</span>'
        f" <small>since {utc(since)}</small></h2>",
    ]
    if detail:
        out.append(f'<p class="detail"{_dk(detail_path)}>{escape(detail)}</p>')
    if up.get("held") is not None:  # the upstream is not up: nothing is granted, requests wait in their lanes
        out.append(f'<p class="held">held {num([*p, "held"], up["held"])}: requests wait until it is back</p>')
    reason = up.get("limit_reason")
    out.append(
        f'<p class="summary">limit {num([*p, "limit"], limit)}'
        f' (<span data-k="{_k([*p, "limit_reason"])}">{escape(fmt(reason))}</span>)'
        f' · {num([*p, "in_flight"], up["in_flight"])} in flight · {num([*p, "queued"], up["queued"])} queued'
        f' · {num([*p, "free"], up["free"])} free</p>'
    )
    out.append(bar("all lanes", up["in_flight"], up["queued"], limit, limit, cap))
    if batch is not None:
        lp = [*p, "lanes", "batch"]
        out.append(
            f'<p class="batch">free batch slots {num([*lp, "free"], batch["free"])}'
            f" (batch may hold {num([*lp, 'limit'], batch['limit'])} of {num([*p, 'limit'], limit)})</p>"
        )
    out.append(_views("lanes", name, "lanes", up.get("lanes", {}), limit))
    out.append(_views("profiles", name, "profiles", up.get("profiles", {}), limit))
    if up.get("max_context_tokens") is not None:
        out.append(
            f'<p class="tokens">context tokens in flight {num([*p, "tokens_in_flight"], up["tokens_in_flight"])}'
            f' of {num([*p, "max_context_tokens"], up["max_context_tokens"])}</p>'
        )
    out.append(_reserved(p, up.get("reserved")))
    moves = up.get("limit_history") or []  # "seconds ago" shown as the time it happened
    now = hist.get("now", 0.0)
    if moves:
        items = "".join(
            f"<li>{utc(round(now - m['ago_s']))}: limit"
            f" {num([*p, 'limit_history', str(i), 'limit'], m['limit'])}"
            f' (<span data-k="{_k([*p, "limit_history", str(i), "reason"])}">{escape(fmt(m["reason"]))}</span>)</li>'
            for i, m in enumerate(moves)
        )
        out.append(f'<h3>limit moves</h3><ul class="moves">{items}</ul>')
    out.append(chart(name, h.get("points", []), hist.get("now", 0.0), hist.get("window_s", 3600.0)))
    out.append("</section>")
    return "".join(out)


def _reserved(p: Path, reserved: Any) -> str:
    """Reservations (guard-dispatch's booked slots), when there are any."""
    if not reserved or (isinstance(reserved, Mapping) and not any(reserved.values())):
        return ""
    if isinstance(reserved, Mapping):
        items = "".join(
            f"<li>{escape(str(k))}: {num([*p, 'reserved', str(k)], v)}</li>"
            for k, v in reserved.items()
            if not isinstance(v, (Mapping, list))
        )
        return f'<h3>reserved</h3><ul class="reserved">{items}</ul>'
    return f'<p class="reserved">reserved {num([*p, "reserved"], reserved)}</p>'


def render_refusals(hist: Mapping[str, Any]) -> str:
    rows = []
    for i, r in enumerate(hist.get("refusals", [])):
        p = ["h", "refusals", str(i)]
        cells = "".join(
            f'<td data-k="{_k([*p, key])}">{escape(fmt(r.get(key)))}</td>'
            for key in ("status", "lane", "profile", "upstream", "reason")
        )
        rows.append(f"<tr><td>{utc(r.get('at'))}</td>{cells}</tr>")
    if not rows:
        return '<p class="empty">No refusals since the guard started.</p>'
    head = "<tr><th>when</th><th>status</th><th>lane</th><th>profile</th><th>upstream</th><th>reason</th></tr>"
    table = f'<table class="refusals"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def render_tokens(hist: Mapping[str, Any]) -> str:
    tpm = hist.get("tokens_per_minute", {})
    if not tpm:
        return '<p class="empty">No tokens in the last minute.</p>'
    rows = "".join(
        f"<tr><td>{escape(k)}</td><td>{num(['h', 'tokens_per_minute', k], v)}</td></tr>" for k, v in tpm.items()
    )
    head = "<tr><th>profile</th><th>tokens / min</th></tr>"
    return f'<table class="tpm"><thead>{head}</thead><tbody>{rows}</tbody></table>'


def render_body(cap: Mapping[str, Any], hist: Mapping[str, Any]) -> str:
    ups = "".join(render_upstream(n, u, hist) for n, u in cap.get("upstreams", {}).items())
    return (
        f'<p class="overall">free batch slots overall {num(["c", "free"], cap.get("free"))}'
        f" · snapshot at {utc(hist.get('now'))}</p>{ups}"
        f'<section class="recent"><h2>Last refusals</h2>{render_refusals(hist)}</section>'
        f'<section class="recent"><h2>Tokens per minute</h2>{render_tokens(hist)}</section>'
    )


def render_page(cap: Mapping[str, Any], hist: Mapping[str, Any]) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>gateway_guard status</title>
<link rel="stylesheet" href="static/page.css">
<script src="static/page.js" defer></script>
</head><body>
<header><h1>gateway_guard</h1><span id="mode" class="mode" role="status">snapshot</span></header>
<main id="live" aria-live="off">{render_body(cap, hist)}</main>
<footer>JSON: <a href="capacity">/guard/capacity</a> · <a href="history">/guard/history</a>
· <a href="ready">/guard/ready</a> · <a href="../metrics">/metrics</a></footer>
</body></html>
"""
