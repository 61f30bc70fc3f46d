"""Inline SVG charts rendered on the server: no JavaScript, no external assets.

Every label is escaped; charts use presentation attributes only (no ``style``), so the app's
Content-Security-Policy can forbid inline styles and scripts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from markupsafe import Markup, escape

KEPT = "#7a9cc6"
FLAGGED = "#d9534f"
BEFORE = "#9aa5b1"
AFTER = "#2f6fb0"
LINE = "#333"


def duration(seconds: float | None) -> str:
    """Seconds as a human-readable duration: ``45 s``, ``3 min 20 s``, ``2 h 05 min``."""
    try:
        s = float(seconds)  # type: ignore[arg-type]
    except Exception:  # None, jinja2 Undefined, text
        return "–"
    if math.isnan(s) or s < 0:
        return "–"
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h:02d} h"


def fmt(value: float | None, digits: int = 3) -> str:
    """A compact number: 4 significant digits, scientific for tiny/huge magnitudes."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except Exception:  # None, jinja2 Undefined, text
        return "–"
    if math.isnan(v):
        return "–"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{digits}e}"
    return f"{v:.{digits + 1}g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def histogram(
    values: Sequence[float], flagged: Sequence[bool], threshold: float | None = None,
    bins: int = 40, title: str = "score", threshold_label: str = "flag threshold",
    unit: str = "samples",
) -> Markup:  # fmt: skip
    """Stacked histogram of scores: kept below, flagged on top (red), counted in ``unit``."""
    v = np.asarray(values, dtype=np.float64)
    f = np.asarray(flagged, dtype=bool)
    ok = np.isfinite(v)
    v, f = v[ok], f[ok]
    w, h, ml, mr, mt, mb = 620, 250, 52, 16, 40, 40
    if v.size == 0:
        return Markup('<p class="muted">no scores recorded for this run</p>')
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    kept_c, _ = np.histogram(v[~f], edges)
    flag_c, _ = np.histogram(v[f], edges)
    top = max(1, int((kept_c + flag_c).max()))
    pw, ph = w - ml - mr, h - mt - mb

    def x(val: float) -> float:
        return ml + (val - lo) / (hi - lo) * pw

    def y(count: float) -> float:
        return mt + ph - count / top * ph

    parts = [f'<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
             f'aria-label="{escape(title)} histogram">']  # fmt: skip
    for t in _ticks(0, top, 4):
        parts.append(f'<line x1="{ml}" x2="{w - mr}" y1="{y(t):.1f}" y2="{y(t):.1f}" '
                     f'stroke="#e5e5e5"/><text x="{ml - 6}" y="{y(t) + 4:.1f}" '
                     f'text-anchor="end" font-size="11">{t:g}</text>')  # fmt: skip
    bw = pw / bins
    for i in range(bins):
        x0 = ml + i * bw
        if kept_c[i]:
            parts.append(f'<rect x="{x0 + 0.5:.1f}" y="{y(kept_c[i]):.1f}" width="{bw - 1:.1f}" '
                         f'height="{y(0) - y(kept_c[i]):.1f}" fill="{KEPT}"/>')  # fmt: skip
        if flag_c[i]:
            total = kept_c[i] + flag_c[i]
            parts.append(f'<rect x="{x0 + 0.5:.1f}" y="{y(total):.1f}" width="{bw - 1:.1f}" '
                         f'height="{y(kept_c[i]) - y(total):.1f}" fill="{FLAGGED}"/>')  # fmt: skip
    for t in _ticks(lo, hi, 6):
        parts.append(f'<text x="{x(t):.1f}" y="{h - mb + 16}" text-anchor="middle" '
                     f'font-size="11">{escape(fmt(t, 2))}</text>')  # fmt: skip
    parts.append(f'<line x1="{ml}" x2="{w - mr}" y1="{y(0):.1f}" y2="{y(0):.1f}" '
                 f'stroke="{LINE}"/>')  # fmt: skip
    if threshold is not None and lo <= threshold <= hi:
        left = x(threshold) < w - 260  # label right of the line, unless near the right edge
        parts.append(f'<line x1="{x(threshold):.1f}" x2="{x(threshold):.1f}" y1="{mt - 4}" '
                     f'y2="{y(0):.1f}" stroke="{FLAGGED}" stroke-dasharray="4 3"/>'
                     f'<text x="{x(threshold) + (4 if left else -4):.1f}" y="{mt - 10}" '
                     f'text-anchor="{"start" if left else "end"}" '
                     f'font-size="11" fill="{FLAGGED}">{escape(threshold_label)} '
                     f'{escape(fmt(threshold, 2))}</text>')  # fmt: skip
    parts.append(f'<text x="{ml + pw / 2}" y="{h - 6}" text-anchor="middle" font-size="12">'
                 f'{escape(title)} (higher = riskier)</text>')  # fmt: skip
    parts.append(_legend([(KEPT, f"kept {unit} ({int((~f).sum())})"),
                          (FLAGGED, f"flagged ({int(f.sum())})")],
                         w - mr - 200 - 7 * len(unit), 14))  # fmt: skip
    parts.append("</svg>")
    return Markup("".join(parts))


