"""Hidden states of a model on a set of texts, read with forward hooks on its decoder layers, one micro-batch at a time.

Layer i is the output of decoder block i (0-based): the residual stream after that block, which sae-lens calls
`blocks.i.hook_resid_post`. Nothing is kept beyond the micro-batch a caller is reducing (no full activation dump),
so the memory is known before the first forward: `activation_mib` says how much one micro-batch holds.

The texts of the representation suites:
- probes: chat prompts rendered with a generation prompt (what the model reads before it answers); reduced at the
  last prompt token and as the mean over the prompt's tokens;
- labelled texts (direction suites): a prompt with an answer, averaged over the answer's tokens, or a plain text,
  averaged over all of its tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ConfigError
from .spec import EvalError, JudgeSuite


@dataclass
class Text:
    """One text to read: `text` as the model sees it, and the character offset where the averaged span starts (0 =
    every token; the answer's start for a prompt with an answer; the generation prompt's end for a probe)."""

    text: str
    span_start: int = 0
    label: str = ""  # "positive" / "negative" for a direction suite's texts


@dataclass
class Reference:
    """What a suite that compares with the base model gets at one step: the checkpoint folder (None: the step is the
    base model itself), the run's complete checkpoint before it (None: none), and the base model, entered as a context
    while the checkpoint's model is loaded (LoRA: the same PEFT model with its adapter switched off)."""

    folder: Path | None
    previous: Path | None
    base: Callable[[], AbstractContextManager[nn.Module]]
    cache: dict = field(default_factory=dict)  # what a suite computed on the base model, kept by the session between steps

    def base_model(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        """The base model to compare `model` with: `model` itself at step 0 (the same forward: differences are exactly 0)."""
        return nullcontext(model) if self.folder is None else self.base()


@dataclass
class Batch:
    """One micro-batch read: hidden states per requested layer (B, T, D) float32, which tokens are averaged (B, T), the
    last real token of each text (B,), and the logits (B, T, V) float32 when asked for."""

    hidden: dict[int, torch.Tensor]
    span: torch.Tensor
    last: torch.Tensor
    logits: torch.Tensor | None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks (through PEFT and head wrappers): the ModuleList named `...layers` with one entry per
    hidden layer."""
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and (num_layers is None or len(module) == num_layers):
            return module
    raise EvalError(
        f"{type(model).__name__}: no decoder layers found (a ModuleList named '...layers'); this suite reads Llama-style models"
    )


def check_layers(wanted: list[int] | None, num_layers: int, suite: str) -> list[int]:
    """The layers a suite reads (all when None); a layer the model does not have is an EvalError naming the suite."""
    if wanted is None:
        return list(range(num_layers))
    bad = [i for i in wanted if i >= num_layers]
    if bad:
        raise EvalError(
            f"eval suite '{suite}': layers {bad} do not exist (the model has {num_layers}: 0..{num_layers - 1}); fix its layers"
        )
    return sorted(set(wanted))


@contextmanager
def capture(model: nn.Module, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks storing the output hidden state of each layer in `layers` (overwritten by each forward)."""
    blocks = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def store(_module, _args, output):
            seen[index] = (output[0] if isinstance(output, tuple) else output).detach()

        return store

    handles = [blocks[i].register_forward_hook(hook(i)) for i in layers]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def read(model: nn.Module, tokenizer, texts: list[Text], layers: list[int], micro_batch_size: int, logits: bool = False) -> Iterator[Batch]:
    """The hidden states of `texts` at `layers`, micro-batch by micro-batch (see read_batch)."""
    for k in range(0, len(texts), micro_batch_size):
        yield read_batch(model, tokenizer, texts[k : k + micro_batch_size], layers, logits)


@torch.no_grad()
def read_batch(model: nn.Module, tokenizer, texts: list[Text], layers: list[int], logits: bool = False) -> Batch:
    """One forward of `texts` (right padding: token t of a text is at position t whatever the batch holds), the model in
    eval mode for it, hooks on `layers` only while it runs (a LoRA checkpoint and its base are one module: the caller
    switches the adapter between two calls)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    enc, span = encode(tokenizer, texts)
    mask = enc["attention_mask"]
    try:
        with capture(model, layers) as seen:
            out = model(input_ids=enc["input_ids"].to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        model.train(was_training)
    return Batch(
        hidden={i: seen[i].float().cpu() for i in layers},
        span=span,
        last=mask.sum(1) - 1,
        logits=out.logits.float().cpu() if logits else None,
    )


def encode(tokenizer, texts: list[Text]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token ids (right-padded, no special tokens added: a chat template has its own) and the (B, T) mask of the
    tokens each text averages over (those starting at or after its span_start)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer([t.text for t in texts], return_tensors="pt", padding=True, add_special_tokens=False, return_offsets_mapping=True)
    finally:
        tokenizer.padding_side = side
    offsets = enc.pop("offset_mapping")  # (B, T, 2) characters of each token
    starts = torch.tensor([t.span_start for t in texts]).unsqueeze(1)
    span = (offsets[:, :, 1] > starts) & enc["attention_mask"].bool()
    empty = [texts[i].text[:60] for i in range(len(texts)) if not span[i].any()]
    if empty:
        raise EvalError(f"a text has no tokens to average (an empty answer?): {empty[0]!r}")
    return dict(enc), span


def activation_mib(tokenizer, texts: list[Text], micro_batch_size: int, num_layers: int, hidden_size: int, vocab_size: int = 0) -> float:
    """MiB one micro-batch of the longest texts holds: float32 hidden states of `num_layers` layers (and logits over
    `vocab_size` when the suite reads them)."""
    lengths = sorted((len(tokenizer(t.text, add_special_tokens=False)["input_ids"]) for t in texts), reverse=True)
    tokens = micro_batch_size * (lengths[0] if lengths else 0)
    return tokens * (num_layers * hidden_size + vocab_size) * 4 / 2**20


def pooled(batch: Batch, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over each text's span, hidden state at its last token), both (B, D), at `layer`."""
    h = batch.hidden[layer]
    weights = batch.span.float().unsqueeze(-1)
    mean = (h * weights).sum(1) / weights.sum(1)
    last = h[torch.arange(h.shape[0]), batch.last]
    return mean, last


# ----------------------------------------------------------------------------------------------------- the texts
def probe_file(suite, cfg: Config) -> tuple[str, Path] | None:
    """(config field, file) the suite's probe prompts come from: its own `prompts`, the first judge suite's
    questions, or train.sample_prompts_file; None when they are train.sample_prompts alone (or there are none).
    The one rule: probe_texts reads by it, the eval cache key hashes the file it names."""
    if suite.prompts:
        return "prompts", Path(suite.prompts)
    if judge := next((s for s in cfg.eval.suites if isinstance(s, JudgeSuite)), None):
        return f"prompts (the questions of judge suite '{judge.name}')", Path(judge.questions)
    if cfg.train.sample_every_steps is not None and cfg.train.sample_prompts_file:
        return "prompts (train.sample_prompts_file)", Path(cfg.train.sample_prompts_file)
    return None


def probe_texts(suite, cfg: Config, tokenizer) -> list[Text]:
    """A suite's probe prompts, rendered with the chat template and a generation prompt (see spec._PROBES)."""
    from ..sampling import load_prompts, read_prompts_file

    found = probe_file(suite, cfg)
    own = found is not None and not found[0].endswith("(train.sample_prompts_file)")  # else load_prompts reads it
    prompts = read_prompts_file(found[1], f"eval suite '{suite.name}': {found[0]}") if own else load_prompts(cfg.train)
    if not prompts:
        raise ConfigError(
            f"eval suite '{suite.name}': no probe prompts; set its prompts (a question file), add a judge suite, or set "
            "train.sample_prompts"
        )
    return [Text(tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)) for p in prompts]


