"""The report page: sections built from RunData, one self-contained HTML string (styles inline, charts
as inline SVG, no scripts, nothing fetched).

Several runs share every chart, one colour per run, so configs can be compared at a glance.
"""

from __future__ import annotations

import time
from html import escape
from itertools import pairwise

from ..evaluate.rates import is_rate
from ..rundir import size_text
from .charts import PALETTE, Chart, Series, fmt
from .collect import RunData
from .facts import duration, run_facts
from .html import CSS, collapsed, grid, is_num, num, section, swatch, table
from .mixture import SOURCE_PREFIX, has_mixture, mixture_section, source_charts
from .representations import has_representations, representations_section
from .validation import VAL_PREFIX, best_marker, has_validation, header_lines, trajectory_best, validation_section

TRAIN_CURVES = (  # metrics.jsonl key, chart title, y-axis label with unit
    ("lr", "Learning rate (warmup, then decay)", "learning rate"),
    ("grad_norm", "Gradient norm (L2, before clipping)", "gradient norm"),
    ("tokens_per_s", "Throughput (optimizer steps only)", "tokens / s"),
    ("peak_mem_mib", "Peak memory (CPU: RSS; GPU: allocated)", "MiB"),
)
STEP_AXIS = "optimizer step"


def build_page(runs: list[RunData]) -> str:
    """The whole HTML document."""
    colors = {r.name: PALETTE[i % len(PALETTE)] for i, r in enumerate(runs)}
    title = "finetrack report: " + ", ".join(r.name for r in runs)
    sections = [
        _header(runs, colors),
        _problems(runs),
        _training(runs, colors),
        mixture_section(runs, colors),
        validation_section(runs, colors),
        _trajectory(runs, colors),
        representations_section(runs, colors),
        _answers(runs),
        *(run_facts(r, colors[r.name], i) for i, r in enumerate(runs)),
    ]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
        f"<style>{CSS}</style></head><body><main>{''.join(s for s in sections if s)}</main></body></html>\n"
    )


# ------------------------------------------------------------------------------------------ header
def _header(runs: list[RunData], colors: dict[str, str]) -> str:
    rows = []
    for r in runs:
        model = r.config.get("model", {})
        last = r.metrics[-1] if r.metrics else {}
        steps = max([m.get("step", 0) for m in r.metrics] + [0])
        held = next((m["eval_loss"] for m in reversed(r.metrics) if m.get("eval_loss") is not None), None)
        rows.append(
            [
                swatch(colors[r.name]) + escape(r.name),
                escape(f"{model.get('name', '?')} ({model.get('method', '?')})"),
                escape(f"{steps} / {r.resolved('total_steps', '?')}"),
                num(last.get("loss")),
                num(held),
                str(len(r.checkpoints)),
                str(len(r.evals)),
                escape(duration(r)),
            ]
        )
    head = [
        "run",
        "model (method)",
        "steps done / planned",
        "last train loss",
        "last held-out loss",
        "checkpoints",
        "evaluated steps",
        "duration",
    ]
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    validation_link = '<a href="#validation">validation</a> · ' if has_validation(runs) else ""
    mixture_link = '<a href="#mixture">data mixture</a> · ' if has_mixture(runs) else ""
    representations_link = '<a href="#representations">representations</a> · ' if has_representations(runs) else ""
    return (
        f'<header><h1>finetrack report</h1><p class="sub">built {escape(when)} from the files of '
        f"{len(runs)} run director{'y' if len(runs) == 1 else 'ies'}; hover a point for its exact value.</p>"
        f'{table(head, rows, raw=True)}{header_lines(runs, colors)}<nav><a href="#training">training curves</a> · '
        f"{mixture_link}{validation_link}"
        f'<a href="#trajectory">trajectory</a> · {representations_link}<a href="#answers">sample answers</a> · <a href="#facts-0">run facts</a></nav></header>'
    )


def _problems(runs: list[RunData]) -> str:
    items = [f"<li>{escape(r.name)}: {escape(p)}</li>" for r in runs for p in r.problems]
    return f'<section class="problems"><h2>Left out</h2><ul>{"".join(items)}</ul></section>' if items else ""


# ---------------------------------------------------------------------------------------- training
def _training(runs: list[RunData], colors: dict[str, str]) -> str:
    charts = [_loss_chart(runs, colors), *source_charts(runs, _loss_unit(runs)), *_term_charts(runs, colors)]
    for key, title, unit in TRAIN_CURVES:
        series = [Series(r.name, colors[r.name], [(m["step"], float(m[key])) for m in r.metrics if is_num(m.get(key))]) for r in runs]
        charts.append(Chart(title, STEP_AXIS, unit, series, _epoch_lines(runs)))
    same = len({r.resolved("steps_per_epoch") for r in runs}) == 1
    note = "" if same else '<p class="sub">Epoch boundaries are not drawn: the runs\' epochs differ in length.</p>'
    return section("training", "Training curves", note + grid(charts))


