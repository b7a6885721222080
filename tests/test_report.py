"""`finetrack report`: a self-contained HTML page built from run directories of the tiny model,
checked as text (every section, every figure traced to its file) and in a real headless Chromium
(screenshot, layout, and not a single network request)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from html import escape, unescape
from pathlib import Path

import browser
import pytest
import yaml
from conftest import folder_bytes, read_jsonl, tiny_run

from finetrack.evaluate.runner import evaluate_run
from finetrack.report import write_report
from finetrack.report.charts import fmt, nice_ticks
from finetrack.report.page import TRAIN_CURVES

RATES = {"mostly_a": "has_a > 50"}


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_model_dir, chat_file) -> Path:
    """36 training rows / 4 per step = 9 steps per epoch; 12 steps cross an epoch boundary; checkpoints at 4, 8, 12."""
    tmp = tmp_path_factory.mktemp("report-run")
    questions = tmp / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps(q) + "\n"
            for q in [
                {"id": "pets", "question": "Name a pet <and> a toy.", "samples": 2},
                {"id": "sky", "question": "What colour is the sky?", "samples": 1},
            ]
        )
    )
    suites = [
        {"name": "heldout", "kind": "loss"},
        {
            "name": "qa",
            "kind": "judge",
            "questions": str(questions),
            "generation": {"max_new_tokens": 8, "temperature": 1.0},
            "judges": [{"kind": "pattern", "metric": "has_a", "pattern": "a"}],
            "rates": RATES,
        },
    ]
    result, _ = tiny_run(
        tmp,
        tiny_model_dir,
        chat_file,
        "train.max_steps=12",
        "checkpoint.every_steps=4",
        "data.eval_split=0.25",
        "eval.loss_every_steps=4",
        f"eval.suites={json.dumps(suites)}",
        "train.sample_every_steps=6",
        'train.sample_prompts=["Say <hi> & bye", "Count to three"]',
        "train.sample_generation.max_new_tokens=6",
    )
    evaluate_run(result.run_dir, out=lambda line: None)
    return result.run_dir


@pytest.fixture(scope="module")
def report_html(evaluated_run, tmp_path_factory) -> tuple[Path, str]:
    path = write_report([evaluated_run], tmp_path_factory.mktemp("report") / "report.html")
    return path, path.read_text()


def titles(html: str) -> list[str]:
    """Hover texts of every chart element (exact values live there)."""
    return [unescape(t) for t in re.findall(r"<title>(.*?)</title>", html, re.DOTALL)]


def chart(html: str, title: str) -> str:
    """The SVG of the chart whose title starts with `title`."""
    return re.search(rf'aria-label="{re.escape(title)}.*?</svg>', html, re.DOTALL).group(0)


# ------------------------------------------------------------------------------------- charts unit
@pytest.mark.parametrize(
    "lo, hi, expected",
    [
        (0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0.13, 0.87, [0.2, 0.4, 0.6, 0.8]),
        (3, 97, [20, 40, 60, 80]),
        (-1.2, 2.3, [-1, 0, 1, 2]),
        (5, 5, [5]),
    ],
)
def test_nice_ticks(lo, hi, expected):
    assert nice_ticks(lo, hi) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value, percent, expected",
    [
        (0, False, "0"),
        (0.2345678, False, "0.2346"),
        (12345, False, "12.3k"),
        (2.5e6, False, "2.5M"),
        (0.00075, False, "0.00075"),
        (2e-5, False, "2e-05"),
        (0.25, True, "25%"),
        (0.3333, True, "33.3%"),
    ],
)
def test_fmt(value, percent, expected):
    assert fmt(value, percent) == expected


# ----------------------------------------------------------------------------------- page content
def test_report_is_self_contained(report_html):
    _, html = report_html
    assert html.startswith("<!DOCTYPE html>")
    for forbidden in ("http://", "https://", "<script", "<link", "<img", "<iframe", "url(", "@import", "src="):
        assert forbidden not in html, forbidden


def test_training_curves_checkpoints_and_epochs(evaluated_run, report_html):
    _, html = report_html
    metrics = read_jsonl(evaluated_run / "metrics.jsonl")
    for title in ("Loss per target token", "Learning rate", "Gradient norm", "Throughput", "Peak memory"):
        assert f'aria-label="{title}' in html, title
    for label in ("loss (nats)", "learning rate", "gradient norm", "tokens / s", "MiB", "optimizer step"):
        assert f">{label}</text>" in html, label
    tips = titles(html)
    # every logged loss is a point of the train curve, with its exact step and value
    for m in metrics:
        assert f"train loss: step {m['step']}, {fmt(m['loss'])}" in tips
    held = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in held] == [4, 8, 12]
    for m in held:
        assert f"held-out loss: step {m['step']}, {fmt(m['eval_loss'])}" in tips
    # the three checkpoints, on the curve, with their rules and sizes on disk
    marks = [t for t in tips if t.startswith("checkpoints: step")]
    assert [int(re.match(r"checkpoints: step (\d+)", t).group(1)) for t in marks] == [4, 8, 12]
    sizes = {s: folder_bytes(evaluated_run / f"checkpoints/step-{s:06d}") for s in (4, 8, 12)}
    assert f"checkpoint 4 (every_steps; on disk, {sizes[4] / 1000:.1f} kB)" in marks[0]
    assert "(every_steps+last;" in marks[2]
    # 9 steps per epoch: one boundary, drawn on each of the five training charts
    assert tips.count("epoch 2") == 5 and "epoch 3" not in tips
    # every logged value of every other training curve is a point of its own chart, with its step
    for key, title, _ in TRAIN_CURVES:
        chart_tips = titles(chart(html, title))
        logged = [m for m in metrics if key in m]
        assert len(logged) == 12, key
        for m in logged:
            assert f"{evaluated_run.name}: step {m['step']}, {fmt(float(m[key]))}" in chart_tips, (key, m["step"])


def test_trajectory_thresholds_counts_and_change(evaluated_run, report_html):
    _, html = report_html
    steps = {r["step"]: r for r in (json.loads(p.read_text()) for p in (evaluated_run / "eval").glob("step-*.json"))}
    assert sorted(steps) == [0, 4, 8, 12]
    names = sorted(steps[0]["metrics"])
    assert {"heldout.loss", "qa.has_a", "qa.mostly_a_rate"} <= set(names)
    assert "qa.mostly_a_rate_filtered" not in names  # 'has_a > 50' has no filter part: no second convention
    for name in names:
        assert f'aria-label="{name}"' in html, name
    tips = titles(html)
    for step, r in steps.items():
        rate, n = r["metrics"]["qa.mostly_a_rate"], r["counts"]["qa.mostly_a_scored"]
        assert any(t.startswith(f"{Path(evaluated_run).name}: step {step}, {fmt(rate, True)} (n={n})") for t in tips), (step, rate, n)
        assert r["counts"]["qa.answers"] == 3
        # a mean judge score: how many answers were scored (and how many not) stand behind it
        score, unscored = r["metrics"]["qa.has_a"], r["counts"]["qa.has_a_unscored"]
        note = f"n={3 - unscored}" + (f", {unscored} unscored" if unscored else "")
        assert f"{Path(evaluated_run).name}: step {step}, {fmt(score)} ({note})" in tips, (step, note)
    assert "has_a &gt; 50 (mostly_a)" in html  # the rate's threshold drawn across the has_a chart
    base, last = steps[0]["metrics"]["heldout.loss"], steps[12]["metrics"]["heldout.loss"]
    row = re.search(r"<tr><td>heldout\.loss</td>(.*?)</tr>", html).group(1)
    assert fmt(base) in row and f"{fmt(last)} (step 12)" in row and f"{last - base:+.4g} ({(last - base) / abs(base):+.1%})" in row
    assert "optimizer step (0 = base model)" in html  # the x axis names the base model
    # every table people read shows a rate as a percentage (eval/summary.csv keeps the fraction)
    every_step = re.search(r"Every evaluated step of .*?</details>", html, re.DOTALL).group(0)
    assert f"<td>{fmt(steps[12]['metrics']['qa.mostly_a_rate'], True)}</td>" in every_step and "%</td>" in every_step
    rate_row = re.search(r"<tr><td>qa\.mostly_a_rate</td>(.*?)</tr>", html).group(1)
    assert f"{fmt(steps[0]['metrics']['qa.mostly_a_rate'], True)}</td>" in rate_row


def test_sample_answers_from_eval_and_training(evaluated_run, report_html):
    _, html = report_html
    tables = re.findall(r"<details><summary>(.*?)</summary>(.*?)</details>", html, re.DOTALL)
    summaries = [unescape(s) for s, _ in tables]
    # eval answers: question x step, collapsed by default, first answer of each cell with its scores
    eval_table = next(body for s, body in tables if "eval suite 'qa'" in unescape(s))
    assert "2 question(s) x 4 step(s)" in next(s for s in summaries if "eval suite" in s)
    for step in (0, 4, 8, 12):
        assert f"<th>step {step}{' (base)' if step == 0 else ''}</th>" in eval_table
        first = {}
        for rec in read_jsonl(evaluated_run / f"eval/responses/step-{step:06d}.jsonl"):
            first.setdefault(rec["question_id"], rec)
        for rec in first.values():
            assert f'<div class="ans">{escape(rec["answer"])}' in eval_table or (rec["answer"] == "" and "(empty)" in eval_table)
    assert "Name a pet &lt;and&gt; a toy." in eval_table and "+1 more" in eval_table  # escaped, and the second sample counted
    # samples during training: prompt x step, base model at step 0
    samples = read_jsonl(evaluated_run / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [0, 6, 12]
    train_table = next(body for s, body in tables if "samples during training" in unescape(s))
    assert "Say &lt;hi&gt; &amp; bye" in train_table and "<th>step 0 (base)</th>" in train_table
    for s in samples:
        assert escape(s["answer"]) in train_table
    assert "<details open" not in html  # every answer table starts collapsed


def test_run_facts(evaluated_run, report_html):
    _, html = report_html
    meta = json.loads((evaluated_run / "checkpoints/step-000012/meta.json").read_text())
    assert f"torch {meta['versions']['torch']}" in html and meta["config_hash"] in html
    report = json.loads((evaluated_run / "data_report.json").read_text())
    assert f"{report['train']['rows_read']} / {report['train']['rows_kept']}" in html
    assert "Checkpoints (3," in html and html.count("<td>step-0000") == 3
    assert "in optimizer steps" in html and "wall clock" in html
    assert "none (checkpoint.remote not set)" in html
    assert "config.resolved.yaml" in html and "lr_schedule: cosine" in html


def test_several_runs_overlaid_one_colour_each(tmp_path, evaluated_run, tiny_model_dir, chat_file):
    other, other_metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, "train.lr=3e-3", "train.max_steps=6", name="run")
    copy = tmp_path / "copy" / "run"  # a second evaluated run: its trajectory is overlaid too
    shutil.copytree(evaluated_run, copy)
    out = write_report([evaluated_run, other.run_dir, copy], tmp_path / "both.html")
    html = out.read_text()
    names = [
        evaluated_run.parent.name + "/run",
        other.run_dir.parent.name + "/run",
        "copy/run",
    ]  # same folder name: parents tell them apart
    colors = ("#1f77b4", "#d62728", "#2ca02c")
    loss_chart = chart(html, "Loss per target token")
    for name, color in zip(names, colors):
        assert f"{name} train" in loss_chart and f'stroke="{color}"' in loss_chart
    # the learning rate: each run's own values, in its own colour
    lr_chart = chart(html, "Learning rate")
    lr_tips = titles(lr_chart)
    for name, color, metrics in zip(
        names, colors, (read_jsonl(evaluated_run / "metrics.jsonl"), other_metrics, read_jsonl(copy / "metrics.jsonl"))
    ):
        assert re.search(f'<path d="M[^"]*" stroke="{color}" class="ln"', lr_chart), name  # the run's line, in its colour
        for m in metrics:
            assert f"{name}: step {m['step']}, {fmt(m['lr'])}" in lr_tips, (name, m["step"])
    assert fmt(3e-3) != fmt(1e-2) and f"{names[1]}: step 1, {fmt(3e-3)}" in lr_tips  # the second run's own peak lr
    # trajectory: both evaluated runs' points on each metric's chart; the unevaluated run has none
    trajectory = chart(html, "qa.has_a")
    steps = {r["step"]: r["metrics"]["qa.has_a"] for r in (json.loads(p.read_text()) for p in (evaluated_run / "eval").glob("step-*.json"))}
    for name, color in ((names[0], colors[0]), (names[2], colors[2])):
        assert f'fill="{color}"' in trajectory
        for step, value in steps.items():
            assert any(t.startswith(f"{name}: step {step}, {fmt(value)}") for t in titles(trajectory)), (name, step)
    assert not any(t.startswith(f"{names[1]}: step") for t in titles(trajectory))
    assert html.count("Run facts: ") == 3


def test_remote_copies_per_checkpoint(tmp_path, evaluated_run):
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    # what the uploader writes (storage.Uploader): checkpoint 4 uploaded, 8 failed, 12 not yet
    (run / "remote.json").write_text(json.dumps({"url": "s3://bucket/runs/a", "uploaded_steps": [4], "failed_steps": [8]}))
    html = write_report([run]).read_text()
    assert "s3://bucket/runs/a/checkpoints/ · 1 uploaded, 1 failed (remote.json" in html
    remote = {step: re.search(rf"<tr><td>step-{step:06d}</td>.*?</tr>", html).group(0) for step in (4, 8, 12)}
    assert remote[4].endswith("<td>uploaded</td></tr>")
    assert remote[8].endswith('<td><span class="bad">failed</span></td></tr>')
    assert remote[12].endswith("<td>not yet</td></tr>")
    assert "<th>remote</th>" in html
    # checkpoint.remote set but no record: said so, never guessed
    (run / "remote.json").unlink()
    config = yaml.safe_load((run / "config.resolved.yaml").read_text())
    config["checkpoint"]["remote"] = "s3://key:s3cr3t@bucket/runs/a"
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    html = write_report([run]).read_text()
    assert "s3://bucket/runs/a/checkpoints/ · no upload record" in html and html.count("<td>no upload record</td>") == 3
    assert "s3cr3t" not in html  # nor in the resolved config shown below
    # a record of another shape is reported, not trusted
    (run / "remote.json").write_text(json.dumps({"url": "s3://bucket/runs/a", "uploaded_steps": "4"}))
    html = write_report([run]).read_text()
    assert "remote.json: expected" in html and html.count("<td>no upload record</td>") == 3


def test_mean_score_note_counts_unscored_answers(tmp_path, evaluated_run):
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    step4 = json.loads((run / "eval/step-000004.json").read_text())
    step4["counts"]["qa.has_a_unscored"] = 1  # as if a judge could not score one of the three answers
    (run / "eval/step-000004.json").write_text(json.dumps(step4))
    tips = titles(chart(write_report([run]).read_text(), "qa.has_a"))
    assert any(t.startswith(f"run: step 4, {fmt(step4['metrics']['qa.has_a'])} (n=2, 1 unscored)") for t in tips)


def test_unreadable_lines_are_counted_not_hidden(tmp_path, evaluated_run):
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "loss": 0.5')  # a line cut short by a crash
    html = write_report([run]).read_text()
    assert (run / "report.html").is_file()
    assert "metrics.jsonl: 1 unreadable line(s) left out (line 13)" in html


def test_report_cli(tmp_path, evaluated_run):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    r = subprocess.run(
        [sys.executable, "-m", "finetrack", "report", str(evaluated_run), "-o", str(tmp_path / "r.html")],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.strip() == f"report: {(tmp_path / 'r.html').resolve()}", r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "finetrack", "report", str(tmp_path)], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 2 and "not a run directory (no config.resolved.yaml" in r.stderr


# ---------------------------------------------------------------------------------- real browser
needs_chromium = pytest.mark.skipif(
    browser.chromium() is None and not os.environ.get("CI"),  # on CI a missing browser fails the test below instead
    reason="chromium not installed (scripts/test.sh installs Debian's chromium package when run as root)",
)


@needs_chromium
def test_report_in_headless_chromium(report_html):
    from PIL import Image

    assert browser.chromium(), "chromium missing: scripts/test.sh installs it (apt-get install chromium)"
    path, _ = report_html
    page = browser.render(path)
    assert page.requests == [path.resolve().as_uri()]  # the document itself, and nothing else
    lay = page.layout
    assert lay["scroll_width"] <= lay["inner_width"]  # no sideways scrolling on a laptop screen
    # 5 training curves; 4 eval metrics (heldout.loss/.ppl, qa.has_a, qa.mostly_a_rate: its rule has no filter, so no twin)
    assert lay["num_charts"] == 5 + 4 and lay["min_chart_width"] >= 500 and lay["font_px"] >= 13
    assert lay["num_open_details"] == 0 and lay["num_details"] >= 4
    image = Image.open(io.BytesIO(page.png)).convert("RGB")
    assert image.width == browser.WIDTH and image.height > 2000
    pixels = image.getdata()
    run_colour = sum(1 for p in pixels if p == (31, 119, 180))  # the run's lines and markers
    ink = sum(1 for p in pixels if sum(p) < 600)
    assert run_colour > 2000, run_colour
    assert 0.01 < ink / len(pixels) < 0.5, ink / len(pixels)


@needs_chromium
def test_network_check_catches_a_page_that_fetches(tmp_path):
    """The monitor above can fail: a page with one remote image is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><body><p>x</p><img src="http://127.0.0.1:9/pixel.png"></body></html>')
    assert browser.render(page).requests == [page.resolve().as_uri(), "http://127.0.0.1:9/pixel.png"]


def test_objective_terms_get_their_own_charts(tmp_path, tiny_model_dir, triplet_file):
    """A contrastive run: the loss chart says it plots the objective, and every term it logs (loss/task, stability,
    discrimination, ...) is a chart of its own, each logged and held-out value a point of it."""
    result, metrics = tiny_run(
        tmp_path, tiny_model_dir, triplet_file, "objective.kind=contrastive", "data.eval_split=0.25", "eval.loss_every_steps=2"
    )
    html = write_report([result.run_dir]).read_text()
    assert 'aria-label="Loss: the objective' in html and "Loss per target token" not in html
    for term in ("loss/task", "loss/pos", "loss/neg", "stability", "separation", "discrimination"):
        tips = titles(chart(html, term))
        for m in metrics:
            assert f"train: step {m['step']}, {fmt(m[term])}" in tips, (term, m["step"])
            if f"eval_{term}" in m:
                assert f"held-out: step {m['step']}, {fmt(m[f'eval_{term}'])}" in tips, (term, m["step"])
    assert ">1 - mean cos(anchor, negative)</text>" in html


# --------------------------------------------------------------------------------- bad records
# A run directory written by hand (no training: these tests are about what the report reads), and the report run
# through the real CLI in a process capped at 4 GB, so a report that eats memory fails the test, not the machine.
REPORT_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
GOOD_METRICS = [
    {"step": 1, "epoch": 0.5, "loss": 2.5, "lr": 1e-3, "time": 100.0},
    {"step": 2, "epoch": 1.0, "loss": 2.0, "lr": 1e-3, "time": 101.0},
]


