"""Validation during training: the eval suites on the live model on their schedules (eval.every_steps, a suite's
every_steps), and the decisions taken from validation values: the best checkpoint and early stopping.

    values = validator.run(step, model)           # {"val/<suite>.<metric>": ...}; {} when no suite is due
    decision = decide(cfg, state, step, values)   # with the held-out loss: the best improved? stop early?
    ... the checkpoint of the step, when one is written ...
    validator.store(step, folder, last)           # eval/step-N.json, keyed exactly as `finetrack eval` keys it

Suites run on every process under untouched_rng (training draws the same random numbers with or without them) and
in eval mode. Results of a step that has a checkpoint are stored as `finetrack eval` stores them, with the same cache
keys (computed from config.resolved.yaml as eval reads it), so `finetrack eval RUN` reuses them instead of
recomputing; step 0 of a fresh start is the base model, reused from a baseline evaluated before training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import rundir, sharding
from .config import Config, ConfigError, MonitorConfig, load_config
from .config_monitor import rate_rules
from .evaluate.spec import validates_at, validation_every_steps
from .sampling import untouched_rng
from .train_state import TrainState, Watch

log = logging.getLogger("finetrack")
VALIDATION_PREFIX = "val/"


class Validator:
    """The suites that run during training, their prepared rows and judges (loaded once), and the results of the
    latest validation until its checkpoint is written."""

    def __init__(self, cfg: Config, run_dir: Path, tokenizer: Any, accelerator: Any, total_steps: int) -> None:
        self.cfg, self.run_dir, self.tokenizer, self.accelerator, self.total_steps = cfg, run_dir, tokenizer, accelerator, total_steps
        self.suites = [(s, every) for s in cfg.eval.suites if (every := validation_every_steps(s, cfg.eval.every_steps))]
        self.rows: dict[str, list] = {}
        self.pending: tuple[int, dict[str, dict]] | None = None
        self.judges = None
        self.key_cfg: Config | None = None
        self.units: dict[str, int] = {}  # progress units per suite (answers, items): its files are read once, here
        if self.suites:
            from .evaluate.suites import Judges, suite_units

            self.judges = Judges(cfg, accelerator.device)
            self.units = {s.name: suite_units(s) for s, _ in self.suites}
            accelerator.wait_for_everyone()  # config.resolved.yaml is written by the main process
            # the config exactly as `finetrack eval RUN` reads it back: the same cache keys
            self.key_cfg = load_config(run_dir / rundir.CONFIG_FILE)

    def due(self, step: int) -> list:
        """The suites due after optimizer step `step` (0: the starting weights of a fresh run)."""
        return [s for s, every in self.suites if validates_at(every, step, self.total_steps)]

    def run(self, step: int, model: nn.Module) -> dict[str, float | None]:
        """Every suite due at `step` on `model` (unwrapped; a heads.WithHead on a regression run), in eval mode, with
        the random generators left as they were. Returns {"val/<suite>.<metric>": value}."""
        from tqdm.auto import tqdm

        from .evaluate.suites import run_suite, skip_reason

        due = self.due(step)
        if not due:
            return {}
        results = self._cached_base(due) if step == 0 and not self.cfg.model.init_from else {}
        todo = [s for s in due if s.name not in results]
        main = self.accelerator.is_main_process
        bar = tqdm(total=sum(self.units[s.name] for s in todo), desc=f"validate @ {step}", leave=False, disable=not main or not todo)
        was_training = model.training
        model.eval()
        try:
            with untouched_rng(), torch.no_grad(), sharding.gathered(model):
                for suite in todo:
                    skipped = skip_reason(suite, self.cfg, None if step == 0 else self.run_dir)
                    if skipped:
                        results[suite.name] = {"metrics": {}, "counts": {}, "skipped": skipped}
                        continue
                    rows = self._rows(suite)
                    results[suite.name] = run_suite(suite, model, self.tokenizer, self.cfg, self.accelerator, self.judges, bar, rows)
        finally:
            model.train(was_training)
            bar.close()
        self.pending = (step, results)
        return {f"{VALIDATION_PREFIX}{name}.{k}": v for name, r in results.items() for k, v in r["metrics"].items()}

    def store(self, step: int, folder: Path | None, epoch: float, last: bool) -> None:
        """Write the results of the validation at `step` into eval/ (main process), once the checkpoint `folder`
        is complete (None: step 0, the base model), keyed by its manifest as `finetrack eval` keys it."""
        if self.pending is None or self.pending[0] != step or not self.accelerator.is_main_process:
            return
        if step == 0 and self.cfg.model.init_from:  # eval's step 0 is the base model; this run began from the warm start
            return
        from .evaluate.results import flatten, read_step, write_responses, write_step, write_summary
        from .evaluate.runner import checkpoint_id, suite_key

        assert self.key_cfg is not None
        results = self.pending[1]
        step_id = checkpoint_id(self.key_cfg, folder)
        where = None if folder is None else str(folder.relative_to(self.run_dir))
        record = read_step(self.run_dir, step) or {"step": step, "checkpoint": where, "suites": {}}
        record.update(checkpoint=where, epoch=epoch, fraction=min(step / self.total_steps, 1.0), last=last)
        for suite in self.key_cfg.eval.suites:
            if suite.name in results:
                result = dict(results[suite.name])
                write_responses(self.run_dir, step, suite.name, result.pop("responses", None))
                record["suites"][suite.name] = {"key": suite_key(suite, step_id, self.key_cfg), **result}
        write_step(self.run_dir, flatten(record))
        write_summary(self.run_dir)

    def _cached_base(self, due: list) -> dict[str, dict]:
        """Results of the base model (step 0) already in eval/ with this run's keys (a baseline evaluated before training)."""
        from .evaluate.results import read_step
        from .evaluate.runner import checkpoint_id, suite_key

        assert self.key_cfg is not None
        record = read_step(self.run_dir, 0) or {"suites": {}}
        step_id = checkpoint_id(self.key_cfg, None)
        key_suites = {s.name: s for s in self.key_cfg.eval.suites}
        found = {}
        for suite in due:
            cached = record["suites"].get(suite.name, {})
            if cached.get("key") == suite_key(key_suites[suite.name], step_id, self.key_cfg):
                found[suite.name] = {k: v for k, v in cached.items() if k != "key"}
        if found:
            log.info("validation @ 0: %s reused from eval/ (the base model was evaluated before training)", ", ".join(sorted(found)))
        return found

    def _rows(self, suite: Any) -> list | None:
        """A row suite's prepared rows, read once per run (None: the suite reads no rows)."""
        from .evaluate.loss import load_rows
        from .evaluate.spec import ContrastiveSuite, LossSuite, RegressionSuite

        if not isinstance(suite, (LossSuite, RegressionSuite, ContrastiveSuite)):
            return None
        if suite.name not in self.rows:
            self.rows[suite.name] = load_rows(suite, self.cfg, self.tokenizer)
        return self.rows[suite.name]


