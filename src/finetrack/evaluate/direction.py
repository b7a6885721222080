"""The `direction` suite: a direction per layer from two sets of texts on the base model (persona / steering vectors),
and where each checkpoint's activations lie along it.

    direction    mean activation of the positive texts minus that of the negative texts, on the base model, per layer
                 (each text: the mean over its answer's tokens, or over all of a plain text's); unit length with
                 normalize (the default)
    separation   on the base model: (mean positive projection - mean negative projection) / pooled standard deviation
    projection   the probes' mean projection on the direction, read with the checkpoint (at each probe's last prompt
                 token, or the mean of its tokens: `position`)
    shift        the fine-tuning shift: projection of (checkpoint mean - base mean) probe activations on the direction,
                 = projection(checkpoint) - projection(base)

The summary metrics are read at one layer: `layer` if set, else the one where the direction separates the sets best.
The base model's side (directions, separations, its projections) is computed once per eval session and reused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from .activations import Reference, Text, check_layers, decoder_layers, labelled_texts, pooled, probe_texts, read
from .spec import DirectionSuite, EvalError


def run(suite: DirectionSuite, model: nn.Module, tokenizer, cfg: Config, reference: Reference) -> dict:
    """The suite's result at one step (metrics, counts, and every layer's values under "layers")."""
    layers = check_layers(suite.layers, len(decoder_layers(model)), suite.name)
    probes = probe_texts(suite, cfg, tokenizer)
    key = ("direction", suite.name)
    if key not in reference.cache:
        with reference.base_model(model) as base:
            reference.cache[key] = _on_base(suite, base, tokenizer, layers, probes)
    directions, separation, texts, base_projection = reference.cache[key]
    projection = base_projection if reference.folder is None else _projections(suite, model, tokenizer, layers, probes, directions)
    shift = [p - p0 for p, p0 in zip(projection, base_projection)]
    at = layers.index(suite.layer) if suite.layer is not None and suite.layer in layers else None
    if suite.layer is not None and at is None:
        raise EvalError(f"eval suite '{suite.name}': layer {suite.layer} is not among its layers {layers}; add it to layers")
    if at is None:
        at = max(range(len(layers)), key=lambda j: abs(separation[j]) if separation[j] is not None else -1.0)
    metrics = {"projection": projection[at], "shift": shift[at], "layer": layers[at], "separation": separation[at]}
    counts = {
        "positive": sum(t.label == "positive" for t in texts),
        "negative": sum(t.label == "negative" for t in texts),
        "prompts": len(probes),
    }
    per_layer = {"layer": layers, "projection": projection, "shift": shift, "separation": separation}
    return {"metrics": metrics, "counts": counts, "layers": per_layer}


def suite_texts(suite: DirectionSuite, tokenizer) -> list[Text]:
    """The positive and negative texts, labelled."""
    if suite.texts is not None:
        texts = labelled_texts(Path(suite.texts), tokenizer, None, f"eval suite '{suite.name}': texts")
    else:
        texts = labelled_texts(Path(suite.positive), tokenizer, "positive", f"eval suite '{suite.name}': positive")
        texts += labelled_texts(Path(suite.negative), tokenizer, "negative", f"eval suite '{suite.name}': negative")
    for side in ("positive", "negative"):
        if not any(t.label == side for t in texts):
            raise EvalError(f"eval suite '{suite.name}': no {side} texts; a direction needs texts on both sides")
    return texts


def _on_base(suite: DirectionSuite, base: nn.Module, tokenizer, layers: list[int], probes: list[Text]) -> tuple:
    """(directions per layer (L, D), separation per layer, the texts, the base model's probe projections per layer)."""
    texts = suite_texts(suite, tokenizer)
    vectors = _vectors(base, tokenizer, texts, layers, suite.micro_batch_size, "mean")  # (L, N, D)
    positive = torch.tensor([t.label == "positive" for t in texts])
    directions = mean_difference(vectors, positive, suite.normalize)
    separation = [separation_of(vectors[j], positive, directions[j]) for j in range(len(layers))]
    return directions, separation, texts, _projections(suite, base, tokenizer, layers, probes, directions)


def _projections(suite: DirectionSuite, model: nn.Module, tokenizer, layers, probes: list[Text], directions: torch.Tensor) -> list[float]:
    """Per layer, the probes' mean projection on that layer's direction."""
    vectors = _vectors(model, tokenizer, probes, layers, suite.micro_batch_size, suite.position)  # (L, P, D)
    return (vectors.mean(1) * directions).sum(-1).tolist()


def _vectors(model: nn.Module, tokenizer, texts: list[Text], layers: list[int], micro_batch_size: int, position: str) -> torch.Tensor:
    """One vector per text and layer, (L, N, D) float64: the mean over the text's span, or its last token."""
    out: list[list[torch.Tensor]] = [[] for _ in layers]
    for batch in read(model, tokenizer, texts, layers, micro_batch_size):
        for j, i in enumerate(layers):
            mean, last = pooled(batch, i)
            out[j].append(mean if position == "mean" else last)
    return torch.stack([torch.cat(v) for v in out]).double()


def mean_difference(vectors: torch.Tensor, positive: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Per layer, the mean of the positive texts' vectors minus the negative ones': (L, N, D) -> (L, D), each of unit
    length with `normalize` (a zero difference stays zero)."""
    directions = vectors[:, positive].mean(1) - vectors[:, ~positive].mean(1)
    if normalize:
        norms = directions.norm(dim=-1, keepdim=True)
        directions = directions / torch.where(norms > 0, norms, 1.0)
    return directions


def separation_of(vectors: torch.Tensor, positive: torch.Tensor, direction: torch.Tensor) -> float | None:
    """(mean positive - mean negative projection on the unit `direction`) / pooled standard deviation of the
    projections (Cohen's d); None when the projections do not vary within the sets (or a set has one text)."""
    unit = direction / direction.norm() if direction.norm() > 0 else direction
    proj = vectors @ unit
    a, b = proj[positive], proj[~positive]
    if len(a) + len(b) < 3:
        return None
    pooled_var = (float(((a - a.mean()) ** 2).sum()) + float(((b - b.mean()) ** 2).sum())) / (len(a) + len(b) - 2)
    if pooled_var <= 0:
        return None
    return (float(a.mean()) - float(b.mean())) / math.sqrt(pooled_var)
