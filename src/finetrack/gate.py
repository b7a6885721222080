"""`finetrack gate`: GO / NO-GO on one metric, read from the eval files of a run.

Reads RUN_DIR/eval/step-NNNNNN.json (written by `finetrack eval`; step 0 is the base model) and, for a rate
whose rule the eval files do not carry, config.resolved.yaml; it loads neither torch nor fsspec, so it is quick
between two commands in a shell pipeline:

    finetrack gate runs/x --metric heldout.loss --min-improvement 5% && finetrack train long.yaml

Exit status: 0 GO, 1 NO-GO, 2 missing data or bad input (no run, no or garbled eval file, metric absent or null,
a metric whose better direction is ambiguous without --direction).
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from . import rundir
from .evaluate import rates
from .evaluate.spec import EvalError, parse_rate
from .flags import one_step, whole_number
from .schema import ConfigError

# A leaf metric name containing one of these words says which way is better (lower words are checked first:
# "misaligned" contains "aligned"). A name with none of them is ambiguous: the gate asks for --direction
# rather than guess, since a wrong guess turns a regression into a GO.
LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "wasserstein", "mae", "mse", "error", "misaligned", "unaligned", "unscored")
HIGHER_IS_BETTER = (
    *("accuracy", "acc", "aligned", "coherent", "pearson", "spearman", "r2", "correlation", "f1", "exact_match", "bleu", "rouge"),
    *("stability", "separation", "discrimination"),  # the contrastive suite's (objectives.py)
)
DIRECTIONS = ("lower", "higher")
# Float round-off must not turn an exact hit into NO-GO: (0.3 - 0.285) / 0.3 is 0.04999999999999999.
_TOLERANCE = 1e-9

GO, NO_GO, MISSING = 0, 1, 2


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


class _Missing(Exception):
    """Data the gate needs is not there; the message says what and how to get it."""


def parse_min_improvement(text: str) -> float:
    """Parse a threshold as a fraction: "5%" -> 0.05, "0.05" -> 0.05, "-2%" -> -0.02 (tolerate a 2% regression)."""
    raw = text.strip()
    is_percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if is_percent else raw)
    except ValueError:
        raise ValueError(
            f"min_improvement {text!r} is not a number: write a percentage like '5%' or '-2%', or a fraction like '0.05'"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"min_improvement {text!r} must be a finite number, e.g. '5%' or '0.05'")
    if is_percent:
        return value / 100
    # A bare "5" is far more likely to mean 5% than a 500% improvement; make the user say which.
    if abs(value) >= 1:
        raise ValueError(
            f"min_improvement {text!r} is ambiguous: write '{raw}%' for {raw} percent, or a fraction below 1 such as '{value / 100:g}'"
        )
    return value


def infer_direction(metric: str, rules: dict[str, str] | None = None) -> tuple[str | None, str]:
    """Which way is better for `metric`: ("lower" | "higher", why) or (None, why not) when it is ambiguous.

    A judge-suite rate (`<suite>.<name>_rate[_filtered]`) whose rule is in `rules` (rate name -> rule) is read
    from its rule's criterion: `aligned < 30` counts answers scoring *below* a threshold on a judge score, the
    emergent-misalignment convention for a bad-answer rate, so lower is better (unless the score itself is
    lower-is-better by name, e.g. `error < 5`, which counts good answers). `coherent > 50` counts answers above
    a threshold: better in the direction of its score, ambiguous when the score's name does not say.
    Anything else is read from the leaf name (after the last "."), so a suite called "loss_probe" does not flip
    its accuracy metrics.
    """
    rate = rates.rate_name(metric)
    rule = (rules or {}).get(rate) if rate is not None else None
    if rule is not None:
        score, op, value = parse_rate(rule)[0]
        score_direction = _by_name(score)
        criterion = f"{score} {op} {value:g}"
        if op in ("<", "<="):
            if score_direction == "lower":
                return "higher", f"rule '{rule}': it counts answers with a low {score}, and lower {score} is better"
            return "lower", f"rule '{rule}': it counts answers scoring below a threshold ({criterion})"
        if score_direction is None:
            return None, f"rule '{rule}' counts answers with {criterion}, and the name '{score}' does not say whether that is good"
        return score_direction, f"rule '{rule}': it counts answers with {criterion}, and {score_direction} {score} is better"
    direction, word = _name_word(metric.rsplit(".", 1)[-1])
    if direction is None:
        return None, f"its name contains none of the words {', '.join(LOWER_IS_BETTER + HIGHER_IS_BETTER)}"
    return direction, f"its name contains the word {word!r}"


def _name_word(name: str) -> tuple[str | None, str | None]:
    """("lower" | "higher" | None, the word that says so). Whole words only, split at . _ - and spaces: `apple_mentions`
    holds no 'ppl', `accent_score` no 'acc', and 'unaligned' is not 'aligned' (a wrong guess turns a regression into a GO)."""
    padded = "_" + "_".join(w for w in re.split(r"[._\-\s]+", name.lower()) if w) + "_"
    for direction, words in (("lower", LOWER_IS_BETTER), ("higher", HIGHER_IS_BETTER)):
        for word in words:
            if f"_{word}_" in padded:
                return direction, word
    return None, None


def _by_name(name: str) -> str | None:
    return _name_word(name)[0]


def _eval_files(run_dir: Path) -> dict[int, Path]:
    """Step -> eval file for every eval/step-N.json of the run; anything else in eval/ is ignored."""
    if not run_dir.exists():
        raise _Missing(f"run directory {run_dir} does not exist; give the output.dir of an evaluated run")
    if not run_dir.is_dir():
        raise _Missing(f"{run_dir} is a file, not a run directory; give the folder holding eval/")
    eval_dir = run_dir / rundir.EVAL_DIR
    if not eval_dir.is_dir():
        what = "" if rundir.is_run_dir(run_dir) else f" and no {rundir.CONFIG_FILE}: it is not a run directory"
        raise _Missing(f"{run_dir} has no eval/ folder{what}; run `finetrack eval RUN_DIR` on a trained run first")
    files = rundir.eval_files(run_dir)
    if not files:
        raise _Missing(f"{eval_dir} holds no step-NNNNNN.json eval files: run `finetrack eval {run_dir}` first")
    return files


def _rules(run_dir: Path, records: list[dict], metric: str) -> dict[str, str]:
    """Rate name -> rule of the metric's suite: from the eval records (what was computed), else config.resolved.yaml."""
    suite = metric.rsplit(".", 1)[0] if "." in metric else ""
    for record in records:
        found = (record.get("suites") or {}).get(suite, {}).get("rates") if isinstance(record.get("suites"), dict) else None
        if isinstance(found, dict):
            return found
    if rundir.is_run_dir(run_dir):
        return rundir.judge_rates(rundir.read_config(run_dir)).get(suite, {})
    return {}


