"""Checkpoint write and resume cost: finetrack's format vs accelerate's `save_state` / `load_state` (CPU).

Same model (the embedded SmolLM2-135M-Instruct, fp32), same optimizer state (AdamW after one real
optimizer step on a fixed batch), same disk, one process. For each method (LoRA r=16 all-linear, full):

- finetrack: `checkpoint.save` (weights in PEFT/transformers format + tokenizer, trainer_state.safetensors/json,
  meta.json, sha256 MANIFEST.json, every file fsynced, temp folder renamed), then the resume path:
  `checkpoint.verify(full=True)` (re-hashes every file) + `models.load_weights` + `checkpoint.restore_state`.
- accelerate: `Accelerator.save_state(safe_serialization=True)` (model safetensors, optimizer and RNG via
  torch.save, i.e. pickle; no manifest, no fsync) and `load_state`.

Prints seconds and MB for both and the ratios. finetrack does more work on purpose (hashing, fsync,
no pickle); the ratio says what that safety costs.

    .venv/bin/python benchmarks/checkpoint_io.py [--methods lora full] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def build(method: str):
    from finetrack.config import Environment, load_config, resolve
    from finetrack.models import build_model, load_tokenizer
    from finetrack.optim import build_optimizer

    cfg, _ = resolve(load_config(None, [f"model.method={method}"]), Environment("cpu", False, 1, 1000))
    torch.manual_seed(0)
    model = build_model(cfg.model, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.train, cfg.train.lr)
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()  # one real step: optimizer state exists
    optimizer.step()
    optimizer.zero_grad()
    return cfg, model, optimizer, load_tokenizer(cfg.model)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench(method: str, repeats: int, root: Path) -> dict:
    from accelerate import Accelerator

    from finetrack import checkpoint
    from finetrack.models import build_model, load_weights, save_weights
    from finetrack.optim import build_optimizer

    cfg, model, optimizer, tokenizer = build(method)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    out = {"method": method}
    ft_save, acc_save, ft_load, acc_load = [], [], [], []
    for r in range(repeats):
        ft_run = root / f"ft-{method}-{r}"
        ft_save.append(
            timed(
                lambda: checkpoint.save(
                    ft_run,
                    1,
                    lambda d: save_weights(accelerator.unwrap_model(model), tokenizer, d),
                    checkpoint.capture_state(optimizer.state_dict(), {"step": 1}),
                    {"rules": ["bench"]},
                )
            )
        )
        folder = checkpoint.checkpoint_dir(ft_run, 1)
        fresh = build_model(cfg.model, torch.device("cpu"))
        fresh_opt = build_optimizer(fresh, cfg.train, cfg.train.lr)
        ft_load.append(
            timed(
                lambda: (
                    checkpoint.verify(folder, full=True),
                    load_weights(fresh, folder),
                    checkpoint.restore_state(folder, fresh_opt.load_state_dict),
                )
            )
        )
        out["finetrack_mb"] = dir_mb(folder)

        acc_dir = root / f"acc-{method}-{r}"
        acc_save.append(timed(lambda: accelerator.save_state(str(acc_dir), safe_serialization=True)))
        acc_load.append(timed(lambda: accelerator.load_state(str(acc_dir))))
        out["accelerate_mb"] = dir_mb(acc_dir)
        shutil.rmtree(ft_run)
        shutil.rmtree(acc_dir)
    out.update(
        finetrack_save_s=min(ft_save), accelerate_save_s=min(acc_save), finetrack_resume_s=min(ft_load), accelerate_resume_s=min(acc_load)
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--repeats", type=int, default=2, help="best of N (first writes warm the page cache)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # same disk as a run directory would be
        for method in args.methods:
            rows.append(bench(method, args.repeats, Path(tmp)))
            print(f"done: {method}", file=sys.stderr)
    print(
        "| method | finetrack MB | accelerate MB | finetrack save s | accelerate save s | save ratio | finetrack resume s | accelerate resume s | resume ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['finetrack_mb']:.1f} | {r['accelerate_mb']:.1f} | {r['finetrack_save_s']:.2f} | {r['accelerate_save_s']:.2f} | "
            f"{r['finetrack_save_s'] / r['accelerate_save_s']:.2f}x | {r['finetrack_resume_s']:.2f} | {r['accelerate_resume_s']:.2f} | "
            f"{r['finetrack_resume_s'] / r['accelerate_resume_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
