"""The report page: sections built from RunData, one self-contained HTML string (styles inline, charts
as inline SVG, no scripts, nothing fetched).

Several runs share every chart, one colour per run, so configs can be compared at a glance.
"""

from __future__ import annotations

import json
import math
import time
from html import escape
from itertools import pairwise

import yaml

from ..storage import size_text
from .charts import PALETTE, Chart, Series, fmt, render
from .collect import RunData

TRAIN_CURVES = (  # metrics.jsonl key, chart title, y-axis label with unit
    ("lr", "Learning rate (warmup, then decay)", "learning rate"),
    ("grad_norm", "Gradient norm (L2, before clipping)", "gradient norm"),
    ("tokens_per_s", "Throughput (optimizer steps only)", "tokens / s"),
    ("peak_mem_mb", "Peak memory (CPU: RSS; GPU: allocated)", "MiB"),
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
        _trajectory(runs, colors),
        _answers(runs),
        *(_facts(r, colors[r.name], i) for i, r in enumerate(runs)),
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
                _swatch(colors[r.name]) + escape(r.name),
                escape(f"{model.get('name', '?')} ({model.get('method', '?')})"),
                escape(f"{steps} / {r.resolved('total_steps', '?')}"),
                _num(last.get("loss")),
                _num(held),
                str(len(r.checkpoints)),
                str(len(r.evals)),
                escape(_duration(r)),
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
    return (
        f'<header><h1>finetrack report</h1><p class="sub">built {escape(when)} from the files of '
        f"{len(runs)} run director{'y' if len(runs) == 1 else 'ies'}; hover a point for its exact value.</p>"
        f'{_table(head, rows, raw=True)}<nav><a href="#training">training curves</a> · <a href="#trajectory">trajectory</a> · '
        f'<a href="#answers">sample answers</a> · <a href="#facts-0">run facts</a></nav></header>'
    )


def _problems(runs: list[RunData]) -> str:
    items = [f"<li>{escape(r.name)}: {escape(p)}</li>" for r in runs for p in r.problems]
    return f'<section class="problems"><h2>Left out</h2><ul>{"".join(items)}</ul></section>' if items else ""


# ---------------------------------------------------------------------------------------- training
def _training(runs: list[RunData], colors: dict[str, str]) -> str:
    charts = [_loss_chart(runs, colors)]
    for key, title, unit in TRAIN_CURVES:
        series = [Series(r.name, colors[r.name], [(m["step"], float(m[key])) for m in r.metrics if _is_num(m.get(key))]) for r in runs]
        charts.append(Chart(title, STEP_AXIS, unit, series, _epoch_lines(runs)))
    same = len({r.resolved("steps_per_epoch") for r in runs}) == 1
    note = "" if same else '<p class="sub">Epoch boundaries are not drawn: the runs\' epochs differ in length.</p>'
    return _section("training", "Training curves", note + _grid(charts))


def _loss_chart(runs: list[RunData], colors: dict[str, str]) -> Chart:
    series = []
    for r in runs:
        color = colors[r.name]
        train = [(m["step"], float(m["loss"])) for m in r.metrics if _is_num(m.get("loss"))]
        held = [(m["step"], float(m["eval_loss"])) for m in r.metrics if _is_num(m.get("eval_loss"))]
        series.append(Series(f"{r.name} train" if len(runs) > 1 else "train loss", color, train))
        if held:
            series.append(Series(f"{r.name} held-out" if len(runs) > 1 else "held-out loss", color, held, dashed=True, marker="dot"))
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
    return Chart("Loss per target token (checkpoints ◆)", STEP_AXIS, "loss (nats)", series, _epoch_lines(runs))


def _checkpoint_marks(r: RunData, curve: list[tuple[float, float]]) -> list[tuple[tuple[float, float], str]]:
    """Every scheduled checkpoint step reached so far, placed on the loss curve, with what became of it."""
    on_disk = {c.step: c for c in r.checkpoints}
    planned = {int(s): rules for s, rules in (r.resolved("checkpoint_steps") or {}).items()}
    reached = max([p[0] for p in curve] + [0])
    steps = sorted({s for s in planned if s <= reached} | set(on_disk))
    out = []
    for s in steps:
        c = on_disk.get(s)
        state = (f"on disk, {size_text(c.size_bytes)}" if c.complete else f"incomplete: {c.problem}") if c else "deleted by retention"
        rules = planned.get(s) or "+".join((c.meta.get("rules") if c else None) or ["signal"])
        out.append(((s, _interpolate(curve, s)), f"checkpoint {s} ({rules}; {state})"))
    return out


def _epoch_lines(runs: list[RunData]) -> list[tuple[float, str]]:
    per_epoch = {r.resolved("steps_per_epoch") for r in runs}
    if len(per_epoch) != 1 or not isinstance(spe := per_epoch.pop(), int) or spe <= 0:
        return []
    last = max(max([m.get("step", 0) for m in r.metrics] + [0]) for r in runs)
    return [(k * spe, f"epoch {k + 1}") for k in range(1, int(last // spe) + 1) if k * spe < last]


# -------------------------------------------------------------------------------------- trajectory
def _trajectory(runs: list[RunData], colors: dict[str, str]) -> str:
    names = sorted({k for r in runs for e in r.evals for k in e.get("metrics", {})})
    if not names:
        return _section(
            "trajectory",
            "Trajectory",
            '<p class="empty">No evaluation yet: <code>finetrack eval RUN_DIR</code> evaluates '
            "the base model (step 0) and every checkpoint; run this report again afterwards.</p>",
        )
    charts = []
    for name in names:
        percent = name.endswith(("_rate", "_rate_filtered"))
        series = []
        for r in runs:
            rows = [e for e in r.evals if _is_num(e.get("metrics", {}).get(name))]
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
        charts.append(
            Chart(name, STEP_AXIS + " (0 = base model)", _metric_unit(name), series, hlines=_thresholds(name, runs), percent=percent)
        )
    return _section("trajectory", "Trajectory", _change_table(runs, names) + _grid(charts) + "".join(_trajectory_table(r) for r in runs))


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
        return "loss (nats per token)"
    known = {
        "ppl": "perplexity",
        "wasserstein": "Wasserstein-1 (options in [0, 1])",
        "mae_mean": "MAE of the means",
        "pearson_means": "Pearson r of the means",
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
        percent = name.endswith(("_rate", "_rate_filtered"))
        cells = [escape(name)]
        for r in runs:
            values = [(e["step"], e["metrics"][name]) for e in r.evals if _is_num(e.get("metrics", {}).get(name))]
            base = next((v for s, v in values if s == 0), None)
            step, latest = values[-1] if values else (None, None)
            cells += [
                _num(base, percent),
                "-" if latest is None else f"{fmt(latest, percent)} (step {step})",
                _change(base, latest, percent),
            ]
        rows.append(cells)
    return _table(head, rows, raw=True)


def _trajectory_table(r: RunData) -> str:
    names = sorted({k for e in r.evals for k in e.get("metrics", {})})
    rows = [
        [str(e["step"]), "base" if e["step"] == 0 else f"{e.get('epoch', 0):.2f}", *(_num(e.get("metrics", {}).get(n)) for n in names)]
        for e in r.evals
    ]
    return f"<details><summary>Every evaluated step of {escape(r.name)} (eval/summary.csv)</summary>{_table(['step', 'epoch', *names], rows)}</details>"


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
                _collapsed(
                    f"{r.name}: samples during training ({len(prompts)} prompt(s) x {len(steps)} step(s), samples.jsonl)",
                    _table(["prompt", *(f"step {s}" + (" (base)" if s == 0 else "") for s in steps)], rows, raw=True, wide=True),
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
                _collapsed(
                    f"{r.name}: eval suite '{suite}' ({len(questions)} question(s) x {len(steps)} step(s), first answer of each; "
                    "every answer is in eval/responses/)",
                    _table(["question", *(f"step {s}" + (" (base)" if s == 0 else "") for s in steps)], rows, raw=True, wide=True),
                )
            )
    body = (
        "".join(parts)
        or '<p class="empty">No answers yet: set <code>train.sample_every_steps</code> for samples during training, or run a judge suite with <code>finetrack eval</code>.</p>'
    )
    return _section("answers", "Sample answers", body)


def _eval_cell(records: list[dict]) -> str:
    if not records:
        return ""
    first = records[0]
    scores = " · ".join(f"{k} {'-' if v is None else f'{v:.0f}'}" for k, v in sorted(first.get("scores", {}).items()))
    more = f" · +{len(records) - 1} more" if len(records) > 1 else ""
    return _answer(first.get("answer", "")) + (f'<div class="scores">{escape(scores)}{more}</div>' if scores or more else "")


def _answer(text: str | None) -> str:
    return "" if text is None else f'<div class="ans">{escape(text) or "<i>(empty)</i>"}</div>'


# ------------------------------------------------------------------------------------------- facts
def _facts(r: RunData, color: str, index: int) -> str:
    from ..storage import redact  # the config may hold a remote URL with credentials

    meta = r.newest_meta()
    remote = r.config.get("checkpoint", {}).get("remote")
    facts = [
        ("run directory", escape(str(r.path.resolve()))),
        (
            "model",
            escape(
                f"{r.config.get('model', {}).get('name')} · {r.config.get('model', {}).get('method')} · "
                f"{r.config.get('model', {}).get('dtype')}"
            ),
        ),
        (
            "global batch",
            escape(f"{r.resolved('global_batch_size', '?')} rows per step · {r.resolved('steps_per_epoch', '?')} steps per epoch"),
        ),
        ("duration", escape(_duration(r))),
        ("tokens seen", escape(f"{meta.get('tokens_seen', max([m.get('tokens', 0) for m in r.metrics] + [0])):,}")),
        ("versions", escape(", ".join(f"{k} {v}" for k, v in r.versions.items()) or "-")),
        ("git commit", escape(meta.get("git_sha") or "-")),
        ("config hash", escape(meta.get("config_hash") or "-")),
        ("remote copies", escape(_remote_fact(r, remote))),
        ("trackers", escape(json.dumps(r.trackers)) if r.trackers else "none"),
    ]
    ck_rows = [
        [
            c.folder,
            f"{c.meta.get('epoch', 0):.2f}" if c.meta else "-",
            escape("+".join(c.meta.get("rules", [])) or "-"),
            size_text(c.size_bytes),
            "yes" if c.resumable else "no",
            escape(c.meta.get("saved_at", "-")),
            "complete" if c.complete else f'<span class="bad">{escape(c.problem)}</span>',
        ]
        for c in r.checkpoints
    ]
    columns = ["folder", "epoch", "rules", "size", "resume state", "saved at", "status"]
    if remote or r.remote:  # where each checkpoint's remote copy stands, from the uploader's remote.json
        columns.append("remote")
        for row, c in zip(ck_rows, r.checkpoints):
            row.append(
                "no upload record"
                if r.remote is None
                else "uploaded"
                if c.step in r.remote["uploaded_steps"]
                else '<span class="bad">failed</span>'
                if c.step in r.remote["failed_steps"]
                else "not yet"
            )
    body = (
        _table(["", ""], [[k, v] for k, v in facts], raw=True, header=False)
        + "<h3>Data</h3>"
        + _data_table(r.data_report)
        + f"<h3>Checkpoints ({len(r.checkpoints)}, {size_text(sum(c.size_bytes for c in r.checkpoints))})</h3>"
        + (_table(columns, ck_rows, raw=True) if ck_rows else '<p class="empty">none</p>')
        + _collapsed(
            "Resolved config (config.resolved.yaml)", f"<pre>{escape(redact(yaml.safe_dump(r.config, sort_keys=False, width=120)))}</pre>"
        )
        + (
            _collapsed("Data report (data_report.json)", f"<pre>{escape(json.dumps(r.data_report, indent=2))}</pre>")
            if r.data_report
            else ""
        )
    )
    return _section(f"facts-{index}", _swatch(color) + "Run facts: " + escape(r.name), body, raw_title=True)


def _remote_fact(r: RunData, remote: str | None) -> str:
    """Where the remote copies are: the uploader's record (remote.json) when there is one, else the config's URL."""
    from ..storage import redact

    if r.remote is not None:
        url = redact(r.remote["url"]).rstrip("/")
        up, failed = r.remote["uploaded_steps"], r.remote["failed_steps"]
        return (
            f"{url}/checkpoints/ · {len(up)} uploaded, {len(failed)} failed (remote.json; per checkpoint below) · "
            f"`finetrack sync {url} DIR` fetches them"
        )
    if remote:
        return (
            f"{redact(remote).rstrip('/')}/checkpoints/ · no upload record (no remote.json in the run directory: "
            f"nothing uploaded yet, or an older finetrack) · `finetrack sync {redact(remote)} DIR` fetches what is there"
        )
    return "none (checkpoint.remote not set)"


def _data_table(report: dict | None) -> str:
    if not report:
        return '<p class="empty">no data_report.json</p>'
    t = report.get("train", {})
    tok = t.get("tokens", {})
    dropped = ", ".join(f"{k} {v}" for k, v in t.get("dropped", {}).items()) or "none"
    rows = [
        ["rows read / kept", f"{t.get('rows_read', '?')} / {t.get('rows_kept', '?')}"],
        ["dropped", dropped],
        ["truncated rows", str(t.get("truncated_rows", "?"))],
        ["held out for eval", str(t.get("held_out_for_eval", report.get("eval", {}).get("rows_kept", 0)))],
        ["tokens per row (min / mean / p95 / max)", " / ".join(str(tok.get(k, "?")) for k in ("min", "mean", "p95", "max"))],
        [
            "tokens / trainable tokens",
            f"{tok.get('total', '?'):,} / {t.get('trainable_tokens', '?'):,}"
            if isinstance(tok.get("total"), int) and isinstance(t.get("trainable_tokens"), int)
            else "?",
        ],
    ]
    return _table(["", ""], [[escape(a), escape(b)] for a, b in rows], raw=True, header=False)


# ----------------------------------------------------------------------------------------- helpers
def _duration(r: RunData) -> str:
    windows = []  # optimizer-step seconds of each logged window: its tokens over its throughput
    prev = 0
    for m in r.metrics:
        if _is_num(m.get("tokens")) and _is_num(m.get("tokens_per_s")) and m["tokens_per_s"] > 0:
            windows.append((m["tokens"] - prev) / m["tokens_per_s"])
            prev = m["tokens"]
    training = sum(windows)
    times = [m["time"] for m in r.metrics if _is_num(m.get("time"))]
    if not times and not training:
        return "-"
    # wall clock: first to last logged step, plus the first window (which ran before its line was written)
    wall = f"{_hms(max(times) - min(times) + (windows[0] if windows else 0))} wall clock" if times else ""
    return "; ".join(x for x in (wall, f"{_hms(training)} in optimizer steps" if training else "") if x)


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _interpolate(curve: list[tuple[float, float]], x: float) -> float:
    if not curve:
        return float("nan")
    for (x0, y0), (x1, y1) in pairwise(curve):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / ((x1 - x0) or 1)
    return curve[0][1] if x < curve[0][0] else curve[-1][1]


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v, percent: bool = False) -> str:
    return fmt(v, percent) if _is_num(v) else "-"


def _change(base, latest, percent: bool) -> str:
    if not (_is_num(base) and _is_num(latest)):
        return "-"
    diff = latest - base
    rel = f" ({diff / abs(base):+.1%})" if base else ""
    text = (f"{100 * diff:+.3g} pts" if percent else f"{diff:+.4g}") + rel
    return escape(text)


def _swatch(color: str) -> str:
    return f'<span class="sw" style="background:{color}"></span>'


def _table(columns: list[str], rows: list[list[str]], raw: bool = False, wide: bool = False, header: bool = True) -> str:
    """An HTML table; cells are escaped here unless raw (already HTML)."""
    cell = (lambda x: x) if raw else escape
    thead = "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in columns) + "</tr></thead>" if header else ""
    tbody = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="tw{" wide" if wide else ""}"><table>{thead}<tbody>{tbody}</tbody></table></div>'


def _grid(charts: list[Chart]) -> str:
    return '<div class="grid">' + "".join(f"<figure>{render(c)}</figure>" for c in charts) + "</div>"


def _collapsed(summary: str, body: str) -> str:
    return f"<details><summary>{escape(summary)}</summary>{body}</details>"


def _section(anchor: str, title: str, body: str, raw_title: bool = False) -> str:
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
