"""The vLLM engine of `finetrack eval` (eval.engine vllm, or auto on a machine with a CUDA GPU and vllm).

One vLLM instance holds the run's base model; each checkpoint is a LoRA request of its adapter folder (many adapters on
one base, none merged). engine.py decides when this engine is used and what it cannot serve.

Its answers are the transformers engine's (generate.py) where they can be:
- the same prompts: finetrack's tokenizer renders the chat template (generate.prompt_texts) and tokenizes it without
  special tokens; vLLM is given those token ids, never the text (its own tokenizing would add a second BOS);
- the same settings: temperature (0 = greedy), top_p, max_new_tokens -> max_tokens, top-k off in both, stopping at the
  model's end-of-sequence tokens (vLLM reads them from the same generation_config.json transformers does);
- the same answer: the new token ids decoded by finetrack's tokenizer, special tokens skipped, stripped
  (generate.clean_answers).
Sampling differs: vLLM draws its own random numbers, seeded per answer from (gen.seed, the answer's index), so an answer
does not depend on which others ran beside it; transformers seeds torch once per batch (gen.seed + batch index). A
sampled rate is therefore another draw of the same distribution, equal within its confidence interval.
A generation_config.json's other sampling options (repetition_penalty, ...) apply in transformers' generate only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from .generate import Answerer, Conversation, clean_answers, prompt_texts
from .spec import GenerationConfig

# vLLM reserves this share of the GPU's memory (weights, activations, KV cache) when it starts; the rest stays for the
# transformers model of the other suites and the judge models, which load beside it in the same process.
GPU_MEMORY_FRACTION = 0.5
REQUESTS_PER_CALL = 1024  # answers per llm.generate call: batches as large as vLLM schedules, progress between calls


def answer_seed(seed: int, index: int) -> int:
    """vLLM's sampling seed of answer `index` under gen.seed: independent streams per (seed, index), 32 bits."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class VllmEngine:
    """The base model in vLLM, LoRA enabled (rank up to max_lora_rank); `at(folder)` answers with that checkpoint."""

    def __init__(self, model: ModelConfig, max_lora_rank: int, enable_lora: bool = True) -> None:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its start-up INFO lines would bury finetrack's own
        from vllm import LLM

        from ..models import model_source

        source = model_source(model)
        self.max_lora_rank = max_lora_rank
        lora = {"enable_lora": True, "max_loras": 1, "max_lora_rank": max_lora_rank} if enable_lora else {}
        self.llm = LLM(
            model=source,
            tokenizer=source,
            revision=model.revision,
            dtype=model.dtype,
            trust_remote_code=model.trust_remote_code,
            gpu_memory_utilization=GPU_MEMORY_FRACTION,
            seed=0,
            **lora,
        )
        self.adapter_ids: dict[str, int] = {}

    def at(self, folder: Path | None, checkpoint_id: str) -> VllmAnswers:
        """Answers of the base model (folder None) or of the adapter in `folder`. vLLM caches an adapter by its integer
        id, so every distinct checkpoint (its manifest hash) gets its own: a reused id would serve stale weights."""
        if folder is None:
            return VllmAnswers(self.llm, None)
        from vllm.lora.request import LoRARequest

        number = self.adapter_ids.setdefault(checkpoint_id, len(self.adapter_ids) + 1)  # ids start at 1
        return VllmAnswers(self.llm, LoRARequest(lora_name=f"checkpoint-{number}", lora_int_id=number, lora_path=str(folder)))


class VllmAnswers(Answerer):
    """One step's answers from vLLM: the base model, or the base with one LoRA request."""

    def __init__(self, llm, lora_request) -> None:
        self.llm, self.lora_request = llm, lora_request

    def answers(self, tokenizer, conversations: list[Conversation], gen: GenerationConfig, on_batch: Callable[[int], None]) -> list[str]:
        from vllm import SamplingParams

        greedy = gen.temperature == 0
        answers: list[str] = []
        for k in range(0, len(conversations), REQUESTS_PER_CALL):
            texts = prompt_texts(tokenizer, conversations[k : k + REQUESTS_PER_CALL])
            prompts = [{"prompt_token_ids": ids} for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
            params = [
                SamplingParams(
                    n=1,
                    temperature=gen.temperature,
                    top_p=1.0 if greedy else gen.top_p,
                    max_tokens=gen.max_new_tokens,
                    seed=None if greedy else answer_seed(gen.seed, k + i),
                )
                for i in range(len(prompts))
            ]
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)  # in prompt order
            answers.extend(clean_answers(tokenizer, [list(o.outputs[0].token_ids) for o in outputs]))
            on_batch(len(prompts))
        return answers