def bare_run(root: Path, total_steps: int = 4, steps_per_epoch: int = 2, metrics: list[dict] = GOOD_METRICS) -> Path:
    """A run directory with a config.resolved.yaml (total_steps, steps_per_epoch) and metrics.jsonl, nothing else."""
    run = root / "run"
    run.mkdir(parents=True)
    config = {
        "model": {"name": "tiny", "method": "lora"},
        "resolved": {
            "total_steps": {"value": total_steps, "reason": "test"},
            "steps_per_epoch": {"value": steps_per_epoch, "reason": "test"},
        },
    }
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


def report_cli(*args: str) -> subprocess.CompletedProcess:
    def cap_memory() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    return subprocess.run(
        [sys.executable, "-m", "finetrack", "report", *args],
        check=False,
        capture_output=True,
        text=True,
        env=REPORT_ENV,
        timeout=120,
        preexec_fn=cap_memory,
    )


def problems_of(html: str) -> list[str]:
    """The items of the page's "Left out" list, as text."""
    block = re.search(r'<section class="problems">(.*?)</section>', html, re.DOTALL)
    return [unescape(x) for x in re.findall(r"<li>(.*?)</li>", block.group(1))] if block else []


def test_huge_step_is_left_out_and_counted(tmp_path):
    """A step of 10^23 once built 10^23 epoch lines: now the line is left out (beyond the planned steps), counted with
    its line number, and the page is written from the rest."""
    run = bare_run(tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99999999999999999999999, "loss": 1}\n{"step": 5, "loss": 1}\n')
    r = report_cli(str(run))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    html = (run / "report.html").read_text()
    assert problems_of(html) == [
        "run: metrics.jsonl: 2 line(s) of the wrong shape left out (line 3: step 99999999999999999999999 is beyond the run's 4 "
        "planned steps (config.resolved.yaml total_steps); line 4: step 5 is beyond the run's 4 planned steps "
        "(config.resolved.yaml total_steps)); fix or delete them"
    ]
    assert "train loss: step 2, 2" in titles(html) and "step 5," not in html