def _list_steps(steps: list[int]) -> str:
    steps = sorted(steps)
    if len(steps) > 12:  # a long run can have hundreds of evals; the ends are what tells the user where to look
        return ", ".join(map(str, steps[:5])) + f", ... ({len(steps) - 10} more), " + ", ".join(map(str, steps[-5:]))
    return ", ".join(map(str, steps))


def _read_record(files: dict[int, Path], step: int, role: str, run_dir: Path) -> dict:
    """The eval record of `step`; raises _Missing naming the steps there are, EvalError for a garbled file."""
    path = files.get(step)
    if path is None:
        hint = " (step 0 is the base model)" if step == 0 else ""
        raise _Missing(
            f"no eval file for {role} step {step}{hint} in {run_dir / 'eval'}; evaluated steps: {_list_steps(list(files))}. "
            f"Pick one of those or run `finetrack eval {run_dir}`"
        )
    return rundir.read_eval(path, run_dir)


def _read_metric(record: dict, path: Path, step: int, metric: str, role: str) -> float:
    """The value of `metric` in one eval record; raises _Missing naming the file and the metrics it does hold."""
    metrics = record.get("metrics") or {}

    def is_number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    available = [name for name, v in metrics.items() if is_number(v)]
    # Every metric, closest to what was asked first, so a typo's fix is at the front of the list.
    ranked = difflib.get_close_matches(metric, available, n=max(len(available), 1), cutoff=0.0)  # n=0 raises (a step with no metrics)
    listing = ", ".join(ranked) if ranked else "none"
    suite = metric.rsplit(".", 1)[0]
    suites = record.get("suites") if isinstance(record.get("suites"), dict) else {}
    skipped = (suites.get(suite) or {}).get("skipped") if isinstance(suites.get(suite), dict) else None
    if metric not in metrics and isinstance(skipped, str):  # e.g. a regression suite at step 0: the base model has no head
        fix = " Compare against a step where it was measured: --baseline STEP." if role == "baseline" else ""
        raise _Missing(
            f"metric {metric!r} has no value in {path} ({role} step {step}): suite {suite!r} was skipped there ({skipped}).{fix}"
        )
    if metric not in metrics:
        close = difflib.get_close_matches(metric, available, n=1)
        guess = f" Did you mean {close[0]!r}?" if close else ""
        raise _Missing(f"metric {metric!r} is not in {path} ({role} step {step}).{guess} Metrics there: {listing}")
    value = metrics[metric]
    if not is_number(value):
        what = "null (nothing could be scored)" if value is None else f"not a finite number ({value!r})"
        raise _Missing(f"metric {metric!r} is {what} in {path} ({role} step {step}). Metrics with values there: {listing}")
    return float(value)


