"""The `representation` suite: per layer, how far a checkpoint's hidden states moved from the base model's on the same
probe prompts, and how far its next-token predictions moved (KL).

Each micro-batch is read twice, by the checkpoint and by the base model, and reduced at once (nothing is dumped):

    shift        mean over the probes' tokens of ||h - h0|| / ||h0||      (h: checkpoint, h0: base, one token, one layer)
    cosine       mean over the probes' tokens of cos(h, h0)
    shift_last   / cosine_last: the same at each probe's last token (where the answer starts)
    cka          linear CKA (Kornblith et al. 2019) between base and checkpoint over the probes: each probe is the mean of
                 its tokens' states (cka_last: its last token's state); 1 = the same geometry up to rotation and scale
    kl           mean over the probes' tokens of KL(checkpoint || base) of the next-token distributions

The step's metrics summarize the layers: the largest shift (and its layer), the lowest cosine and CKA.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import Config
from .activations import Reference, activation_mib, check_layers, decoder_layers, pooled, probe_texts, read_batch
from .spec import RepresentationSuite

log = logging.getLogger("finetrack")

PER_LAYER = ("shift", "shift_last", "cosine", "cosine_last", "cka", "cka_last")


def run(suite: RepresentationSuite, model: nn.Module, tokenizer, cfg: Config, reference: Reference) -> dict:
    """The suite's result at one step (metrics, counts, and every layer's values under "layers")."""
    texts = probe_texts(suite, cfg, tokenizer)
    layers = check_layers(suite.layers, len(decoder_layers(model)), suite.name)
    mib = activation_mib(tokenizer, texts, suite.micro_batch_size, 2 * len(layers), model.config.hidden_size, 2 * model.config.vocab_size)
    log.info("representation suite '%s': %d probes, %.0f MiB of activations and logits per micro-batch", suite.name, len(texts), mib)
    sums = {name: torch.zeros(len(layers), dtype=torch.float64) for name in ("shift", "cosine", "shift_last", "cosine_last")}
    means: dict[int, list[torch.Tensor]] = {i: [] for i in layers}  # per layer: (base, checkpoint) probe vectors
    lasts: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    kl_sum, num_tokens = 0.0, 0
    for k in range(0, len(texts), suite.micro_batch_size):
        chunk = texts[k : k + suite.micro_batch_size]
        now = read_batch(model, tokenizer, chunk, layers, logits=True)
        if reference.folder is None:
            then = now  # step 0 is the base model: the very same numbers
        else:
            with reference.base() as base:
                then = read_batch(base, tokenizer, chunk, layers, logits=True)
        mask = now.span
        num_tokens += int(mask.sum())
        kl_sum += float(token_kl(now.logits, then.logits)[mask].sum())
        rows = torch.arange(mask.shape[0])
        for j, i in enumerate(layers):
            h, h0 = now.hidden[i].double(), then.hidden[i].double()
            shift, cosine = relative_change(h, h0), cosine_similarity(h, h0)
            sums["shift"][j] += shift[mask].sum()
            sums["cosine"][j] += cosine[mask].sum()
            sums["shift_last"][j] += shift[rows, now.last].sum()
            sums["cosine_last"][j] += cosine[rows, now.last].sum()
            (m, last), (m0, last0) = pooled(now, i), pooled(then, i)
            means[i].append(torch.stack([m0, m]))
            lasts[i].append(torch.stack([last0, last]))
    per_layer: dict[str, list] = {"layer": layers}
    for name in ("shift", "cosine"):
        per_layer[name] = (sums[name] / num_tokens).tolist()
        per_layer[f"{name}_last"] = (sums[f"{name}_last"] / len(texts)).tolist()
    per_layer["cka"] = [linear_cka(*torch.cat(means[i], 1).double()) for i in layers]
    per_layer["cka_last"] = [linear_cka(*torch.cat(lasts[i], 1).double()) for i in layers]
    top = max(range(len(layers)), key=lambda j: per_layer["shift"][j])
    ckas = [c for c in per_layer["cka"] if c is not None]
    metrics = {
        "shift": per_layer["shift"][top],
        "shift_layer": layers[top] if per_layer["shift"][top] > 0 else None,  # no layer moved at all: none is the most changed
        "shift_last": max(per_layer["shift_last"]),
        "cosine": min(per_layer["cosine"]),
        "cka": min(ckas) if ckas else None,
        "kl": kl_sum / num_tokens,
    }
    counts = {"prompts": len(texts), "tokens": num_tokens, "layers": len(layers), "activation_mib": round(mib, 1)}
    return {"metrics": metrics, "counts": counts, "layers": per_layer}


def relative_change(h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """||h - h0|| / ||h0|| over the last dimension: (..., D) -> (...); 0 where h equals h0 (a zero h0 included)."""
    norm = h0.norm(dim=-1)
    return (h - h0).norm(dim=-1) / torch.where(norm > 0, norm, 1.0)


def cosine_similarity(h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """cos(h, h0) over the last dimension: (..., D) -> (...); 1 where the two are equal (zero vectors included)."""
    dot = (h * h0).sum(-1)
    scale = h.norm(dim=-1) * h0.norm(dim=-1)
    cos = torch.where(scale > 0, dot / torch.where(scale > 0, scale, 1.0), 1.0).clamp(-1.0, 1.0)
    return torch.where((h == h0).all(-1), 1.0, cos)  # exact at equal vectors: step 0 reads 1, not 1 - 1 ulp


def token_kl(logits: torch.Tensor, logits0: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || softmax(logits0)) at every position: (B, T, V) x 2 -> (B, T), in nats."""
    logp, logp0 = torch.log_softmax(logits.double(), -1), torch.log_softmax(logits0.double(), -1)
    return (logp.exp() * (logp - logp0)).sum(-1)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Linear centered kernel alignment of two representations of the same n examples, (n, D1) and (n, D2):
    <K, L> / (||K|| ||L||) with K, L the centered Gram matrices (Kornblith et al. 2019, arXiv:1905.00414). 1 for
    the same geometry up to an orthogonal transform and a scale; None when either side has no variance (n < 2)."""
    x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    scale = float(k.norm() * l.norm())
    if scale == 0:
        return None
    if torch.equal(x, y):
        return 1.0
    return max(0.0, min(1.0, float((k * l).sum()) / scale))