_LOGGED = {"step", "epoch", "loss", "grad_norm", "target_tokens", "tokens_per_s", "lr", "tokens", "peak_mem_mib", "time"}


def _term_charts(runs: list[RunData], colors: dict[str, str]) -> list[Chart]:
    """One chart per term an objective logs beside its loss (loss/task, stability, ...: objectives.logged), training
    solid and held-out (its eval_ twin) dashed."""
    terms = sorted(
        {
            k
            for r in runs
            for m in r.metrics
            for k in m
            if k not in _LOGGED and not k.startswith(("eval_", VAL_PREFIX, SOURCE_PREFIX)) and is_num(m[k])
        }
    )
    charts = []
    for term in terms:
        series = []
        for r in runs:
            train = [(m["step"], float(m[term])) for m in r.metrics if is_num(m.get(term))]
            held = [(m["step"], float(m[f"eval_{term}"])) for m in r.metrics if is_num(m.get(f"eval_{term}"))]
            series.append(Series(f"{r.name} train" if len(runs) > 1 else "train", colors[r.name], train))
            if held:
                series.append(
                    Series(f"{r.name} held-out" if len(runs) > 1 else "held-out", colors[r.name], held, dashed=True, marker="dot")
                )
            if mark := best_marker(r, f"eval_{term}", colors[r.name], len(runs) > 1):
                series.append(mark)
        charts.append(Chart(term, STEP_AXIS, _metric_unit(f"train.{term}"), series, _epoch_lines(runs)))
    return charts


def _loss_chart(runs: list[RunData], colors: dict[str, str]) -> Chart:
    series = []
    for r in runs:
        color = colors[r.name]
        train = [(m["step"], float(m["loss"])) for m in r.metrics if is_num(m.get("loss"))]
        held = [(m["step"], float(m["eval_loss"])) for m in r.metrics if is_num(m.get("eval_loss"))]
        series.append(Series(f"{r.name} train" if len(runs) > 1 else "train loss", color, train))
        if held:
            series.append(Series(f"{r.name} held-out" if len(runs) > 1 else "held-out loss", color, held, dashed=True, marker="dot"))
        if mark := best_marker(r, "eval_loss", color, len(runs) > 1):
            series.append(mark)
        marks = _checkpoint_marks(r, train)
        if marks:
            series.append(
                Series(
                    f"{r.name} checkpoints" if len(runs) > 1 else "checkpoints",
                    color,
                    [p for p, _ in marks],
                    line=False,
                    marker="diamond",
                    notes=[n for _, n in marks],
                )
            )
    unit = _loss_unit(runs)
    title = "Loss per target token (checkpoints ◆)" if unit == "loss (nats)" else "Loss: the objective's weighted terms (checkpoints ◆)"
    return Chart(title, STEP_AXIS, unit, series, _epoch_lines(runs))


def _loss_unit(runs: list[RunData]) -> str:
    """Nats per target token when every run trains next-token loss alone; else the objective's weighted terms."""
    per_token = all(r.config.get("objective", {}).get("kind", "causal_lm") == "causal_lm" for r in runs)
    return "loss (nats)" if per_token else "loss"


def _checkpoint_marks(r: RunData, curve: list[tuple[float, float]]) -> list[tuple[tuple[float, float], str]]:
    """Every scheduled checkpoint step reached so far, placed on the loss curve, with what became of it."""
    on_disk = {c.step: c for c in r.checkpoints}
    scheduled = r.resolved("checkpoint_steps")  # step -> rules; a hand-edited entry that names no step is passed over
    planned = {int(s): rules for s, rules in scheduled.items() if str(s).isdigit()} if isinstance(scheduled, dict) else {}
    reached = max([p[0] for p in curve] + [0])
    steps = sorted({s for s in planned if s <= reached} | set(on_disk))
    out = []
    for s in steps:
        c = on_disk.get(s)
        state = (f"on disk, {size_text(c.size_bytes)}" if c.complete else f"incomplete: {c.problem}") if c else "deleted by retention"
        rules = planned.get(s) or "+".join((c.meta.get("rules") if c else None) or ["signal"])
        best = "; the best: checkpoints/best.json" if r.best is not None and r.best["step"] == s else ""
        out.append(((s, _interpolate(curve, s)), f"checkpoint {s} ({rules}; {state}{best})"))
    return out


MAX_EPOCH_LINES = 40  # more boundaries than this would hide the curves: every n-th is drawn instead


