"""The `distribution` suite: how far the model's answers to rating-style prompts are from a target distribution.

An item is a prompt whose answer is one of a few options (a 1-7 rating, agree / neutral / disagree, ...)
and a target distribution over those options (e.g. the answers of surveyed people). The model's
distribution over the options comes from one of two methods (`method` in the suite settings):

- probs: P(the reply is exactly the option) = P(option's tokens, then the end-of-turn token | prompt),
  renormalized over the options. The raw total over the options is kept per item (`option_mass`):
  when it is small the model mostly says something else and the renormalized distribution means little
  (items below LOW_MASS are counted in counts["low_mass_items"]).
- sample: `num_samples` sampled answers, each mapped to an option by `parse_answer`; answers that map to no
  option are counted (counts["unparsed"]), never dropped silently; distribution = option counts / parsed.

Each option has a value in [0, 1] (`option_values`). Per item: the Wasserstein-1 distance between the
two distributions over those values, each one's mean value, and the absolute error of the means. Per
suite: `wasserstein` (mean W1), `mae_mean` (mean absolute error of the means), `pearson_means` (Pearson
correlation of model and target means across items: are the items rated high rated high by the model?).

Item file: YAML (a list of items) or JSONL (one object per line) with `id` (optional: "item<n>", n the
YAML item number or JSONL line), `prompt`, optional `system`, `options` (2+ distinct texts; YAML
integers are read as their digits) and `target` (one non-negative count or probability per option).
Every error is a `DistributionError` naming the file, the item or line, the field, and what to do.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .generate import generate
from .judges import end_of_turn_id
from .questions import MAX_ANSWERS_PER_SUITE, check_plain_text, read_items
from .spec import DistributionSuite, EvalError, GenerationConfig

log = logging.getLogger("finetrack")

_KNOWN_KEYS = ("id", "prompt", "system", "options", "target")
# a plain decimal number; float() alone would also take "nan", "inf" and "1_000"
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
LOW_MASS = 0.25  # probs: below this raw probability on the options an item is counted in low_mass_items (the judge's default min_total)


class DistributionError(EvalError):
    """A bad item file or item; the message names file, item or line, field, and what to do."""


@dataclass
class Item:
    """One prompt, its answer options in scale order, and the target distribution (sums to 1)."""

    id: str
    prompt: str
    system: str | None
    options: list[str]
    target: list[float]

    @property
    def values(self) -> list[float]:
        """Each option's value in [0, 1] (see `option_values`)."""
        return option_values(self.options)


# ------------------------------------------------------------------------------------------ metrics
def option_values(options: list[str]) -> list[float]:
    """The options' values in [0, 1]: the numbers min-max rescaled when every option is a plain decimal
    number ("1".."7", "0", "2.5", "-3"; so ["0", "1", "5", "10"] -> [0, 0.1, 0.5, 1]), else the
    positions i / (k - 1) (the options listed in scale order)."""
    if len(options) < 2:
        raise ValueError(f"need at least 2 options, got {options!r}")
    if all(_NUMBER.match(o) for o in options):
        numbers = [float(o) for o in options]
        low, high = min(numbers), max(numbers)
        if len(set(numbers)) < len(numbers):
            raise ValueError(f"options {options!r} name the same number twice; give each number once")
        return [(x - low) / (high - low) for x in numbers]
    return [i / (len(options) - 1) for i in range(len(options))]


def wasserstein_1(values: list[float], p: list[float], q: list[float]) -> float:
    """Wasserstein-1 (earth mover's) distance between distributions p and q on the points `values`.

    On a line it is the area between the two CDFs: sum over consecutive sorted points of
    |CDF_p - CDF_q| * gap. p and q are normalized here (counts are fine)."""
    v, a, b = (np.asarray(x, dtype=np.float64) for x in (values, p, q))
    if not v.shape == a.shape == b.shape or v.ndim != 1:
        raise ValueError(f"values, p and q must be 1-D and of the same length, got {v.shape}, {a.shape}, {b.shape}")
    order = np.argsort(v, kind="stable")  # numeric options need not be listed in increasing order
    cdf_a = np.cumsum(a[order]) / a.sum()
    cdf_b = np.cumsum(b[order]) / b.sum()
    return float(np.sum(np.abs(cdf_a - cdf_b)[:-1] * np.diff(v[order])))


