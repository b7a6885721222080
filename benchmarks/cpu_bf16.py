"""bf16 autocast against float32 on this CPU: training and eval tokens/s, the loss trajectory, and the share of the
machine's probed matmul peak each reaches; `--profile` adds where a float32 training step spends its time.

What "bf16" means is finetrack's `model.mixed_precision: bf16` (src/finetrack/precision.py): the forward under
`precision.autocast` (torch.autocast bfloat16), the backward outside it, float32 weights, gradients and AdamW state.

Models (each built twice from the same seed, so both modes start from the same weights and see the same batches):
- `llama`: a ~30M-parameter Llama built from a config (random weights, nothing downloaded), full fine-tuning with
  AdamW on synthetic token sequences from a fixed random Markov chain (learnable: the loss falls from ~ln(vocab)).
- `embedded` (--models llama,embedded): the embedded SmolLM2-135M-Instruct with LoRA r=16 on all linear layers,
  through finetrack's own pieces (build_model, the builtin demo chat rows, packing, the causal_lm objective).

Per mode: N optimizer steps (step 1 untimed: warm-up), then eval forwards (no_grad) over the same batches. FLOPs are
counted per token as k x the parameters of the matmuls (decoder linear layers and the output head; not the input
embedding, not attention scores): k = 6 for a full fine-tune, 4 for LoRA (the frozen base needs activation
gradients only), 2 for an eval forward. tokens/s x FLOPs/token is divided by the probed matmul rate of float32 and
of bfloat16 (a 1024^3 product repeated for --probe-seconds, at least once after a warm-up).

    .venv/bin/python benchmarks/cpu_bf16.py                       # llama, 5 steps: ~4 min on 2 AVX2 cores
    .venv/bin/python benchmarks/cpu_bf16.py --steps 20 --modes fp32,bf16 --models llama,embedded
    .venv/bin/python benchmarks/cpu_bf16.py --profile --modes fp32 --models embedded --steps 3
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from finetrack.config import ModelConfig
from finetrack.precision import autocast, this_cpu

# ------------------------------------------------------------------------------------------ machine
LAYOUTS = {  # the three products of a linear layer: forward x @ W.T, input gradient g @ W, weight gradient g.T @ x
    "x@W.T": lambda a, b: a @ b.t(),
    "g@W": lambda a, b: a @ b,
    "g.T@x": lambda a, b: a.t() @ b,
}


def probe_matmul_flops(dtype: torch.dtype, seconds: float, size: int = 1024) -> dict[str, float]:
    """FLOP/s of a size^3 product in `dtype` for each layout a linear layer uses, each repeated for about `seconds`
    (at least once) after a small warm-up product: without bfloat16 hardware they differ by 10x and more."""
    out = {}
    for name, product in LAYOUTS.items():
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        product(a[:256, :256], b[:256, :256])
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < seconds:
            product(a, b)
            n += 1
        out[name] = 2 * size**3 * n / (time.perf_counter() - start)
    return out


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------------------- models
@dataclass
class Workload:
    """One model's training job, built the same way for every mode."""

    name: str
    model: torch.nn.Module
    params: list[torch.Tensor]  # trainable
    matmul_params: int  # parameters of the matmuls a token goes through (FLOPs per token = k x this)
    train_k: int  # 6 (full) or 4 (LoRA)
    batches: list[Any]  # one per step, the same for every mode
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]  # mean loss of one batch (the forward)
    tokens: Callable[[Any], int]  # tokens computed in one batch
    lr: float
    collate_s: float = 0.0  # seconds to build one step's batch from tokenized rows (finetrack's collate; 0: synthetic)


