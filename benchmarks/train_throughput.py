"""Training throughput and memory: finetrack vs TRL's SFTTrainer on the same LoRA job (CPU).

Held equal: the embedded SmolLM2-135M-Instruct in fp32 with sdpa attention, LoRA (r=16, alpha=32, dropout 0, all
linear layers), the same synthetic chat rows (seeded, written to a temp JSONL, ~40-600 tokens each), optimizer
steps, rows per step (one micro batch, no accumulation), AdamW, lr, cosine schedule, seed, grad clipping at 1.0,
no gradient checkpointing. That last one is NOT TRL's default: SFTConfig turns gradient checkpointing on by default
(trl 1.16), which recomputes activations in backward (less memory, more compute); this script sets
gradient_checkpointing=False so both engines do the same work (finetrack's default is off); the engine
`trl-defaults` keeps TRL's default (checkpointing on) for the comparison the words "TRL's defaults" ask for. Warmup
defaults to 0 steps: only then are the schedules identical (HF's warmup starts at lr 0, finetrack's at lr/warmup).

Different, on purpose: each tool's default data handling. finetrack packs each micro batch (data.pack auto,
data.pack_row_tokens unset: the row width is chosen per micro batch to compute least, a multiple of 1-4x its
longest sample; position_ids restart per sample; shorter packed rows are padded to the widest) and computes
loss on assistant tokens only. TRL pads each batch to its longest row and, since this
model's chat template has no `{% generation %}` markers (and is not one TRL can patch), trains on all tokens. So
losses are not comparable; the output says which tokens each covers. Both compute logits only where a label is.

Measured: each engine runs in its own subprocess (`--engine finetrack|trl`) that prints one JSON line. Peak RSS
is that process's own ru_maxrss (model load included). The timed span is the same for both: end of optimizer
step 1 to end of step N (step 1 is untimed warmup), taken in both engines by the same global torch hook
that stamps time.perf_counter() after every optimizer.step(). Real (non-pad) tokens per step come from finetrack's
metrics.jsonl (`tokens`, log_every_steps=1) and from TRL's cumulative `num_tokens` in every log (logging_steps=1).
The child's CPU seconds per wall second over that span ("cores busy") shows whether other work shared the machine.
The tensor shapes each engine computes on (padding included) are recorded through finetrack's `objective`
argument and by wrapping TRL's data collator; neither wrapper changes what is computed.

    .venv/bin/python benchmarks/train_throughput.py [--steps 5] [--micro-batch-size 8] [--rows 40]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
WORDS = (
    "the a model data token layer loss rate batch step weight gradient memory kernel cache value query key head "
    "vector matrix sample window budget river mountain garden kitchen library music story letter market "
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


def stamp_optimizer_steps() -> list[tuple[float, float]]:
    """(wall, process CPU) seconds after every optimizer.step() in this process (a global torch hook): the step
    boundary both engines share, whatever each one logs about its own timing."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    stamps: list[tuple[float, float]] = []
    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: stamps.append((time.perf_counter(), cpu())))
    return stamps


def timed_span(stamps: list[tuple[float, float]], cumulative_tokens: list[int]) -> dict[str, float]:
    """Wall seconds, real tokens and CPU cores kept busy over steps 2..N, and the median per-step tokens/s."""
    if len(stamps) != len(cumulative_tokens):
        raise RuntimeError(f"{len(stamps)} optimizer steps stamped for {len(cumulative_tokens)} training steps")
    per_step = [(b[0] - a[0], t1 - t0) for a, b, t0, t1 in zip(stamps, stamps[1:], cumulative_tokens, cumulative_tokens[1:])]
    wall = stamps[-1][0] - stamps[0][0]
    return {
        "timed_s": wall,
        "timed_tokens": cumulative_tokens[-1] - cumulative_tokens[0],
        "cores_busy": (stamps[-1][1] - stamps[0][1]) / wall,
        "median_step_tok_s": statistics.median(t / s for s, t in per_step),
    }


