"""Validation during training (eval suites on the live model, the held-out loss), the decisions taken from it (early
stopping, the best checkpoint) and what they leave in the run directory, on the tiny model. Every run is configured as
a user writes it (YAML overrides, a config file through the real command line, a killed and re-run process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import kill_9_when, read_jsonl, tiny_run, train_argv
from safetensors.torch import load_file

from finetrack import checkpoint, cli, rundir
from finetrack.evaluate.runner import evaluate_run

# python suites, imported by module name (`finetrack eval` imports them so): the folder goes on sys.path / PYTHONPATH
SUITES_PY = '''
import random

import numpy as np
import torch


def _count(options):
    """How many times this suite has run, this call included (a line per call in options["count"])."""
    if "count" not in options:
        return 0
    with open(options["count"], "a") as f:
        f.write("1\\n")
    with open(options["count"]) as f:
        return len(f.read().splitlines())


def logits(model, tokenizer, options):
    """Numbers that depend on the weights only: the logits of a fixed prompt."""
    _count(options)
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer("alpha beta gamma delta").input_ids], device=device)
    out = model(input_ids=ids).logits.float()
    return {"mean_logit": float(out.mean()), "max_logit": float(out.max())}


def noisy(model, tokenizer, options):
    """Draws from every random generator training uses."""
    return {"torch": float(torch.rand(1)), "python": random.random(), "numpy": float(np.random.rand())}


def plateau(model, tokenizer, options):
    """options["values"][n - 1] at the n-th call: a curve that improves, then stalls."""
    n = _count(options)
    values = options["values"]
    return {"value": values[min(n, len(values)) - 1]}
'''
MODULE = "ft_validation_suites"


@pytest.fixture
def suites_dir(tmp_path_factory, monkeypatch) -> Path:
    folder = tmp_path_factory.getbasetemp() / "validation-suites"
    folder.mkdir(exist_ok=True)
    (folder / f"{MODULE}.py").write_text(SUITES_PY)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    return folder


def calls(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def val(metrics: list[dict], key: str) -> dict[int, float]:
    """{step: value} of a metrics.jsonl key, over the lines that have it."""
    return {m["step"]: m[key] for m in metrics if key in m}


def stop_step(history: list[tuple[int, float]], mode: str, min_delta: float, patience: int) -> int | None:
    """The documented rule, written out: a validation improves when it beats the best by more than min_delta; the
    run stops at the validation that makes `patience` validations in a row without improvement."""
    best, bad = None, 0
    for step, value in history:
        better = best is None or (value < best - min_delta if mode == "min" else value > best + min_delta)
        best, bad = (value, 0) if better else (best, bad + 1)
        if bad >= patience:
            return step
    return None


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("model.safetensors", "adapter_model.safetensors", "head.safetensors"):
        if (folder / name).is_file():
            out.update({f"{name}:{k}": v for k, v in load_file(folder / name).items()})
    assert out, f"no weights in {folder}"
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]


def steps_of(run_dir: Path) -> list[int]:
    return [s for s, _ in rundir.step_folders(run_dir)]


# ------------------------------------------------------------------------- validation == finetrack eval
def test_validation_during_training_is_what_finetrack_eval_computes_and_is_reused(tmp_path, tiny_model_dir, chat_file, suites_dir, capsys):
    """A loss suite and python suites during training: val/<suite>.<metric> on the scheduled steps (eval.every_steps,
    a suite's own every_steps, 0 = only `finetrack eval`, the last step, step 0), eval/step-N.json for every checkpoint
    step; `finetrack eval RUN` then reuses them (the suite is not called again) and a fresh eval gives the same numbers."""
    count = {name: tmp_path / f"{name}.calls" for name in ("probe", "late", "never")}
    suites = (
        "eval.suites=[{name: held, kind: loss},"
        f" {{name: probe, kind: python, function: '{MODULE}:logits', options: {{count: '{count['probe']}'}}}},"
        f" {{name: late, kind: python, function: '{MODULE}:logits', every_steps: 3, options: {{count: '{count['late']}'}}}},"
        f" {{name: never, kind: python, function: '{MODULE}:logits', every_steps: 0, options: {{count: '{count['never']}'}}}}]"
    )
    result, metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "train.max_steps=5",
        "data.eval_split=0.25",
        "checkpoint.every_steps=2",
        "eval.every_steps=2",
        suites,
    )
    run = result.run_dir
    assert sorted(val(metrics, "val/held.loss")) == [0, 2, 4, 5]  # every 2 steps, the last step and the base model
    assert sorted(val(metrics, "val/probe.mean_logit")) == [0, 2, 4, 5]
    assert sorted(val(metrics, "val/late.mean_logit")) == [0, 3, 5]  # its own every_steps
    assert not [k for m in metrics for k in m if k.startswith("val/never.")]  # every_steps: 0
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4, 5]  # validations share their step's line
    assert {"loss", "lr"} <= metrics[2].keys() and "loss" not in metrics[0]
    assert [calls(count[n]) for n in ("probe", "late", "never")] == [4, 3, 0]
    # the loss suite on the held-out rows at the last step is the held-out loss training computes there
    assert val(metrics, "val/held.loss")[5] == pytest.approx(metrics[-1]["eval_loss"], rel=1e-6)
    assert val(metrics, "val/held.loss")[5] < val(metrics, "val/held.loss")[0]  # the model trained: not a constant
    # eval/ holds the checkpoint steps (2, 4, 5) and the base model, with the values of metrics.jsonl
    assert sorted(rundir.eval_files(run)) == [0, 2, 4, 5]
    for step in (0, 2, 4, 5):
        record = json.loads(rundir.eval_path(run, step).read_text())
        assert record["checkpoint"] == (None if step == 0 else f"checkpoints/{rundir.step_name(step)}")
        logged = {k.removeprefix("val/"): v for k, v in metrics[step].items() if k.startswith("val/")}
        assert {k: record["metrics"][k] for k in logged} == logged
    assert json.loads(rundir.eval_path(run, 5).read_text())["last"] is True

    # `finetrack eval RUN`: what training stored is reused; late at 2 and 4 (not stored: no validation there) and
    # never (every step) are computed
    fresh_copy = tmp_path / "copy"
    shutil.copytree(run, fresh_copy)
    shutil.rmtree(fresh_copy / "eval")
    capsys.readouterr()
    assert cli.main(["eval", str(run)]) == 0
    assert "cached: 10 (step, suite) result(s) unchanged since the last eval" in capsys.readouterr().out
    assert [calls(count[n]) for n in ("probe", "late", "never")] == [4, 5, 4]
    reused = {r["step"]: r["metrics"] for r in evaluate_run(run, out=lambda _: None)}
    assert [calls(count[n]) for n in ("probe", "late", "never")] == [4, 5, 4]  # a second eval computes nothing
    for step in (0, 2, 4, 5):
        assert reused[step]["held.loss"] == val(metrics, "val/held.loss")[step]
        assert reused[step]["probe.mean_logit"] == val(metrics, "val/probe.mean_logit")[step]
    # the same checkpoints evaluated from scratch: the numbers training logged
    fresh = {r["step"]: r["metrics"] for r in evaluate_run(fresh_copy, out=lambda _: None)}
    assert calls(count["probe"]) == 8
    for step in (0, 2, 4, 5):
        assert fresh[step]["held.loss"] == pytest.approx(val(metrics, "val/held.loss")[step], rel=1e-5)
        assert fresh[step]["held.ppl"] == pytest.approx(val(metrics, "val/held.ppl")[step], rel=1e-4)
        for key in ("mean_logit", "max_logit"):
            assert fresh[step][f"probe.{key}"] == pytest.approx(val(metrics, f"val/probe.{key}")[step], rel=1e-5, abs=1e-6)
        assert fresh[step]["never.mean_logit"] == pytest.approx(reused[step]["never.mean_logit"], rel=1e-5, abs=1e-6)
    assert fresh[5]["late.mean_logit"] == pytest.approx(val(metrics, "val/late.mean_logit")[5], rel=1e-5, abs=1e-6)
    assert fresh[2]["probe.mean_logit"] != pytest.approx(fresh[4]["probe.mean_logit"], rel=1e-4)  # the weights differ


def test_a_suite_with_its_own_every_steps_runs_without_eval_every_steps(tmp_path, tiny_model_dir, chat_file, suites_dir):
    """A suite's every_steps alone puts it into training (eval.every_steps unset); the other suites stay out."""
    count = tmp_path / "probe.calls"
    _, metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "train.max_steps=3",
        f"eval.suites=[{{name: probe, kind: python, function: '{MODULE}:logits', every_steps: 2, options: {{count: '{count}'}}}},"
        f" {{name: other, kind: python, function: '{MODULE}:noisy'}}]",
    )
    assert sorted(val(metrics, "val/probe.mean_logit")) == [0, 2, 3] and calls(count) == 3
    assert not [k for m in metrics for k in m if k.startswith("val/other.")]