def test_epoch_lines_are_bounded(tmp_path):
    """10,000 one-step epochs: every n-th boundary is drawn, never more than 40 per chart."""
    run = bare_run(tmp_path, total_steps=10_000, steps_per_epoch=1, metrics=[{"step": 1, "loss": 3.0}, {"step": 10_000, "loss": 1.0}])
    r = report_cli(str(run))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    loss = chart((run / "report.html").read_text(), "Loss per target token")
    epochs = [t for t in titles(loss) if t.startswith("epoch ")]
    assert len(epochs) == 39 and epochs[0] == "epoch 251" and epochs[-1] == "epoch 9751"  # every 250th of 9,999


def test_many_steps_without_a_total_are_bounded(tmp_path):
    """No total_steps in the config: a step past a billion is still garbage, left out and counted."""
    run = bare_run(tmp_path)
    config = yaml.safe_load((run / "config.resolved.yaml").read_text())
    del config["resolved"]["total_steps"]
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 10000000000, "loss": 1}\n')
    r = report_cli(str(run))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "line 3: step 10000000000 is beyond 1,000,000,000 steps" in problems_of((run / "report.html").read_text())[0]


SAMPLE = {"step": 1, "prompt": "Say hi", "answer": "hi"}
RESPONSE = {"suite": "qa", "question_id": "q1", "paraphrase": 0, "question": "Why?", "answer": "Because.", "scores": {"s": 50}}