def markov_tokens(vocab: int, num_rows: int, seq: int, seed: int, used: int = 256) -> torch.Tensor:
    """(num_rows, seq) tokens from a random Markov chain over `used` of the vocabulary's tokens, each followed by one
    of 4: learnable at once (the loss falls from ~ln(vocab) towards ln(used), then towards ln(4) with the bigrams)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randperm(vocab, generator=g)[:used]
    nxt = torch.randint(0, used, (used, 4), generator=g)
    rows = torch.empty(num_rows, seq, dtype=torch.long)
    rows[:, 0] = torch.randint(0, used, (num_rows,), generator=g)
    for t in range(1, seq):
        rows[:, t] = nxt[rows[:, t - 1], torch.randint(0, 4, (num_rows,), generator=g)]
    return tokens[rows]


def llama_workload(a: argparse.Namespace) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 3,
        num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 64,
        num_key_value_heads=a.hidden // 64,
        max_position_embeddings=a.seq,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg)
    data = markov_tokens(a.vocab, a.steps * a.batch, a.seq, seed=1)
    batches = [data[i * a.batch : (i + 1) * a.batch] for i in range(a.steps)]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # includes lm_head
    return Workload(
        name=f"llama-{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M",
        model=model,
        params=list(model.parameters()),
        matmul_params=linear,
        train_k=6,
        batches=batches,
        loss=lambda m, ids: m(input_ids=ids, labels=ids, use_cache=False).loss,
        tokens=lambda ids: ids.numel(),
        lr=a.lr,
    )


def embedded_workload(a: argparse.Namespace) -> Workload:
    """The demo's job: the embedded model with LoRA (or --embedded-method full) on the builtin chat rows, finetrack's
    collate and objective, at finetrack's automatic learning rate for the method (2e-4 LoRA, 2e-5 full)."""
    from finetrack.batches import batch_builder
    from finetrack.config import load_config
    from finetrack.data import prepare
    from finetrack.models import build_model, load_tokenizer
    from finetrack.objectives import build, weighted_loss

    settings = ["model.dtype=float32", "model.attn_implementation=sdpa", "data.pack=true", "model.mixed_precision=none"]
    cfg = load_config(None, [*settings, f"model.method={a.embedded_method}"])
    full = a.embedded_method == "full"
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, 0, cfg.objective)
    torch.manual_seed(0)
    model = build_model(cfg.model, torch.device("cpu"))
    make_batch = batch_builder(tokenizer.pad_token_id, True, None, model)
    rows = data.train
    start = time.perf_counter()  # the data stage of a step: packing and collating its rows (train.py does it per step)
    batches = [make_batch(rows[(i * a.embedded_rows) % len(rows) :][: a.embedded_rows]) for i in range(a.steps)]
    collate_s = (time.perf_counter() - start) / a.steps
    objective = build(cfg.objective)
    base = model if full else model.get_base_model()
    linear = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))  # the base's layers + lm_head

    def loss(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        return weighted_loss(objective(m, batch), batch.units)

    return Workload(
        name=f"smollm2-135m {a.embedded_method}",
        model=model,
        params=[p for p in model.parameters() if p.requires_grad],
        matmul_params=linear,
        train_k=6 if full else 4,
        batches=batches,
        loss=loss,
        tokens=lambda b: int(b.num_tokens),
        lr=2e-5 if full else 2e-4,
        collate_s=collate_s,
    )


WORKLOADS = {"llama": llama_workload, "embedded": embedded_workload}


# -------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # seconds over the timed steps
    eval_s: float = 0.0
    final_fp32_loss: float = math.nan  # the trained weights' mean loss over the eval batches, computed in float32
    eval_tokens: int = 0
    cores_busy: float = math.nan  # CPU seconds per wall second over the timed steps: far below the threads = shared machine

    def train_tok_s(self) -> float:  # steps 2..N: step 1 pays one-off allocations and kernel choices
        return sum(self.step_tokens[1:]) / sum(self.step_s[1:]) if len(self.step_s) > 1 else math.nan

    def eval_tok_s(self) -> float:
        return self.eval_tokens / self.eval_s if self.eval_s else math.nan


def run_mode(w: Workload, ctx: Callable[[], AbstractContextManager], a: argparse.Namespace, profiler: Any = None) -> Run:
    """N optimizer steps then eval forwards over the same batches, every forward inside ctx()."""
    out = Run()
    opt = torch.optim.AdamW(w.params, lr=w.lr, **({"fused": True} if a.fused_adamw else {}))
    w.model.train()
    cpu_start = 0.0
    for i, batch in enumerate(w.batches):
        if i == 1:
            cpu_start = cpu_seconds()
        t0 = time.perf_counter()
        with ctx():
            loss = w.loss(w.model, batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(w.params, 1.0)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        out.losses.append(float(loss.detach()))
        out.step_s.append(t4 - t0)
        out.step_tokens.append(w.tokens(batch))
        if i:
            for name, s in (("forward", t1 - t0), ("backward", t2 - t1), ("clip", t3 - t2), ("optimizer", t4 - t3)):
                out.phases[name] += s
        if profiler is not None:
            profiler.step()
    if len(out.step_s) > 1:
        out.cores_busy = (cpu_seconds() - cpu_start) / sum(out.step_s[1:])
    w.model.eval()
    with torch.no_grad():
        for batch in w.batches[: a.eval_batches]:
            t0 = time.perf_counter()
            with ctx():
                w.loss(w.model, batch)
            out.eval_s += time.perf_counter() - t0
            out.eval_tokens += w.tokens(batch)
        # the weights each mode trained, judged alike: what bf16 did to the training, apart from its own forward's rounding
        final = [float(w.loss(w.model, batch)) for batch in w.batches[: a.eval_batches]]
    out.final_fp32_loss = sum(final) / len(final)
    return out


def contexts() -> dict[str, Callable[[], AbstractContextManager]]:
    """The forward's context per mode, from finetrack's own precision.autocast."""
    return {
        "fp32": lambda: autocast(ModelConfig(mixed_precision="none"), "cpu"),
        "bf16": lambda: autocast(ModelConfig(mixed_precision="bf16"), "cpu"),
    }


# ------------------------------------------------------------------------------------------ profile
def op_class(name: str) -> str:
    """The class an aten op's self time is counted in."""
    n = name.removeprefix("aten::")
    if "scaled_dot_product" in n or "flash_attention" in n or "efficient_attention" in n:
        return "attention (sdpa)"
    if n in ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "_addmm_activation") or n.startswith("mkldnn"):
        return "matmul"
    if n.startswith(("_foreach", "_fused_adam")):
        return "optimizer + clip (foreach)"
    if "softmax" in n or "nll_loss" in n or "cross_entropy" in n:
        return "loss (log_softmax, nll)"
    if "embedding" in n:
        return "embedding"
    if n in ("copy_", "to", "_to_copy", "clone", "contiguous", "cat", "stack", "index", "index_put_", "index_select", "gather", "scatter_"):
        return "copies, casts, indexing"
    if n.startswith("empty") or n in ("zeros", "zero_", "fill_", "ones", "resize_", "as_strided", "view", "reshape", "t", "transpose"):
        return "allocation, views"
    return "elementwise, norms, reductions"


def print_profile(prof: Any, run: Run, w: Workload) -> None:
    """Self CPU time of every aten op over the profiled steps, by class; and the step's phases by wall clock."""
    by_class: dict[str, float] = defaultdict(float)
    top: list[tuple[float, str]] = []
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            by_class[op_class(e.key)] += e.self_cpu_time_total / 1e6
            top.append((e.self_cpu_time_total / 1e6, e.key))
    total = sum(by_class.values())
    print(f"\nprofile of {w.name}, fp32, {len(run.step_s) - 1} steps after the first (self CPU time of aten ops, {total:.1f} s):")
    for name, s in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"  {name:34s} {s:8.2f} s  {100 * s / total:5.1f}%")
    print("  top ops: " + ", ".join(f"{k.removeprefix('aten::')} {100 * s / total:.1f}%" for s, k in sorted(top, reverse=True)[:8]))
    wall = sum(run.step_s[1:])
    print(f"phases by wall clock ({wall:.1f} s): " + ", ".join(f"{k} {100 * v / wall:.1f}%" for k, v in run.phases.items()))
    if w.collate_s:
        step_s = wall / (len(run.step_s) - 1)
        print(
            f"data: collating a step's rows takes {1e3 * w.collate_s:.1f} ms ({100 * w.collate_s / (step_s + w.collate_s):.2f}% of a step)"
        )