def mean_value(values: list[float], p: list[float]) -> float:
    """The expected value of distribution p (normalized here) on the points `values`."""
    a = np.asarray(p, dtype=np.float64)
    return float(np.dot(np.asarray(values, dtype=np.float64), a) / a.sum())


def pearson_undefined_reason(xs: list[float], ys: list[float]) -> str | None:
    """Why the Pearson correlation of xs and ys is undefined, or None when it is defined."""
    if len(xs) < 2:
        return f"{len(xs)} scored item(s): a correlation needs at least 2"
    for name, zs in (("model", xs), ("target", ys)):
        if all(z == zs[0] for z in zs):
            return f"every {name} mean is {zs[0]!r}: a correlation needs variation"
    return None


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation of xs and ys; None with fewer than 2 points or a constant side."""
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys must have the same length, got {len(xs)} and {len(ys)}")
    if pearson_undefined_reason(xs, ys):
        return None
    x = np.asarray(xs, dtype=np.float64) - np.mean(xs)
    y = np.asarray(ys, dtype=np.float64) - np.mean(ys)
    r = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
    return max(-1.0, min(1.0, r))  # rounding can step just outside


# ------------------------------------------------------------------------------------------ loading
def load_items(path: Path) -> list[Item]:
    """Read an item file (.yaml/.yml: a list of items; .jsonl: one object per line), validating every item."""
    path = Path(path)
    located = read_items(path, DistributionError, "item", "item", "- prompt: ...")
    items: list[Item] = []
    seen: dict[str, str] = {}  # id -> where it was first defined
    for where, default_id, raw in located:
        item = _parse_item(raw, where, default_id)
        if item.id in seen:
            raise DistributionError(
                f"{where}: field 'id': duplicate id '{item.id}' (first used at {seen[item.id]}); give each item its own id"
            )
        seen[item.id] = where
        items.append(item)
    return items


def check_sample_count(suite: DistributionSuite, items: list[Item]) -> None:
    """method sample: items x num_samples answers are held in memory at once (one generate() call), so their number is
    bounded as a judge suite's is (questions.MAX_ANSWERS_PER_SUITE); a DistributionError naming the file otherwise."""
    total = len(items) * suite.num_samples
    if suite.method == "sample" and total > MAX_ANSWERS_PER_SUITE:
        raise DistributionError(
            f"{suite.items}: {len(items):,} items x num_samples={suite.num_samples:,} make {total:,} answers per step; at most "
            f"{MAX_ANSWERS_PER_SUITE:,} (every answer is held in memory): lower num_samples of eval suite '{suite.name}' or split the file"
        )


