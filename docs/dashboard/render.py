#!/usr/bin/env python3
"""Render deploy/monitoring/nllb-dashboard.json from real scrapes.

Reads the JSON lines `tests/tests/monitoring.rs::dashboard_scenario` wrote
(`{"t_ms", "metrics"}` per scrape of a real agent's /metrics, `{"t_ms",
"event"}` per scenario step), evaluates every panel's own PromQL over them
and writes an HTML page of SVG charts laid out by the panels' gridPos.
make.sh screenshots it with headless Chromium.

Only the PromQL the dashboard uses is understood (selectors with label
matchers, rate/increase over a range, sum/min/max/count [by (...)],
histogram_quantile); anything else stops the script, so the picture never
shows a query it did not evaluate. Like Prometheus: a range needs two
samples, rate/increase handle counter resets and extrapolate to the window.

Usage: render.py DASHBOARD.json SCRAPES.jsonl OUT.html
"""

import html
import json
import math
import re
import sys

STEP_S = 1.0            # one point per second, like the scrapes
RATE_INTERVAL_S = 10.0  # $__rate_interval: Grafana uses >= 4 scrape intervals
PALETTE = ["#73bf69", "#f2cc0c", "#5794f2", "#ff780a", "#f2495c", "#b877d9", "#8ab8ff", "#ffb357"]

# ------------------------------------------------------------------ scrapes