def run_finetrack(a: argparse.Namespace) -> dict[str, Any]:
    from finetrack.config import load_config
    from finetrack.train import causal_lm_objective, run

    shapes: list[tuple[int, int]] = []

    def objective(model, batch):  # finetrack's own objective; only records the (rows, width) of what is computed
        shapes.append(tuple(batch.inputs["input_ids"].shape))
        return causal_lm_objective(model, batch)

    stamps = stamp_optimizer_steps()
    out = Path(tempfile.mkdtemp(prefix="bench-finetrack-"))
    overrides = [
        f"model.name={a.model_dir}",
        "model.method=lora",
        "model.dtype=float32",
        "model.attn_implementation=sdpa",
        "model.lora.r=16",
        "model.lora.alpha=32",
        "model.lora.dropout=0.0",
        "model.lora.target_modules=all-linear",
        f"data.path={a.data}",
        f"output.dir={out}",
        f"train.max_steps={a.steps}",
        f"train.micro_batch_size={a.micro_batch_size}",
        "train.grad_accum_steps=1",
        f"train.lr={a.lr!r}",
        "train.lr_schedule=cosine",
        f"train.warmup_steps={a.warmup_steps}",
        f"train.seed={a.seed}",
        "train.max_grad_norm=1.0",
        "train.log_every_steps=1",
        f"data.train_on={a.finetrack_train_on}",
    ]
    start = time.perf_counter()
    run(load_config(None, overrides), objective)
    total_s = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    report = json.loads((out / "data_report.json").read_text())["train"]["tokens"]
    shutil.rmtree(out, ignore_errors=True)  # run dir with its final checkpoint
    return {
        "engine": "finetrack",
        "steps": len(records),
        "tokens": records[-1]["tokens"],
        **timed_span(stamps, [r["tokens"] for r in records]),
        "total_s": total_s,
        "peak_rss_mb": peak_rss_mb(),
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "computed_tokens": sum(b * t for b, t in shapes[: len(records)]),
        "loss_tokens": sum(r["target_tokens"] for r in records),
        "loss_on": "assistant tokens" if a.finetrack_train_on == "assistant" else "all tokens",
        "data": f"row tokens min {report['min']} mean {report['mean']} max {report['max']} (finetrack data report)",
    }


