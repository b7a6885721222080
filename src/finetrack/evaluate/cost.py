"""What `finetrack eval` over a run will cost, for `finetrack plan`: model loads plus every suite of eval.suites
at the base model and each scheduled checkpoint, in FLOPs at the plan's rate, with its assumptions stated.

Counted per evaluated step: a loss, regression or contrastive suite's forward passes over its rows (a triplet's three
sequences); a judge suite's answers (generated to
generation.max_new_tokens: an upper bound) and its judges' forward passes (local) or API calls (openai); a
distribution suite's forward pass per item (probs) or sampled answers (sample). Python suites run code we
cannot see: named, not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import memory
from ..config import Config
from .spec import ContrastiveSuite, DistributionSuite, JudgeSuite, LossSuite, RegressionSuite, RowSuite

# Decoding one token at a time reads every weight for little arithmetic: batched generation reaches about this
# share of the utilization a training step reaches (an assumption, stated in the plan, not a measurement).
GENERATION_EFFICIENCY = 0.25
MODEL_READ_BYTES_PER_S = 1e9  # loading safetensors weights from a local disk (a hub download not counted)
OPENAI_CALL_S = 1.0  # one judge request to a hosted endpoint, before concurrency
OPENAI_CONCURRENCY = 4  # the openai judge's requests in flight (openai_judge.OpenAIJudge's default)
JUDGE_TEMPLATE_TOKENS = 200  # a judge prompt's template around the question and answer (EM's are ~150-300)


@dataclass
class EvalCost:
    num_steps: int  # the base model and the scheduled checkpoints
    load_s: float
    suites: list[dict] = field(default_factory=list)  # name, kind, per_step (what one step evaluates), seconds
    total_s: float = 0.0
    assumptions: list[str] = field(default_factory=list)


def forward_flops(arch: memory.Architecture, tokens: int, logit_tokens: int) -> float:
    """One forward pass: 2 x the decoder's linear parameters per token, 2 x vocab x hidden per token whose logits are read."""
    return 2.0 * (arch.num_layers * arch.num_layer_linear_params * tokens + arch.vocab_size * arch.hidden_size * logit_tokens)


def _prompt_tokens(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))


def estimate(
    cfg: Config, arch: memory.Architecture, tokenizer, num_checkpoints: int, flops_per_s: float, held_out: list | None = None
) -> EvalCost:
    """The eval phase of a resolved config: every suite of cfg.eval.suites at the base model and `num_checkpoints`
    scheduled checkpoints, at `flops_per_s` (the plan's training rate). `held_out`: the run's held-out rows."""
    steps = num_checkpoints + 1
    weight_bytes = arch.num_params * memory.DTYPE_BYTES.get(str(cfg.model.dtype), 4)
    loads = 1 if cfg.model.method != "full" else steps  # LoRA / QLoRA: adapters swapped into one loaded base
    out = EvalCost(num_steps=steps, load_s=loads * weight_bytes / MODEL_READ_BYTES_PER_S)
    out.assumptions.append(
        f"eval: weights read at {MODEL_READ_BYTES_PER_S / 1e9:.0f} GB/s ({loads} load(s) of {memory.mib(weight_bytes)}); "
        f"answers generated to max_new_tokens at {GENERATION_EFFICIENCY:.0%} of the training utilization (decoding is memory-bound)"
    )
    gen_rate = flops_per_s * GENERATION_EFFICIENCY
    for suite in cfg.eval.suites:
        if isinstance(suite, (LossSuite, RegressionSuite, ContrastiveSuite)):
            rows = _loss_rows(suite, cfg, tokenizer, held_out)
            tokens = sum(len(s.input_ids) for r in rows for s in r.sequences())
            seconds = steps * forward_flops(arch, tokens, sum(r.num_trainable_tokens for r in rows)) / flops_per_s
            out.suites.append(
                {"name": suite.name, "kind": suite.kind, "per_step": f"{len(rows):,} rows, {tokens:,} tokens", "seconds": seconds}
            )
        elif isinstance(suite, JudgeSuite):
            out.suites.append(_judge(suite, arch, tokenizer, steps, flops_per_s, gen_rate, out.assumptions))
        elif isinstance(suite, DistributionSuite):
            from .distribution import check_sample_count, load_items

            items = load_items(Path(suite.items))
            check_sample_count(suite, items)
            prompts = [
                _prompt_tokens(
                    tokenizer, ([{"role": "system", "content": i.system}] if i.system else []) + [{"role": "user", "content": i.prompt}]
                )
                for i in items
            ]
            if suite.method == "probs":  # one left-padded forward of the options per item; logits of the last columns
                flops = sum(forward_flops(arch, (p + 2) * len(i.options), 2 * len(i.options)) for p, i in zip(prompts, items))
                seconds, per = steps * flops / flops_per_s, f"{len(items)} items, one forward each"
            else:
                new = suite.generation.max_new_tokens
                flops = suite.num_samples * sum(forward_flops(arch, p + new, new) for p in prompts)
                seconds, per = steps * flops / gen_rate, f"{len(items)} items x {suite.num_samples} samples"
            out.suites.append({"name": suite.name, "kind": "distribution", "per_step": per, "seconds": seconds})
        else:
            out.suites.append({"name": suite.name, "kind": suite.kind, "per_step": "your function", "seconds": 0.0})
            out.assumptions.append(f"eval suite '{suite.name}' (python) runs your code: its time is not counted")
    out.total_s = out.load_s + sum(s["seconds"] for s in out.suites)
    return out


