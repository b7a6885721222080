"""Batched sampling with a KV cache: chat prompts in, answers out, reproducible by seed.

Two engines produce answers (engine.py chooses): this module's transformers generate() on the model itself, or an
`Answerer` handed in its place (vllm_engine.py). Both render the prompts and clean the answers with the helpers below,
so the same weights give the same greedy answers whichever engine ran.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from .spec import GenerationConfig

Conversation = list[dict[str, str]]


class Answerer(ABC):
    """Answers from another engine than transformers (vllm_engine.VllmAnswers): generate() hands it the work."""

    @abstractmethod
    def answers(self, tokenizer, conversations: list[Conversation], gen: GenerationConfig, on_batch: Callable[[int], None]) -> list[str]:
        """One answer per conversation, as generate() defines them (prompt_texts, the sampling settings, clean_answers)."""


def prompt_texts(tokenizer, conversations: list[Conversation]) -> list[str]:
    """The chat template over each conversation with the generation prompt; tokenize without special tokens (the
    rendered text holds any BOS the template wants)."""
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def clean_answers(tokenizer, new_token_ids: list[list[int]]) -> list[str]:
    """The generated tokens as answer texts: special tokens (end of turn, padding) dropped, surrounding space stripped."""
    return [a.strip() for a in tokenizer.batch_decode(new_token_ids, skip_special_tokens=True)]


@torch.no_grad()
def generate(
    model: nn.Module | Answerer,
    tokenizer,
    conversations: list[Conversation],
    gen: GenerationConfig,
    on_batch: Callable[[int], None] = lambda n: None,
) -> list[str]:
    """One answer per conversation (the chat template with a generation prompt, left-padded batches).

    Batch k is sampled after seeding with gen.seed + k, so the same weights give the same answers
    whatever else ran before; different checkpoints see the same random stream. An Answerer in place of the
    model generates them itself (vLLM: the same prompts and settings, its own random stream).
    """
    if isinstance(model, Answerer):
        return model.answers(tokenizer, conversations, gen, on_batch)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: prompts must end at the same position
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        for k in range(0, len(conversations), gen.batch_size):
            chunk = conversations[k : k + gen.batch_size]
            enc = tokenizer(prompt_texts(tokenizer, chunk), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(gen.seed + k // gen.batch_size)
            sampling = (
                {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p, "top_k": 0}
                if gen.temperature > 0
                else {"do_sample": False}
            )
            out = model.generate(
                **enc, max_new_tokens=gen.max_new_tokens, use_cache=True, pad_token_id=tokenizer.pad_token_id, **sampling
            )  # (B, prompt + new)
            answers.extend(clean_answers(tokenizer, out[:, enc["input_ids"].shape[1] :].tolist()))
            on_batch(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers
