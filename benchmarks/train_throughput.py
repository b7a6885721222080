"""Training throughput and memory: finetrack vs TRL's SFTTrainer on the same LoRA job (CPU).

What is held equal: the embedded SmolLM2-135M-Instruct in fp32, LoRA (r=16, alpha=32, dropout 0, all linear layers),
the same synthetic chat rows (written to a temp JSONL by this script, seeded, roughly 40-600 tokens each), the
number of optimizer steps, rows per step (micro batch, no accumulation), AdamW with lr/cosine schedule/seed,
grad clipping at 1.0, no gradient checkpointing (finetrack's default; TRL's default is on, so it is turned off).
Warmup defaults to 0 steps: with warmup the two schedules differ (HF starts warmup at lr 0).

What differs is each tool's default data handling: finetrack packs rows padding-free and computes loss on
assistant tokens only; TRL right-pads each batch to its longest row and (this model's chat template has no
`{% generation %}` markers and TRL cannot patch it) computes loss on all tokens. Both skip the LM head on
positions without a label. Losses are therefore not directly comparable; the table says which tokens they cover.

How it is measured: each engine runs in its own subprocess (`--engine finetrack|trl`) that prints one JSON line;
peak RSS is that process's own ru_maxrss (whole process: model load included). The timed span is the same for
both: from the end of optimizer step 1 to the end of step N (step 1 is an untimed warmup). TRL: a
TrainerCallback stamps time.perf_counter() at on_step_end and reads TRL's cumulative `num_tokens` (non-pad
tokens) from each log. finetrack: metrics.jsonl with log_every_steps=1 gives per-step `tokens` and
`tokens_per_s`, so each step's seconds = tokens_delta / tokens_per_s. "tokens" are real (non-pad) tokens.

    .venv/bin/python benchmarks/train_throughput.py [--steps 12 --micro-batch-size 8 --rows 96]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
WORDS = (
    "the a model data token layer loss rate batch step weight gradient memory kernel cache value query key head "
    "vector matrix sample window budget river mountain garden kitchen library window music story letter market "
    "simple careful quick gentle bright quiet early later always often never because while after before under "
    "between across through build measure compare explain improve check write read learn teach choose keep move "
    "small large long short new old different same important useful clear hard easy first last next every"
).split()


def make_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Deterministic chat rows: a question and answers of 2-480 words in all (~40-600 tokens with the template);
    one row in four has a second user/assistant turn."""
    rng = random.Random(seed)

    def text(num_words: int, end: str) -> str:
        words, out = [rng.choice(WORDS) for _ in range(num_words)], []
        while words:
            k = rng.randint(6, 14)
            out.append(" ".join(words[:k]).capitalize() + end)
            words = words[k:]
        return " ".join(out)

    rows = []
    for _ in range(n):
        budget = rng.randint(2, 480)  # answer words for the whole row
        messages = [{"role": "user", "content": text(rng.randint(3, 14), "?")}]
        if rng.random() < 0.25 and budget > 40:
            first = rng.randint(5, budget // 2)
            messages += [{"role": "assistant", "content": text(first, ".")}, {"role": "user", "content": text(rng.randint(3, 10), "?")}]
            budget -= first
        messages.append({"role": "assistant", "content": text(budget, ".")})
        rows.append({"messages": messages})
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed_span(steps: dict[int, tuple[float, int]]) -> tuple[float, int]:
    """(seconds, tokens) of steps 2..N given {step: (seconds of that step, tokens of that step)}."""
    later = [v for k, v in steps.items() if k >= 2]
    return sum(s for s, _ in later), sum(t for _, t in later)


def run_finetrack(a: argparse.Namespace) -> dict[str, Any]:
    from finetrack.config import load_config
    from finetrack.train import run

    out = Path(tempfile.mkdtemp(prefix="bench-finetrack-"))
    overrides = [
        f"model.name={a.model_dir}", "model.method=lora", "model.dtype=float32", "model.lora.r=16", "model.lora.alpha=32",
        "model.lora.dropout=0.0", "model.lora.target_modules=all-linear", f"data.path={a.data}", f"output.dir={out}",
        f"train.max_steps={a.steps}", f"train.micro_batch_size={a.micro_batch_size}", "train.grad_accum_steps=1",
        f"train.lr={a.lr!r}", "train.lr_schedule=cosine", f"train.warmup_steps={a.warmup_steps}", f"train.seed={a.seed}",
        "train.max_grad_norm=1.0", "train.log_every_steps=1",
    ]
    start = time.perf_counter()
    run(load_config(None, overrides))
    total_s = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps, prev = {}, 0
    for r in records:
        steps[r["step"]] = ((r["tokens"] - prev) / r["tokens_per_s"], r["tokens"] - prev)
        prev = r["tokens"]
    seconds, tokens = timed_span(steps)
    report = json.loads((out / "data_report.json").read_text())["train"]["tokens"]
    return {
        "engine": "finetrack", "steps": len(records), "tokens": prev, "timed_s": seconds, "timed_tokens": tokens,
        "total_s": total_s, "peak_rss_mb": peak_rss_mb(), "first_loss": records[0]["loss"], "final_loss": records[-1]["loss"],
        "loss_tokens": sum(r["target_tokens"] for r in records), "loss_on": "assistant tokens",
        "data": f"row tokens min {report['min']} mean {report['mean']} max {report['max']} (finetrack data report)",
    }


def run_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.end: dict[int, float] = {}
            self.logs: dict[int, dict[str, float]] = {}

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.end[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if logs and "loss" in logs:
                self.logs[state.global_step] = dict(logs)

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    try:  # the same check SFTTrainer makes: markers present, or a known template it can patch
        get_training_chat_template(tokenizer)
        assistant_only, why = True, "assistant tokens (assistant_only_loss=True)"
    except ValueError:
        assistant_only, why = False, "ALL tokens (assistant_only_loss unsupported: template has no generation markers)"
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines()]
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=a.steps, per_device_train_batch_size=a.micro_batch_size,
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=a.warmup_steps,
        seed=a.seed, max_grad_norm=1.0, weight_decay=0.0, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False, assistant_only_loss=assistant_only,
        model_init_kwargs={"dtype": torch.float32},
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    set_seed(a.seed)  # SFTTrainer wraps the model with PEFT before Trainer.__init__ seeds
    clock = StepClock()
    trainer = SFTTrainer(model=str(a.model_dir), args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[clock])
    trainer.train()
    total_s = time.perf_counter() - start
    n = max(clock.end)
    cum = {s: int(clock.logs[s]["num_tokens"]) for s in sorted(clock.logs)}
    steps = {s: (clock.end[s] - clock.end[s - 1] if s > 1 else 0.0, cum[s] - cum.get(s - 1, 0)) for s in range(1, n + 1)}
    seconds, tokens = timed_span(steps)
    return {
        "engine": "trl", "steps": n, "tokens": cum[n], "timed_s": seconds, "timed_tokens": tokens, "total_s": total_s,
        "peak_rss_mb": peak_rss_mb(), "first_loss": clock.logs[1]["loss"], "final_loss": clock.logs[n]["loss"],
        "loss_tokens": None, "loss_on": why,
    }


def child(a: argparse.Namespace) -> None:
    result = run_finetrack(a) if a.engine == "finetrack" else run_trl(a)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def spawn(engine: str, a: argparse.Namespace, data: Path, model_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--engine", engine, "--data", str(data), "--model-dir", str(model_dir),
           "--steps", str(a.steps), "--micro-batch-size", str(a.micro_batch_size), "--lr", repr(a.lr),
           "--warmup-steps", str(a.warmup_steps), "--seed", str(a.seed)]
    print(f"--- {engine}: running ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress, warnings) passes through
    lines = proc.stdout.splitlines()
    found = [json.loads(x[len(RESULT_PREFIX):]) for x in lines if x.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not found:
        sys.stderr.write("\n".join(lines[-40:]) + "\n")
        raise SystemExit(f"{engine} child failed (exit code {proc.returncode})")
    return found[-1]


def table(results: list[dict[str, Any]]) -> str:
    head = ["engine", "steps", "tokens", "timed steps", "timed tokens", "loop s", "tokens/s", "peak RSS MB", "first loss", "final loss"]
    body = [[r["engine"], r["steps"], r["tokens"], f"2..{r['steps']}", r["timed_tokens"], f"{r['timed_s']:.1f}",
             f"{r['timed_tokens'] / r['timed_s']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['first_loss']:.4f}", f"{r['final_loss']:.4f}"]
            for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "  ".join(str(x).rjust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--rows", type=int, default=96, help="synthetic rows (default: one epoch of 12 steps x 8)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--engines", default="finetrack,trl", help="comma-separated, run in this order")
    p.add_argument("--engine", choices=["finetrack", "trl"], help=argparse.SUPPRESS)  # child mode
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.engine:
        return child(a)

    from finetrack.models import embedded_model_dir

    model_dir = embedded_model_dir()  # converts once per user, outside any measurement
    data = Path(tempfile.mkdtemp(prefix="bench-data-")) / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(a.rows, a.seed)))
    results = [spawn(e.strip(), a, data, model_dir) for e in a.engines.split(",") if e.strip()]

    print(f"\nSmolLM2-135M-Instruct fp32, LoRA r=16 alpha=32 all-linear, {a.rows} rows, {a.steps} steps x "
          f"{a.micro_batch_size} rows, lr {a.lr} cosine, warmup {a.warmup_steps}, seed {a.seed}; CPU")
    for r in results:
        if "data" in r:
            print(r["data"])
    print(table(results))
    print("loop s: steps 2..N only (end of step 1 to end of step N); tokens = real non-pad tokens through the model;"
          " peak RSS includes model load.")
    for r in results:
        extra = f" ({r['loss_tokens']} loss tokens over all steps)" if r["loss_tokens"] else ""
        print(f"{r['engine']}: loss over {r['loss_on']}{extra}; whole run incl. setup {r['total_s']:.1f} s")
    by = {r["engine"]: r for r in results}
    if {"finetrack", "trl"} <= by.keys():
        ft, trl = by["finetrack"], by["trl"]
        speed = (ft["timed_tokens"] / ft["timed_s"]) / (trl["timed_tokens"] / trl["timed_s"])
        print(f"finetrack/TRL: throughput x{speed:.2f}, peak RSS x{ft['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")
        if ft["loss_on"] != trl["loss_on"]:
            print("losses are NOT comparable: finetrack averages over assistant tokens only, TRL over " + trl["loss_on"])


if __name__ == "__main__":
    main()
