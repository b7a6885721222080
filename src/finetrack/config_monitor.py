"""The config sections that watch a run (train.early_stopping, checkpoint.best) and run your code during it
(train.callbacks), with the check that a watched metric is produced during training. Part of the schema: config.py
imports them; split off to keep config.py one screenful per stage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from .evaluate.spec import validation_every_steps
from .schema import Section

if TYPE_CHECKING:
    from .config import Config


class MonitorConfig(Section):
    metric: str = Field(
        "eval_loss",
        min_length=1,
        description="A validation metric as metrics.jsonl names it: eval_loss (held-out rows, every eval.loss_every_steps), "
        "eval_<term>, or val/<suite>.<metric> (a suite of eval.suites run during training).",
    )
    mode: Literal["auto", "min", "max"] = Field(
        "auto",
        description="min or max is better; auto reads it from the metric's name as `finetrack gate` does (loss, mse: min; r2, accuracy: max).",
    )


class EarlyStoppingConfig(MonitorConfig):
    patience: int = Field(3, gt=0, description="Stop after this many validations in a row without improvement.")
    min_delta: float = Field(0.0, ge=0, description="An improvement smaller than this does not count.")


class BestConfig(MonitorConfig):
    """checkpoint.best: which checkpoint is the best (checkpoints/best.json)."""


class CallbackConfig(Section):
    function: str = Field(
        pattern=r"^[^:]+:\w+$",
        description="'module:Name' or 'path/to/file.py:Name': a class (or function) called with `options` as keyword arguments, "
        "returning an object with any of on_step_end, on_validation, on_checkpoint, on_stop (see the README's callbacks).",
    )
    options: dict = Field(default_factory=dict, description="Keyword arguments for `function`.")


def rate_rules(config: Config) -> dict[str, str]:
    """Rate name -> rule, over the judge suites of eval.suites (how the gate reads a rate's direction)."""
    return {name: rule for s in config.eval.suites for name, rule in getattr(s, "rates", {}).items()}


def monitor_problem(field: str, monitor: MonitorConfig, config: Config) -> str | None:
    """What is wrong with a monitored metric (None: it is produced during training and its direction is known)."""
    metric = monitor.metric
    names = [s.label() for s in config.data.sources]
    source_loss = metric.startswith("source/") and metric.endswith(".eval_loss")  # a mixture source's held-out loss
    if source_loss:
        name = metric.removeprefix("source/").removesuffix(".eval_loss")
        source = next((s for s in config.data.sources if s.label() == name), None)
        if source is None:
            return f"{field}.metric={metric}: no source '{name}' in data.sources (sources: {names})"
        if source.eval_split is None and config.data.eval_split is None:
            return f"{field}.metric={metric}: source '{name}' has no held-out rows: set its eval_split (or data.eval_split)"
    if metric.startswith("eval_") or source_loss:
        if not config.data.has_held_out() or config.eval.loss_every_steps is None:
            return (
                f"{field}.metric={metric}: the held-out loss runs during training only with data.eval_split and "
                "eval.loss_every_steps: set both (e.g. data.eval_split=0.1 eval.loss_every_steps=50)"
            )
    elif metric.startswith("val/") and "." in metric:
        suite_name = metric.removeprefix("val/").split(".", 1)[0]
        suite = next((s for s in config.eval.suites if s.name == suite_name), None)
        if suite is None:
            return f"{field}.metric={metric}: no suite '{suite_name}' in eval.suites (suites: {[s.name for s in config.eval.suites]})"
        if not validation_every_steps(suite, config.eval.every_steps):
            return f"{field}.metric={metric}: suite '{suite_name}' does not run during training: set eval.every_steps or its every_steps"
    else:
        return (
            f"{field}.metric={metric}: not a validation metric; use eval_loss, eval_<term> (held-out rows) or "
            "val/<suite>.<metric> (a suite of eval.suites run during training)"
            + (", or source/<name>.eval_loss (a source's held-out rows)" if names else "")
        )
    if monitor.mode == "auto":
        from .gate import infer_direction

        inferred, why = infer_direction(metric.removeprefix("val/"), rate_rules(config))
        if inferred is None:
            return f"{field}.mode=auto: which way is better for {metric} is ambiguous ({why}); set {field}.mode=min or max"
    return None