# ------------------------------------------------------------------------- bit-identical with and without
def test_training_is_bit_identical_with_and_without_validation(tmp_path, tiny_model_dir, chat_file, suites_dir):
    """LoRA dropout draws from the torch generator every step; suites that draw random numbers (a python suite using
    torch, random and numpy; a judge sampling at temperature 1) run at every step: the losses and the weights are
    exactly those of the same run without them."""
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        json.dumps({"id": "pets", "question": "Name a pet.", "samples": 2}) + "\n" + json.dumps({"id": "sky", "question": "Sky?"}) + "\n"
    )
    common = (
        "model.lora.r=4",
        "model.lora.dropout=0.1",
        "train.max_steps=4",
        "data.eval_split=0.25",
        "eval.loss_every_steps=2",
        "checkpoint.every_steps=2",
    )
    plain, plain_metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, name="plain")
    suites = (
        f"eval.suites=[{{name: noise, kind: python, function: '{MODULE}:noisy'}}, {{name: held, kind: loss}},"
        f" {{name: qa, kind: judge, questions: '{questions}', generation: {{temperature: 1.0, max_new_tokens: 4, batch_size: 2}},"
        " judges: [{kind: pattern, metric: has_a, pattern: a}]}]"
    )
    watched, watched_metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, "eval.every_steps=1", suites, name="watched")
    # the suites ran at every step and drew numbers
    assert sorted(val(watched_metrics, "val/noise.torch")) == [0, 1, 2, 3, 4]
    assert all(0 <= v < 1 for key in ("torch", "python", "numpy") for v in val(watched_metrics, f"val/noise.{key}").values())
    assert sorted(val(watched_metrics, "val/qa.has_a")) == [0, 1, 2, 3, 4]
    responses = read_jsonl(watched.run_dir / "eval/responses/step-000004.jsonl")
    assert len(responses) == 3 and all(r["suite"] == "qa" for r in responses)
    # training: the same numbers, bit for bit
    training_keys = ("loss", "grad_norm", "eval_loss", "tokens")
    strip = [{k: m[k] for k in training_keys if k in m} for m in watched_metrics if m["step"] > 0]
    assert strip == [{k: m[k] for k in training_keys if k in m} for m in plain_metrics]
    assert len({m["loss"] for m in plain_metrics}) == 4
    for step in (2, 4):
        assert_same_weights(
            plain.run_dir / f"checkpoints/{rundir.step_name(step)}", watched.run_dir / f"checkpoints/{rundir.step_name(step)}"
        )


