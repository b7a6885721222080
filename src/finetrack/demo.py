"""`finetrack demo`: the main job on the embedded model, end to end, in a few minutes on a CPU.

Fine-tunes SmolLM2-135M-Instruct with LoRA on the shipped pirate chat set, then shows what changed:
the loss curve in one line, and the answer to a question the training data never asked, before
and after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import Config, load_config
from .models import load_tokenizer, model_source
from .train import RunResult, run

DEMO_CONFIG = Path(__file__).parent / "assets" / "demo.yaml"
DEMO_QUESTION = "How many days are in a week?"  # no such question in the demo data: the style must generalize
_BARS = "▁▂▃▄▅▆▇█"


def demo(overrides: list[str] | None = None) -> RunResult:
    """Train the demo config and print the before/after comparison."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(DEMO_CONFIG, [f"output.dir=runs/demo-{stamp}", *(overrides or [])])
    before = answer(cfg, adapter=None, question=DEMO_QUESTION)
    result = run(cfg)
    after = answer(cfg, adapter=result.final_checkpoint, question=DEMO_QUESTION)
    losses = [r["loss"] for r in _metrics(result.run_dir) if "loss" in r]
    print()
    print(f"run directory: {result.run_dir}")
    print(f"loss: {result.first_loss:.3f} -> {result.final_loss:.3f} over {result.total_steps} steps  {sparkline(losses)}")
    if result.eval_loss is not None:
        print(f"held-out loss at the end: {result.eval_loss:.3f}")
    print(f"question (not in the training data): {DEMO_QUESTION}")
    print(f"  before: {before}")
    print(f"  after:  {after}")
    return result


def answer(cfg: Config, adapter: Path | None, question: str, max_new_tokens: int = 40) -> str:
    """Greedy answer of the base model, or of the base model with a LoRA adapter from a checkpoint."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(model_source(cfg.model), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int((v - lo) / span * len(_BARS)))] for v in values)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