def parse_exposition(text):
    """{(name, frozenset(labels.items())): value} of one scrape."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)', line)
        if not m:
            continue
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        out[(m.group(1), frozenset(labels.items()))] = value
    return out


def load(path):
    series, events, times = {}, [], []
    for line in open(path):
        rec = json.loads(line)
        t = rec["t_ms"] / 1000.0
        if "event" in rec:
            events.append((t, rec["event"]))
            continue
        times.append(t)
        for key, v in parse_exposition(rec["metrics"]).items():
            series.setdefault(key, []).append((t, v))
    return series, events, times

# ------------------------------------------------------------------- PromQL


def tokenize(expr):
    expr = expr.replace("$__rate_interval", f"{int(RATE_INTERVAL_S)}s")
    return re.findall(r'"(?:[^"\\]|\\.)*"|=~|!=|!~|[A-Za-z_:][A-Za-z0-9_:]*|\d+(?:\.\d+)?[smh]?|[(){}\[\],=]', expr)


class Parser:
    def __init__(self, expr):
        self.toks, self.i, self.expr = tokenize(expr), 0, expr

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want=None):
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise SystemExit(f"unsupported PromQL (wanted {want!r} at {tok!r}): {self.expr}")
        self.i += 1
        return tok

    def parse(self):
        node = self.expr_()
        if self.peek() is not None:
            raise SystemExit(f"unsupported PromQL (trailing {self.peek()!r}): {self.expr}")
        return node

    def expr_(self):
        tok = self.peek()
        if tok in ("sum", "min", "max", "count"):
            self.take()
            by = []
            if self.peek() == "by":
                self.take()
                by = self.labels()
            self.take("(")
            inner = self.expr_()
            self.take(")")
            return ("agg", tok, by, inner)
        if tok == "histogram_quantile":
            self.take()
            self.take("(")
            q = float(self.take())
            self.take(",")
            inner = self.expr_()
            self.take(")")
            return ("hq", q, inner)
        if tok in ("rate", "increase"):
            self.take()
            self.take("(")
            sel = self.selector()
            self.take("[")
            window = duration(self.take())
            self.take("]")
            self.take(")")
            return ("range", tok, sel, window)
        return ("sel", self.selector())

    def labels(self):
        self.take("(")
        out = []
        while self.peek() != ")":
            out.append(self.take())
            if self.peek() == ",":
                self.take()
        self.take(")")
        return out

    def selector(self):
        name = self.take()
        matchers = []
        if self.peek() == "{":
            self.take()
            while self.peek() != "}":
                label, op, value = self.take(), self.take(), self.take()
                value = json.loads(value).replace("$instance", ".*")
                matchers.append((label, op, value))
                if self.peek() == ",":
                    self.take()
            self.take("}")
        return (name, matchers)


def duration(tok):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh])", tok)
    if not m:
        raise SystemExit(f"unsupported duration {tok!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def matches(labels, matchers):
    d = dict(labels)
    for label, op, value in matchers:
        have = d.get(label, "")
        ok = {"=": have == value, "!=": have != value,
              "=~": re.fullmatch(value, have) is not None, "!~": re.fullmatch(value, have) is None}[op]
        if not ok:
            return False
    return True


def select(series, sel):
    name, matchers = sel
    return {labels: pts for (n, labels), pts in series.items() if n == name and matches(labels, matchers)}


def instant(pts, t):
    """The latest sample at or before t, if not stale (5 scrapes)."""
    best = None
    for ts, v in pts:
        if ts <= t:
            best = (ts, v)
        else:
            break
    if best and t - best[0] <= 5 * STEP_S:
        return best[1]
    return None


def range_value(pts, t, window, func):
    """rate/increase as Prometheus computes them (extrapolated delta)."""
    inside = [(ts, v) for ts, v in pts if t - window < ts <= t]
    if len(inside) < 2:
        return None
    delta, prev = 0.0, inside[0][1]
    for _, v in inside[1:]:
        delta += v - prev if v >= prev else v
        prev = v
    first_t, last_t = inside[0][0], inside[-1][0]
    sampled = last_t - first_t
    avg = sampled / (len(inside) - 1)
    to_start, to_end = first_t - (t - window), t - last_t
    if delta > 0 and inside[0][1] >= 0:
        to_zero = sampled * (inside[0][1] / delta)
        to_start = min(to_start, to_zero)
    ext = sampled + (to_start if to_start < avg * 1.1 else avg / 2) + (to_end if to_end < avg * 1.1 else avg / 2)
    delta *= ext / sampled
    return delta / window if func == "rate" else delta


def quantile(q, buckets):
    buckets = sorted(buckets, key=lambda b: b[0])
    if len(buckets) < 2 or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0)
        prev_le, prev_c = le, c
    return None


def evaluate(node, series, t):
    """{labels (frozenset): value} at time t."""
    kind = node[0]
    if kind == "sel":
        out = {}
        for labels, pts in select(series, node[1]).items():
            v = instant(pts, t)
            if v is not None:
                out[labels] = v
        return out
    if kind == "range":
        _, func, sel, window = node
        out = {}
        for labels, pts in select(series, sel).items():
            v = range_value(pts, t, window, func)
            if v is not None:
                out[labels] = v
        return out
    if kind == "agg":
        _, op, by, inner = node
        groups = {}
        for labels, v in evaluate(inner, series, t).items():
            key = frozenset((k, val) for k, val in labels if k in by)
            groups.setdefault(key, []).append(v)
        fn = {"sum": sum, "min": min, "max": max, "count": len}[op]
        return {k: float(fn(vs)) for k, vs in groups.items()}
    if kind == "hq":
        _, q, inner = node
        groups = {}
        for labels, v in evaluate(inner, series, t).items():
            d = dict(labels)
            le = float(d.pop("le"))
            groups.setdefault(frozenset(d.items()), []).append((le, v))
        out = {}
        for k, b in groups.items():
            v = quantile(q, b)
            if v is not None:
                out[k] = v
        return out
    raise SystemExit(f"unknown node {kind}")

# ---------------------------------------------------------------- rendering


def legend(fmt, labels):
    d = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: d.get(m.group(1), ""), fmt) or "value"


def fmt_value(v, unit):
    if v is None:
        return "-"
    if unit == "s":
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "cps":
        return f"{v:.1f}/s"
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:.2f}"


def panel_series(panel, series, times):
    out = []
    for target in panel["targets"]:
        node = Parser(target["expr"]).parse()
        lines = {}
        for t in times:
            for labels, v in evaluate(node, series, t).items():
                lines.setdefault(labels, []).append((t, v))
        for labels, pts in sorted(lines.items(), key=lambda kv: legend(target["legendFormat"], kv[0])):
            out.append((legend(target["legendFormat"], labels), pts))
    return out


def svg_timeseries(panel, data, t0, t1, events, w, h):
    unit = panel["fieldConfig"]["defaults"].get("unit")
    left, right, top, bottom = 58, 10, 8, 20
    pw, ph = w - left - right, h - top - bottom
    vals = [v for _, pts in data for _, v in pts]
    lo = panel["fieldConfig"]["defaults"].get("min", 0)
    hi = panel["fieldConfig"]["defaults"].get("max", max(vals) if vals else 1)
    hi = hi if hi > lo else lo + 1
    hi *= 1.0 if "max" in panel["fieldConfig"]["defaults"] else 1.1
    x = lambda t: left + (t - t0) / max(t1 - t0, 1) * pw
    y = lambda v: top + ph - (v - lo) / (hi - lo) * ph
    step = panel["fieldConfig"]["defaults"].get("custom", {}).get("lineInterpolation") == "stepAfter"
    parts = [f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">']
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#2c3235"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" class="ax">{fmt_value(v, unit)}</text>')
    for s in range(0, int(t1 - t0) + 1, 30):
        parts.append(f'<text x="{x(t0 + s):.1f}" y="{h - 4}" text-anchor="middle" class="ax">{s} s</text>')
    for i, (t, name) in enumerate(events):
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{top + ph}" stroke="#8e8e8e" stroke-dasharray="3,3"/>')
    for i, (name, pts) in enumerate(data):
        color = PALETTE[i % len(PALETTE)]
        d, prev = [], None
        for t, v in pts:
            if prev is not None and t - prev[0] > 3 * STEP_S:
                d.append(f"M{x(t):.1f},{y(v):.1f}")
            elif prev is None:
                d.append(f"M{x(t):.1f},{y(v):.1f}")
            else:
                if step:
                    d.append(f"L{x(t):.1f},{y(prev[1]):.1f}")
                d.append(f"L{x(t):.1f},{y(v):.1f}")
            prev = (t, v)
        parts.append(f'<path d="{" ".join(d)}" fill="none" stroke="{color}" stroke-width="2"/>')
    parts.append("</svg>")
    keys = "".join(f'<span class="key"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{html.escape(n)}</span>'
                   for i, (n, _) in enumerate(data))
    return "".join(parts) + f'<div class="legend">{keys}</div>'


def stat_color(panel, v):
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    color = "#5794f2"
    for s in steps:
        if s["value"] is None or (v is not None and v >= s["value"]):
            color = s["color"]
    return {"green": "#37872d", "red": "#c4162a", "orange": "#fa6400", "blue": "#1f60c4"}.get(color, color)


def stat_text(panel, v):
    for m in panel["fieldConfig"]["defaults"].get("mappings", []):
        text = m.get("options", {}).get(fmt_value(v, None), {}).get("text")
        if text:
            return text
    return fmt_value(v, panel["fieldConfig"]["defaults"].get("unit"))


def main():
    dashboard_path, scrapes_path, out_path = sys.argv[1:4]
    dashboard = json.load(open(dashboard_path))
    series, events, times = load(scrapes_path)
    if not times:
        raise SystemExit("no scrapes")
    t0, t1 = times[0], times[-1]
    grid = 56  # px per gridPos column (24 columns)
    row = 34   # px per gridPos row
    cells = []
    for p in dashboard["panels"]:
        g = p["gridPos"]
        w, h = g["w"] * grid - 8, g["h"] * row - 8
        data = panel_series(p, series, times)
        if p["type"] == "timeseries":
            body = svg_timeseries(p, data, t0, t1, events, w - 16, h - 64)
        else:
            body = '<div class="stats">' + "".join(
                f'<div class="stat" style="background:{stat_color(p, pts[-1][1] if pts else None)}">'
                f'<b>{html.escape(stat_text(p, pts[-1][1] if pts else None))}</b><span>{html.escape(n)}</span></div>'
                for n, pts in data) + "</div>"
        cells.append(f'<div class="panel" style="left:{g["x"] * grid}px;top:{g["y"] * row}px;width:{w}px;height:{h}px">'
                     f'<h3>{html.escape(p["title"])}</h3>{body}</div>')
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"]) * row
    steps = " · ".join(f"{t - t0:.0f} s {html.escape(e)}" for t, e in events)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ background:#111217; color:#ccccdc; font:13px sans-serif; margin:16px; width:{24 * grid}px }}
h1 {{ font-size:18px; margin:0 0 4px }} p {{ margin:0 0 12px; color:#9fa7b3 }}
.board {{ position:relative; height:{height}px }}
.panel {{ position:absolute; background:#181b1f; border:1px solid #2c3235; border-radius:3px; padding:8px; box-sizing:border-box; overflow:hidden }}
h3 {{ font-size:13px; margin:0 0 6px; color:#d8d9da }}
.ax {{ fill:#8e8e8e; font-size:10px }}
.legend {{ font-size:11px; margin-top:2px }} .key {{ margin-right:12px; white-space:nowrap }}
.key i {{ display:inline-block; width:12px; height:3px; margin-right:4px; vertical-align:middle }}
.stats {{ display:flex; gap:6px; height:calc(100% - 24px) }}
.stat {{ flex:1; border-radius:3px; display:flex; flex-direction:column; justify-content:center; align-items:center; color:#fff }}
.stat b {{ font-size:24px }} .stat span {{ font-size:11px }}
</style></head><body>
<h1>{html.escape(dashboard["title"])} dashboard (deploy/monitoring/nllb-dashboard.json)</h1>
<p>Every panel's own query, evaluated over a real agent's /metrics scraped every second
({len(times)} scrapes, {t1 - t0:.0f} s); dashed lines: {steps}. Stats show the last value.</p>
<div class="board">{"".join(cells)}</div></body></html>"""
    open(out_path, "w").write(page)


if __name__ == "__main__":
    main()
