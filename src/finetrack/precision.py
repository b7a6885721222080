"""Compute precision: what this CPU offers for bfloat16, the `model.mixed_precision: auto` decision, and the autocast
context the forward runs in.

"bf16" here is mixed precision with float32 master weights: the forward runs under `torch.autocast(bfloat16)` (matmuls
and attention in bfloat16, norms, softmax and the loss in float32), the backward follows the forward's dtypes, and the
weights, gradients and AdamW state stay float32 (what accelerate's mixed_precision="bf16" does). It is not bfloat16
weights (`model.dtype: bfloat16`), whose optimizer updates would round away in bfloat16.

Whether bf16 is faster is a property of the CPU: oneDNN runs bfloat16 matmuls on AVX512-BF16 dot products or AMX
tiles (issue 18 reports 2.7x the float32 matmul rate on one such machine); without them torch falls back to slow
kernels (AVX2 only: training 32x slower than float32, benchmarks/cpu_bf16.py). The decision reads the CPU's feature
flags, not a timing probe: the flags are what oneDNN dispatches on, they give the same answer on every call (the
decision is written to config.resolved.yaml and compared on resume, so it must not flap with the load of a shared
machine), and they cost nothing where resolve_model runs (train, eval, export, plan), whereas one bfloat16 1024^3
product takes 0.1-2 s on an AVX2 machine, too long for a probe and too noisy for a short one. Which methods `auto`
then gives bf16 is AUTO_BF16_METHODS, from the measured loss trajectories: none so far.

Imports torch only inside functions: config_resolve imports this module, and `report` / `gate` never load torch.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .config import ModelConfig

R = TypeVar("R")

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuBf16:
    """What a CPU offers for bfloat16 matmuls (this machine's from `this_cpu()`; tests describe others)."""

    avx512_bf16: bool  # AVX512-BF16 dot products (Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later)
    amx_bf16: bool  # AMX tiles with BF16 (Sapphire Rapids and later)
    capability: str  # torch's vectorized kernel level for its own ops: "AVX2", "AVX512", "DEFAULT", ...
    source: str  # where the flags were read: "torch.cpu", "/proc/cpuinfo", "unknown" or "described"

    @property
    def fast_bf16(self) -> bool:
        """Does oneDNN have bfloat16 hardware here (so bf16 autocast beats float32)?"""
        return self.avx512_bf16 or self.amx_bf16

    def describe(self) -> str:
        """'AVX512-BF16 and AMX-BF16' / 'no AVX512-BF16 or AMX-BF16 (torch kernels: AVX2)'."""
        have = [name for name, on in (("AVX512-BF16", self.avx512_bf16), ("AMX-BF16", self.amx_bf16)) if on]
        return " and ".join(have) if have else f"no AVX512-BF16 or AMX-BF16 (torch kernels: {self.capability})"


def cpuinfo_flags(text: str) -> set[str]:
    """The x86 feature flags of a /proc/cpuinfo text (its first `flags` line; every core lists the same)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def from_cpuinfo(text: str, capability: str) -> CpuBf16:
    """A CpuBf16 from a /proc/cpuinfo text (Linux names the flags avx512_bf16 and amx_bf16)."""
    flags = cpuinfo_flags(text)
    return CpuBf16("avx512_bf16" in flags, "amx_bf16" in flags, capability, str(CPUINFO))


@functools.cache
def this_cpu() -> CpuBf16:
    """This machine's CPU, read once per process: torch's cpuinfo (any OS) where this torch has it, else /proc/cpuinfo."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    cpu = torch.cpu
    if hasattr(cpu, "_is_avx512_bf16_supported") and hasattr(cpu, "_is_amx_tile_supported"):
        # torch's private probes (pytorch/cpuinfo, the library oneDNN's own checks agree with); AMX tiles
        # came with AMX-BF16 in every CPU that has them
        return CpuBf16(bool(cpu._is_avx512_bf16_supported()), bool(cpu._is_amx_tile_supported()), capability, "torch.cpu")
    if platform.system() == "Linux" and CPUINFO.is_file():
        return from_cpuinfo(CPUINFO.read_text(), capability)
    return CpuBf16(False, False, capability, "unknown")  # float32 is never the slow choice


# Methods `auto` gives bf16 autocast on a CPU with bfloat16 hardware: none. The issue's rule is "bf16 where the loss
# trajectory stays within a stated tolerance of float32" (2%), and fine-tuning the embedded model did not: bf16's loss
# ran up to 11% above float32's over 12 LoRA steps (lr 2e-4) and 9% over 8 full steps (lr 2e-5), and the trained
# weights, judged in float32, ended 7% / 2.8% worse (benchmarks/cpu_bf16.py; README "Speed"). A pretrained model's
# per-step change is below bfloat16's resolution in the forward (a LoRA delta of ~1e-4 on activations of ~1).
# Randomly initialized models stayed within 0.03%. Add "full" / "lora" here to trade that for the speed.
AUTO_BF16_METHODS: frozenset[str] = frozenset()


def auto_mixed_precision(device_type: str, dtype: str, method: str, cpu: CpuBf16) -> tuple[str, str]:
    """What `model.mixed_precision: auto` becomes, and why: ("bf16" | "none", reason). `dtype` is model.dtype resolved.

    bf16 only on a CPU with bfloat16 hardware and for the methods of AUTO_BF16_METHODS; a GPU's bf16 is chosen
    by model.dtype: auto (bfloat16 weights), QLoRA's by model.qlora.compute_dtype."""
    if dtype != "float32":
        return "none", f"auto: model.dtype={dtype}: the weights compute in {dtype} already"
    if method == "qlora":
        return "none", "auto: model.method=qlora computes its 4-bit matmuls in model.qlora.compute_dtype"
    if device_type != "cpu":
        return "none", f"auto: float32 weights on {device_type}: set model.mixed_precision=bf16 for bf16 autocast"
    if not cpu.fast_bf16:
        return "none", f"auto: this CPU has {cpu.describe()}: bf16 matmuls are emulated there, far slower than float32"
    if method in AUTO_BF16_METHODS:
        return "bf16", f"auto: this CPU has {cpu.describe()}: bf16 autocast over float32 weights"
    return "none", (
        f"auto: this CPU has {cpu.describe()}, but bf16 autocast moved a fine-tune's loss beyond 2% of float32's "
        "(up to 11% in 12 steps on the embedded model): float32; set model.mixed_precision=bf16 to trade that for speed"
    )


def slow_bf16_warning(device_type: str, cpu: CpuBf16) -> str | None:
    """The warning for an explicit model.mixed_precision=bf16 on a CPU without bfloat16 hardware (None elsewhere)."""
    if device_type != "cpu" or cpu.fast_bf16:
        return None
    return (
        f"model.mixed_precision=bf16 on a CPU with {cpu.describe()}: bf16 matmuls are emulated there, one training step "
        "takes many times as long as in float32 (benchmarks/cpu_bf16.py); set model.mixed_precision=auto unless you mean it"
    )


def autocast(cfg: ModelConfig, device_type: str) -> AbstractContextManager:
    """The context every forward of this model runs in: bf16 autocast for model.mixed_precision=bf16, else nothing.
    Wrap the forward only (the objective's call); the backward outside it follows the forward's dtypes."""
    if cfg.mixed_precision == "auto":
        raise ValueError("precision.autocast: resolve the config first (config.resolve_model fills model.mixed_precision)")
    if cfg.mixed_precision == "none":
        return nullcontext()
    import torch

    return torch.autocast(device_type, dtype=torch.bfloat16)


def autocasting(objective: Callable[[Any, Any], R], cfg: ModelConfig, device_type: str) -> Callable[[Any, Any], R]:
    """`objective(model, batch)` with every call inside autocast(cfg, device_type): the forwards of the training steps
    and of the held-out loss; the backward, outside the call, follows the forward's dtypes. Itself when autocast is off."""
    autocast(cfg, device_type)  # a config not yet resolved fails here, not at the first step
    if cfg.mixed_precision == "none":
        return objective

    def under_autocast(model: Any, batch: Any) -> R:
        with autocast(cfg, device_type):
            return objective(model, batch)

    return under_autocast