# --------------------------------------------------------------------------------------------- main
def probe_peaks(peak: dict[str, float], modes: list[str], seconds: float) -> None:
    """Probe each mode's matmul rates, print them, and keep in `peak` the best layout's rate seen so far."""
    for mode in ("fp32", "bf16"):
        if mode == "fp32" or mode in modes:  # fp32: every rate is also given as a share of its peak
            rates = probe_matmul_flops(torch.float32 if mode == "fp32" else torch.bfloat16, seconds)
            print(f"{mode} matmul 1024^3 GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()))
            peak[mode] = max(peak.get(mode, 0.0), *rates.values())
    if "bf16" in peak:
        print(
            f"  peak so far: fp32 {peak['fp32'] / 1e9:.1f}, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s: bf16 / fp32 x{peak['bf16'] / peak['fp32']:.3f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama", help="comma-separated: llama, embedded")
    p.add_argument("--modes", default="fp32,bf16", help="comma-separated: fp32, bf16 (fp32 is always probed)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per mode (step 1 untimed)")
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="llama: rows per step")
    p.add_argument("--seq", type=int, default=128, help="llama: tokens per row")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lr", type=float, default=1e-3, help="llama: AdamW learning rate (constant)")
    p.add_argument("--embedded-rows", type=int, default=4, help="embedded: chat rows per step")
    p.add_argument("--embedded-method", choices=("lora", "full"), default="lora", help="embedded: LoRA r=16 or full fine-tuning")
    p.add_argument("--probe-seconds", type=float, default=0.5, help="per matmul layout and probe")
    p.add_argument("--fused-adamw", action="store_true", help="torch.optim.AdamW(fused=True) instead of the foreach default")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="profile the fp32 run (torch.profiler) and print where its time goes")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    modes = a.modes.split(",")
    cpu = this_cpu()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu.describe()} (flags from {cpu.source})")
    peak: dict[str, float] = {}
    probe_peaks(peak, modes, a.probe_seconds)
    for model_name in a.models.split(","):
        runs: dict[str, Run] = {}
        w = None
        for mode in modes:
            w = WORKLOADS[model_name](a)  # rebuilt per mode: the same seed, the same starting weights
            profiler = None
            if a.profile and mode == "fp32":
                from torch.profiler import ProfilerActivity, profile, schedule

                profiler = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=0, active=a.steps - 1))
                profiler.start()
            runs[mode] = run_mode(w, contexts()[mode], a, profiler)
            if profiler is not None:
                profiler.stop()
                print_profile(profiler, runs[mode], w)
        assert w is not None
        probe_peaks(peak, modes, a.probe_seconds)  # again: a shared machine may have been busy at the first probe
        print(
            f"\n{w.name}: {w.matmul_params / 1e6:.1f}M matmul parameters, {a.steps} steps, {sum(runs[modes[0]].step_tokens) // a.steps} tokens/step"
        )
        head = (
            "mode",
            "train tok/s",
            "of fp32 peak",
            "of own peak",
            "eval tok/s",
            "of fp32 peak",
            "of own peak",
            "cores busy",
            "first loss",
            "last loss",
        )
        print(" ".join(f"{h:>12s}" for h in head))
        for mode, r in runs.items():
            train_flops, eval_flops = w.train_k * w.matmul_params * r.train_tok_s(), 2 * w.matmul_params * r.eval_tok_s()
            row = (
                f"{r.train_tok_s():.1f}",
                f"{train_flops / peak['fp32']:.1%}",
                f"{train_flops / peak[mode]:.1%}",
                f"{r.eval_tok_s():.1f}",
                f"{eval_flops / peak['fp32']:.1%}",
                f"{eval_flops / peak[mode]:.1%}",
                f"{r.cores_busy:.2f}",
                f"{r.losses[0]:.4f}",
                f"{r.losses[-1]:.4f}",
            )
            print(" ".join(f"{c:>12s}" for c in (mode, *row)))
        if "fp32" in runs and "bf16" in runs:
            f, b = runs["fp32"], runs["bf16"]
            rel = max(abs(x - y) / abs(x) for x, y in zip(f.losses, b.losses))
            print(
                f"bf16 / fp32: train tokens/s x{b.train_tok_s() / f.train_tok_s():.3f}, eval tokens/s x{b.eval_tok_s() / f.eval_tok_s():.3f}"
            )
            print(f"loss trajectory: max |bf16 - fp32| / fp32 over {len(f.losses)} steps = {rel:.4%}")
            print("  fp32: " + " ".join(f"{x:.4f}" for x in f.losses))
            print("  bf16: " + " ".join(f"{x:.4f}" for x in b.losses))
            print(
                f"final weights, loss over the eval batches computed in float32: fp32-trained {f.final_fp32_loss:.4f}, "
                f"bf16-trained {b.final_fp32_loss:.4f} ({abs(b.final_fp32_loss - f.final_fp32_loss) / f.final_fp32_loss:.4%} apart)"
            )


if __name__ == "__main__":
    main()
