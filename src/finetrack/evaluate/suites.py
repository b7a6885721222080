"""One suite at one step: what `finetrack eval` (runner.py) and validation during training (validation.py) call.

run_suite dispatches to the suite's own module (loss, regression, contrastive, freeform, distribution, representation,
direction, adapter_view, sae, or a user's python function); Judges holds the judge models, loaded once per eval.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..models import model_source
from .activations import Reference
from .generate import Answerer
from .spec import (
    AdapterSuite,
    ContrastiveSuite,
    DirectionSuite,
    DistributionSuite,
    JudgeConfig,
    JudgeSuite,
    LossSuite,
    PythonSuite,
    RegressionSuite,
    RepresentationSuite,
    SaeSuite,
)


def skip_reason(suite, cfg: Config, folder: Path | None) -> str | None:
    """Why a suite has no value at this step (recorded in place of its metrics), None when it runs: on a regression
    run the base model (step 0) has no trained head, so neither the regression suite nor the objective's loss exists."""
    if folder is None and cfg.objective.kind == "regression" and isinstance(suite, (LossSuite, RegressionSuite)):
        return "no trained head at step 0: the base model has no regression head (objective.kind=regression)"
    return None


class Judges:
    """Judge objects, their models loaded once per eval."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device, self.models = cfg, device, {}

    def __call__(self, judge: JudgeConfig, template: str):
        from . import judges

        if judge.kind == "pattern":
            return judges.PatternJudge(judge.pattern)
        if judge.kind == "python":
            return judges.PythonJudge(judge.function)
        if judge.kind == "openai":
            from .openai_judge import OpenAIJudge

            return OpenAIJudge(
                template, model=judge.model, base_url=judge.base_url, api_key_env=judge.api_key_env, min_total=judge.min_total_prob
            )
        name = judge.model or model_source(self.cfg.model)
        if name not in self.models:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            source = model_source(self.cfg.model.model_copy(update={"name": name}))
            self.models[name] = (AutoModelForCausalLM.from_pretrained(source).to(self.device).eval(), AutoTokenizer.from_pretrained(source))
        model, tokenizer = self.models[name]
        return judges.LocalJudge.from_model(model, tokenizer, template, min_total=judge.min_total_prob)


def suite_units(suite) -> int:
    """Work units of one (step, suite): answers (judge), items (distribution), 1 otherwise; reads and checks the suite's file."""
    if isinstance(suite, JudgeSuite):
        from .freeform import check_judges
        from .judges import PythonJudge
        from .questions import check_answer_count, load_questions

        questions = load_questions(Path(suite.questions))
        check_judges(suite, questions)
        for judge in suite.judges:  # imported before any model loads: a typo fails now, not after the answers are generated
            if judge.kind == "python":
                PythonJudge(judge.function)
        # counted, not built: the answers' conversations are built when the suite runs, once the count is known to fit
        return check_answer_count(Path(suite.questions), questions, suite.generation.num_samples, "generation.num_samples")
    if isinstance(suite, DistributionSuite):
        from .distribution import check_sample_count, load_items

        items = load_items(Path(suite.items))
        check_sample_count(suite, items)
        return len(items)
    if isinstance(suite, PythonSuite):
        _python_suite_function(suite)
    return 1


def _python_suite_function(suite: PythonSuite):
    module, _, attr = suite.function.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"eval suite '{suite.name}': cannot import {suite.function} ({e}); install the module or put its folder on PYTHONPATH"
        ) from None


def run_suite(
    suite,
    model,
    tokenizer,
    cfg: Config,
    accelerator,
    judges: Judges,
    bar,
    rows: list | None = None,
    reference: Reference | None = None,
    answerer: Answerer | None = None,
) -> dict:
    """One suite on the model at one step. `model` is a heads.WithHead on a regression run's checkpoints: the loss
    and regression suites use the head; every other suite gets the language model alone. `rows`: a row suite's
    prepared rows when the caller keeps them (validation during training), else read now. `reference`: the base
    model and the checkpoint folders, for the suites that compare with them (`finetrack eval` only); `model` is None
    for a step whose suites read files alone (adapter) or get their answers from `answerer` alone. `answerer`: the
    step's vLLM answers (engine.py), used by the suites that generate (judge, distribution with method sample).
    The forwards run in the precision the run trained in (model.mixed_precision bf16: under autocast, during training
    and in `finetrack eval` alike; a run from before the field: none)."""
    from .. import precision
    from ..heads import language_model

    trained_bf16 = cfg.model.mixed_precision == "bf16"
    with precision.autocast(cfg.model, accelerator.device.type) if trained_bf16 else nullcontext():
        if isinstance(suite, (RepresentationSuite, DirectionSuite, AdapterSuite, SaeSuite)):
            if reference is None:
                raise ConfigError(f"eval suite '{suite.name}': compares checkpoints with the base model; run it with `finetrack eval`")
            if isinstance(suite, AdapterSuite):
                from . import adapter_view

                result = adapter_view.run(suite, reference.folder, reference.previous)
            else:
                module = {RepresentationSuite: "representation", DirectionSuite: "direction", SaeSuite: "sae"}[type(suite)]
                scorer = importlib.import_module(f".{module}", __package__).run
                result = scorer(suite, language_model(model), tokenizer, cfg, reference)
            bar.update(1)
            return result

        if isinstance(suite, (LossSuite, RegressionSuite, ContrastiveSuite)):
            from . import contrastive, loss, regression

            scorer = {LossSuite: loss.run, RegressionSuite: regression.run, ContrastiveSuite: contrastive.run}[type(suite)]
            result = scorer(suite, model, tokenizer, rows or loss.load_rows(suite, cfg, tokenizer), cfg, accelerator)
            bar.update(1)
            return result
        model = language_model(model)
        if isinstance(suite, JudgeSuite):
            from . import freeform
            from .questions import load_questions

            return freeform.run(suite, answerer or model, tokenizer, load_questions(Path(suite.questions)), judges, bar.update)
        if isinstance(suite, DistributionSuite):
            from . import distribution

            # generate() hands the sampled answers to the answerer; method probs reads the model's probabilities itself
            generator = answerer if answerer is not None and suite.method == "sample" else model
            return distribution.run(suite, generator, tokenizer, bar.update)
        assert isinstance(suite, PythonSuite)
        fn = _python_suite_function(suite)
        metrics = fn(model, tokenizer, dict(suite.options))
        bar.update(1)
        if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) or v is None for v in metrics.values()):
            raise ConfigError(f"eval suite '{suite.name}': {suite.function} must return {{metric: number or None}}, got {metrics!r:.200}")
        return {"metrics": metrics, "counts": {}}
