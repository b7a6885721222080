"""What the report shows of a weighted data mixture (data.sources): each source's loss during training and on its
held-out rows (the `source/<name>.loss` and `source/<name>.eval_loss` keys of metrics.jsonl), one chart per run
beside the loss chart, and the "Data mixture" table (data_report.json's "sources": what each source holds and what
the planned run takes from it).

A run that ended before its planned steps (early stopping, a callback, an interrupted run) also gets what it took
through its last trained step, by the rule train draws its rows with (mixture.Mixture: exact per step, so the counts
follow from the weights, the sources' rows and the rows per step alone). A run of one data.path shows none of this.
"""

from __future__ import annotations

from html import escape

from ..mixture import Mixture
from .charts import PALETTE, Chart, Series
from .collect import RunData
from .html import is_num, num, section, swatch, table
from .validation import best_marker, stop_text

SOURCE_PREFIX = "source/"  # metrics.jsonl keys of a mixture's per-source losses


def sources(r: RunData) -> list[dict]:
    """data_report.json's "sources", one per source in config order; [] for a run of one data.path."""
    found = (r.data_report or {}).get("sources")
    return [s for s in found if isinstance(s, dict) and isinstance(s.get("name"), str)] if isinstance(found, list) else []


def source_names(r: RunData) -> list[str]:
    """The run's sources: data_report.json's order, then any other name its metrics carry (a data report left out)."""
    names = [s["name"] for s in sources(r)]
    for m in r.metrics:
        for key in m:
            if key.startswith(SOURCE_PREFIX) and key.endswith((".loss", ".eval_loss")):
                name = key.removeprefix(SOURCE_PREFIX).rsplit(".", 1)[0]
                if name not in names:
                    names.append(name)
    return names


def has_mixture(runs: list[RunData]) -> bool:
    return any(sources(r) for r in runs)


def source_charts(runs: list[RunData], unit: str) -> list[Chart]:
    """Per run with sources: one chart, one colour per source, its training loss solid and its held-out loss dashed."""
    from .page import STEP_AXIS, _epoch_lines  # page imports this module

    charts = []
    for r in runs:
        series = []
        for i, name in enumerate(source_names(r)):
            color = PALETTE[i % len(PALETTE)]
            series.append(Series(f"{name} train", color, _points(r, f"{SOURCE_PREFIX}{name}.loss")))
            if held := _points(r, f"{SOURCE_PREFIX}{name}.eval_loss"):
                series.append(Series(f"{name} held-out", color, held, dashed=True, marker="dot"))
            if mark := best_marker(r, f"{SOURCE_PREFIX}{name}.eval_loss", color, False):
                series.append(mark)
        if series:
            title = "Loss per data source" if len(runs) == 1 else f"{r.name}: loss per data source"
            charts.append(Chart(f"{title} (held-out dashed)", STEP_AXIS, unit, series, _epoch_lines([r])))
    return charts


def mixture_section(runs: list[RunData], colors: dict[str, str]) -> str:
    """The "Data mixture" section: one table per run with sources; '' when no run has any."""
    parts = []
    for r in runs:
        if sources(r):
            heading = f"<h3>{swatch(colors[r.name])}{escape(r.name)}</h3>" if len(runs) > 1 else ""
            parts.append(heading + _table(r))
    if not parts:
        return ""
    note = (
        '<p class="sub">Each optimizer step takes every source\'s share of its rows (data.sources, data_report.json); '
        "a source drawn past one epoch repeats its rows, reshuffled. Held-out rows: its own, for its held-out loss.</p>"
    )
    return section("mixture", "Data mixture", note + "".join(parts))


def last_step(r: RunData) -> int:
    """The last optimizer step the run trained: its newest metrics line or checkpoint (0 before any)."""
    steps = [m["step"] for m in r.metrics if isinstance(m.get("step"), int)] + [c.step for c in r.checkpoints]
    return max(steps + [0])


def through(r: RunData, step: int) -> list[dict] | None:
    """Per source, what the first `step` optimizer steps took (rows drawn, realized share, epochs), by the mixture's rule;
    None when data_report.json or config.resolved.yaml lacks what it needs."""
    src, per_step = sources(r), r.resolved("global_batch_size")
    kept, weights = [s.get("rows_kept") for s in src], [s.get("weight") for s in src]
    if not (isinstance(per_step, int) and all(isinstance(n, int) and n > 0 for n in kept) and all(is_num(w) and w > 0 for w in weights)):
        return None
    drawn = Mixture(tuple(s["name"] for s in src), tuple(weights), tuple(kept)).drawn(per_step, step)
    total = max(1, sum(drawn))
    return [{"rows_drawn": k, "realized_share": k / total, "epochs": k / n} for k, n in zip(drawn, kept)]


def _table(r: RunData) -> str:
    src = sources(r)
    over = [s.get("over_the_run") if isinstance(s.get("over_the_run"), dict) else {} for s in src]
    planned = next((o["steps"] for o in over if isinstance(o.get("steps"), int)), r.resolved("total_steps"))
    per_step = r.resolved("global_batch_size")
    last = last_step(r)
    early = through(r, last) if isinstance(planned, int) and 0 < last < planned else None
    head = ["source", "path", "weight", "target share", "rows kept", "held-out rows"]
    head += ["rows drawn", "realized share", "epochs", "tokens drawn"]
    if early:
        head += [f"rows drawn through step {last}", f"realized share through step {last}", f"epochs through step {last}"]
    rows = []
    for s, o, e in zip(src, over, early or [{}] * len(src)):
        path = s.get("path")
        held = s.get("eval_rows")
        rows.append(
            [
                escape(s["name"]),
                escape(", ".join(path) if isinstance(path, list) else str(path)),
                escape(f"{s['weight']:g}") if is_num(s.get("weight")) else "-",
                num(s.get("target_share"), percent=True),
                _count(s.get("rows_kept")),
                _count(held) + (" (file)" if held and s.get("eval_rows_from") == "file" else ""),
                _count(o.get("rows_drawn")),
                num(o.get("realized_share"), percent=True),
                num(o.get("epochs")),
                _count(o.get("tokens_drawn")),
                *([_count(e["rows_drawn"]), num(e["realized_share"], percent=True), num(e["epochs"])] if early else []),
            ]
        )
    reason = (r.config.get("resolved", {}).get("total_steps") or {}).get("reason")
    rows_total = f" x {per_step} rows per step" if isinstance(per_step, int) else ""
    lines = [
        f"Rows drawn, realized share, epochs and tokens drawn: over the run, the planned {planned} optimizer steps{rows_total}"
        + (f" ({reason})" if reason else "")
        + "."
    ]
    if early:
        why = stop_text(r.stop_reason) if r.stop_reason else "the run has not reached its planned end (still running, or interrupted)"
        lines.append(
            f"Through step {last}, the last trained step ({why}): what those steps took, by the rule "
            "train draws its rows with (finetrack.mixture), from the weights, the rows kept and the rows per step."
        )
    notes = "".join(f'<p class="sub">{escape(x)}</p>' for x in lines)
    return notes + table(head, rows, raw=True)


def _points(r: RunData, key: str) -> list[tuple[float, float]]:
    return [(m["step"], float(m[key])) for m in r.metrics if is_num(m.get(key))]


def _count(v) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else "-"
