"""Accuracy of finetrack's memory model (`finetrack.memory`): predicted vs measured peak per config.

The matrix: full / LoRA / QLoRA x two row lengths x gradient checkpointing off / on, on the embedded
SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49,152, tied embeddings), trained for a few optimizer
steps through `finetrack.train.run` itself (AdamW, micro batch 4, no accumulation, data.pack=false) on
generated chat rows that are all truncated to exactly the row length (so every micro-batch is the same
shape; about 1/8 of each row is the user prompt, the rest assistant tokens that carry loss). Then the
HELD_OUT configs (row length 128, micro batch 2), which the calibration constants were not fitted on,
marked "(held out)" and counted apart.

Each config runs in a fresh subprocess, because RSS peaks are high-water marks:
- CPU: the resident set after `import torch, transformers, peft, accelerate, bitsandbytes, finetrack.train`
  is the baseline, the peak (VmHWM, reset through /proc/self/clear_refs after the imports; ru_maxrss where
  that is not possible) is read right before the final checkpoint is written, and the measurement is the
  growth. The prediction compared is `memory.peak_bytes(terms, measured_only=True)`: the runtime present
  before the run is left out of both.
- CUDA (where a GPU is present; untested so far): torch.cuda.max_memory_allocated before the final
  checkpoint; the CUDA context is outside the allocator and left out of the prediction the same way.

The final checkpoint write is not part of the memory model; its own peak is printed when it is higher.

Then the OBJECTIVES rows (objective.kind regression and contrastive, LoRA): a regression head on the mean of each
row's hidden states (rows of prompt + answer, no next-token term), the same with freeze_backbone (only the head
trains), and contrastive triplets (anchor with an answer for the task loss, positive, negative: 3 x micro batch
sequences in one forward); every sequence truncated to the row length, as above. They were not used to fit the
CPU constants either, and are counted apart.

    .venv/bin/python benchmarks/memory_model.py                    # 12 configs + 2 held out + 3 objectives on the CPU, ~10 min on 2 cores
    .venv/bin/python benchmarks/memory_model.py --methods lora --lengths 64 --verbose
    .venv/bin/python benchmarks/memory_model.py --no-matrix --no-held-out --verbose   # the objective rows only, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "MEMORY_RESULT "
WORDS = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "oscar"]
TOLERANCE = 0.15
GLIBC_TERMS = ("CPU heap slack", "quantization leftovers (CPU heap)")  # what a fixed mmap threshold removes
# The calibration constants (memory.CPU_*) were fitted on the 12 configs of the matrix; these configs were
# not part of that fit (another row length, another micro batch), so they check the model on unseen shapes.
HELD_OUT = (  # (method, row tokens, micro batch size, gradient checkpointing)
    ("lora", 128, 2, "false"),
    ("full", 128, 2, "true"),
)
# objective rows: name -> (method, row tokens, micro batch size, gradient checkpointing, overrides). Pooling reads the
# mean of a sequence's (prompt) tokens, so that truncating every sequence to the row length keeps its read positions.
OBJECTIVES = {
    "regression": ("lora", 128, 4, "false", ["objective.kind=regression", "objective.regression.pool=mean"]),
    "regression-frozen": (
        "lora",
        128,
        4,
        "false",
        ["objective.kind=regression", "objective.regression.pool=mean", "objective.regression.freeze_backbone=true"],
    ),
    "contrastive": ("lora", 64, 4, "false", ["objective.kind=contrastive", "objective.contrastive.pool=mean"]),
}


# ------------------------------------------------------------------------------------------- child
def _status_mib(key: str) -> float | None:
    status = Path("/proc/self/status")
    match = re.search(rf"^{key}:\s+(\d+) kB", status.read_text(), re.MULTILINE) if status.exists() else None
    return int(match.group(1)) / 1024 if match else None


def _reset_high_water() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM (and ru_maxrss) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _high_water_mib() -> float:
    import resource

    return _status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(device: str, overrides: list[str]) -> None:
    """Run finetrack on one config and print its memory figures as one JSON line."""
    import gc

    import accelerate  # noqa: F401  (imported before the baseline: the runtime is not what is measured)
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from finetrack import train
    from finetrack.config import load_config

    cuda = device == "cuda"
    gc.collect()
    baseline_mib = _status_mib("VmRSS") or 0.0
    resettable = _reset_high_water()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    figures: dict[str, Any] = {"baseline_rss_mib": baseline_mib, "hwm_reset": resettable}
    save = train.CheckpointWriter.__call__

    def measured_save(writer, *args, **kwargs):  # read the peak of the training loop, then the checkpoint write's own
        if cuda:
            figures["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            figures["peak_mib"] = _high_water_mib() - baseline_mib
            _reset_high_water()
        started = time.perf_counter()
        result = save(writer, *args, **kwargs)
        figures["save_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else _high_water_mib() - baseline_mib
        figures["save_s"] = time.perf_counter() - started
        return result

    train.CheckpointWriter.__call__ = measured_save  # records only; the checkpoint is written as usual
    started = time.perf_counter()
    train.run(load_config(None, overrides))
    figures["run_s"] = time.perf_counter() - started
    print(RESULT_PREFIX + json.dumps(figures), flush=True)


# ------------------------------------------------------------------------------------------ parent
def write_rows(path: Path, num_rows: int, row_tokens: int, seed: int, kind: str = "causal_lm") -> None:
    """Rows longer than row_tokens (truncated to exactly that by data.max_length): a user prompt of ~1/8 of the row
    and an assistant answer that fills the rest; regression rows as prompt + completion + target, triplets as an
    anchor prompt with a completion (the task loss) and a positive and a negative prompt that fill the row."""
    rng = random.Random(seed)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    rows = []
    for _ in range(num_rows):
        user, answer = words(max(2, row_tokens // 8)), words(row_tokens)
        if kind == "regression":
            rows.append({"prompt": user, "completion": answer, "target": round(rng.random(), 3)})
        elif kind == "contrastive":
            rows.append({"anchor": user, "completion": answer, "positive": words(row_tokens), "negative": words(row_tokens)})
        else:
            rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def largest_micro_batch(cfg, total_steps: int, hidden_size: int):
    """The Workload of the largest micro-batch the run will see, batched exactly as train.run batches."""
    from finetrack.batches import collate, micro_batches, step_rows
    from finetrack.data import prepare
    from finetrack.memory import Workload
    from finetrack.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.train.seed, cfg.objective)
    # logits at target tokens only with a next-token term (objectives.py): regression lm_weight, contrastive lambda_task
    o = cfg.objective
    next_token = o.kind in ("causal_lm", "python") or (o.kind == "regression" and o.regression.lm_weight > 0)
    next_token = next_token or (o.kind == "contrastive" and o.contrastive.lambda_task > 0)
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    best = None
    for step in range(total_steps):
        _, rows = step_rows(len(data.train), rows_per_step, cfg.train.seed, step, cfg.data.shuffle)
        for mb in micro_batches(data.train, rows, cfg.train.micro_batch_size):
            b = collate(mb, tokenizer.pad_token_id, cfg.data.pack, cfg.data.pack_row_tokens, attn_tokens=6 * hidden_size)
            if "attention_mask" in b.inputs:  # transformers skips the mask when no row is padded
                masked = not bool(b.inputs["attention_mask"].all())
            else:  # packed: a mask as soon as positions restart inside a row
                pos = b.inputs["position_ids"]
                masked = bool((pos[:, 1:] != pos[:, :-1] + 1).any())
            reads = 0 if b.pool is None else b.pool.shape[0]
            targets = b.num_target_tokens if next_token else 0
            work = Workload(b.targets.numel(), b.targets.shape[1], targets, b.targets.shape[0], masked, reads)
            if best is None or (work.micro_batch_tokens, work.target_tokens) > (best.micro_batch_tokens, best.target_tokens):
                best = work
    return best


def predict(overrides: list[str], device: str, model_dir: Path, num_rows: int, verbose: bool, fixed_threshold: bool) -> tuple[float, str]:
    """Predicted measurable peak in MiB for these overrides, and the breakdown as text. fixed_threshold:
    glibc keeps no freed memory on the heap, so those terms are left out."""
    import torch

    from finetrack.config import Environment, load_config, resolve
    from finetrack.memory import Architecture, breakdown, peak_bytes, peak_phase

    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    cfg, res = resolve(load_config(None, overrides), Environment(device, bf16, 1, num_rows))
    arch = Architecture.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    work = largest_micro_batch(cfg, res["total_steps"], arch.hidden_size)
    terms = [t for t in breakdown(cfg, arch, work, device) if not (fixed_threshold and t.name in GLIBC_TERMS)]
    lines = [f"    {work}; peak phase: {peak_phase(terms)}"]
    lines += (
        [
            f"    {t.name:38s} {t.bytes / 2**20:10.1f} MiB  {'/'.join(t.phases) or 'all'}{'' if t.measured else ' (not measured)'}  {t.detail}"
            for t in terms
        ]
        if verbose
        else []
    )
    return peak_bytes(terms, measured_only=True) / 2**20, "\n".join(lines)


def spawn(device: str, overrides: list[str], fixed_threshold: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--device", device, "--", *overrides]
    env = dict(os.environ)
    if device == "cpu":  # accelerate would take a GPU if it saw one
        env["CUDA_VISIBLE_DEVICES"] = ""
    if fixed_threshold:  # any of the MALLOC_*_ tuning variables turns glibc's dynamic mmap threshold off: it stays at 128 KiB
        env["MALLOC_TRIM_THRESHOLD_"] = "131072"
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    found = [json.loads(x[len(RESULT_PREFIX) :]) for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not found:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child failed (exit code {proc.returncode}): {' '.join(overrides)}")
    return found[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="full,lora,qlora")
    p.add_argument("--lengths", default="64,256", help="row lengths in tokens (data.max_length)")
    p.add_argument("--checkpointing", default="false,true", help="model.gradient_checkpointing values")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (AdamW state exists from step 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--verbose", action="store_true", help="print every term of every prediction")
    p.add_argument("--no-held-out", action="store_true", help="leave out the held-out configs (HELD_OUT: not used to fit the constants)")
    p.add_argument("--no-matrix", action="store_true", help="leave out the method x length x checkpointing matrix")
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help=f"objective rows to run, of {', '.join(OBJECTIVES)} ('' for none)")
    p.add_argument(
        "--fixed-mmap-threshold",
        action="store_true",
        help="CPU: run the children with glibc's mmap threshold fixed at 128 KiB (no heap slack; slower) and "
        "compare with the prediction without the glibc terms: checks the tensor arithmetic alone",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.device, a.overrides)
    import torch

    from finetrack.models import embedded_model_dir

    devices = ["cpu", "cuda"] if a.device == "auto" and torch.cuda.is_available() else ["cpu" if a.device == "auto" else a.device]
    model_dir = embedded_model_dir()  # converted once per user, outside any measurement
    # (objective row name or "", method, row tokens, micro batch size, checkpointing, overrides, held out)
    matrix = [
        ("", method, length, a.micro_batch_size, ckpt, [], False)
        for length in ([] if a.no_matrix else [int(x) for x in a.lengths.split(",")])
        for method in a.methods.split(",")
        for ckpt in a.checkpointing.split(",")
    ]
    matrix += [] if a.no_held_out else [("", *config, [], True) for config in HELD_OUT]
    matrix += [(name, *OBJECTIVES[name], True) for name in a.objectives.split(",") if name]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for device in devices:
            for objective, method, length, micro_batch_size, ckpt, extra, held_out in matrix:
                num_rows = micro_batch_size * a.steps
                kind = objective.split("-")[0] or "causal_lm"
                data = Path(tmp) / f"rows-{kind}-{length}-{num_rows}.jsonl"
                write_rows(data, num_rows, length, seed=0, kind=kind)
                name = f"{device} {method:5s} S={length:<4d} mb={micro_batch_size} gc={'on ' if ckpt == 'true' else 'off'} {objective}".rstrip()
                overrides = [
                    f"model.name={model_dir}",
                    f"model.method={method}",
                    f"model.gradient_checkpointing={ckpt}",
                    f"data.path={data}",
                    f"data.max_length={length}",
                    "data.pack=false",
                    f"train.micro_batch_size={micro_batch_size}",
                    f"train.max_steps={a.steps}",
                    "train.warmup_steps=0",
                    f"output.dir={Path(tmp) / 'run'}",
                    *extra,
                ]
                if device == "cpu":
                    overrides.append("model.dtype=float32")
                predicted, text = predict(overrides, device, model_dir, num_rows, a.verbose, a.fixed_mmap_threshold)
                print(f"--- {name}: predicted {predicted:,.0f} MiB, running ...", file=sys.stderr, flush=True)
                measured = spawn(device, overrides, a.fixed_mmap_threshold)
                results.append((name, predicted, measured, text, "objective" if objective else "held out" if held_out else ""))
                shutil.rmtree(Path(tmp) / "run", ignore_errors=True)
    print(
        f"\nSmolLM2-135M-Instruct, AdamW, micro batch mb, {a.steps} steps, rows truncated to S tokens, "
        f"data.pack=false; CPU: peak RSS growth over the post-import baseline; CUDA: max_memory_allocated"
        + ("; glibc mmap threshold fixed (MALLOC_TRIM_THRESHOLD_=131072), glibc heap terms left out" if a.fixed_mmap_threshold else "")
    )
    head = f"{'config':55s} {'predicted MiB':>13s} {'measured MiB':>12s} {'ratio':>6s}  within 15%"
    print(head + "\n" + "-" * len(head))
    within = {"": [0, 0], "held out": [0, 0], "objective": [0, 0]}  # group -> [within tolerance, configs]
    for name, predicted, measured, text, group in results:
        ratio = predicted / measured["peak_mib"]
        ok = abs(ratio - 1) <= TOLERANCE
        within[group][0] += ok
        within[group][1] += 1
        note = (
            f"  (checkpoint write peak {measured['save_peak_mib']:,.0f})" if measured["save_peak_mib"] > 1.02 * measured["peak_mib"] else ""
        )
        print(
            f"{name:55s} {predicted:13,.0f} {measured['peak_mib']:12,.0f} {ratio:6.2f}  {'yes' if ok else 'NO'}{note}"
            + (f"  ({group})" if group else "")
        )
        if a.verbose:
            print(text)
    baselines = sorted({round(m["baseline_rss_mib"]) for _, _, m, _, _ in results if m.get("baseline_rss_mib")})
    print(
        f"{within[''][0]} of {within[''][1]} within {TOLERANCE:.0%} (the configs the constants were fitted on); "
        f"held out: {within['held out'][0]} of {within['held out'][1]}; objectives: {within['objective'][0]} of "
        f"{within['objective'][1]}; post-import RSS baselines: {baselines} MiB; run seconds: {sum(m['run_s'] for _, _, m, _, _ in results):.0f}"
    )


if __name__ == "__main__":
    main()
