"""The `loss` suite: held-out loss and perplexity of the model at one step."""

from __future__ import annotations

import math
from functools import partial

from torch import nn

from ..batches import collate
from ..config import Config, ConfigError
from ..data import prepare
from .spec import LossSuite


def load_rows(suite: LossSuite, cfg: Config, tokenizer) -> list:
    """The rows to score: the suite's own file, or the run's held-out split (rebuilt exactly as in training)."""
    if suite.data:
        data_cfg = cfg.data.model_copy(update={"path": suite.data, "eval_split": None})
        return prepare(data_cfg, tokenizer, cfg.train.seed).train
    rows = prepare(cfg.data, tokenizer, cfg.train.seed).eval
    if not rows:
        raise ConfigError(f"eval suite '{suite.name}': the run has no held-out rows (data.eval_split unset); give the suite a data file")
    return rows


def run(suite: LossSuite, model: nn.Module, tokenizer, rows: list, cfg: Config, accelerator) -> dict:
    """{'metrics': {loss, ppl}, 'counts': {rows, target_tokens}} with the same masking and batching as training."""
    from ..loop import causal_lm_objective, evaluate_loss

    make_batch = partial(collate, pad_id=tokenizer.pad_token_id, pack=bool(cfg.data.pack), pack_row_tokens=cfg.data.pack_row_tokens)
    loss = evaluate_loss(model, rows, suite.micro_batch_size, make_batch, causal_lm_objective, accelerator)
    targets = sum(r.num_trainable_tokens for r in rows)
    return {"metrics": {"loss": loss, "ppl": math.exp(min(loss, 50))}, "counts": {"rows": len(rows), "target_tokens": targets}}
