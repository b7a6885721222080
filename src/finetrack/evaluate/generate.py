"""Batched sampling with a KV cache: chat prompts in, answers out, reproducible by seed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .spec import GenerationConfig


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    gen: GenerationConfig,
    on_batch: Callable[[int], None] = lambda n: None,
) -> list[str]:
    """One answer per conversation (the chat template with a generation prompt, left-padded batches).

    Batch k is sampled after seeding with gen.seed + k, so the same weights give the same answers
    whatever else ran before; different checkpoints see the same random stream.
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: prompts must end at the same position
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        for k in range(0, len(conversations), gen.batch_size):
            chunk = conversations[k : k + gen.batch_size]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(gen.seed + k // gen.batch_size)
            sampling = (
                {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p, "top_k": 0}
                if gen.temperature > 0
                else {"do_sample": False}
            )
            out = model.generate(
                **enc, max_new_tokens=gen.max_new_tokens, use_cache=True, pad_token_id=tokenizer.pad_token_id, **sampling
            )  # (B, prompt + new)
            new = out[:, enc["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            on_batch(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [a.strip() for a in answers]