# -------------------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Decision:
    """What a step's validation values decide: a new best checkpoint, or the end of the run."""

    best_improved: bool = False
    stop_reason: dict[str, Any] | None = None


def direction(monitor: MonitorConfig, cfg: Config) -> str:
    """ "min" or "max": as written, or (auto) from the metric's name and, for a judge rate, its rule, as the gate reads it."""
    if monitor.mode != "auto":
        return monitor.mode
    from .gate import infer_direction

    inferred, why = infer_direction(monitor.metric.removeprefix(VALIDATION_PREFIX), rate_rules(cfg))
    assert inferred is not None, "an ambiguous name is refused when the config loads (config._monitor_problem)"
    log.info("%s: %s is better (mode auto: %s)", monitor.metric, inferred, why)
    return "min" if inferred == "lower" else "max"


def watches(cfg: Config, resumed: TrainState | None) -> tuple[Watch | None, Watch | None]:
    """(early stopping, best) watches for this config: the resumed checkpoint's progress when it followed the same
    metric the same way, else counted anew (said in the log)."""
    es, best = cfg.train.early_stopping, cfg.checkpoint.best
    fresh = (
        Watch(es.metric, direction(es, cfg), es.min_delta) if es else None,
        Watch(best.metric, direction(best, cfg)) if best else None,
    )
    if resumed is None:
        return fresh
    out = []
    for name, new, old in (("train.early_stopping", fresh[0], resumed.early_stopping), ("checkpoint.best", fresh[1], resumed.best)):
        if new is not None and old is not None and new.same_rule(old):
            out.append(old)
        else:
            if new is not None:
                log.info("%s: %s, counted from this step on", name, "changed since the checkpoint" if old else "new on resume")
            out.append(new)
    return out[0], out[1]