def gate(
    run_dir: Path,
    metric: str,
    step: str = "latest",
    baseline: int = 0,
    min_improvement: str = "5%",
    direction: str | None = None,
    require_export: list[str] | None = None,
    out: Callable[[str], None] = print,
    err: Callable[[str], None] = _to_stderr,
) -> int:
    """Compare `metric` at `step` with `baseline` and say GO (0), NO-GO (1) or missing data / bad input (2).

    The verdict block goes to `out` (stdout); the one "error: ..." line for missing data to `err` (stderr),
    so a pipeline that reads the verdict from stdout never mistakes an error for it.

    step: "latest" (the highest step with an eval file), "best" (the step checkpoints/best.json names: the best
    checkpoint by checkpoint.best's metric) or a step number. min_improvement: "5%" or "0.05";
    negative tolerates that much regression. direction: "lower" / "higher" is better; None infers it (from a
    rate's rule or the metric's name) and says how, and refuses a metric whose direction is ambiguous.
    The improvement is relative to |baseline value|, or absolute when that is exactly 0.
    Raises ValueError for a malformed step, threshold or direction.
    """
    threshold = parse_min_improvement(min_improvement)
    if direction is not None and direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} must be 'lower' or 'higher' (which way is better for {metric})")
    step_text = str(step).strip()
    if step_text not in ("latest", rundir.BEST) and not step_text.isdigit():
        raise ValueError(f"step {step!r} must be 'latest', 'best' or a step number such as 47")

    run_dir = Path(run_dir)
    try:
        files = _eval_files(run_dir)
        step_num = max(files) if step_text == "latest" else rundir.resolve_step(run_dir, step_text)
        # `--step best`: say which best it is, so a log of the gate shows what was compared
        best = f" (best: {rundir.describe_best(rundir.require_best(run_dir), False)})" if step_text == rundir.BEST else ""
        if step_num == baseline:
            only = " (it is the only step evaluated so far)" if len(files) == 1 else ""
            raise _Missing(
                f"evaluated step {step_num} is the baseline step{only}: evaluate a checkpoint with `finetrack eval {run_dir}` or pick --step"
            )
        base_record = _read_record(files, baseline, "baseline", run_dir)
        if step_text == rundir.BEST and step_num not in files:
            raise _Missing(
                f"no eval file for the best step {step_num} (checkpoints/best.json) in {run_dir / 'eval'}; "
                f"run `finetrack eval {run_dir} --steps best` first"
            )
        record = _read_record(files, step_num, "evaluated", run_dir)
        base_value = _read_metric(base_record, files[baseline], baseline, metric, "baseline")
        value = _read_metric(record, files[step_num], step_num, metric, "evaluated")
        if direction is None:
            direction, why = infer_direction(metric, _rules(run_dir, [record, base_record], metric))
            if direction is None:
                raise _Missing(
                    f"--direction: which way is better for {metric!r} is ambiguous ({why}); pass --direction lower or --direction higher"
                )
            how = f"{direction} is better: {why}"
            told = f"{how}; pass --direction {'higher' if direction == 'lower' else 'lower'} if not"
        else:
            how = told = f"{direction} is better; as given"
    except (_Missing, EvalError, ConfigError, rundir.CheckpointError) as e:
        err(f"error: {e}")
        return MISSING

    is_rate = rates.is_rate(metric)

    def show(v: float) -> str:
        return rates.show(v, metric) if is_rate else f"{v:.6g}"

    improvement = value - base_value if direction == "higher" else base_value - value
    if base_value == 0:
        # A relative change from 0 is undefined; the difference itself, in the metric's units, is the honest figure.
        change = improvement
        shown, needed = (
            (f"{100 * improvement:+.2f} pts", f"{100 * threshold:+.2f} pts") if is_rate else (f"{improvement:+.6g}", f"{threshold:+.6g}")
        )
        change_text = f"{shown} (absolute difference: the baseline is exactly 0, so there is no relative change)"
        threshold_text = f"at least {needed} (absolute, since the baseline is 0)"
    else:
        change, shown, needed = improvement / abs(base_value), f"{improvement / abs(base_value) * 100:+.2f}%", f"{threshold * 100:+.2f}%"
        change_text = f"{shown} ({'improvement' if change > 0 else 'regression' if change < 0 else 'no change'})"
        threshold_text = f"at least {needed}" + (f" (a regression of up to {-threshold * 100:.2f}% is tolerated)" if threshold < 0 else "")

    out(f"metric:    {metric} ({told})")
    out(f"baseline:  step {baseline}: {show(base_value)}")
    out(f"evaluated: step {step_num}{best}: {show(value)}")
    out(f"change:    {change_text}")
    out(f"threshold: {threshold_text}")
    moved = f"{metric} {show(value)} at step {step_num} vs {show(base_value)} at step {baseline} ({how}), a change of {shown}"
    missing = _missing_exports(run_dir, step_num, require_export or [], out)
    if change >= threshold - _TOLERANCE and missing:
        out(f"NO-GO: {moved} meets the required {needed}, but {missing}")
        return NO_GO
    if change >= threshold - _TOLERANCE:
        out(f"GO: {moved}, meeting the required {needed}" + (f"; verified exports: {', '.join(require_export)}" if require_export else ""))
        return GO
    out(f"NO-GO: {moved}, short of the required {needed}")
    return NO_GO