def _legend(items: list[tuple[str, str]], x0: float, y0: float) -> str:
    out, x = [], x0
    for color, label in items:
        out.append(
            f'<rect x="{x}" y="{y0 - 9}" width="10" height="10" fill="{color}"/>'
            f'<text x="{x + 14}" y="{y0}" font-size="11">{escape(label)}</text>'
        )
        x += 22 + 7 * len(label)
    return "".join(out)


@dataclass
class Series:
    name: str
    values: Sequence[float | None]
    color: str


def hbars(
    labels: Sequence[str], series: Sequence[Series], *, ref: float | None = None,
    ref_label: str = "", highlight: Sequence[bool] | None = None, width: int = 560,
    percent: bool = False, title: str = "",
) -> Markup:  # fmt: skip
    """Horizontal grouped bars, one row per label, with an optional vertical reference line.

    ``highlight[i]`` draws row ``i``'s first series in the flagged colour (e.g. a group below
    the four-fifths line).
    """
    rows, k = len(labels), len(series)
    bar, gap = 14, 10
    label_w = min(220, 12 + 7 * max((len(str(s)) for s in labels), default=4))
    ml, mr, mt = label_w, 70, 26 if (k > 1 or title) else 8
    row_h = k * bar + gap
    h = mt + rows * row_h + 24
    vals = [float(v) for s in series for v in s.values if v is not None and math.isfinite(v)]
    hi = max([*vals, ref or 0.0, 1e-12])
    lo = min([*vals, 0.0])
    hi = hi * 1.08 if hi > 0 else 1.0
    pw = width - ml - mr

    def x(val: float) -> float:
        return ml + (val - lo) / (hi - lo) * pw

    def show(val: float) -> str:
        return f"{100 * val:.1f}%" if percent else fmt(val)

    parts = [f'<svg class="chart" viewBox="0 0 {width} {h}" width="{width}" height="{h}" '
             f'role="img" aria-label="{escape(title or "bar chart")}">']  # fmt: skip
    if title:
        parts.append(f'<text x="{ml}" y="14" font-size="12" font-weight="bold">'
                     f'{escape(title)}</text>')  # fmt: skip
    if k > 1:
        parts.append(_legend([(s.color, s.name) for s in series],
                             ml + (8 * len(title) + 12 if title else 0), 14))  # fmt: skip
    for i, label in enumerate(labels):
        y0 = mt + i * row_h
        parts.append(f'<text x="{ml - 8}" y="{y0 + k * bar / 2 + 4}" text-anchor="end" '
                     f'font-size="12">{escape(str(label))}</text>')  # fmt: skip
        for j, s in enumerate(series):
            v = s.values[i]
            yb = y0 + j * bar
            if v is None or not math.isfinite(float(v)):
                parts.append(f'<text x="{ml + 4}" y="{yb + bar - 3}" font-size="11">n/a</text>')
                continue
            color = FLAGGED if (j == 0 and highlight is not None and highlight[i]) else s.color
            x0, x1 = sorted((x(0.0), x(float(v))))
            parts.append(f'<rect x="{x0:.1f}" y="{yb + 1}" width="{max(x1 - x0, 1):.1f}" '
                         f'height="{bar - 2}" fill="{color}"><title>{escape(s.name)}: '
                         f'{escape(show(float(v)))}</title></rect>'
                         f'<text x="{x1 + 4:.1f}" y="{yb + bar - 3}" font-size="11">'
                         f'{escape(show(float(v)))}</text>')  # fmt: skip
    base = mt + rows * row_h
    parts.append(f'<line x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{mt - 2}" y2="{base}" '
                 f'stroke="{LINE}"/>')  # fmt: skip
    if ref is not None and math.isfinite(ref):
        parts.append(f'<line x1="{x(ref):.1f}" x2="{x(ref):.1f}" y1="{mt - 4}" y2="{base + 4}" '
                     f'stroke="{FLAGGED}" stroke-dasharray="5 3" stroke-width="1.5"/>'
                     f'<text x="{x(ref):.1f}" y="{base + 18}" text-anchor="middle" '
                     f'font-size="11" fill="{FLAGGED}">{escape(ref_label)} '
                     f'{escape(show(ref))}</text>')  # fmt: skip
    parts.append("</svg>")
    return Markup("".join(parts))