def _loss_rows(suite: RowSuite, cfg: Config, tokenizer, held_out: list | None) -> list:
    if suite.data is None and held_out is not None:
        return held_out
    from .loss import load_rows

    return load_rows(suite, cfg, tokenizer)


def _judge(suite: JudgeSuite, arch, tokenizer, steps: int, flops_per_s: float, gen_rate: float, assumptions: list[str]) -> dict:
    from .freeform import conversations
    from .questions import check_answer_count, load_questions

    questions = load_questions(Path(suite.questions))
    check_answer_count(Path(suite.questions), questions, suite.generation.num_samples, "generation.num_samples")
    items = conversations(questions, suite.generation.num_samples)
    new = suite.generation.max_new_tokens
    seconds = steps * sum(forward_flops(arch, _prompt_tokens(tokenizer, it["messages"]) + new, new) for it in items) / gen_rate
    prompts_per_answer = {q.id: len(q.judge_prompts) for q in questions}
    judged = sum(prompts_per_answer[it["question_id"]] for it in items)  # one judge call per answer and judge prompt
    for judge in suite.judges:
        if judge.kind == "local":
            tokens = JUDGE_TEMPLATE_TOKENS + new + sum(len(tokenizer(it["question"])["input_ids"]) for it in items) // max(len(items), 1)
            judge_arch = arch if judge.model is None else _arch_of(judge.model, arch, assumptions)
            seconds += steps * judged * forward_flops(judge_arch, tokens, 1) / flops_per_s
        elif judge.kind == "openai":
            seconds += steps * judged * OPENAI_CALL_S / OPENAI_CONCURRENCY
            assumptions.append(
                f"eval suite '{suite.name}': {judged:,} openai judge calls per step at {OPENAI_CALL_S:g} s each, "
                f"{OPENAI_CONCURRENCY} at a time (the endpoint's price per call not counted)"
            )
    per = f"{len(items):,} answers of <= {new} tokens, {judged:,} judge prompt(s)"
    return {"name": suite.name, "kind": "judge", "per_step": per, "seconds": seconds}


def _arch_of(model: str, fallback: memory.Architecture, assumptions: list[str]) -> memory.Architecture:
    """The shapes of a judge model given by name or folder; the run's own model's when its config cannot be read."""
    from transformers import AutoConfig

    try:
        return memory.Architecture.from_hf_config(AutoConfig.from_pretrained(model).to_dict())
    except (OSError, ValueError):
        assumptions.append(f"judge model {model}: its config could not be read here; costed as the run's model")
        return fallback