# ------------------------------------------------------------------------- early stopping
ES_CONFIG = """\
model:
  name: {model}
  lora:
    r: 4
data:
  path: {data}
  eval_split: 0.25
  max_length: 512
train:
  micro_batch_size: 4
  max_steps: 20
  lr: 1.0e-2
  warmup_steps: 0
  early_stopping:
    metric: eval_loss
    mode: max          # the held-out loss falls: it never improves after the first validation
    patience: 2
eval:
  loss_every_steps: 2
output:
  dir: run
"""


def test_early_stopping_through_the_command_line(tmp_path, tiny_model_dir, chat_file, capsys, monkeypatch):
    """The loss falls and mode is max: no validation after the first improves, so with patience 2 and a validation every
    2 steps the run stops at step 2 * (2 + 1) = 6: a final checkpoint whose meta.json says why, the final lines say so;
    the same command again trains nothing; a larger patience trains on from there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(ES_CONFIG.format(model=tiny_model_dir, data=chat_file))
    assert cli.main(["train", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    metrics = read_jsonl(run / "metrics.jsonl")
    history = sorted(val(metrics, "eval_loss").items())
    assert [s for s, _ in history] == [2, 4, 6] and history[0][1] > history[1][1] > history[2][1]
    assert stop_step(history, "max", 0.0, 2) == 6
    assert "stopped early at step 6 of 20: eval_loss did not improve for 2 validation(s) in a row" in out, out
    assert max(m["step"] for m in metrics) == 6 and steps_of(run) == [6]
    meta = rundir.read_meta(run / "checkpoints/step-000006")
    assert {"early_stop", "last"} <= set(meta["rules"])
    reason = meta["stop_reason"]
    assert reason["kind"] == "early_stopping" and reason["step"] == 6 and reason["metric"] == "eval_loss"
    assert (reason["mode"], reason["patience"], reason["min_delta"]) == ("max", 2, 0.0)
    assert reason["best_step"] == 2 and reason["best_value"] == history[0][1]
    assert reason["history"] == [list(h) for h in history]  # the logged values, exactly
    assert meta["validation"]["eval_loss"] == history[-1][1]

    # the same command: complete, nothing trained
    before = (run / "metrics.jsonl").read_text()
    assert cli.main(["train", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    assert "already complete: stopped early at step 6" in out, out
    assert (run / "metrics.jsonl").read_text() == before and steps_of(run) == [6]

    # a larger patience: the rule changed, training goes on from step 6 with the history it had
    assert cli.main(["train", "cfg.yaml", "train.early_stopping.patience=4"]) == 0
    out = capsys.readouterr().out
    assert "stopped early at step 10 of 20" in out, out
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 11))
    reason = rundir.read_meta(run / "checkpoints/step-000010")["stop_reason"]
    assert [s for s, _ in reason["history"]] == [2, 4, 6, 8, 10] and reason["patience"] == 4
    assert reason["history"] == [list(h) for h in sorted(val(metrics, "eval_loss").items())]


def test_a_plateau_of_a_suite_stops_the_run_where_the_rule_says(tmp_path, tiny_model_dir, chat_file, suites_dir):
    """A python suite's value improves, then creeps up by less than min_delta: the run stops at the step the documented
    rule gives on the logged val/ history (the base model's validation at step 0 does not count)."""
    count = tmp_path / "flat.calls"
    values = [1.0, 2.0, 3.0, 3.001, 3.002, 3.003, 3.004, 3.005]
    result, metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "train.max_steps=14",
        "eval.every_steps=2",
        f"eval.suites=[{{name: flat, kind: python, function: '{MODULE}:plateau', options: {{count: '{count}', values: {values}}}}}]",
        "train.early_stopping={metric: val/flat.value, mode: max, patience: 2, min_delta: 0.01}",
    )
    logged = val(metrics, "val/flat.value")
    assert logged == {0: 1.0, 2: 2.0, 4: 3.0, 6: 3.001, 8: 3.002}
    history = sorted((s, v) for s, v in logged.items() if s > 0)
    assert stop_step(history, "max", 0.01, 2) == 8
    assert result.stop_reason is not None and result.stop_reason["kind"] == "early_stopping" and result.stop_reason["step"] == 8
    assert result.stop_reason["history"] == [list(h) for h in history] and result.stop_reason["best_step"] == 4
    assert result.final_checkpoint == result.run_dir / "checkpoints/step-000008"
    assert rundir.read_meta(result.final_checkpoint)["stop_reason"] == result.stop_reason
    assert max(m["step"] for m in metrics) == 8 and result.total_steps == 14