def _missing_exports(run_dir: Path, step: int, formats: list[str], out: Callable[[str], None]) -> str:
    """--require-export: '' when every format has a verified export of `step` in RUN_DIR/exports/, else what is missing."""
    missing = []
    for fmt in formats:
        folder, found = rundir.verified_export(run_dir, step, fmt)
        out(f"export:    {fmt}: " + (f"verified ({folder})" if folder else f"no verified export of step {step} (found: {found})"))
        if folder is None:
            missing.append(f"no verified {fmt} export of step {step} (finetrack export {run_dir} --step {step} --format {fmt})")
    return "; ".join(missing)


def _threshold_arg(text: str) -> str:
    """argparse type: reject a bad --min-improvement before anything is read, with the fix in the message."""
    try:
        parse_min_improvement(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `finetrack gate` arguments to `parser` (the CLI wires the verb to `main`)."""
    parser.add_argument("run_dir", help="run directory holding eval/step-NNNNNN.json files (from `finetrack eval`)")
    parser.add_argument("--metric", required=True, help="metric to gate on, '<suite>.<metric>', e.g. heldout.loss or em.aligned")
    parser.add_argument(
        "--step",
        default="latest",
        type=one_step,
        help="step to judge: a step number, 'best' (the step checkpoints/best.json names) "
        "or 'latest' (default): the highest evaluated step",
    )
    parser.add_argument(
        "--baseline", default=0, type=whole_number(0, 10**9, "a step number"), help="step to compare against (default 0: the base model)"
    )
    parser.add_argument(
        "--min-improvement",
        default="5%",
        type=_threshold_arg,
        metavar="X",
        # argparse reads a bare "-2%" as an unknown option (only plain numbers like -0.02 pass), hence the "=" form in the help.
        help="required improvement over the baseline: '5%%' or '0.05' (default 5%%); negative tolerates a regression: --min-improvement=-2%%",
    )
    parser.add_argument(
        "--require-export",
        action="append",
        choices=("merged", "onnx", "gguf"),
        metavar="FORMAT",
        help="GO also needs a verified export of the judged step in RUN_DIR/exports/ (merged, onnx or gguf; repeatable)",
    )
    parser.add_argument(
        "--direction",
        choices=DIRECTIONS,
        help="which way is better for the metric (default: inferred from a rate's rule or the metric's name; required when ambiguous)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the gate from parsed arguments; returns the exit status (0 GO, 1 NO-GO, 2 missing data or bad input)."""
    try:
        return gate(
            Path(args.run_dir),
            args.metric,
            step=args.step,
            baseline=args.baseline,
            min_improvement=args.min_improvement,
            direction=args.direction,
            require_export=args.require_export,
        )
    except ValueError as e:  # only reachable when args did not come through add_arguments' validation
        print(f"error: {e}", file=sys.stderr)
        return MISSING
