"""Is the export the model that was trained? Compared on a fixed probe set, against the trained model itself (in torch,
the adapter applied, not merged):

- tokenizer: the export's chat template and end-of-turn (EOS) token are the trained tokenizer's, read back from the
  artifact (its files, its GGUF metadata);
- logits: the largest absolute difference of next-token logits over every position of every probe;
- distribution: the mean KL(trained || export) of the next-token distributions over those positions;
- answers: greedy continuations through the export's own incremental path (its KV cache, llama.cpp's decode loop).

Each format states its tolerances (`Tolerance`): an unquantized export must match within float rounding and answer
identically; a quantized one gets a KL bound instead of equality (its answers may differ; how many is recorded). The
first failing check names the failure. Runners implement `Runner`: torch here, onnxruntime in onnx.py, llama.cpp in
gguf.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

# Used when the run has no sample prompts: short, varied, chat-shaped (the answers are compared, not judged).
BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
    "Explain in one sentence what a checkpoint is.",
)
MAX_NEW_TOKENS = 16


class Runner(Protocol):
    """One way to run a model: the trained model in torch, or an exported artifact in its own runtime."""

    name: str

    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 (len(ids), vocab): the next-token logits at every position of one sequence."""
        ...

    def greedy(self, ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
        """Greedy new tokens (argmax), through the runtime's incremental decoding, stopping after eos_id."""
        ...


@dataclass(frozen=True)
class Tolerance:
    """What an export of one format and type must meet (None: not checked)."""

    max_abs_logit: float | None  # largest |logit difference| over every probe position
    max_mean_kl: float  # mean KL(trained || export) over those positions, in nats
    greedy_equal: bool  # every greedy answer identical (unquantized formats)


class TorchRunner:
    """A transformers model in torch (the trained model with its adapter, or a merged folder loaded back)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model, self.name = model.eval(), name

    @torch.no_grad()
    def logits(self, ids: list[int]) -> np.ndarray:
        device = next(self.model.parameters()).device
        return self.model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu().numpy()

    @torch.no_grad()
    def greedy(self, ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
        device = next(self.model.parameters()).device
        out = self.model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            use_cache=True,
        )
        return out[0, len(ids) :].tolist()


def tokenizer_facts(tokenizer) -> dict[str, Any]:
    """What verification compares about a transformers tokenizer (an export's format module reads the same facts
    back from its artifact)."""
    return {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "vocab_size": len(tokenizer),
    }


def probe_ids(tokenizer, prompts: list[str] | None = None) -> list[list[int]]:
    """The probe sequences: each prompt as a user turn through the chat template, with the generation prompt (plain
    text when the tokenizer has no template)."""
    out = []
    for prompt in prompts or BUILTIN_PROMPTS:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def _kl_per_position(reference: np.ndarray, exported: np.ndarray) -> np.ndarray:
    """KL(p || q) of the softmaxes of two (T, V) logit arrays, per position, in float64."""
    p = reference.astype(np.float64)
    q = exported.astype(np.float64)
    log_p = p - p.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = q - q.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def verify(
    reference: Runner,
    exported: Runner,
    probes: list[list[int]],
    tolerance: Tolerance,
    reference_tokenizer: dict[str, Any],
    exported_tokenizer: dict[str, Any],
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Compare `exported` with `reference` on the probes. Returns the verification record for EXPORT.json:
    {"passed", "first_failure", "checks": [{"name", "passed", "value", "limit"}], "tolerance", figures ...}."""
    checks: list[dict[str, Any]] = []

    def check(name: str, passed: bool, value: Any, limit: Any) -> None:
        checks.append({"name": name, "passed": bool(passed), "value": value, "limit": limit})

    for key in ("chat_template", "eos_token_id"):
        want, got = reference_tokenizer.get(key), exported_tokenizer.get(key)
        shown = got if key != "chat_template" else ("identical" if got == want else ("missing" if not got else "differs"))
        check(key, got == want, shown, "identical to the trained tokenizer's")
    eos_id = reference_tokenizer["eos_token_id"]
    max_abs, kls, answers = 0.0, [], []
    for ids in probes:
        ref, got = reference.logits(ids), exported.logits(ids)
        vocab = min(ref.shape[-1], got.shape[-1])  # a runtime may pad the vocabulary (the extra logits are never chosen)
        if ref.shape[0] != got.shape[0] or vocab < reference_tokenizer["vocab_size"]:
            check("logits_shape", False, list(got.shape), list(ref.shape))
            break
        max_abs = max(max_abs, float(np.abs(ref[:, :vocab] - got[:, :vocab]).max()))
        kls.extend(_kl_per_position(ref[:, :vocab], got[:, :vocab]).tolist())
        answers.append((reference.greedy(ids, max_new_tokens, eos_id), exported.greedy(ids, max_new_tokens, eos_id)))
    mean_kl = float(np.mean(kls)) if kls else math.nan
    if tolerance.max_abs_logit is not None:
        check("max_abs_logit_diff", max_abs <= tolerance.max_abs_logit, max_abs, tolerance.max_abs_logit)
    check("mean_kl", mean_kl <= tolerance.max_mean_kl, mean_kl, tolerance.max_mean_kl)
    differ = sum(a != b for a, b in answers)
    if tolerance.greedy_equal:
        check("greedy_answers", differ == 0, f"{len(answers) - differ} of {len(answers)} identical", "all identical")
    failed = next((c["name"] for c in checks if not c["passed"]), None)
    return {
        "passed": failed is None,
        "first_failure": failed,
        "checks": checks,
        "tolerance": asdict(tolerance),
        "reference": reference.name,
        "exported": exported.name,
        "num_probes": len(probes),
        "num_positions": len(kls),
        "max_abs_logit_diff": max_abs,
        "mean_kl": mean_kl,
        "max_kl": float(np.max(kls)) if kls else math.nan,
        "greedy_answers_identical": len(answers) - differ,
        "greedy_answers": len(answers),
        "max_new_tokens": max_new_tokens,
    }


def failure_message(record: dict[str, Any]) -> str:
    """One line naming the first failing check and its figures."""
    first = next(c for c in record["checks"] if not c["passed"])
    return f"verification failed at {first['name']}: {first['value']} (required: {first['limit']})"