def test_kill_9_then_the_same_command_stops_where_the_uninterrupted_run_stopped(tmp_path, tiny_model_dir, chat_file):
    """The early-stopping watch is part of the train state: a run killed after its first checkpoint and run again stops
    at the same step, with the same history and bit-identical weights (LoRA dropout: the RNG state matters too)."""
    argv = train_argv(
        tiny_model_dir,
        chat_file,
        tmp_path / "unused",
        "model.lora.r=4",
        "model.lora.dropout=0.1",
        "data.max_length=512",
        "data.eval_split=0.25",
        "train.micro_batch_size=2",
        "train.max_steps=40",
        "train.lr=1e-2",
        "train.warmup_steps=0",
        "eval.loss_every_steps=2",
        "checkpoint.every_steps=2",
        "train.early_stopping={metric: eval_loss, mode: max, patience: 3}",
    )
    argv = [a for a in argv if not a.startswith("output.dir=")]  # each run gets its own below
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = subprocess.run([*argv, f"output.dir={tmp_path / 'ref'}"], check=False, capture_output=True, text=True, timeout=600, env=env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    stopped = steps_of(tmp_path / "ref")[-1]
    ref_reason = rundir.read_meta(tmp_path / f"ref/checkpoints/{rundir.step_name(stopped)}")["stop_reason"]
    history = sorted(val(read_jsonl(tmp_path / "ref/metrics.jsonl"), "eval_loss").items())
    assert ref_reason["step"] == stopped == stop_step(history, "max", 0.0, 3) < 40
    assert f"stopped early at step {stopped} of 40" in ref.stdout

    out = tmp_path / "killed"
    kill_9_when([*argv, f"output.dir={out}"], out / "checkpoints/step-000002", env)
    final = f"checkpoints/{rundir.step_name(stopped)}"
    assert steps_of(out)[-1] < stopped, "killed after the stop"
    again = subprocess.run([*argv, f"output.dir={out}"], check=False, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "resuming from" in again.stderr, again.stderr[-2000:]
    assert f"stopped early at step {stopped} of 40" in again.stdout, again.stdout
    assert steps_of(out)[-1] == stopped and rundir.read_meta(out / final)["stop_reason"] == ref_reason
    assert [m["loss"] for m in read_jsonl(out / "metrics.jsonl")] == [m["loss"] for m in read_jsonl(tmp_path / "ref/metrics.jsonl")]
    assert_same_weights(tmp_path / "ref" / final, out / final)


# ------------------------------------------------------------------------- the best checkpoint
def test_the_best_checkpoint_survives_num_keep_last_1(tmp_path, tiny_model_dir, chat_file, capsys):
    """checkpoint.best on the held-out loss (mode auto: min) with num_keep_last 1: best.json names the step of the lowest
    eval_loss in metrics.jsonl, its folder is complete; the schedule's checkpoint stays (keep_schedule), rolling and
    superseded best-only checkpoints go."""
    result, metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "train.max_steps=7",
        "data.eval_split=0.25",
        "eval.loss_every_steps=1",
        "checkpoint.every_steps=3",
        "checkpoint.steps=[2]",
        "checkpoint.num_keep_last=1",
        "checkpoint.best={}",
    )
    run = result.run_dir
    logged = val(metrics, "eval_loss")
    assert sorted(logged) == list(range(1, 8))
    best_step = min(logged, key=logged.get)
    best = rundir.read_best(run)
    assert best == {
        "format": rundir.BEST_FORMAT,
        "step": best_step,
        "metric": "eval_loss",
        "mode": "min",
        "value": logged[best_step],
        "checkpoint": f"checkpoints/{rundir.step_name(best_step)}",
    }
    assert result.best == best
    assert steps_of(run) == sorted({2, best_step, 7})  # the schedule's, the best, the newest
    rundir.verify(run / best["checkpoint"])
    meta = rundir.read_meta(run / best["checkpoint"])
    assert "best" in meta["rules"] and meta["validation"]["eval_loss"] == logged[best_step]
    assert [f.step for f in checkpoint.complete_checkpoints(run)] == steps_of(run)
    # every improvement was saved; those saved only for it went once a later one was better
    improved = [s for s in logged if logged[s] == min(v for t, v in logged.items() if t <= s)]
    best_only = [s for s in improved if s not in (2, 3, 6, 7)]  # not also a schedule / every_steps / last checkpoint
    out = capsys.readouterr().out
    for step in improved:
        assert f"checkpoint: {run / 'checkpoints' / rundir.step_name(step)} (" in out and f"best: step {step}, eval_loss" in out
    for step in best_only:
        assert (step == best_step) != (f"retention: deleted {rundir.step_name(step)} (saved as the best" in out), step


def test_the_best_by_a_suite_metric_in_mode_max_is_kept_while_rolling_ones_go(tmp_path, tiny_model_dir, chat_file):
    """checkpoint.best on a val/ metric with mode max (the highest held-out loss: an early step) stays while every_steps
    checkpoints roll under num_keep_last 1; with keep_schedule false the schedule's checkpoint goes too."""
    result, metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "train.max_steps=6",
        "data.eval_split=0.25",
        "eval.every_steps=2",
        "eval.suites=[{name: held, kind: loss}]",
        "checkpoint.every_steps=1",
        "checkpoint.steps=[3]",
        "checkpoint.num_keep_last=1",
        "checkpoint.keep_schedule=false",
        "checkpoint.best={metric: val/held.loss, mode: max}",
    )
    run = result.run_dir
    logged = {s: v for s, v in val(metrics, "val/held.loss").items() if s > 0}
    assert sorted(logged) == [2, 4, 6]
    best_step = max(logged, key=logged.get)
    assert best_step < 6  # the loss falls: the best is not the newest
    best = rundir.read_best(run)
    assert (best["step"], best["metric"], best["mode"], best["value"]) == (best_step, "val/held.loss", "max", logged[best_step])
    assert steps_of(run) == [best_step, 6]
    rundir.verify(run / best["checkpoint"])
    assert rundir.read_meta(run / best["checkpoint"])["validation"]["val/held.loss"] == logged[best_step]
    # its validation is stored for `finetrack eval`, as the newest's is
    assert json.loads(rundir.eval_path(run, best_step).read_text())["metrics"]["held.loss"] == logged[best_step]
