"""`finetrack plan` of checkpoint.export: the disk every checkpoint's exports take, and how long they keep the run.

Each export of `checkpoint.export` (export/background.py) is `finetrack export CHECKPOINT --format F [--quantize T]`
in a child process on the CPU, one at a time, in the background beside training; retention deletes checkpoints, never
exports, so every scheduled checkpoint's exports stay in RUN_DIR/exports/. Sizes are the formats' bytes per parameter:

- merged: float32 (the background exporter's dtype), 4 B per parameter, a regression head beside it, the tokenizer files;
- onnx: float32, 4 B per parameter, the tokenizer files; onnx:int8: 1 B per linear-layer weight (the decoder layers'
  linear weights and an untied lm_head), 4 B per other parameter (embeddings, norms, biases);
- gguf f16: 2 B per parameter; q8_0: its block of 32 weights is 32 int8 + one f16 scale, 34 B; q4_k_m: llama.cpp's
  published average, 4.84 bits per weight (tools/quantize/README.md, Llama 2 7B), an approximation: the mix of types
  varies with the model, and rows not a multiple of 256 fall back to other types.

Time of one export, a model with two measured constants (`finetrack export --format merged` of a 2-step LoRA
checkpoint of the embedded SmolLM2-135M on a shared 2-core CPU, 2026-12-04; the probed matmul rate at the time
normalizes the load of the machine):

    EXPORT_STARTUP_S + EXPORT_WORK_FACTOR x (model reads at MODEL_READ_BYTES_PER_S (eval's) + bytes written at
    CHECKPOINT_WRITE_BYTES_PER_S (checkpoints') + the verification's probe forwards at the plan's CPU rate and its
    greedy answers at GENERATION_EFFICIENCY (eval's) of it)

Reads (each counted at the float32 size: an upper bound for a model stored in 16 bits): the trained model (and the
base again for the merge of an adapter) and the written artifact, loaded back to verify it; writes: the merged folder (a
scratch one for onnx / gguf), the artifact (q4_k_m: and llama.cpp's f16 input); verification (export/verify.py): each
probe's logits and a greedy answer of MAX_NEW_TOKENS, by the trained model and by the export. Measured: the CLI
recorded 39.7 s, 37.5 s and 40.6 s in EXPORT.json with 32-30 GFLOP/s probed, export() in a script 28.4 s and 30.1 s with
42 GFLOP/s: 1.9-2.0 x what those terms give at those rates (batch-1 forwards of ~40 tokens and token-by-token decoding
reach about half the rates eval assumes; the loads build models too), and the command's wall time 5.2-6.1 s more
(python, imports). A 2-step LoRA run with checkpoint.export=[merged] waited 42 s at its end (EXPORT.json: 38.0 s).
ONNX and GGUF conversion is not counted: not measured yet.
"""

from __future__ import annotations

from . import memory
from .config import Config, RunShape
from .evaluate.cost import GENERATION_EFFICIENCY, MODEL_READ_BYTES_PER_S, forward_flops

EXPORT_STARTUP_S = 6.0  # measured: a `finetrack export` process's wall time before its work (python, torch, transformers)
EXPORT_WORK_FACTOR = 2.0  # measured: an export's work took 1.9-2.0 x what the reads, writes and FLOPs give at the plan's rates
GGUF_BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32, "q4_k_m": 4.84 / 8}  # q8_0: 32 int8 + an f16 scale per block of 32