def labelled_texts(path: Path, tokenizer, label: str | None, field: str) -> list[Text]:
    """The items of a direction suite's positive / negative / texts file (YAML list or JSONL): {prompt, answer}
    (chat-templated, averaged over the answer) or {text} (raw, averaged over all of it); `label` given, or read from
    each item's label (texts). Errors name the file, the item and the field."""
    items = _items(path, field)
    out = []
    for where, item in items:
        if not isinstance(item, dict):
            raise EvalError(f"{where}: an item is an object with prompt and answer, or text; got {type(item).__name__}")
        unknown = sorted(set(item) - {"prompt", "answer", "text", "label", "id"})
        if unknown:
            raise EvalError(f"{where}: unknown key(s) {unknown}; an item has prompt + answer, or text (and label in a texts file)")
        side = label or item.get("label")
        if side not in ("positive", "negative"):
            raise EvalError(f"{where}: label must be 'positive' or 'negative', got {item.get('label')!r}")
        if isinstance(item.get("text"), str) and item["text"].strip() and "prompt" not in item and "answer" not in item:
            out.append(Text(item["text"], 0, side))
            continue
        prompt, answer = item.get("prompt"), item.get("answer")
        if not (isinstance(prompt, str) and prompt.strip() and isinstance(answer, str) and answer.strip()):
            raise EvalError(f"{where}: needs non-empty prompt and answer (texts), or text alone")
        head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(head):  # the answer's span is what follows the generation prompt
            raise EvalError(f"{where}: the chat template renders the prompt differently with an answer; use text items")
        out.append(Text(full, len(head), side))
    if not out:
        raise EvalError(f"{path}: no items; add texts (prompt + answer, or text)")
    return out


def _items(path: Path, field: str) -> list[tuple[str, object]]:
    """(where, item) of a YAML list or JSONL file, 'file:line: item #n' naming each (the question loaders' readers)."""
    from .questions import read_jsonl_items, read_yaml_items

    if not path.is_file():
        raise ConfigError(f"{field}: file not found: {path}; fix the path under eval.suites")
    if path.suffix.lower() in (".yaml", ".yml"):
        found = read_yaml_items(path, EvalError, "t", "- prompt: ...")
    else:
        found = read_jsonl_items(path, EvalError, "t")
    return [(where, item) for where, _, item in found]
