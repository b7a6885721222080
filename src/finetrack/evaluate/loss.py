"""The `loss` suite: the run's objective on held-out rows (and perplexity for causal_lm) of the model at one step."""

from __future__ import annotations

import math

from torch import nn

from ..batches import batch_builder
from ..config import Config, ConfigError
from ..data import prepare
from .spec import LossSuite, RowSuite


def load_rows(suite: RowSuite, cfg: Config, tokenizer) -> list:
    """The rows to score (loss, regression and contrastive suites): the suite's own file, or the run's held-out split
    (rebuilt exactly as in training), prepared for the run's objective (regression targets, triplets)."""
    if suite.data:
        data_cfg = cfg.data.model_copy(update={"path": suite.data, "sources": [], "eval_split": None, "max_rows": None})  # read whole
        return prepare(data_cfg, tokenizer, cfg.train.seed, cfg.objective).train
    rows = prepare(cfg.data, tokenizer, cfg.train.seed, cfg.objective).eval
    if not rows:
        raise ConfigError(f"eval suite '{suite.name}': the run has no held-out rows (data.eval_split unset); give the suite a data file")
    return rows


def run(suite: LossSuite, model: nn.Module, tokenizer, rows: list, cfg: Config, accelerator) -> dict:
    """{'metrics': {loss, ppl (causal_lm), the objective's logged terms}, 'counts': {rows, target_tokens}} with the same
    masking, batching and objective as training's held-out loss (`model`: a heads.WithHead on a regression run)."""
    from .. import objectives
    from ..heads import language_model
    from ..loop import evaluate

    make_batch = batch_builder(tokenizer.pad_token_id, bool(cfg.data.pack), cfg.data.pack_row_tokens, language_model(model))
    found = evaluate(model, rows, suite.micro_batch_size, make_batch, objectives.build(cfg.objective), accelerator)
    metrics = {"loss": found.pop("loss")}
    if cfg.objective.kind == "causal_lm":
        metrics["ppl"] = math.exp(min(metrics["loss"], 50))
    counts = {"rows": len(rows), "target_tokens": sum(r.num_trainable_tokens for r in rows)}
    if cfg.objective.kind == "regression":
        counts["targets"] = sum(len(r.values) for r in rows)
    elif cfg.objective.kind == "contrastive":
        counts["triplets"] = sum(1 for r in rows if r.pair)
    return {"metrics": {**metrics, **found}, "counts": counts}