def export_size(entry: str, arch: memory.Architecture, head_params: int, tokenizer_file_bytes: int) -> tuple[int, str]:
    """(bytes, how they are counted) of one checkpoint's export `entry` (a checkpoint.export value, e.g. gguf:q4_k_m)."""
    fmt, _, quantize = entry.partition(":")
    n = arch.num_params
    if fmt == "merged":
        head = (head_params + 2) * memory.HEAD_BYTES if head_params else 0  # head.safetensors: + the target mean and std
        with_head = f" + the regression head's {head_params:,} x 4 B" if head_params else ""
        return n * 4 + head + tokenizer_file_bytes, f"{n:,} params x 4 B (float32){with_head} + tokenizer files"
    if fmt == "onnx" and quantize == "int8":
        linear = arch.num_layers * sum(i * o for i, o, _ in arch.linear_shapes().values()) + arch.num_lm_head_params
        how = f"{linear:,} linear-layer weights x 1 B + {n - linear:,} other params x 4 B + tokenizer files"
        return linear + 4 * (n - linear) + tokenizer_file_bytes, how
    if fmt == "onnx":
        return n * 4 + tokenizer_file_bytes, f"{n:,} params x 4 B (float32) + tokenizer files"
    quantize = quantize or "f16"  # `finetrack export --format gguf`'s default type
    per = GGUF_BYTES_PER_WEIGHT[quantize]
    how = {"f16": "2 B", "q8_0": "34 B per block of 32", "q4_k_m": "~4.84 bits (llama.cpp's average)"}[quantize]
    return round(n * per), f"{n:,} weights x {how}"


def export_seconds(entry: str, size: int, arch: memory.Architecture, adapter: bool, probe_tokens: list[int], cpu_rate: float) -> dict:
    """The time model of one export (module docstring): its reads, writes and verification FLOPs, and the seconds."""
    from .export.verify import MAX_NEW_TOKENS
    from .plan import CHECKPOINT_WRITE_BYTES_PER_S

    fmt, _, quantize = entry.partition(":")
    float32 = arch.num_params * 4
    read = (2 if adapter else 1) * float32 + (float32 if fmt == "merged" else size)  # trained (+ base to merge), loaded back
    written = size if fmt == "merged" else float32 + size  # onnx / gguf are written from a merged folder
    if fmt == "gguf" and quantize == "q4_k_m":
        written += arch.num_params * 2  # llama.cpp quantizes from an f16 file
    logits = 2 * sum(forward_flops(arch, t, t) for t in probe_tokens)  # trained model and export, every position
    greedy = 2 * sum(forward_flops(arch, t + MAX_NEW_TOKENS, MAX_NEW_TOKENS) for t in probe_tokens)
    work = read / MODEL_READ_BYTES_PER_S + written / CHECKPOINT_WRITE_BYTES_PER_S + logits / cpu_rate
    work += greedy / (GENERATION_EFFICIENCY * cpu_rate)
    return {
        "read_bytes": read,
        "written_bytes": written,
        "verify_logits_flops": logits,
        "verify_greedy_flops": greedy,
        "seconds": EXPORT_STARTUP_S + EXPORT_WORK_FACTOR * work,
    }


def wait_at_end(checkpoint_steps: list[int], total_steps: int, run_s: float, per_checkpoint_s: float) -> float:
    """Seconds the run waits after its last step for the exports still queued: one checkpoint's exports at a time, from
    the moment it is saved (steps spread evenly over `run_s`); at least the last checkpoint's, more when they fall behind."""
    free = 0.0
    for step in sorted(checkpoint_steps):
        free = max(free, run_s * step / total_steps) + per_checkpoint_s
    return max(0.0, free - run_s)