def decide(cfg: Config, state: TrainState, step: int, values: dict[str, float | None]) -> Decision:
    """Update the watches with the values of a validation at `step` and decide: has the best improved (a checkpoint is
    due), has the early-stopping metric stalled for `patience` validations (the run ends)? Step 0 (the base model) only
    checks that the watched metrics are measured: the best is a checkpoint, and patience counts trained steps."""
    best, watch, es = state.best, state.early_stopping, cfg.train.early_stopping
    measured = {
        name: w is not None and _has(name, w, values, step) for name, w in (("checkpoint.best", best), ("train.early_stopping", watch))
    }
    if step == 0:
        return Decision()
    improved = best.update(step, values[best.metric]) if best is not None and measured["checkpoint.best"] else False
    stop_reason = None
    if es is not None and watch is not None and measured["train.early_stopping"]:
        watch.update(step, values[watch.metric])
        if watch.num_bad >= es.patience:
            stop_reason = _early_stop_reason(watch, es.patience, step)
    return Decision(improved, stop_reason)


def _has(field: str, watch: Watch, values: dict[str, float | None], step: int) -> bool:
    """Did this validation measure the watched metric? A suite that ran but does not produce it is a ConfigError."""
    if watch.metric in values:
        return True
    # the held-out loss's terms share "eval_"; a suite's metrics its "val/<suite>."
    prefix = "eval_" if watch.metric.startswith("eval_") else watch.metric.split(".", 1)[0] + "."
    produced = sorted(k for k in values if k.startswith(prefix))
    if produced:
        raise ConfigError(
            f"{field}.metric={watch.metric}: not measured by the validation at step {step}, which gives {produced}; fix the metric name"
        )
    return False


def _early_stop_reason(watch: Watch, patience: int, step: int) -> dict[str, Any]:
    best = "no value yet" if watch.best_value is None else f"best {watch.best_value:.6g} at step {watch.best_step}"
    by = f" by more than {watch.min_delta:g}" if watch.min_delta else ""
    return {
        "kind": "early_stopping",
        "step": step,
        "message": f"{watch.metric} did not improve{by} for {patience} validation(s) in a row ({best})",
        "metric": watch.metric,
        "mode": watch.mode,
        "patience": patience,
        "min_delta": watch.min_delta,
        "best_step": watch.best_step,
        "best_value": watch.best_value,
        "history": [list(h) for h in watch.history],
    }


def write_best(run_dir: Path, watch: Watch) -> None:
    """checkpoints/best.json for the watch's best step (atomic: readers see the old or the new record)."""
    record = {
        "format": rundir.BEST_FORMAT,
        "step": watch.best_step,
        "metric": watch.metric,
        "mode": watch.mode,
        "value": watch.best_value,
        "checkpoint": f"{rundir.CHECKPOINTS_DIR}/{rundir.step_name(watch.best_step)}",
    }
    rundir.write_atomic(rundir.best_path(run_dir), json.dumps(record, indent=2) + "\n")
