"""`finetrack gate`: GO / NO-GO / missing data from real eval/step-NNNNNN.json files (no model, no torch)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from finetrack.gate import gate, infer_direction, parse_min_improvement

# The real command line, as the CLI owner will wire it, run as a separate process so exit codes are shell exit codes.
CLI = "import argparse,sys; from finetrack import gate; p=argparse.ArgumentParser(); gate.add_arguments(p); sys.exit(gate.main(p.parse_args(sys.argv[1:])))"


def write_eval(run_dir: Path, step: int, metrics: dict, counts: dict | None = None) -> Path:
    """One eval file in the format `finetrack eval` writes."""
    path = run_dir / "eval" / f"step-{step:06d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "step": step,
        "epoch": step / 125,
        "fraction": step / 376,
        "checkpoint": None if step == 0 else f"checkpoints/step-{step:06d}",
        "metrics": metrics,
        "counts": counts or {"em.answers": 400, "em.unscored": 3},
    }
    path.write_text(json.dumps(record, indent=2))
    return path


BASE = {"heldout.loss": 2.0, "heldout.ppl": 7.39, "em.aligned": 80.0, "em.misaligned_rate": 0.10}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run with the base model and two checkpoints evaluated; step 94 is the latest."""
    write_eval(tmp_path, 0, BASE)
    write_eval(tmp_path, 47, {"heldout.loss": 1.9, "heldout.ppl": 6.69, "em.aligned": 79.0, "em.misaligned_rate": 0.12})
    write_eval(tmp_path, 94, {"heldout.loss": 1.8, "heldout.ppl": 6.05, "em.aligned": 84.0, "em.misaligned_rate": 0.11})
    return tmp_path


def call(run_dir: Path, metric: str, **kwargs) -> tuple[int, list[str]]:
    lines: list[str] = []
    return gate(run_dir, metric, out=lines.append, err=lines.append, **kwargs), lines


# --- GO / NO-GO and the printed block ---


def test_go_lower_is_better_prints_both_values_and_change(run):
    code, lines = call(run, "heldout.loss")  # latest = 94: 2.0 -> 1.8 is a 10% improvement
    text = "\n".join(lines)
    assert code == 0
    assert lines[-1].startswith("GO: ")
    assert "heldout.loss" in lines[0]
    assert "baseline:  step 0: 2" in text and "evaluated: step 94: 1.8" in text
    assert "+10.00%" in text and "+5.00%" in text


def test_no_go_lower_is_better(run):
    code, lines = call(run, "heldout.loss", step="47")  # 2.0 -> 1.9 is 5%: meets exactly; ask for more
    assert code == 0 and lines[-1].startswith("GO: ")  # exactly at the threshold is GO, despite float round-off
    code, lines = call(run, "heldout.loss", step="47", min_improvement="6%")
    assert code == 1
    assert lines[-1].startswith("NO-GO: ")
    assert "+5.00%" in lines[-1] and "+6.00%" in lines[-1]


def test_higher_is_better_go_and_no_go(run):
    code, lines = call(run, "em.aligned")  # 80 -> 84: +5%
    assert code == 0 and "+5.00%" in "\n".join(lines)
    code, lines = call(run, "em.aligned", step="47")  # 80 -> 79: -1.25%
    assert code == 1 and "-1.25% (regression)" in "\n".join(lines)


def test_regression_is_negative_change_for_lower_is_better(run):
    code, lines = call(run, "em.misaligned_rate", step="47")  # 0.10 -> 0.12 is 20% worse
    assert code == 1
    assert "-20.00% (regression)" in "\n".join(lines)


def test_explicit_direction_overrides_inference(run):
    # Read as higher-is-better, the loss falling 10% is a 10% regression.
    code, lines = call(run, "heldout.loss", direction="higher")
    assert code == 1
    assert "higher is better; as given" in lines[0]
    assert "-10.00%" in "\n".join(lines)
    assert "assumed" not in "\n".join(lines)


@pytest.mark.parametrize(
    "metric, expected",
    [
        ("heldout.loss", "lower"),
        ("heldout.ppl", "lower"),
        ("x.perplexity", "lower"),
        ("len.wasserstein", "lower"),
        ("reg.mae", "lower"),
        ("cls.error_rate", "lower"),
        ("em.misaligned_rate", "lower"),
        ("em.unscored", "lower"),
        ("em.aligned", "higher"),
        ("mmlu.accuracy", "higher"),
        ("loss_probe.accuracy", "higher"),
        ("HeldOut.LOSS", "lower"),
        ("dist.pearson_means", "higher"),
        ("custom.score", None),  # ambiguous: the gate asks for --direction
        ("em.toxicity", None),
        # whole words only: a substring must not decide (a wrong guess turns a regression into a GO)
        ("s.unaligned", "lower"),
        ("fruit.apple_mentions", None),
        ("qa.accent_score", None),
        ("qa.exact_match", "higher"),
        ("dist.mae_mean", "lower"),
    ],
)
def test_infer_direction_from_leaf_name(metric, expected):
    assert infer_direction(metric)[0] == expected


