"""The `contrastive` suite: how the model's representations of held-out triplets relate, at one step.

Per triplet (anchor a, positive p, negative n) the pooled hidden states at objective.contrastive.layer, as the
objective reads them (`objectives.representations`, pooled where the data stage placed each row's read):

    stability      = mean cos(a, p)            (rewordings stay close)
    separation     = 1 - mean cos(a, n)        (injections move away)
    discrimination = stability - (1 - separation)   (= mean cos(a, p) - mean cos(a, n))

The same numbers training logs as eval_stability / eval_separation / eval_discrimination. No trained weights
beyond the language model's are needed: the base model (step 0) is measured too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import batch_builder, micro_batches
from ..config import Config
from .spec import ContrastiveSuite


def run(suite: ContrastiveSuite, model: nn.Module, tokenizer, rows: list, cfg: Config, accelerator) -> dict:
    """{'metrics': {stability, separation, discrimination}, 'counts': {rows, triplets}} of `model` on triplet `rows`."""
    from ..heads import language_model
    from ..objectives import representations

    lm = language_model(model)
    make_batch = batch_builder(tokenizer.pad_token_id, bool(cfg.data.pack), cfg.data.pack_row_tokens, lm)
    cos_ap, cos_an = [], []
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            for chunk in micro_batches(rows, list(range(len(rows))), suite.micro_batch_size):
                a, p, n, _ = representations(lm, make_batch(chunk).to(accelerator.device), cfg.objective.contrastive.layer)
                cos_ap.append(F.cosine_similarity(a, p, dim=-1).double().cpu())
                cos_an.append(F.cosine_similarity(a, n, dim=-1).double().cpu())
    finally:
        lm.train(was_training)
    triplets = sum(len(c) for c in cos_ap)
    if not triplets:
        return {"metrics": dict.fromkeys(("stability", "separation", "discrimination")), "counts": {"rows": len(rows), "triplets": 0}}
    stability = float(torch.cat(cos_ap).mean())
    separation = 1.0 - float(torch.cat(cos_an).mean())
    # as objectives.logged derives it: one formula, so the suite and metrics.jsonl agree to round-off
    metrics = {"stability": stability, "separation": separation, "discrimination": stability - (1.0 - separation)}
    return {"metrics": metrics, "counts": {"rows": len(rows), "triplets": triplets}}
