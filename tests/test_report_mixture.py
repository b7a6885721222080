"""`finetrack report` of a weighted mixture (data.sources): one training and one held-out loss curve per source, and
the "Data mixture" table (what each source holds, what the planned run takes from it, and what the steps trained took
when a callback stopped the run early), from one run of the embedded model trained through the command line.

The weights (5 : 3 : 2 of 10 rows per step) make every step take exactly 5, 3 and 2 rows of the sources (mixture.py:
whole shares are exact per step), so every count below is worked out by hand."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl

from finetrack.report import write_report
from finetrack.report.charts import fmt

PER_STEP = {"alpha": 5, "beta": 3, "gamma": 2}  # rows of each source in every step: weights 5 : 3 : 2 of 10
KEPT = {"alpha": 24, "beta": 9, "gamma": 16}  # training rows left after each source's held-out rows
HELD = {"alpha": 6, "beta": 3, "gamma": 4}  # alpha: data.eval_split 0.2 of 30; beta: its own 0.25 of 12; gamma: a file
PLANNED, STOPPED = 6, 3  # train.max_steps, and the step the callback stops at

STOP_AT = """
class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, view):
        if view.step == self.step:
            view.request_stop(f"enough at step {self.step}")
"""


def finetrack(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "finetrack", *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def chat_file(path: Path, name: str, n: int) -> str:
    """n short chat rows, each source's words its own."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{name} question {i}"},
                {"role": "assistant", "content": f"{name} answer {i} " * (1 + i % 3)},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory) -> Path:
    """Three sources trained through `finetrack train`: planned 6 steps of 10 rows, stopped by a callback after step 3;
    held-out loss every step, a checkpoint every 2 steps, the best by eval_loss."""
    tmp = tmp_path_factory.mktemp("mixture")
    (tmp / "stop_at.py").write_text(STOP_AT)
    config = {
        "model": {"name": "smollm2-135m-instruct", "method": "lora"},
        "data": {
            "sources": [
                {"name": "alpha", "path": chat_file(tmp / "alpha.jsonl", "alpha", 30), "weight": 5},
                {"name": "beta", "path": chat_file(tmp / "beta.jsonl", "beta", 12), "weight": 3, "eval_split": 0.25},
                {"name": "gamma", "path": chat_file(tmp / "gamma.jsonl", "gamma", 16), "weight": 2, "eval_split": "gamma_eval.jsonl"},
            ],
            "eval_split": 0.2,
            "max_length": 128,
        },
        "train": {
            "micro_batch_size": 5,
            "grad_accum_steps": 2,
            "max_steps": PLANNED,
            "log_every_steps": 1,
            "callbacks": [{"function": f"{tmp / 'stop_at.py'}:StopAt", "options": {"step": STOPPED}}],
        },
        "eval": {"loss_every_steps": 1},
        "checkpoint": {"every_steps": 2, "best": {"metric": "eval_loss"}},
        "output": {"dir": str(tmp / "run")},
    }
    chat_file(tmp / "gamma_eval.jsonl", "gamma-eval", 4)
    (tmp / "mix.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    r = finetrack("train", "mix.yaml", cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    r = finetrack("report", "run", cwd=tmp)
    assert r.returncode == 0 and r.stdout.strip() == f"report: {(tmp / 'run' / 'report.html').resolve()}", r.stderr[-3000:]
    return tmp / "run"


class Page(HTMLParser):
    """The parts of a report page these tests read: each section's tables (header, rows of cell text) and paragraphs,
    and each chart's hover texts (<title> in the <svg>), by its aria-label."""

    def __init__(self, html: str):
        super().__init__()
        self.section, self.chart = "", ""
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.paragraphs: dict[str, list[str]] = {}
        self.tips: dict[str, list[str]] = {}
        self._cell: list[str] | None = None
        self._text: list[str] | None = None
        self._title: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id", "")
        elif tag == "table":
            self.tables.setdefault(self.section, []).append([])
        elif tag == "tr":
            self.tables[self.section][-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "p":
            self._text = []
        elif tag == "svg":
            self.chart = a.get("aria-label", "")
            self.tips[self.chart] = []
        elif tag == "title" and self.chart:
            self._title = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self.section][-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "p" and self._text is not None:
            self.paragraphs.setdefault(self.section, []).append("".join(self._text).strip())
            self._text = None
        elif tag == "title" and self._title is not None:
            self.tips[self.chart].append("".join(self._title))
            self._title = None
        elif tag == "svg":
            self.chart = ""

    def handle_data(self, data):
        for part in (self._cell, self._text, self._title):
            if part is not None:
                part.append(data)


def page_of(run: Path) -> Page:
    return Page((run / "report.html").read_text())


def curves(tips: list[str]) -> dict[str, list[tuple[int, str]]]:
    """Hover texts 'label: step N, value' grouped by label: each series' (step, value as shown)."""
    out: dict[str, list[tuple[int, str]]] = {}
    for tip in tips:
        if m := re.fullmatch(r"(.+?): step (\d+), ([^ ]+)(?: \(.*\))?", tip, re.DOTALL):
            out.setdefault(m.group(1), []).append((int(m.group(2)), m.group(3)))
    return out


def by_source(table: list[list[str]]) -> dict[str, dict[str, str]]:
    head, *rows = table
    return {row[0]: dict(zip(head, row)) for row in rows}


@pytest.mark.e2e
def test_one_train_and_one_held_out_curve_per_source(mixture_run):
    metrics = read_jsonl(mixture_run / "metrics.jsonl")
    page = page_of(mixture_run)
    chart = next(label for label in page.tips if label.startswith("Loss per data source"))
    series = curves(page.tips[chart])
    assert set(series) == {f"{s} {kind}" for s in PER_STEP for kind in ("train", "held-out")}
    for source in PER_STEP:  # every logged value of metrics.jsonl, at its step, on its source's curve
        train = [(m["step"], fmt(m[f"source/{source}.loss"])) for m in metrics if f"source/{source}.loss" in m]
        held = [(m["step"], fmt(m[f"source/{source}.eval_loss"])) for m in metrics if f"source/{source}.eval_loss" in m]
        assert [s for s, _ in train] == [1, 2, 3] and [s for s, _ in held] == [1, 2, 3]
        assert series[f"{source} train"] == train and series[f"{source} held-out"] == held
    # the per-source keys get no term charts of their own; the loss chart keeps its checkpoints and best marker
    assert not [label for label in page.tips if label.startswith("source/")]
    best = json.loads((mixture_run / "checkpoints" / "best.json").read_text())
    loss = curves(page.tips[next(label for label in page.tips if label.startswith("Loss per target token"))])
    assert [s for s, _ in loss["checkpoints"]] == [2, 3] and loss["best (best.json)"] == [(best["step"], fmt(best["value"]))]


@pytest.mark.e2e
def test_mixture_table_over_the_run_and_through_the_stop(mixture_run):
    page = page_of(mixture_run)
    [table] = page.tables["mixture"]
    rows = by_source(table)
    assert list(rows) == list(PER_STEP)
    report = {s["name"]: s for s in json.loads((mixture_run / "data_report.json").read_text())["sources"]}
    for name, per_step in PER_STEP.items():
        row, share = rows[name], per_step / 10
        assert row["path"] == f"{name}.jsonl" and float(row["weight"]) == {"alpha": 5, "beta": 3, "gamma": 2}[name]
        assert row["rows kept"] == str(KEPT[name]) and row["held-out rows"] == str(HELD[name]) + (" (file)" if name == "gamma" else "")
        assert float(row["target share"].rstrip("%")) == pytest.approx(100 * share)
        # over the planned 6 steps: 6 x its rows per step, its share exactly (data_report.json says the same)
        assert int(row["rows drawn"]) == PLANNED * per_step == report[name]["over_the_run"]["rows_drawn"]
        assert float(row["realized share"].rstrip("%")) == pytest.approx(100 * share)
        assert float(row["epochs"]) == pytest.approx(PLANNED * per_step / KEPT[name], abs=5e-4)
        assert row["tokens drawn"] == f"{report[name]['over_the_run']['tokens_drawn']:,}"
        # through step 3, where the callback stopped the run
        assert int(row[f"rows drawn through step {STOPPED}"]) == STOPPED * per_step
        assert float(row[f"realized share through step {STOPPED}"].rstrip("%")) == pytest.approx(100 * share)
        assert float(row[f"epochs through step {STOPPED}"]) == pytest.approx(STOPPED * per_step / KEPT[name], abs=5e-4)
    notes = " ".join(page.paragraphs["mixture"])
    assert f"the planned {PLANNED} optimizer steps x 10 rows per step (train.max_steps)" in notes
    assert f"Through step {STOPPED}, the last trained step (stopped by a callback at step {STOPPED}" in notes


@pytest.mark.e2e
def test_a_run_that_reached_its_end_has_no_through_columns_and_one_source_runs_show_no_mixture(mixture_run, tmp_path):
    """The same run directory as if it had trained its 6 planned steps (the metrics carry step 6): the table stops at
    the run's columns; and with data_report.json's sources and the source/* metrics left out (a run of one data.path),
    nothing of the mixture is shown."""
    run = tmp_path / "run"
    shutil.copytree(mixture_run, run)
    (run / "report.html").unlink()
    metrics = read_jsonl(run / "metrics.jsonl")
    metrics.append({**metrics[-1], "step": PLANNED})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    [table] = Page(write_report([run]).read_text()).tables["mixture"]
    assert table[0][-1] == "tokens drawn" and not any("through step" in h for h in table[0])

    report = json.loads((run / "data_report.json").read_text())
    del report["sources"]
    (run / "data_report.json").write_text(json.dumps(report))
    plain = [{k: v for k, v in m.items() if not k.startswith("source/")} for m in metrics]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in plain))
    html = write_report([run]).read_text()
    page = Page(html)
    assert "mixture" not in page.tables and 'id="mixture"' not in html and 'href="#mixture"' not in html
    assert not [label for label in page.tips if "data source" in label or label.startswith("source/")]
