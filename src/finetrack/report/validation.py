"""What the report shows of a run that watched itself: the best checkpoint (checkpoints/best.json), why the run
stopped (the `stop_reason` in its newest checkpoint's meta.json), and validation during training (the
`val/<suite>.<metric>` keys of metrics.jsonl), one chart per metric and one series per run.

The best step is marked with a diamond at best.json's own step and value on the chart of best.json's metric (its
hover text quotes best.json), and on every trajectory chart at the best step's evaluated value.
"""

from __future__ import annotations

from html import escape

from ..evaluate.rates import is_rate
from ..rundir import BEST_FILE, describe_best
from .charts import Chart, Series, fmt
from .collect import RunData
from .html import grid, is_num, section, swatch

VAL_PREFIX = "val/"  # metrics.jsonl keys of the suites run during training
_STOP_KINDS = {"early_stopping": "stopped early", "callback": "stopped by a callback"}


def best_text(r: RunData) -> str:
    """'step 40, eval_loss 0.51 (min) · checkpoints/step-000040', or '' when the run has no best.json."""
    if r.best is None:
        return ""
    where = r.best.get("checkpoint")
    return describe_best(r.best) + (f" · {where}" if isinstance(where, str) else "")


def best_marker(r: RunData, metric: str, color: str, several: bool) -> Series | None:
    """A diamond at best.json's step and value, on the chart of best.json's metric; None on any other chart."""
    best = r.best
    if best is None or best.get("metric") != metric or not is_num(best.get("value")):
        return None
    label = f"{r.name} best" if several else f"best ({BEST_FILE})"
    return Series(
        label, color, [(best["step"], float(best["value"]))], line=False, marker="diamond", notes=[f"best: {describe_best(best)}"]
    )


def trajectory_best(r: RunData, metric: str, color: str, several: bool) -> Series | None:
    """A diamond at the best step's evaluated value of `metric` (eval/step-NNNNNN.json); None without best.json or
    without an evaluated value there."""
    if r.best is None:
        return None
    value = next((e.get("metrics", {}).get(metric) for e in r.evals if e.get("step") == r.best["step"]), None)
    if not is_num(value):
        return None
    label = f"{r.name} best checkpoint" if several else f"best checkpoint ({BEST_FILE})"
    note = f"the best checkpoint: {describe_best(r.best)}"
    return Series(label, color, [(r.best["step"], float(value))], line=False, marker="diamond", notes=[note])


def stop_text(reason: dict) -> str:
    """'stopped early at step 40: eval_loss did not improve ...': a stop_reason as one line."""
    kind = reason.get("kind")
    what = _STOP_KINDS.get(kind, f"stopped ({kind})")
    message = reason.get("message")
    return f"{what} at step {reason.get('step', '?')}" + (f": {message}" if isinstance(message, str) and message else "")


def stop_details(reason: dict) -> str:
    """The early-stopping settings and the metric history that triggered the stop, '' for other kinds."""
    parts = []
    if reason.get("metric"):
        settings = f"patience {reason.get('patience', '?')}, min_delta {reason.get('min_delta', '?')}"
        parts.append(f"{reason['metric']} ({reason.get('mode', '?')}), {settings}")
    if is_num(reason.get("best_value")):
        parts.append(f"best {fmt(reason['best_value'])} at step {reason.get('best_step', '?')}")
    history = [h for h in reason.get("history") or [] if isinstance(h, (list, tuple)) and len(h) == 2 and is_num(h[1])]
    if history:
        shown = history[-12:]  # the end of the history is what triggered the stop
        parts.append("history: " + ("..., " if len(history) > len(shown) else "") + ", ".join(f"{s}: {fmt(v)}" for s, v in shown))
    return " · ".join(parts)


def header_lines(runs: list[RunData], colors: dict[str, str]) -> str:
    """Below the header's table: each run's best checkpoint and why it stopped, for the runs that have either."""
    lines = []
    for r in runs:
        parts = ([f"best: {best_text(r)}"] if r.best else []) + ([stop_text(r.stop_reason)] if r.stop_reason else [])
        if parts:
            lines.append(f'<p class="sub">{swatch(colors[r.name])}{escape(r.name)}: {escape("; ".join(parts))}</p>')
    return "".join(lines)


def facts(r: RunData) -> list[tuple[str, str]]:
    """Rows of the run facts (escaped HTML): the best checkpoint, and the stop reason when there is one."""
    rows = [("best checkpoint", escape(best_text(r) or f"none (no checkpoints/{BEST_FILE}: checkpoint.best not set)"))]
    if r.stop_reason:
        details = stop_details(r.stop_reason)
        rows.append(("stopped", escape(stop_text(r.stop_reason)) + (f"<br>{escape(details)}" if details else "")))
    return rows


def has_validation(runs: list[RunData]) -> bool:
    return any(k.startswith(VAL_PREFIX) for r in runs for m in r.metrics for k in m)


def validation_section(runs: list[RunData], colors: dict[str, str]) -> str:
    """One chart per `val/<suite>.<metric>` of metrics.jsonl; '' when no run validated during training."""
    from .page import STEP_AXIS, _epoch_lines, _metric_unit  # page imports this module

    names = sorted({k for r in runs for m in r.metrics for k in m if k.startswith(VAL_PREFIX) and is_num(m[k])})
    if not names:
        return ""
    several = len(runs) > 1
    charts = []
    for name in names:
        series = []
        for r in runs:
            points = [(m["step"], float(m[name])) for m in r.metrics if is_num(m.get(name))]
            series.append(Series(r.name, colors[r.name], points, marker="dot"))
            if mark := best_marker(r, name, colors[r.name], several):
                series.append(mark)
        unit = _metric_unit(name.removeprefix(VAL_PREFIX))
        charts.append(Chart(name, STEP_AXIS, unit, series, _epoch_lines(runs), percent=is_rate(name)))
    note = (
        '<p class="sub">The eval suites run on the live model during training (eval.every_steps), from metrics.jsonl; '
        f"◆ marks the best checkpoint on the chart of checkpoint.best's metric ({BEST_FILE}).</p>"
    )
    return section("validation", "Validation during training", note + grid(charts))
