"""Line charts as inline SVG: no JavaScript, no fonts or images to fetch, readable when printed.

A chart is data (series, vertical and horizontal reference lines) rendered by one function. Hovering
a point shows its exact value (SVG <title>), so the picture stays uncluttered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass
class Series:
    label: str
    color: str
    points: list[tuple[float, float]]
    dashed: bool = False
    line: bool = True  # False: markers only (e.g. checkpoints placed on a curve)
    marker: str = ""  # "" | "dot" | "diamond"
    notes: list[str] = field(default_factory=list)  # per point: hover text, and printed beside it with show_notes
    show_notes: bool = False


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list[Series]
    vlines: list[tuple[float, str]] = field(default_factory=list)  # (x, label): epoch boundaries
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label): thresholds
    percent: bool = False  # values in [0, 1] shown as %
    x_range: tuple[float, float] | None = None  # the step axis to draw (shared with heat maps); None: the points' own


WIDTH, HEIGHT = 560, 320  # plot area plus one legend row; each further legend row adds LEGEND_ROW_PX
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 30, 66
LEGEND_CHAR_PX, LEGEND_ROW_PX = 7.0, 16  # 11px legend text


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks: list[float] = []
    v = first
    # bounded: where step is below the float precision of v (1.0 .. 1.0000000000000002), v += step never moves
    while v <= hi + step * 1e-9 and len(ticks) <= 2 * count + 2:
        ticks.append(round(v, 12))
        if v + step == v:
            break
        v += step
    return ticks


def fmt(value: float, percent: bool = False) -> str:
    """Short human form: 0.000123 -> 1.23e-04, 12345 -> 12.3k, 0.25 (percent) -> 25%."""
    if percent:
        return f"{100 * value:.3g}%"
    a = abs(value)
    if a == 0:
        return "0"
    if a >= 1e6:
        return f"{value / 1e6:.3g}M"
    if a >= 1e4:
        return f"{value / 1e3:.3g}k"
    return f"{value:.3g}" if a < 1e-3 else f"{value:.4g}"


def render(chart: Chart, width: int = WIDTH, height: int = HEIGHT) -> str:
    """The chart as an <svg> element (scales to its container: viewBox, width 100%)."""
    legend = _legend_rows(chart.series, width)
    height += LEGEND_ROW_PX * (len(legend) - 1)
    pts = [p for s in chart.series for p in s.points if math.isfinite(p[1])]
    title = f'<text x="{width / 2}" y="18" class="ct">{escape(chart.title)}</text>'
    if not pts:
        return _svg(width, height, chart.title, title + f'<text x="{width / 2}" y="{height / 2}" class="empty">no data</text>')
    x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    x_lo = min([x_lo] + [x for x, _ in chart.vlines])
    if chart.x_range is not None:  # a shared axis: the same step sits at the same place in every figure that uses it
        x_lo, x_hi = chart.x_range
    ys = [p[1] for p in pts] + [y for y, _ in chart.hlines]
    y_lo, y_hi = min(ys), max(ys)
    if chart.percent:
        y_lo, y_hi = min(0.0, y_lo), max(y_hi, y_lo + 0.05)
    pad = (y_hi - y_lo) * 0.06 or abs(y_hi) * 0.1 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM - LEGEND_ROW_PX * (len(legend) - 1)

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return TOP + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    parts = [title, f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    for t in nice_ticks(y_lo, y_hi):
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{sy(t) + 4:.1f}" class="yt">{escape(fmt(t, chart.percent))}</text>')
    for t in nice_ticks(x_lo, x_hi, 6):
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{TOP + plot_h}" y2="{TOP + plot_h + 5}" class="axis"/>')
        parts.append(f'<text x="{sx(t):.1f}" y="{TOP + plot_h + 18}" class="xt">{escape(fmt(t))}</text>')
    for x, label in chart.vlines:
        parts.append(
            f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{TOP}" y2="{TOP + plot_h}" class="vline"><title>{escape(label)}</title></line>'
        )
        parts.append(f'<text x="{sx(x) + 3:.1f}" y="{TOP + 11}" class="vl">{escape(label)}</text>')
    for y, label in chart.hlines:
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="hline"><title>{escape(label)}</title></line>'
        )
        parts.append(f'<text x="{LEFT + plot_w - 4}" y="{sy(y) - 4:.1f}" class="hl">{escape(label)}</text>')
    for s in chart.series:
        parts.extend(_series(s, sx, sy, chart.percent))
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h + 36}" class="xl">{escape(chart.x_label)}</text>')
    parts.append(f'<text transform="translate(14 {TOP + plot_h / 2}) rotate(-90)" class="yl">{escape(chart.y_label)}</text>')
    parts.append(_legend(legend, TOP + plot_h + 52))
    return _svg(width, height, chart.title, "".join(parts))


def _series(s: Series, sx, sy, percent: bool) -> list[str]:
    finite = [(i, x, y) for i, (x, y) in enumerate(s.points) if math.isfinite(y)]
    out = []
    if s.line and len(finite) > 1:
        path = " ".join(f"{'M' if k == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for k, (_, x, y) in enumerate(finite))
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(f'<path d="{path}" stroke="{s.color}" class="ln"{dash}/>')
    for i, x, y in finite:
        note = s.notes[i] if i < len(s.notes) else ""
        tip = escape(f"{s.label}: step {fmt(x)}, {fmt(y, percent)}" + (f" ({note})" if note else ""))
        cx, cy = sx(x), sy(y)
        if s.marker == "diamond":
            out.append(f'<path d="M{cx:.1f},{cy - 6:.1f} l6,6 l-6,6 l-6,-6 z" fill="{s.color}" class="mk"><title>{tip}</title></path>')
        elif s.marker == "dot" or len(finite) == 1:
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{s.color}" class="mk"><title>{tip}</title></circle>')
        else:  # an invisible target wide enough to hover
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="transparent"><title>{tip}</title></circle>')
        if s.show_notes and note:
            out.append(f'<text x="{cx:.1f}" y="{cy - 8:.1f}" class="note" fill="{s.color}">{escape(note)}</text>')
    return out


def _legend_rows(series: list[Series], width: int) -> list[list[tuple[float, Series]]]:
    """Legend entries placed left to right, wrapping onto new rows: [(x, series)] per row."""
    rows: list[list[tuple[float, Series]]] = [[]]
    x = LEFT
    for s in series:
        span = 30 + LEGEND_CHAR_PX * len(s.label)
        if rows[-1] and x + span > width - RIGHT:
            rows.append([])
            x = LEFT
        rows[-1].append((x, s))
        x += span
    return rows


def _legend(rows: list[list[tuple[float, Series]]], top: float) -> str:
    items = []
    for i, row in enumerate(rows):
        y = top + i * LEGEND_ROW_PX
        for x, s in row:
            swatch = (
                (
                    f'<line x1="{x}" x2="{x + 18}" y1="{y - 4}" y2="{y - 4}" stroke="{s.color}" class="ln"'
                    + (' stroke-dasharray="6 4"' if s.dashed else "")
                    + "/>"
                )
                if s.line
                else f'<circle cx="{x + 9}" cy="{y - 4}" r="4" fill="{s.color}"/>'
            )
            items.append(swatch + f'<text x="{x + 22}" y="{y}" class="lg">{escape(s.label)}</text>')
    return "".join(items)


def _svg(width: int, height: int, label: str, body: str) -> str:
    return f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">{body}</svg>'
