"""`finetrack eval` on runs trained with the regression and contrastive objectives: the head reloaded from each
checkpoint, the regression and contrastive suites, the objective's loss, step 0 skipped where there is no head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import read_jsonl, tiny_run

from finetrack import cli, gate
from finetrack.config import ConfigError, load_config
from finetrack.evaluate.regression import average_ranks, regression_metrics
from finetrack.evaluate.runner import evaluate_run

REGRESSION_SUITES = [{"name": "heldout", "kind": "loss"}, {"name": "reg", "kind": "regression", "micro_batch_size": 5}]
CONTRASTIVE_SUITES = [{"name": "heldout", "kind": "loss"}, {"name": "con", "kind": "contrastive", "micro_batch_size": 3}]
EVERY_2 = ("checkpoint.every_steps=2", "data.eval_split=0.25", "eval.loss_every_steps=2")


def logged_at(run_dir: Path, step: int) -> dict:
    """The held-out numbers training logged at `step` (eval_loss, eval_stability, ...)."""
    return next(m for m in read_jsonl(run_dir / "metrics.jsonl") if m["step"] == step and "eval_loss" in m)


@pytest.fixture(scope="module", params=["lora", "full"])
def regression_run(request, tmp_path_factory, tiny_model_dir, regression_file) -> Path:
    """A regression run (mse on raw targets) with a held-out split and the loss and regression suites, evaluated by the CLI."""
    tmp = tmp_path_factory.mktemp(f"regression-{request.param}")
    result, _ = tiny_run(
        tmp,
        tiny_model_dir,
        regression_file,
        f"model.method={request.param}",
        "objective.kind=regression",
        *EVERY_2,
        f"eval.suites={json.dumps(REGRESSION_SUITES)}",
    )
    assert cli.main(["eval", str(result.run_dir)]) == 0
    return result.run_dir


def test_regression_eval_reloads_the_head_and_matches_training(regression_run):
    records = {p: json.loads((regression_run / f"eval/step-{p:06d}.json").read_text()) for p in (0, 2, 4)}
    for step in (2, 4):
        metrics, counts = records[step]["metrics"], records[step]["counts"]
        # the head checkpoint, reloaded around the model, gives the validation loss training logged at that step
        assert metrics["heldout.loss"] == pytest.approx(logged_at(regression_run, step)["eval_loss"], rel=1e-5)
        assert "heldout.ppl" not in metrics  # perplexity is a next-token number
        # raw targets and loss=mse: the objective's loss is the mean squared error in the data's units
        assert metrics["reg.mse"] == pytest.approx(metrics["heldout.loss"], rel=1e-5)
        assert 0 <= metrics["reg.mae"] and metrics["reg.mae"] ** 2 <= metrics["reg.mse"] * (1 + 1e-9)
        assert all(-1 <= metrics[f"reg.{k}"] <= 1 for k in ("pearson", "spearman")) and metrics["reg.r2"] <= 1
        assert counts["reg.rows"] == counts["reg.targets"] == counts["heldout.rows"] == counts["heldout.targets"] == 12
    assert records[2]["metrics"]["reg.mse"] != pytest.approx(records[4]["metrics"]["reg.mse"], rel=1e-6)
    # step 0, the base model: no trained head, so both suites are recorded as skipped, with no metrics
    base = records[0]
    assert base["metrics"] == {} and base["counts"] == {}
    assert {s: r["skipped"] for s, r in base["suites"].items()} == {
        "heldout": "no trained head at step 0: the base model has no regression head (objective.kind=regression)",
        "reg": "no trained head at step 0: the base model has no regression head (objective.kind=regression)",
    }
    summary = (regression_run / "eval/summary.csv").read_text().splitlines()
    assert summary[0] == "step,epoch,fraction,heldout.loss,reg.mae,reg.mse,reg.pearson,reg.r2,reg.spearman"
    assert summary[1] == "0,0.0,0.0,,,,,,"  # no values, no zeros


def test_regression_eval_is_cached_and_gate_and_report_read_the_skip(tmp_path, regression_run):
    lines: list[str] = []
    evaluate_run(regression_run, out=lines.append)
    assert lines[0] == "cached: 6 (step, suite) result(s) unchanged since the last eval"  # the skips included
    assert lines[1].splitlines()[2].split() == ["0", "base", *["-"] * 6]  # the table: no value at step 0
    errors: list[str] = []
    # the default baseline is step 0, where the suite was skipped: the gate says so and how to compare instead
    assert gate.gate(regression_run, "reg.mse", out=lines.append, err=errors.append) == gate.MISSING
    assert "suite 'reg' was skipped there (no trained head at step 0" in errors[0] and "--baseline STEP" in errors[0]
    mse = {r["step"]: r["metrics"].get("reg.mse") for r in evaluate_run(regression_run, out=lambda s: None)}
    expected = gate.GO if (mse[2] - mse[4]) / mse[2] >= 0.05 else gate.NO_GO
    assert gate.gate(regression_run, "reg.mse", baseline=2, out=lines.append) == expected
    assert f"baseline:  step 2: {mse[2]:.6g}" in lines
    from finetrack.report import write_report

    page = write_report([regression_run], tmp_path / "report.html").read_text()
    assert "reg.mse" in page and "reg.spearman" in page


def test_step_level_normalized_targets_are_scored_in_the_data_units(tmp_path, tiny_model_dir, steps_file):
    """Process-reward rows (one label per step) trained on normalized targets: the suite un-normalizes, the loss does not."""
    suites = [{"name": "heldout", "kind": "loss"}, {"name": "reg", "kind": "regression"}]
    result, _ = tiny_run(
        tmp_path,
        tiny_model_dir,
        steps_file,
        "objective.kind=regression",
        "objective.regression.level=step",
        "objective.regression.normalize_targets=true",
        "data.eval_split=0.25",
        f"eval.suites={json.dumps(suites)}",
    )
    (record,) = [r for r in evaluate_run(result.run_dir, steps="4", out=lambda s: None)]
    head = json.loads((result.run_dir / "checkpoints/step-000004/head.json").read_text())
    assert head["normalize_targets"] and head["target_std"] != pytest.approx(1.0)
    m, c = record["metrics"], record["counts"]
    assert m["heldout.loss"] == pytest.approx(logged_at(result.run_dir, 4)["eval_loss"], rel=1e-5)
    # mse in the labels' units = the normalized loss x std^2
    assert m["reg.mse"] == pytest.approx(m["heldout.loss"] * head["target_std"] ** 2, rel=1e-4)
    assert c["reg.rows"] == 8 and c["reg.targets"] == c["heldout.targets"] > 8  # several steps per row


def test_regression_metrics_against_numpy():
    rng = np.random.default_rng(0)
    target = rng.normal(size=40)
    predicted = 0.7 * target + rng.normal(scale=0.5, size=40)
    target[:6] = target[0]  # ties on both sides: ranks are averaged
    predicted[10:14] = 0.25
    m = regression_metrics(predicted, target)
    assert m["mse"] == pytest.approx(np.mean((predicted - target) ** 2))
    assert m["mae"] == pytest.approx(np.mean(np.abs(predicted - target)))
    assert m["r2"] == pytest.approx(1 - np.sum((predicted - target) ** 2) / np.sum((target - target.mean()) ** 2))
    assert m["pearson"] == pytest.approx(np.corrcoef(predicted, target)[0, 1])

    def naive_ranks(x):  # rank = 1 + how many are smaller + half the others equal to it
        return np.array([1 + np.sum(x < v) + (np.sum(x == v) - 1) / 2 for v in x])

    assert m["spearman"] == pytest.approx(np.corrcoef(naive_ranks(predicted), naive_ranks(target))[0, 1])
    assert average_ranks(np.array([30.0, 10, 20, 20])).tolist() == [4, 1, 2.5, 2.5]
    scipy_stats = pytest.importorskip("scipy.stats")
    assert m["spearman"] == pytest.approx(scipy_stats.spearmanr(predicted, target).statistic)
    # undefined values are None, not NaN: constant targets (r2, correlations), nothing to score
    flat = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0]))
    assert flat["mse"] == pytest.approx(2 / 3) and flat["r2"] is flat["pearson"] is flat["spearman"] is None
    assert regression_metrics(np.zeros(0), np.zeros(0)) == dict.fromkeys(("mse", "mae", "r2", "pearson", "spearman"))
    # a perfect monotone (not linear) prediction: spearman 1, pearson below
    x = np.arange(1.0, 9.0)
    perfect = regression_metrics(np.exp(x), x)
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["pearson"] < 0.99


def test_contrastive_eval_at_step_0_and_the_last_step(tmp_path, tiny_model_dir, triplet_file):
    result, _ = tiny_run(
        tmp_path, tiny_model_dir, triplet_file, "objective.kind=contrastive", *EVERY_2, f"eval.suites={json.dumps(CONTRASTIVE_SUITES)}"
    )
    records = evaluate_run(result.run_dir, steps="latest", out=lambda s: None)
    assert [r["step"] for r in records] == [0, 4]
    base, last = records[0]["metrics"], records[1]["metrics"]
    logged = logged_at(result.run_dir, 4)
    for name in ("stability", "separation", "discrimination"):
        # the suite, the loss suite's terms and training's held-out numbers agree at the last checkpoint
        assert last[f"con.{name}"] == pytest.approx(logged[f"eval_{name}"], abs=1e-5)
        assert last[f"heldout.{name}"] == pytest.approx(logged[f"eval_{name}"], abs=1e-5)
        assert base[f"con.{name}"] == pytest.approx(base[f"heldout.{name}"], abs=1e-5)  # the base model is measured too
    assert last["heldout.loss"] == pytest.approx(logged["eval_loss"], rel=1e-5) and "heldout.ppl" not in last
    assert last["con.discrimination"] == pytest.approx(last["con.stability"] - (1 - last["con.separation"]))
    assert base["con.stability"] != pytest.approx(last["con.stability"], abs=1e-6)
    assert records[1]["counts"]["con.triplets"] == records[1]["counts"]["heldout.triplets"] == 8


def test_objective_suites_need_their_objective(tmp_path, tiny_model_dir, capsys):
    regression = [{"name": "reg", "kind": "regression"}]
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model.name={tiny_model_dir}", f"eval.suites={json.dumps(regression)}"])
    assert str(e.value).count("\n") == 0 and (
        "eval.suites.0.kind has no effect unless objective.kind=regression (it scores the regression head that objective "
        "trains); remove the suite or set objective.kind=regression" in str(e.value)
    )
    contrastive = [{"name": "con", "kind": "contrastive"}]
    with pytest.raises(ConfigError, match="eval.suites.0.kind has no effect unless objective.kind=contrastive"):
        load_config(None, ["objective.kind=regression", f"eval.suites={json.dumps(contrastive)}"])
    # the CLI: `finetrack eval CONFIG.yaml` on a causal_lm config with a regression suite is one error line, exit 2
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name: {tiny_model_dir}}}\noutput: {{dir: {tmp_path / 'run'}}}\neval:\n  suites:\n    - {{name: reg, kind: regression}}\n"
    )
    capsys.readouterr()
    assert cli.main(["eval", str(config), "--steps", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"{config}:5: eval.suites.0.kind has no effect unless objective.kind=regression" in err[0], err