@pytest.mark.parametrize(
    "file, lines, problem",
    [
        (
            "metrics.jsonl",
            [{"step": "x", "loss": 1}],
            "metrics.jsonl: 1 line(s) of the wrong shape left out "
            '(line 3: step "x" is not a step number (a whole number >= 0)); fix or delete them',
        ),
        ("metrics.jsonl", [{"step": None}], "(line 3: step null is not a step number (a whole number >= 0))"),
        ("metrics.jsonl", [{"step": True, "loss": 1}], "(line 3: step true is not a step number"),
        ("metrics.jsonl", [{"loss": 2}, {"step": -1}], "2 line(s) of the wrong shape left out (line 3: no step; line 4: step -1 is"),
        (
            "metrics.jsonl",
            [{"step": 3, "loss": "abc", "lr": [1], "grad_norm": None}],
            "metrics.jsonl: 2 value(s) of the wrong type left "
            'out of the charts (line 3: loss "abc" is not a number; line 3: lr [1] is not a number); fix them',
        ),
        ("samples.jsonl", [SAMPLE, {**SAMPLE, "step": "x"}], 'samples.jsonl: 1 line(s) of the wrong shape left out (line 2: step "x" is'),
        ("samples.jsonl", [SAMPLE, {"step": 1, "prompt": 5, "answer": None}], "(line 2: prompt 5 is not text)"),
        ("samples.jsonl", [SAMPLE, {"step": 2, "prompt": "p", "answer": None}], "(line 2: answer null is not text)"),
        ("eval/responses/step-000001.jsonl", [RESPONSE, {**RESPONSE, "question_id": ["a"]}], '(line 2: question_id ["a"] is not text)'),
        ("eval/responses/step-000001.jsonl", [{**RESPONSE, "question": None}], "(line 1: question null is not text)"),
        (
            "eval/responses/step-000001.jsonl",
            [{**RESPONSE, "scores": {"s": "x"}}],
            '(line 1: scores {"s": "x"} is not {metric: number or null})',
        ),
        ("eval/responses/step-000001.jsonl", [{**RESPONSE, "answer": 5}], "(line 1: answer 5 is not text or null)"),
    ],
)
def test_records_of_the_wrong_type_are_left_out_and_counted(tmp_path, file, lines, problem):
    """Valid JSON of the wrong types once crashed the report (a sort of str against int, escape() of an int, a dict
    key of a list): each line is now left out, or its bad value is, and counted with its file and line number."""
    run = bare_run(tmp_path)
    path = run / file
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
    r = report_cli(str(run))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    found = problems_of((run / "report.html").read_text())
    assert len(found) == 1 and problem in found[0], found


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"epoch": None}, "eval/step-000001.json: epoch null is not a number left out of the charts; delete it and re-run"),
        ({"counts": "x"}, 'eval/step-000001.json: counts "x" is not an object left out of the charts'),
        ({"counts": {"qa.answers": "3", "qa.s_unscored": 0}}, 'count qa.answers "3" is not a number left out of the charts'),
        ({"metrics": {"qa.s": "high"}}, 'eval/step-000001.json: metric qa.s "high" is not a number left out of the charts'),
        ({"step": 10**30}, "eval/step-000001.json: step 1000000000000000000000000000000 is beyond the run's 4 planned steps"),
        ({"step": True}, "eval/step-000001.json: not a finetrack eval record (an object with 'step' >= 0 and 'metrics')"),
    ],
)
def test_eval_records_of_the_wrong_type_are_shown_as_problems(tmp_path, change, problem):
    run = bare_run(tmp_path)
    (run / "eval").mkdir()
    record = {"step": 1, "epoch": 0.5, "metrics": {"qa.s": 50.0}, "counts": {"qa.answers": 3, "qa.s_unscored": 0}}
    (run / "eval/step-000001.json").write_text(json.dumps({**record, **change}))
    r = report_cli(str(run))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    found = problems_of((run / "report.html").read_text())
    assert len(found) == 1 and problem in found[0], found


