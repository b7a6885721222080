"""Heat maps as inline SVG: rows (decoder layers) x columns (evaluated steps), no JavaScript.

The columns sit on a step axis drawn exactly as the line charts draw theirs (same width, margins and ticks for the
same step range), so a heat map placed in the report's grid reads straight against the trajectory charts: a column
is centred on its step and reaches halfway to its neighbours; a small mark above the plot shows each evaluated step.
Every cell's <title> gives its row, step and exact value (Python's repr: reads back as the very float of the step
file); a missing or null value is a grey cell reading "no value".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from itertools import pairwise
from typing import Literal

from .charts import BOTTOM, HEIGHT, LEFT, RIGHT, TOP, WIDTH, fmt, nice_ticks

Scale = Literal["sequential", "reversed", "diverging"]
NO_VALUE = "#d5d9dd"  # grey: no value at this layer and step
# light to dark (ColorBrewer Blues); a diverging map runs blue (negative) through white to red (positive)
_SEQUENTIAL = ("#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b")
_DIVERGING = ("#2166ac", "#92c5de", "#f7f7f7", "#f4a582", "#b2182b")
MIN_ROW_PX = 5  # below this a map grows taller instead of squeezing its rows
LEGEND_STEPS = 40  # rects of the colour legend bar
LEGEND_EXTRA_PX = 14  # the colour bar and its labels take a little more than a chart's legend row


@dataclass
class HeatMap:
    title: str
    x_label: str
    y_label: str
    metric: str  # the value's name in hover texts ("shift")
    rows: list[tuple[str, str]]  # (axis label, hover name), bottom row first: ("3", "layer 3")
    values: dict[tuple[str, int], float | None]  # (axis label, step) -> value; absent or None: no value
    steps: list[int]  # the evaluated steps: one column each
    x_range: tuple[float, float]  # the step axis shared with the line charts (lowest and highest evaluated step)
    scale: Scale = "sequential"  # reversed: low values dark (cosine, CKA: lower = further from the base)
    legend_note: str = ""  # what dark means ("darker: further from the base model")
    notes: dict[tuple[str, int], str] = field(default_factory=dict)  # extra hover text per cell


def colour(value: float, lo: float, hi: float, scale: Scale) -> str:
    """The fill of a cell: `value` placed in [lo, hi] on the scale (diverging: symmetric about 0)."""
    if scale == "diverging":
        bound = max(abs(lo), abs(hi))
        t = 0.5 if bound == 0 else 0.5 + 0.5 * value / bound
        return _blend(_DIVERGING, t)
    t = 0.0 if hi == lo else (value - lo) / (hi - lo)
    return _blend(_SEQUENTIAL, 1.0 - t if scale == "reversed" else t)


def render_heatmap(h: HeatMap, width: int = WIDTH, height: int = HEIGHT) -> str:
    """The heat map as an <svg> element of the same size and plot area as a line chart with one legend row."""
    plot_w = width - LEFT - RIGHT
    plot_h = max(height - TOP - BOTTOM, MIN_ROW_PX * len(h.rows))
    height = TOP + plot_h + BOTTOM + LEGEND_EXTRA_PX
    title = f'<text x="{width / 2}" y="18" class="ct">{escape(h.title)}</text>'
    if not h.rows or not h.steps:
        return _svg(width, height, h.title, title + f'<text x="{width / 2}" y="{height / 2}" class="empty">no data</text>')
    x_lo, x_hi = h.x_range
    if x_hi == x_lo:  # as charts.render: one step gets an axis of +-1 around it
        x_lo, x_hi = x_lo - 1, x_hi + 1

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    finite = [v for v in h.values.values() if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    row_h = plot_h / len(h.rows)
    parts = [title]
    for k, (left, right) in enumerate(_column_spans([sx(s) for s in h.steps], LEFT, LEFT + plot_w)):
        step = h.steps[k]
        for j, (label, name) in enumerate(h.rows):
            value = h.values.get((label, step))
            known = value is not None and math.isfinite(value)
            fill = colour(value, lo, hi, h.scale) if known else NO_VALUE
            tip = f"{name}, step {step}: " + (f"{h.metric} {value!r}" if known else "no value")
            if note := h.notes.get((label, step)):
                tip += f" ({note})"
            y = TOP + plot_h - (j + 1) * row_h
            parts.append(
                f'<rect x="{left:.2f}" y="{y:.2f}" width="{right - left:.2f}" height="{row_h:.2f}" fill="{fill}">'
                f"<title>{escape(tip)}</title></rect>"
            )
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h:.2f}" class="frame"/>')
    every = max(1, math.ceil(12 / row_h))  # a label every few rows once rows are thinner than the 11px text
    for j, (label, _) in enumerate(h.rows):
        if j % every == 0:
            y = TOP + plot_h - (j + 0.5) * row_h
            parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="yt">{escape(label)}</text>')
    for t in nice_ticks(x_lo, x_hi, 6):  # the line charts' ticks, at the same places
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{TOP + plot_h}" y2="{TOP + plot_h + 5}" class="axis"/>')
        parts.append(f'<text x="{sx(t):.1f}" y="{TOP + plot_h + 18}" class="xt">{escape(fmt(t))}</text>')
    for step in h.steps:  # the evaluated steps, as the trajectory charts' points
        x = sx(step)
        parts.append(
            f'<path d="M{x - 4:.1f},{TOP - 7} l8,0 l-4,6 z" fill="#5b6670" class="step"><title>evaluated: step {step}</title></path>'
        )
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h + 36}" class="xl">{escape(h.x_label)}</text>')
    parts.append(f'<text transform="translate(14 {TOP + plot_h / 2}) rotate(-90)" class="yl">{escape(h.y_label)}</text>')
    parts.append(_legend(h, lo, hi, TOP + plot_h + 44, any(v is None or not math.isfinite(v) for v in _cells(h))))
    return _svg(width, height, h.title, "".join(parts))


def _cells(h: HeatMap) -> list[float | None]:
    return [h.values.get((label, s)) for s in h.steps for label, _ in h.rows]


def _column_spans(centres: list[float], left: float, right: float) -> list[tuple[float, float]]:
    """Each column from halfway to its left neighbour to halfway to its right one; the outer columns reach as far out
    as in (a lone column: the whole plot), clipped to the plot."""
    if len(centres) == 1:
        return [(left, right)]
    mids = [(a + b) / 2 for a, b in pairwise(centres)]
    edges = [2 * centres[0] - mids[0], *mids, 2 * centres[-1] - mids[-1]]
    return [(max(left, a), min(right, b)) for a, b in pairwise(edges)]


def _legend(h: HeatMap, lo: float, hi: float, top: float, missing: bool) -> str:
    """The colour bar from the lowest to the highest value shown, labelled at both ends."""
    bar_w, bar_h = 180, 10
    parts = []
    for i in range(LEGEND_STEPS):
        v = lo + (hi - lo) * (i + 0.5) / LEGEND_STEPS
        x = LEFT + bar_w * i / LEGEND_STEPS
        parts.append(
            f'<rect x="{x:.1f}" y="{top}" width="{bar_w / LEGEND_STEPS + 0.3:.2f}" height="{bar_h}" fill="{colour(v, lo, hi, h.scale)}"/>'
        )
    parts.append(
        f'<rect x="{LEFT}" y="{top}" width="{bar_w}" height="{bar_h}" class="frame"><title>{escape(h.metric)}: '
        f"{lo!r} .. {hi!r}</title></rect>"
    )
    text_y = top + bar_h + 11
    parts.append(f'<text x="{LEFT}" y="{text_y}" class="lg">{escape(fmt(lo))}</text>')
    parts.append(f'<text x="{LEFT + bar_w}" y="{text_y}" class="lg" text-anchor="end">{escape(fmt(hi))}</text>')
    if h.scale == "diverging" and lo < 0 < hi:  # where the scale turns: white
        zero = LEFT + bar_w * -lo / (hi - lo)
        parts.append(f'<line x1="{zero:.1f}" x2="{zero:.1f}" y1="{top}" y2="{top + bar_h + 3}" class="axis"/>')
        if 30 < zero - LEFT < bar_w - 30:  # not over the end labels
            parts.append(f'<text x="{zero:.1f}" y="{text_y}" class="lg" text-anchor="middle">0</text>')
    x = LEFT + bar_w + 12
    if h.legend_note:
        parts.append(f'<text x="{x}" y="{top + 9}" class="lg">{escape(h.legend_note)}</text>')
    if missing:
        parts.append(f'<rect x="{x}" y="{top + 14}" width="10" height="10" fill="{NO_VALUE}"/>')
        parts.append(f'<text x="{x + 14}" y="{top + 23}" class="lg">no value</text>')
    return "".join(parts)


def _blend(stops: tuple[str, ...], t: float) -> str:
    """The colour at t in [0, 1] along evenly spaced stops, mixed in RGB."""
    t = min(1.0, max(0.0, t)) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    a, b = _rgb(stops[i]), _rgb(stops[i + 1])
    f = t - i
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def _svg(width: int, height: float, label: str, body: str) -> str:
    return f'<svg class="chart" viewBox="0 0 {width} {height:.0f}" role="img" aria-label="{escape(label)}">{body}</svg>'