def _epoch_lines(runs: list[RunData]) -> list[tuple[float, str]]:
    """The epoch boundaries inside the plotted steps, (step, 'epoch k+1') each; at most MAX_EPOCH_LINES of them (a
    run of thousands of short epochs gets every n-th), so their number never grows with the run's length."""
    per_epoch = {r.resolved("steps_per_epoch") for r in runs}
    if len(per_epoch) != 1 or not isinstance(spe := per_epoch.pop(), int) or isinstance(spe, bool) or spe <= 0:
        return []
    last = max(max([m["step"] for m in r.metrics] + [0]) for r in runs)
    boundaries = (last - 1) // spe  # k * spe < last for k = 1 .. boundaries
    stride = max(1, -(-boundaries // MAX_EPOCH_LINES))
    return [(k * spe, f"epoch {k + 1}") for k in range(stride, boundaries + 1, stride)]


# -------------------------------------------------------------------------------------- trajectory
def _trajectory(runs: list[RunData], colors: dict[str, str]) -> str:
    names = sorted({k for r in runs for e in r.evals for k in e.get("metrics", {})})
    if not names:
        return section(
            "trajectory",
            "Trajectory",
            '<p class="empty">No evaluation yet: <code>finetrack eval RUN_DIR</code> evaluates '
            "the base model (step 0) and every checkpoint; run this report again afterwards.</p>",
        )
    charts = []
    for name in names:
        percent = is_rate(name)
        series = []
        for r in runs:
            rows = [e for e in r.evals if is_num(e.get("metrics", {}).get(name))]
            notes = [_count_note(name, e.get("counts", {})) for e in rows]
            series.append(
                Series(
                    r.name,
                    colors[r.name],
                    [(e["step"], float(e["metrics"][name])) for e in rows],
                    marker="dot",
                    notes=notes,
                    show_notes=len(rows) <= 12 and any(notes),
                )
            )
            if mark := trajectory_best(r, name, colors[r.name], len(runs) > 1):
                series.append(mark)
        charts.append(
            Chart(name, STEP_AXIS + " (0 = base model)", _metric_unit(name), series, hlines=_thresholds(name, runs), percent=percent)
        )
    return section("trajectory", "Trajectory", _change_table(runs, names) + grid(charts) + "".join(_trajectory_table(r) for r in runs))


def _count_note(name: str, counts: dict) -> str:
    """How many answers stand behind a judge metric's point."""
    suite, _, metric = name.partition(".")
    if metric.endswith("_rate_filtered"):
        n = counts.get(f"{suite}.{metric[: -len('_rate_filtered')]}_filter_passed")
    elif metric.endswith("_rate"):
        n = counts.get(f"{suite}.{metric[: -len('_rate')]}_scored")
    else:
        answers, unscored = counts.get(f"{suite}.answers"), counts.get(f"{suite}.{metric}_unscored")
        if answers is None or unscored is None:
            return ""
        return f"n={answers - unscored}" + (f", {unscored} unscored" if unscored else "")
    return "" if n is None else f"n={n}"


def _thresholds(name: str, runs: list[RunData]) -> list[tuple[float, str]]:
    """A judge metric used in a rate gets the rate's threshold drawn across its chart."""
    from ..evaluate.spec import parse_rate

    suite, _, metric = name.partition(".")
    lines = {}
    for r in runs:
        for rate, expr in r.suite_rates().get(suite, {}).items():
            for m, op, value in parse_rate(expr):
                if m == metric:
                    lines.setdefault(value, f"{m} {op} {value:g} ({rate})")
    return sorted(lines.items())


def _metric_unit(name: str) -> str:
    metric = name.partition(".")[2]
    if metric.endswith("_rate_filtered"):
        return "share of answers passing the filter"
    if metric.endswith("_rate"):
        return "share of scored answers"
    if metric in ("loss", "eval_loss"):
        return "loss (the run's objective; nats per token for next-token loss)"
    if metric.startswith("loss/"):
        return "loss term (per unit)"
    known = {
        "ppl": "perplexity",
        "wasserstein": "Wasserstein-1 (options in [0, 1])",
        "mae_mean": "MAE of the means",
        "pearson_means": "Pearson r of the means",
        "mse": "mean squared error (target units)",
        "mae": "mean absolute error (target units)",
        "r2": "R^2 (1 = perfect)",
        "pearson": "Pearson r",
        "spearman": "Spearman rho",
        "stability": "mean cos(anchor, positive)",
        "separation": "1 - mean cos(anchor, negative)",
        "discrimination": "stability - mean cos(anchor, negative)",
    }
    return known.get(metric, "mean judge score (0-100)")


def _change_table(runs: list[RunData], names: list[str]) -> str:
    head = [
        "metric",
        *(
            h
            for r in runs
            for h in ([f"{r.name}: base", "latest", "change"] if len(runs) > 1 else ["base (step 0)", "latest step", "change vs base"])
        ),
    ]
    rows = []
    for name in names:
        percent = is_rate(name)
        cells = [escape(name)]
        for r in runs:
            values = [(e["step"], e["metrics"][name]) for e in r.evals if is_num(e.get("metrics", {}).get(name))]
            base = next((v for s, v in values if s == 0), None)
            step, latest = values[-1] if values else (None, None)
            cells += [
                num(base, percent),
                "-" if latest is None else f"{fmt(latest, percent)} (step {step})",
                _change(base, latest, percent),
            ]
        rows.append(cells)
    return table(head, rows, raw=True)


def _trajectory_table(r: RunData) -> str:
    names = sorted({k for e in r.evals for k in e.get("metrics", {})})
    rows = [
        [
            str(e["step"]),
            "base" if e["step"] == 0 else f"{e.get('epoch', 0):.2f}",
            *(num(e.get("metrics", {}).get(n), is_rate(n)) for n in names),
        ]
        for e in r.evals
    ]
    return f"<details><summary>Every evaluated step of {escape(r.name)} (eval/summary.csv)</summary>{table(['step', 'epoch', *names], rows)}</details>"


# ----------------------------------------------------------------------------------------- answers
def _answers(runs: list[RunData]) -> str:
    parts = []
    for r in runs:
        if r.samples:
            prompts = list(dict.fromkeys(s["prompt"] for s in r.samples if "prompt" in s))
            steps = sorted({s["step"] for s in r.samples if "step" in s})
            cells = {(s.get("prompt"), s.get("step")): s.get("answer", "") for s in r.samples}
            rows = [[escape(p), *(_answer(cells.get((p, st))) for st in steps)] for p in prompts]
            parts.append(
                collapsed(
                    f"{r.name}: samples during training ({len(prompts)} prompt(s) x {len(steps)} step(s), samples.jsonl)",
                    table(["prompt", *(f"step {s}" + (" (base)" if s == 0 else "") for s in steps)], rows, raw=True, wide=True),
                )
            )
        by_suite: dict[str, dict] = {}
        for step, records in sorted(r.responses.items()):
            for rec in records:
                key = (rec.get("question_id"), rec.get("paraphrase"))
                slot = by_suite.setdefault(rec.get("suite", "?"), {}).setdefault(key, {"question": rec.get("question", ""), "steps": {}})
                slot["steps"].setdefault(step, []).append(rec)
        for suite, questions in by_suite.items():
            steps = sorted({s for q in questions.values() for s in q["steps"]})
            rows = [
                [
                    escape(f"{qid} #{para}: " if para else f"{qid}: ") + escape(q["question"]),
                    *(_eval_cell(q["steps"].get(s, [])) for s in steps),
                ]
                for (qid, para), q in questions.items()
            ]
            parts.append(
                collapsed(
                    f"{r.name}: eval suite '{suite}' ({len(questions)} question(s) x {len(steps)} step(s), first answer of each; "
                    "every answer is in eval/responses/)",
                    table(["question", *(f"step {s}" + (" (base)" if s == 0 else "") for s in steps)], rows, raw=True, wide=True),
                )
            )
    body = (
        "".join(parts)
        or '<p class="empty">No answers yet: set <code>train.sample_every_steps</code> for samples during training, or run a judge suite with <code>finetrack eval</code>.</p>'
    )
    return section("answers", "Sample answers", body)


def _eval_cell(records: list[dict]) -> str:
    if not records:
        return ""
    first = records[0]
    scores = " · ".join(f"{k} {'-' if v is None else f'{v:.0f}'}" for k, v in sorted(first.get("scores", {}).items()))
    more = f" · +{len(records) - 1} more" if len(records) > 1 else ""
    return _answer(first.get("answer", "")) + (f'<div class="scores">{escape(scores)}{more}</div>' if scores or more else "")


def _answer(text: str | None) -> str:
    return "" if text is None else f'<div class="ans">{escape(text) or "<i>(empty)</i>"}</div>'


# ----------------------------------------------------------------------------------------- helpers
def _interpolate(curve: list[tuple[float, float]], x: float) -> float:
    if not curve:
        return float("nan")
    for (x0, y0), (x1, y1) in pairwise(curve):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / ((x1 - x0) or 1)
    return curve[0][1] if x < curve[0][0] else curve[-1][1]


def _change(base, latest, percent: bool) -> str:
    if not (is_num(base) and is_num(latest)):
        return "-"
    diff = latest - base
    rel = f" ({diff / abs(base):+.1%})" if base else ""
    text = (f"{100 * diff:+.3g} pts" if percent else f"{diff:+.4g}") + rel
    return escape(text)