def _parse_item(raw: Any, where: str, default_id: str) -> Item:
    if not isinstance(raw, dict):
        raise DistributionError(f"{where}: an item must be a mapping with prompt, options and target, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in _KNOWN_KEYS)
    if unknown:  # strict: a misspelt 'system' would silently change every answer
        raise DistributionError(f"{where}: unknown field(s) {unknown}; an item has only {', '.join(_KNOWN_KEYS)}")
    for key in ("prompt", "options", "target"):
        if key not in raw:
            raise DistributionError(f"{where}: missing field '{key}'; every item needs prompt, options and target")
    item_id = raw.get("id", default_id)
    if isinstance(item_id, int) and not isinstance(item_id, bool):
        item_id = str(item_id)  # YAML reads `id: 7` as an int; an id is a label
    if not isinstance(item_id, str) or not item_id.strip():
        raise DistributionError(f"{where}: field 'id' must be non-empty text, got {item_id!r}; or leave it out for '{default_id}'")
    for key in ("prompt", "system"):
        value = raw.get(key)
        if (key == "prompt" or value is not None) and (not isinstance(value, str) or not value.strip()):
            raise DistributionError(
                f"{where}: field '{key}' must be non-empty text, got {value!r}" + ("; or leave it out" if key == "system" else "")
            )
    options = _options(raw["options"], where)
    return Item(
        id=item_id, prompt=raw["prompt"], system=raw.get("system"), options=options, target=_target(raw["target"], len(options), where)
    )


def _options(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or len(value) < 2:
        raise DistributionError(
            f"{where}: field 'options' must be a list of at least 2 answers (e.g. ['1', '2', '3', '4', '5']), got {value!r}"
        )
    out = []
    for i, o in enumerate(value):
        if isinstance(o, int) and not isinstance(o, bool):
            o = str(o)  # YAML `[1, 2, 3]`: the digits are the answer text
        if not isinstance(o, str):
            raise DistributionError(f"{where}: field 'options[{i}]' must be text or a whole number, got {type(o).__name__} {o!r}; quote it")
        if not o.strip() or o != o.strip():
            raise DistributionError(f"{where}: field 'options[{i}]' is {o!r}: an option must be non-empty text without surrounding spaces")
        if o in out:
            raise DistributionError(f"{where}: field 'options[{i}]': '{o}' is listed twice; give each option once")
        out.append(o)
    try:
        option_values(out)
    except ValueError as e:
        raise DistributionError(f"{where}: field 'options': {e}") from None
    return out


def _target(value: Any, k: int, where: str) -> list[float]:
    if not isinstance(value, list) or len(value) != k:
        got = f"{len(value)} entries" if isinstance(value, list) else repr(value)
        raise DistributionError(f"{where}: field 'target' must be a list of {k} numbers (one count or probability per option), got {got}")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise DistributionError(f"{where}: field 'target[{i}]' must be a non-negative number (a count or probability), got {x!r}")
    total = float(sum(value))
    if total <= 0:
        raise DistributionError(f"{where}: field 'target' is all zeros; give the counts or probabilities of the options")
    return [x / total for x in value]


# ------------------------------------------------------------------------------------------ the model's distribution
def _messages(item: Item) -> list[dict[str, str]]:
    return ([{"role": "system", "content": item.system}] if item.system else []) + [{"role": "user", "content": item.prompt}]


def option_logprobs(model: nn.Module, tokenizer, item: Item) -> list[float]:
    """log P(reply == option | prompt) per option: the option's tokens then the end-of-turn token.

    The prompt is the chat template over [system?, user prompt] with the generation prompt. Each option
    is tokenized on its own and appended to the prompt ids (tokenizing prompt + option together can
    merge tokens across the boundary); requiring the end-of-turn token keeps "1" from counting the mass
    of "10". The options go through one forward pass as a left-padded batch (they all end in the same
    column, so only the last few columns' logits are computed).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DistributionError("distribution suite: the tokenizer has no chat template; use an instruct / chat model")
    text = tokenizer.apply_chat_template(_messages(item), tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]  # the rendered text holds any BOS the template wants
    end_id = end_of_turn_id(tokenizer)
    continuations = [tokenizer(o, add_special_tokens=False)["input_ids"] + [end_id] for o in item.options]
    empty = [o for o, c in zip(item.options, continuations) if len(c) == 1]
    if empty:
        raise DistributionError(
            f"distribution item '{item.id}': the tokenizer turns option(s) {empty} into no tokens; use other option texts"
        )
    k, width = len(continuations), max(len(c) for c in continuations)
    length = len(prompt) + width
    ids = torch.full((k, length), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((k, length), dtype=torch.long)
    targets = torch.zeros((k, width), dtype=torch.long)  # each row's continuation, right-aligned
    scored = torch.zeros((k, width), dtype=torch.bool)
    for r, c in enumerate(continuations):
        ids[r, length - len(prompt) - len(c) :] = torch.tensor(prompt + c)
        mask[r, length - len(prompt) - len(c) :] = 1
        targets[r, width - len(c) :] = torch.tensor(c)
        scored[r, width - len(c) :] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts positions from its first real token
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), logits_to_keep=width + 1
            )
    finally:
        model.train(was_training)
    logits = out.logits[:, :-1].float().cpu()  # (k, width, V): column j predicts targets[:, j]
    step = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)  # (k, width)
    return torch.where(scored, step, torch.zeros_like(step)).sum(-1).tolist()  # where, not *: a padding row may hold NaN


def _normalize_logprobs(logprobs: list[float]) -> list[float] | None:
    """softmax over the options (stable however small the raw mass); None when every option has probability 0."""
    top = max(logprobs)
    if top == -math.inf:
        return None
    weights = [math.exp(lp - top) for lp in logprobs]
    return [w / sum(weights) for w in weights]


def model_distribution_probs(model: nn.Module, tokenizer, item: Item) -> list[float] | None:
    """The model's distribution over the options from their probabilities (`option_logprobs`),
    renormalized over the options; None when all are 0."""
    return _normalize_logprobs(option_logprobs(model, tokenizer, item))


def parse_answer(answer: str, options: list[str]) -> int | None:
    """The index of the option an answer gives, or None.

    Rule: the answer, stripped of surrounding whitespace, equals the option, or starts with it followed
    by a character that is not a letter or digit ("5", "5.", "5 - agree", "Agree, mostly" match "5" /
    "Agree"; "50", "5x", "Agreed", "I'd say 5" do not). Case matters. When several options match
    ("1" and "1.5" on "1.5 stars"), the longest wins.
    """
    text = answer.strip()
    matches = [i for i, o in enumerate(options) if text == o or (text.startswith(o) and not text[len(o)].isalnum())]
    return max(matches, key=lambda i: len(options[i]), default=None)


def _tally(item: Item, answers: list[str]) -> tuple[list[float] | None, list[int], int]:
    """(distribution over the options or None when nothing parsed, count per option, unparsed answers)."""
    picks = [parse_answer(a, item.options) for a in answers]
    counts = [picks.count(i) for i in range(len(item.options))]
    parsed = sum(counts)
    return ([c / parsed for c in counts] if parsed else None), counts, len(answers) - parsed


def _sample_answers(
    model: nn.Module, tokenizer, items: list[Item], gen: GenerationConfig, samples: int, on_item: Callable[[int], None]
) -> list[list[str]]:
    """`samples` answers per item, all items in one generate() call so batches are full; on_item(1) as each item completes."""
    done = {"answers": 0, "items": 0}

    def on_batch(n: int) -> None:
        done["answers"] += n
        while done["items"] < done["answers"] // samples:
            done["items"] += 1
            on_item(1)

    answers = generate(model, tokenizer, [_messages(it) for it in items for _ in range(samples)], gen, on_batch)
    return [answers[i * samples : (i + 1) * samples] for i in range(len(items))]


def model_distribution_sample(
    model: nn.Module, tokenizer, item: Item, gen: GenerationConfig, samples: int
) -> tuple[list[float] | None, int]:
    """(the model's distribution from `samples` sampled answers, number of answers that matched no option).

    Answers map to options by `parse_answer`; distribution = option counts / parsed answers (None when
    none parsed). Sampling is seeded by gen.seed (see `generate`)."""
    dist, _, unparsed = _tally(item, _sample_answers(model, tokenizer, [item], gen, samples, lambda n: None)[0])
    return dist, unparsed


# ------------------------------------------------------------------------------------------ the suite
def item_record(item: Item, model_dist: list[float] | None, **extra: Any) -> dict:
    """One response line: the item, both distributions, both means, W1 and the error of the means
    (the model's fields are None when it has no distribution)."""
    values = item.values
    record = {
        "id": item.id,
        "prompt": item.prompt,
        "system": item.system,
        "options": item.options,
        "values": values,
        "target": item.target,
        "model": model_dist,
        "mean_target": mean_value(values, item.target),
        "mean_model": None,
        "w1": None,
        "abs_error": None,
    }
    if model_dist is not None:
        record["mean_model"] = mean_value(values, model_dist)
        record["w1"] = wasserstein_1(values, model_dist, item.target)
        record["abs_error"] = abs(record["mean_model"] - record["mean_target"])
    return {**record, **extra}


def aggregate(records: list[dict]) -> tuple[dict[str, float | None], dict[str, int]]:
    """Suite metrics over the items that have a model distribution, and the counts behind them."""
    scored = [r for r in records if r["model"] is not None]
    model_means, target_means = [r["mean_model"] for r in scored], [r["mean_target"] for r in scored]
    reason = pearson_undefined_reason(model_means, target_means)
    if reason:
        log.info("distribution suite: pearson_means is undefined (%s)", reason)
    metrics = {
        "wasserstein": float(np.mean([r["w1"] for r in scored])) if scored else None,
        "mae_mean": float(np.mean([r["abs_error"] for r in scored])) if scored else None,
        "pearson_means": pearson(model_means, target_means),
    }
    counts = {"items": len(records), "items_scored": len(scored), "pearson_undefined": int(reason is not None)}
    return metrics, counts


def run(suite: DistributionSuite, model: nn.Module, tokenizer, on_progress: Callable[[int], None]) -> dict:
    """Score every item of suite.items with suite.method; on_progress(1) after each item.

    Returns {"metrics": wasserstein / mae_mean / pearson_means, "counts": ..., "responses": one record per item}.
    """
    items = load_items(Path(suite.items))
    check_sample_count(suite, items)
    texts = [(f"item {i.id}", t) for i in items for t in [i.prompt, i.system or "", *i.options]]
    check_plain_text(tokenizer, Path(suite.items), texts, DistributionError)
    records: list[dict] = []
    counts: dict[str, int] = {}
    if suite.method == "probs":
        for item in items:
            logprobs = option_logprobs(model, tokenizer, item)
            raw = [math.exp(lp) for lp in logprobs]
            dist = _normalize_logprobs(logprobs)  # from log space: exact even where the raw mass underflows
            records.append(item_record(item, dist, option_probs_raw=raw, option_mass=sum(raw)))
            on_progress(1)
        low = [r["id"] for r in records if r["option_mass"] < LOW_MASS]
        counts["low_mass_items"] = len(low)
        if low:
            log.warning(
                "distribution suite '%s': on %d item(s) (%s) the model puts less than %.2f probability on the options themselves; "
                "their distributions are renormalized from little mass. Ask for the bare option (e.g. 'Reply with the number only')",
                suite.name,
                len(low),
                ", ".join(low[:5]) + (", ..." if len(low) > 5 else ""),
                LOW_MASS,
            )
    else:
        if suite.generation.temperature == 0 and suite.num_samples > 1:
            log.warning(
                "distribution suite '%s': temperature 0 repeats one answer %d times per item; sample with temperature > 0",
                suite.name,
                suite.num_samples,
            )
        for item, answers in zip(items, _sample_answers(model, tokenizer, items, suite.generation, suite.num_samples, on_progress)):
            dist, option_counts, unparsed = _tally(item, answers)
            records.append(item_record(item, dist, answers=answers, option_counts=option_counts, unparsed=unparsed))
        counts["answers"] = len(items) * suite.num_samples
        counts["unparsed"] = sum(r["unparsed"] for r in records)
    metrics, aggregate_counts = aggregate(records)
    return {"metrics": metrics, "counts": {**aggregate_counts, **counts}, "responses": records}