def export_cost(
    cfg: Config,
    arch: memory.Architecture,
    tokenizer,
    tokenizer_file_bytes: int,
    head_params: int,
    shape: RunShape,
    run_s: float,
    cpu_rate: float | None,
) -> tuple[dict, list[str]]:
    """(the plan's "exports": per checkpoint.export entry its bytes and seconds, the totals and the run's wait at its end;
    the assumptions) for the checkpoints `shape` schedules; ({}, []) without checkpoint.export. `cpu_rate`: the plan's FLOP/s
    when it is this CPU's (else probed here), `run_s`: the run's time before exports."""
    if not cfg.checkpoint.export:
        return {}, []
    from .export.verify import probe_ids
    from .target import CPU_UTILIZATION, probe_cpu_flops

    here = cpu_rate is None
    rate = probe_cpu_flops() * CPU_UTILIZATION if here else cpu_rate
    prompts = [p for p in cfg.train.sample_prompts if p.strip()][:4]  # what export/source.py probes with
    probe_tokens = [len(ids) for ids in probe_ids(tokenizer, prompts or None)]
    num = len(shape.checkpoint_steps)
    entries = []
    for entry in cfg.checkpoint.export:
        size, how = export_size(entry, arch, head_params, tokenizer_file_bytes)
        timed = export_seconds(entry, size, arch, cfg.model.method != "full", probe_tokens, rate)
        entries.append({"entry": entry, "bytes": size, "how": how, "num_exports": num, "total_bytes": size * num, **timed})
    per_checkpoint_s = sum(e["seconds"] for e in entries)
    wait_s = wait_at_end(list(shape.checkpoint_steps), shape.total_steps, run_s, per_checkpoint_s)
    out = {
        "entries": entries,
        "num_checkpoints": num,
        "bytes_per_checkpoint": sum(e["bytes"] for e in entries),
        "total_bytes": sum(e["total_bytes"] for e in entries),
        "seconds_per_checkpoint": per_checkpoint_s,
        "wait_s": wait_s,
        "falls_behind": wait_s > per_checkpoint_s * (1 + 1e-9),
        "cpu_flops_per_s": rate,
        "probe_tokens": probe_tokens,
    }
    assumptions = [
        (
            "checkpoint.export: sizes are the formats' bytes per parameter (q8_0: 32 int8 + one f16 scale per block of 32; "
            "q4_k_m: llama.cpp's published ~4.84 bits per weight, approximate); retention deletes checkpoints, never exports"
        ),
        f"checkpoint.export: each export ~{EXPORT_STARTUP_S:g} s + {EXPORT_WORK_FACTOR:g} x (model reads at "
        f"{MODEL_READ_BYTES_PER_S / 1e9:g} GB/s, writes at the checkpoints' rate, verification forwards at "
        f"{rate / 1e9:.1f} GFLOP/s, its greedy answers at {GENERATION_EFFICIENCY:.0%} of that): fitted to `finetrack export` "
        "timed on a 2-core CPU; an estimate for the CPU"
        + (" (this machine's CPU stands in for the training machine's)" if here else "")
        + "; onnx / gguf conversion not counted (not measured yet)",
        "checkpoint.export: exports run in the background beside training, one at a time; the run waits at its end for "
        "those still queued (the last checkpoint's at least), added to its time"
        + ("; on a CPU they share its cores with training, which slows while they run (not counted)" if not here else ""),
    ]
    if cfg.checkpoint.best is not None:
        assumptions.append("checkpoint.export: checkpoints saved by checkpoint.best outside the schedule are exported too (not counted)")
    return out, assumptions


def export_lines(exports: dict) -> list[str]:
    """The plan's lines for checkpoint.export ([] without it)."""
    if not exports:
        return []
    from .plan_render import _hours

    n, entries = exports["num_checkpoints"], exports["entries"]
    width = max(len(e["entry"]) for e in entries)
    head = f"  checkpoint.export: {n} checkpoint(s) x {len(entries)} export(s), all kept (retention deletes checkpoints, not exports)"
    lines = [f"{head}: {memory.mib(exports['total_bytes'])} on disk"]
    for e in entries:
        conversion = "" if e["entry"] == "merged" else " + conversion (not counted)"
        lines.append(
            f"    {e['entry']:<{width}}  {memory.mib(e['bytes']):>11} per checkpoint, {memory.mib(e['total_bytes']):>11} in all "
            f"({e['how']}); ~{_hours(e['seconds'])} each{conversion}"
        )
    behind = "; they fall behind the checkpoints (the queue grows)" if exports["falls_behind"] else ""
    lines.append(
        f"    estimate for the CPU: exports run in the background beside training, one at a time{behind}; the run waits "
        f"{_hours(exports['wait_s'])} at its end for the last ones (counted in the run's time above)"
    )
    return lines