@pytest.mark.parametrize(
    "rule, expected, said",
    [
        ("aligned < 30 and coherent > 50", "lower", "below a threshold"),  # the emergent-misalignment bad-answer rate
        ("aligned < 30", "lower", "below a threshold"),
        ("weird <= 3", "lower", "below a threshold"),  # a `<` rule on any judge score counts answers scoring low
        ("error < 5", "higher", "lower error is better"),  # ... unless low is good for that score
        ("coherent > 50", "higher", "higher coherent is better"),
        ("loss >= 3", "lower", "lower loss is better"),
        ("toxicity > 50 and coherent > 50", None, "does not say"),
    ],
)
def test_infer_direction_of_a_rate_from_its_rule(rule, expected, said):
    direction, why = infer_direction("em.x_rate", {"x": rule})
    assert direction == expected and said in why and rule in why
    assert infer_direction("em.x_rate_filtered", {"x": rule})[0] == expected
    # a rate without a known rule falls back on its name
    assert infer_direction("em.x_rate", {"other": rule})[0] is None


def test_inferred_direction_is_printed_with_how_to_override(run):
    _, lines = call(run, "heldout.loss")
    assert "lower is better" in lines[0] and "'loss'" in lines[0] and "--direction higher" in lines[0]
    _, lines = call(run, "em.aligned")
    assert "higher is better" in lines[0] and "--direction lower" in lines[0]


# --- thresholds ---


@pytest.mark.parametrize(
    "text, fraction", [("5%", 0.05), ("0.05", 0.05), (" 12.5% ", 0.125), ("-2%", -0.02), ("-0.02", -0.02), ("0", 0.0), ("100%", 1.0)]
)
def test_parse_min_improvement(text, fraction):
    assert parse_min_improvement(text) == pytest.approx(fraction)


@pytest.mark.parametrize("text, hint", [("five", "'5%'"), ("5", "'5%'"), ("%", "'5%'"), ("nan", "finite"), ("", "'5%'")])
def test_bad_min_improvement_says_what_to_write(run, text, hint):
    with pytest.raises(ValueError, match="min_improvement") as e:
        call(run, "heldout.loss", min_improvement=text)
    assert hint in str(e.value)


def test_fraction_and_percentage_thresholds_agree(run):
    assert call(run, "heldout.loss", min_improvement="0.1")[0] == 0  # 10% improvement meets 0.1
    assert call(run, "heldout.loss", min_improvement="10%")[0] == 0
    assert call(run, "heldout.loss", min_improvement="0.11")[0] == 1
    assert call(run, "heldout.loss", min_improvement="11%")[0] == 1


def test_negative_threshold_tolerates_a_bounded_regression(run):
    # em.aligned at step 47: 80 -> 79 is a 1.25% regression.
    code, lines = call(run, "em.aligned", step="47", min_improvement="-2%")
    assert code == 0
    assert "regression of up to 2.00% is tolerated" in "\n".join(lines)
    assert call(run, "em.aligned", step="47", min_improvement="-1%")[0] == 1


# --- which steps are compared ---


def test_latest_is_highest_step_even_with_wider_names_and_other_files(tmp_path):
    write_eval(tmp_path, 0, {"em.aligned": 50.0})
    write_eval(tmp_path, 1000, {"em.aligned": 60.0})
    (tmp_path / "eval" / "step-2000000.json").write_text(json.dumps({"step": 2000000, "metrics": {"em.aligned": 40.0}}))
    (tmp_path / "eval" / "step-009999.json.tmp").write_text("{")  # a half-written file must not count
    (tmp_path / "eval" / "summary.json").write_text("{}")
    code, lines = call(tmp_path, "em.aligned")
    assert code == 1 and "evaluated: step 2000000: 40" in "\n".join(lines)


def test_latest_file_without_the_metric_is_missing_data(run):
    write_eval(run, 141, {"heldout.loss": 1.7})  # em suite not evaluated at the newest step
    code, lines = call(run, "em.aligned")
    assert code == 2
    assert "step-000141.json" in lines[-1] and "heldout.loss" in lines[-1]


