"""`--format merged`: the adapter merged into full weights, a folder plain transformers loads.

LoRA and DoRA adapters are merged by PEFT (`merge_and_unload`). A QLoRA adapter was trained over a 4-bit base: the
base is dequantized (the exact values the trained model computed with, not the original full-precision weights)
into a model of the chosen dtype, and the adapter merged into that; the certificate says so. A full fine-tune is
saved as it is. The folder holds safetensors, the tokenizer with its chat template, a generation config whose end
token is the tokenizer's end-of-turn token, and a regression head beside them when the checkpoint has one
(head.safetensors + head.json, loaded by finetrack.heads.read_head).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..heads import HEAD_CONFIG, HEAD_WEIGHTS, language_model
from .source import Source, _concrete

log = logging.getLogger("finetrack")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge(trained: nn.Module, source: Source, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
    """(a plain transformers model with the adapter merged in, what was done). `trained` is load_trained's model."""
    lm = language_model(trained)
    if not source.adapter:
        return lm.to(dtype), {"merge": "none (full weights)"}
    if source.model.method == "qlora":
        return _merge_qlora(lm, source, dtype), {
            "merge": "QLoRA adapter merged into the base dequantized from its 4-bit weights",
            "dequantized_base": str(dtype).removeprefix("torch."),
        }
    merged = _with_adapter(_float_base(source, dtype), source).merge_and_unload()
    kind = "DoRA" if getattr(lm.peft_config["default"], "use_dora", False) else "LoRA"
    return merged, {"merge": f"{kind} adapter merged (PEFT merge_and_unload)"}


def _float_base(source: Source, dtype: torch.dtype) -> nn.Module:
    """A fresh, unquantized base model in `dtype` (the trained model stays untouched as the reference)."""
    from ..models import load_base_model

    cfg = _concrete(source.model, torch.device("cpu")).model_copy(update={"method": "lora", "dtype": str(dtype).removeprefix("torch.")})
    return load_base_model(cfg, torch.device("cpu"))


def _with_adapter(base: nn.Module, source: Source) -> nn.Module:
    """`base` with the checkpoint's adapter loaded over it (PEFT)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, source.folder, is_trainable=False)


def _merge_qlora(lm: nn.Module, source: Source, dtype: torch.dtype) -> nn.Module:
    """Dequantize every 4-bit linear layer of the trained model into a float base of the same architecture, then load
    the adapter over it and merge."""
    from bitsandbytes.functional import dequantize_4bit

    base = _float_base(source, dtype)
    replaced = 0
    for name, module in lm.get_base_model().named_modules():
        if type(module).__name__ != "Linear4bit" or not hasattr(module.weight, "quant_state"):
            continue
        target = base.get_submodule(name.removesuffix(".base_layer"))
        with torch.no_grad():
            target.weight.copy_(dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype))
        replaced += 1
    log.info("QLoRA: %d 4-bit layers dequantized to %s before the merge", replaced, dtype)
    return _with_adapter(base, source).merge_and_unload()


def write(merged: nn.Module, tokenizer, source: Source, out_dir: Path) -> list[str]:
    """Save the merged model, tokenizer, generation config and head into `out_dir`; returns the files written."""
    eos = tokenizer.eos_token_id
    generation = merged.generation_config
    ends = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    if eos is not None and eos not in ends:  # generation must stop at the end-of-turn token the chat template writes
        generation.eos_token_id = [eos, *(e for e in ends if e is not None)]
    if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    merged.config.use_cache = True  # training switched it off; a served model wants its KV cache
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if source.head:
        for name in (HEAD_WEIGHTS, HEAD_CONFIG):
            shutil.copy2(source.folder / name, out_dir / name)
    return sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
