"""HTML building blocks of the report page: tables, sections, collapsed blocks, number cells, the stylesheet."""

from __future__ import annotations

import math
from html import escape

from .charts import Chart, fmt, render


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def num(v, percent: bool = False) -> str:
    return fmt(v, percent) if is_num(v) else "-"


def swatch(color: str) -> str:
    return f'<span class="sw" style="background:{color}"></span>'


def table(columns: list[str], rows: list[list[str]], raw: bool = False, wide: bool = False, header: bool = True) -> str:
    """An HTML table; cells are escaped here unless raw (already HTML)."""
    cell = (lambda x: x) if raw else escape
    thead = "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in columns) + "</tr></thead>" if header else ""
    tbody = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="tw{" wide" if wide else ""}"><table>{thead}<tbody>{tbody}</tbody></table></div>'


def grid(charts: list[Chart]) -> str:
    return '<div class="grid">' + "".join(f"<figure>{render(c)}</figure>" for c in charts) + "</div>"


def collapsed(summary: str, body: str) -> str:
    return f"<details><summary>{escape(summary)}</summary>{body}</details>"


def section(anchor: str, title: str, body: str, raw_title: bool = False) -> str:
    return f'<section id="{anchor}"><h2>{title if raw_title else escape(title)}</h2>{body}</section>'


CSS = """
:root{--fg:#1d232a;--muted:#5b6670;--line:#d9dee3;--bg:#fff;--soft:#f5f7f9}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1240px;margin:0 auto;padding:20px 24px 60px}h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 10px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:15px;margin:18px 0 6px}.sub{color:var(--muted);margin:0 0 10px}nav{margin:10px 0}a{color:#1f5fa8}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}figure{margin:0;border:1px solid var(--line);border-radius:6px;padding:6px;background:#fff}
svg.chart{width:100%;height:auto;display:block;font-family:inherit}
svg .ct{font-size:14px;font-weight:600;text-anchor:middle;fill:var(--fg)}svg .frame{fill:none;stroke:#aeb7bf}svg .grid{stroke:#eceff2}
svg .axis{stroke:#aeb7bf}svg .xt{font-size:11px;text-anchor:middle;fill:var(--muted)}svg .yt{font-size:11px;text-anchor:end;fill:var(--muted)}
svg .xl,svg .yl{font-size:12px;text-anchor:middle;fill:var(--fg)}svg .ln{fill:none;stroke-width:2}svg .mk{stroke:#fff;stroke-width:1}
svg .vline{stroke:#8a949c;stroke-dasharray:2 3}svg .vl{font-size:10px;fill:var(--muted)}svg .hline{stroke:#b8860b;stroke-dasharray:8 4;stroke-width:1.5}
svg .hl{font-size:10px;text-anchor:end;fill:#8a6d0b}svg .lg{font-size:11px;fill:var(--fg)}svg .note{font-size:10px;text-anchor:middle}svg .empty{font-size:13px;text-anchor:middle;fill:var(--muted)}
.tw{overflow-x:auto;margin:6px 0 12px}table{border-collapse:collapse;font-size:13px}th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600}.wide td{min-width:16em;max-width:30em}.ans{white-space:pre-wrap;max-height:12em;overflow:auto}
.scores{color:var(--muted);font-size:12px;margin-top:3px}details{margin:8px 0;border:1px solid var(--line);border-radius:6px;padding:6px 10px;background:var(--soft)}
details[open]{background:#fff}summary{cursor:pointer;font-weight:600}pre{white-space:pre-wrap;font-size:12px;background:var(--soft);padding:8px;border-radius:4px}
.sw{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:-1px}.bad{color:#a3262a}
.empty{color:var(--muted)}.problems{border:1px solid #e0b4b4;background:#fff6f6;border-radius:6px;padding:4px 14px}
@media print{details{border:none}.grid{grid-template-columns:1fr 1fr}}
"""