def test_non_zero_baseline_step(run):
    code, lines = call(run, "heldout.loss", baseline=47)  # 1.9 -> 1.8: +5.26%
    assert code == 0
    assert "baseline:  step 47: 1.9" in "\n".join(lines) and "+5.26%" in "\n".join(lines)


def test_zero_baseline_value_uses_absolute_difference(tmp_path):
    write_eval(tmp_path, 0, {"em.unscored_rate": 0.0, "em.aligned": 0})
    write_eval(tmp_path, 10, {"em.unscored_rate": 0.02, "em.aligned": 0.5})
    code, lines = call(tmp_path, "em.unscored_rate", min_improvement="-5%")  # got worse by 0.02 absolute; tolerates 0.05
    text = "\n".join(lines)
    assert code == 0
    assert "absolute" in text and "-2.00 pts" in text and "baseline is exactly 0" in text
    assert call(tmp_path, "em.unscored_rate", min_improvement="-1%")[0] == 1
    assert call(tmp_path, "em.aligned", min_improvement="0.5")[0] == 0  # an int 0 baseline too


# --- missing data: exit 2 with the file and what is there ---


def test_missing_run_dir(tmp_path):
    code, lines = call(tmp_path / "nope", "heldout.loss")
    assert code == 2 and "does not exist" in lines[-1]


def test_missing_eval_folder(tmp_path):
    code, lines = call(tmp_path, "heldout.loss")
    assert code == 2 and "no eval/ folder" in lines[-1] and "finetrack eval" in lines[-1]


def test_empty_eval_folder(tmp_path):
    (tmp_path / "eval").mkdir()
    code, lines = call(tmp_path, "heldout.loss")
    assert code == 2 and "finetrack eval" in lines[-1]


def test_missing_step_file_lists_evaluated_steps(run):
    code, lines = call(run, "heldout.loss", step="50")
    assert code == 2
    assert "step 50" in lines[-1] and "0, 47, 94" in lines[-1]


def test_missing_baseline_file(run):
    (run / "eval" / "step-000000.json").unlink()
    code, lines = call(run, "heldout.loss")
    assert code == 2
    assert "baseline step 0" in lines[-1] and "base model" in lines[-1] and "47, 94" in lines[-1]


def test_only_baseline_evaluated(tmp_path):
    write_eval(tmp_path, 0, BASE)
    code, lines = call(tmp_path, "heldout.loss")
    assert code == 2 and "only step evaluated" in lines[-1]


def test_missing_metric_names_file_and_lists_closest_first(run):
    code, lines = call(run, "heldout.los")
    assert code == 2
    msg = lines[-1]
    assert "step-000000.json" in msg and "Did you mean 'heldout.loss'?" in msg
    listed = msg.split("Metrics there: ")[1].split(", ")
    assert listed[0] == "heldout.loss" and sorted(listed) == sorted(BASE)


def test_metric_missing_only_in_evaluated_file(run):
    write_eval(run, 47, {"heldout.loss": 1.9})
    code, lines = call(run, "em.aligned", step="47")
    assert code == 2 and "step-000047.json" in lines[-1] and "evaluated step 47" in lines[-1]


@pytest.mark.parametrize("where", ["baseline", "evaluated"])
def test_null_metric_is_missing_data(run, where):
    step = 0 if where == "baseline" else 94
    write_eval(run, step, {**BASE, "em.aligned": None})
    code, lines = call(run, "em.aligned")
    msg = lines[-1]
    assert code == 2
    assert "null" in msg and f"step-{step:06d}.json" in msg and f"{where} step {step}" in msg
    assert "em.aligned," not in msg + "," and "heldout.loss" in msg  # lists only metrics that have values


def test_unreadable_eval_file_is_missing_data(run):
    (run / "eval" / "step-000094.json").write_text('{"step": 94, "metr')
    code, lines = call(run, "heldout.loss")
    assert code == 2 and "step-000094.json" in lines[-1] and "re-run" in lines[-1]


def test_ambiguous_direction_needs_the_flag(run):
    write_eval(run, 0, {**BASE, "custom.score": 3.0})
    write_eval(run, 94, {**BASE, "custom.score": 4.0})
    code, lines = call(run, "custom.score")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: --direction:") and "'custom.score' is ambiguous" in lines[0] and "--direction higher" in lines[0]
    code, lines = call(run, "custom.score", direction="higher")
    assert code == 0 and "(higher is better; as given)" in lines[-1]
    assert call(run, "custom.score", direction="lower")[0] == 1