def run_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template

    class LogKeeper(TrainerCallback):
        def __init__(self) -> None:
            self.logs: dict[int, dict[str, float]] = {}

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if logs and "loss" in logs:
                self.logs[state.global_step] = dict(logs)

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    try:  # the same check SFTTrainer makes: markers present, or a known template it can patch
        get_training_chat_template(tokenizer)
        assistant_only, why = True, "assistant tokens (assistant_only_loss=True)"
    except ValueError:
        assistant_only, why = False, "ALL tokens (assistant_only_loss=False: the template has no generation markers)"
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines()]
    out = tempfile.mkdtemp(prefix="bench-trl-")
    # `trl` turns gradient checkpointing off (the same compute as finetrack's default); `trl-defaults` keeps TRL's own
    checkpointing = {"gradient_checkpointing": False} if a.engine == "trl" else {}
    config = SFTConfig(
        output_dir=out,
        max_steps=a.steps,
        per_device_train_batch_size=a.micro_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=a.warmup_steps,
        seed=a.seed,
        max_grad_norm=1.0,
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        fp16=False,
        assistant_only_loss=assistant_only,
        **checkpointing,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    set_seed(a.seed)  # SFTTrainer wraps the model with PEFT before Trainer.__init__ seeds
    keeper, stamps = LogKeeper(), stamp_optimizer_steps()
    trainer = SFTTrainer(
        model=str(a.model_dir),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[keeper],
    )
    collate, seen = trainer.data_collator, []

    def recording_collator(examples):  # TRL's own collator; only records (rows, width) and loss-carrying labels
        out = collate(examples)
        seen.append((out["input_ids"].numel(), int((out["labels"][:, 1:] != -100).sum())))
        return out

    trainer.data_collator = recording_collator
    trainer.train()
    total_s = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    n = max(keeper.logs)
    cumulative = [int(keeper.logs[k]["num_tokens"]) for k in range(1, n + 1)]
    return {
        "engine": a.engine,
        "gradient_checkpointing": config.gradient_checkpointing,
        "steps": n,
        "tokens": cumulative[-1],
        **timed_span(stamps, cumulative),
        "total_s": total_s,
        "peak_rss_mb": peak_rss_mb(),
        "first_loss": keeper.logs[1]["loss"],
        "final_loss": keeper.logs[n]["loss"],
        "computed_tokens": sum(c for c, _ in seen[:n]),
        "loss_tokens": sum(t for _, t in seen[:n]),
        "loss_on": why,
    }


def child(a: argparse.Namespace) -> None:
    result = run_finetrack(a) if a.engine == "finetrack" else run_trl(a)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def spawn(engine: str, a: argparse.Namespace, data: Path, model_dir: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--engine",
        engine,
        "--data",
        str(data),
        "--model-dir",
        str(model_dir),
        "--steps",
        str(a.steps),
        "--micro-batch-size",
        str(a.micro_batch_size),
        "--lr",
        repr(a.lr),
        "--warmup-steps",
        str(a.warmup_steps),
        "--seed",
        str(a.seed),
        "--finetrack-train-on",
        a.finetrack_train_on,
    ]
    print(f"--- {engine}: running ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress, warnings) passes through
    lines = proc.stdout.splitlines()
    found = [json.loads(x[len(RESULT_PREFIX) :]) for x in lines if x.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not found:
        sys.stderr.write("\n".join(lines[-40:]) + "\n")
        raise SystemExit(f"{engine} child failed (exit code {proc.returncode})")
    return found[-1]


def table(results: list[dict[str, Any]]) -> str:
    head = [
        "engine",
        "steps",
        "tokens",
        "computed/real",
        "timed steps",
        "timed tokens",
        "loop s",
        "tokens/s",
        "median step tok/s",
        "cores busy",
        "peak RSS MB",
        "first loss",
        "final loss",
    ]
    body = [
        [
            r["engine"],
            r["steps"],
            r["tokens"],
            f"{r['computed_tokens'] / r['tokens']:.2f}",
            f"2..{r['steps']}",
            r["timed_tokens"],
            f"{r['timed_s']:.1f}",
            f"{r['timed_tokens'] / r['timed_s']:.1f}",
            f"{r['median_step_tok_s']:.1f}",
            f"{r['cores_busy']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['first_loss']:.4f}",
            f"{r['final_loss']:.4f}",
        ]
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(x).rjust(w) for x, w in zip(row, widths)) for row in [head, ["-" * w for w in widths], *body])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--rows", type=int, help="synthetic rows (default: steps x micro batch size, one epoch)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--engines",
        default="finetrack,trl,trl-defaults",
        help="comma-separated, run in this order: finetrack, trl (gradient checkpointing off, as finetrack), "
        "trl-defaults (TRL's SFTConfig defaults: checkpointing on)",
    )
    p.add_argument(
        "--finetrack-train-on",
        choices=["assistant", "all"],
        default="assistant",
        help="finetrack's data.train_on; 'all' makes its loss comparable with TRL's all-token loss",
    )
    p.add_argument("--engine", choices=["finetrack", "trl", "trl-defaults"], help=argparse.SUPPRESS)  # child mode
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.engine:
        return child(a)
    a.rows = a.rows or a.steps * a.micro_batch_size

    from finetrack.models import embedded_model_dir

    model_dir = embedded_model_dir()  # converts once per user, outside any measurement
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data = Path(tmp) / "chat.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(a.rows, a.seed)))
        results = [spawn(e.strip(), a, data, model_dir) for e in a.engines.split(",") if e.strip()]

    print(
        f"\nSmolLM2-135M-Instruct fp32, LoRA r=16 alpha=32 all-linear, {a.rows} rows, {a.steps} steps x "
        f"{a.micro_batch_size} rows, lr {a.lr} cosine, warmup {a.warmup_steps}, seed {a.seed}; CPU"
    )
    for r in results:
        if "data" in r:
            print(r["data"])
    print(table(results))
    print(
        "tokens: real (non-pad) tokens of all steps; computed/real: tokens the model ran on, padding included, per real "
        "token;\nloop s / tokens/s: steps 2..N only (end of step 1 to end of step N); cores busy: the child's CPU seconds per "
        "wall second\nover those steps (far below the core count = a shared machine); peak RSS: whole child process."
    )
    for r in results:
        print(f"{r['engine']}: loss over {r['loss_on']}, {r['loss_tokens']} loss tokens in all; run incl. setup {r['total_s']:.1f} s")
    by = {r["engine"]: r for r in results}
    for peer in [e for e in ("trl", "trl-defaults") if e in by and "finetrack" in by]:
        ft, trl = by["finetrack"], by[peer]
        speed = (ft["timed_tokens"] / ft["timed_s"]) / (trl["timed_tokens"] / trl["timed_s"])
        print(
            f"finetrack/{peer} (TRL gradient checkpointing {'on' if trl['gradient_checkpointing'] else 'off'}): throughput x{speed:.2f} "
            f"(median step x{ft['median_step_tok_s'] / trl['median_step_tok_s']:.2f}), peak RSS x{ft['peak_rss_mb'] / trl['peak_rss_mb']:.2f}"
        )
    if "finetrack" in by and (trl := by.get("trl") or by.get("trl-defaults")):
        ft = by["finetrack"]
        if ft["loss_on"].split()[0].lower() != trl["loss_on"].split()[0].lower():
            print(
                f"losses are NOT comparable: finetrack averages over {ft['loss_on']}, TRL over {trl['loss_on']} "
                "(--finetrack-train-on all makes them comparable)."
            )


if __name__ == "__main__":
    main()