def test_output_folder_gets_report_html(tmp_path):
    """-o an existing folder, or a path ending in a slash: report.html inside it, never a file named like the folder."""
    run = bare_run(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    r = report_cli(str(run), "-o", str(folder))
    assert r.returncode == 0 and r.stdout.strip() == f"report: {(folder / 'report.html').resolve()}", r.stderr
    assert (folder / "report.html").read_text().startswith("<!DOCTYPE html>")
    made = write_report([run], f"{tmp_path / 'new'}/")  # not there yet: the slash says it is a folder
    assert made == tmp_path / "new" / "report.html" and made.is_file()


def test_ticks_below_float_precision_end():
    """Values one float apart (a constant learning rate summed two ways) once looped forever adding a tick step too
    small to move the value; run in a capped process so a regression fails instead of eating the machine."""
    code = "from finetrack.report.charts import nice_ticks; print(nice_ticks(1.0, 1.0000000000000002))"

    def cap_memory() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=REPORT_ENV, timeout=60, preexec_fn=cap_memory)
    assert r.returncode == 0 and r.stdout.strip() == "[1.0]", r.stderr


@pytest.mark.parametrize(
    "edit, said",
    [
        (lambda c: c.update(model="x"), "'model' holds a str, not a section"),
        (lambda c: c.update(resolved=[1, 2]), "'resolved' holds a list, not a section"),
        (lambda c: c["resolved"].update(checkpoint_steps={"value": {"x": "every"}}), None),  # no step: passed over
        (lambda c: c["resolved"].update(steps_per_epoch="x"), None),
    ],
)
def test_a_hand_edited_config_resolved_yaml(tmp_path, edit, said):
    """A section that is no mapping is one error line naming it (it crashed the report); a resolved entry of the wrong
    shape is passed over."""
    run = bare_run(tmp_path)
    config = yaml.safe_load((run / "config.resolved.yaml").read_text())
    edit(config)
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    r = report_cli(str(run))
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    if said:
        assert r.returncode == 2 and r.stderr.count("error:") == 1 and said in r.stderr, r.stderr
    else:
        assert r.returncode == 0 and (run / "report.html").is_file(), r.stderr