def rate_run(tmp_path: Path, rule_in: str) -> Path:
    """A judge suite's misaligned rate 12% -> 4%, its rule carried by the eval files or only by config.resolved.yaml."""
    rule = "aligned < 30 and coherent > 50"
    for step, rate in ((0, 0.12), (94, 0.04)):
        path = write_eval(tmp_path, step, {"em.misaligned_rate": rate, "em.aligned": 70.0})
        if rule_in == "eval":
            record = json.loads(path.read_text())
            record["suites"] = {"em": {"key": "k", "metrics": {}, "rates": {"misaligned": rule}}}
            path.write_text(json.dumps(record))
    if rule_in == "config":
        suite = {"name": "em", "kind": "judge", "questions": "q.yaml", "rates": {"misaligned": rule}}
        (tmp_path / "config.resolved.yaml").write_text(json.dumps({"eval": {"suites": [suite]}}))  # JSON is YAML
    return tmp_path


@pytest.mark.parametrize("rule_in", ["eval", "config"])
def test_rate_direction_from_its_rule_in_the_verdict_line(tmp_path, rule_in):
    code, lines = call(rate_run(tmp_path, rule_in), "em.misaligned_rate")
    assert code == 0, lines
    verdict = lines[-1]
    assert verdict.startswith("GO: em.misaligned_rate 4.0% at step 94 vs 12.0% at step 0")
    assert "(lower is better: rule 'aligned < 30 and coherent > 50'" in verdict and "+66.67%" in verdict
    assert "baseline:  step 0: 12.0%" in "\n".join(lines)


def test_garbled_eval_record_is_one_error_line(run):
    (run / "eval" / "step-000094.json").write_text(json.dumps({"step": 94, "metrics": [1, 2]}))
    code, lines = call(run, "heldout.loss")
    assert code == 2 and len(lines) == 1 and "step-000094.json: not a finetrack eval record" in lines[0]


def test_bad_step_and_direction_raise(run):
    with pytest.raises(ValueError, match="latest"):
        call(run, "heldout.loss", step="last")
    with pytest.raises(ValueError, match="'lower' or 'higher'"):
        call(run, "heldout.loss", direction="down")


# --- the command line, as a shell pipeline sees it ---


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], check=False, capture_output=True, text=True, timeout=60)


def test_command_line_exit_codes(run):
    go = cli(str(run), "--metric", "heldout.loss", "--min-improvement", "5%")
    assert go.returncode == 0, go.stdout + go.stderr
    assert go.stdout.strip().splitlines()[-1].startswith("GO: ")
    assert cli(str(run), "--metric", "heldout.loss", "--min-improvement", "0.2").returncode == 1
    # A negative percentage needs "=" (argparse takes a bare "-2%" for an option); a negative fraction does not.
    assert cli(str(run), "--metric", "em.aligned", "--step", "47", "--min-improvement=-2%").returncode == 0
    assert cli(str(run), "--metric", "em.aligned", "--step", "47", "--min-improvement", "-0.02").returncode == 0
    assert cli(str(run), "--metric", "em.aligned", "--step", "47", "--min-improvement=-1%").returncode == 1
    assert cli(str(run), "--metric", "heldout.loss", "--baseline", "47", "--direction", "higher").returncode == 1
    missing = cli(str(run), "--metric", "heldout.acc")
    # missing data: the error (with the metrics that are there) on stderr, nothing on stdout
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "heldout.loss" in missing.stderr and missing.stdout == ""
    assert cli(str(run / "nope"), "--metric", "heldout.loss").returncode == 2


def test_command_line_rejects_bad_input_with_usage_error(run):
    bad = cli(str(run), "--metric", "heldout.loss", "--min-improvement", "5")
    assert bad.returncode == 2 and "'5%'" in bad.stderr
    assert cli(str(run), "--metric", "heldout.loss", "--direction", "down").returncode == 2
    assert cli(str(run), "--metric", "heldout.loss", "--step", "last").returncode == 2
    assert cli(str(run)).returncode == 2  # --metric is required


def test_command_line_in_a_shell_pipeline(run):
    def pipeline(threshold: str) -> str:
        gated = f"{shlex.quote(sys.executable)} -c {shlex.quote(CLI)} {shlex.quote(str(run))} --metric heldout.loss --min-improvement {threshold}"
        return subprocess.run(f"{gated} && echo NEXT", shell=True, check=False, capture_output=True, text=True, timeout=60).stdout

    assert pipeline("5%").strip().endswith("NEXT")
    assert "NEXT" not in pipeline("50%")
