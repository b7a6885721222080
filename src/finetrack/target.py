"""The machine a plan is for (a known GPU by name, this machine's GPU, or this CPU) and the FLOPs of a training step.

`finetrack plan` turns a run's workload into time with these: peak FLOP/s x a stated utilization, or a probed
CPU matmul rate.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from . import memory
from .schema import ConfigError

# Peak dense tensor throughput (bf16; fp16 for T4, which has no bf16) and memory, from vendor datasheets.
GPUS: dict[str, tuple[float, float, bool]] = {  # name: (TFLOP/s, GiB, bf16)
    "H200": (989.0, 141, True),
    "H100": (989.0, 80, True),
    "A100-80GB": (312.0, 80, True),
    "A100-40GB": (312.0, 40, True),
    "L40S": (362.0, 48, True),
    "A10": (125.0, 24, True),
    "L4": (121.0, 24, True),
    "T4": (65.0, 16, False),
}
GPU_UTILIZATION = 0.40  # share of peak a fine-tuning step reaches on a GPU (typical model FLOPs utilization)
# share of the probed fp32 matmul rate a training step reaches on a CPU: the demo config (LoRA on the 135M
# model) trained at 165 tokens/s = ~1.0 x the probed rate on the 2-core development machine
CPU_UTILIZATION = 0.90
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KIB|MB|MIB|GB|GIB|TB|TIB)?\s*$", re.IGNORECASE)


@dataclass
class Target:
    """The machine the run is planned for."""

    device_type: str  # "cuda" | "cpu"
    name: str
    peak_flops_per_s: float | None  # None: probe this CPU
    memory_bytes: int | None
    bf16: bool
    num_processes: int = 1
    this_machine: bool = True  # False for a --gpu this machine does not have: a --measure here does not time it


def parse_bytes(text: str) -> int:
    """'24GB' -> 24 GiB: memory sizes are read in binary units (a '24 GB' GPU has 24 GiB), '1.5TB' too."""
    m = _SIZE.match(text)
    if not m or not m.group(2):  # a bare number: bytes, or GiB? (`--device-memory 24` was planned as 24 bytes)
        raise ConfigError(f"--device-memory {text!r}: write a size with its unit, such as 24GB, 80GiB or 16000MB")
    unit = m.group(2).upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}[unit])


def target_for(gpu: str | None, device_memory: str | None, num_processes: int = 1) -> Target:
    """--gpu NAME, else this machine's CUDA device, else its CPU; --device-memory overrides the memory."""
    import torch

    mem = parse_bytes(device_memory) if device_memory else None
    if gpu:
        key = next((k for k in GPUS if k.lower() == gpu.lower()), None)
        if key is None:
            raise ConfigError(f"--gpu {gpu}: known GPUs are {', '.join(GPUS)} (or leave it out to plan for this machine)")
        tflops, gib, bf16 = GPUS[key]
        here = torch.cuda.is_available() and _gpu_key(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory) == key
        return Target("cuda", key, tflops * 1e12, mem or int(gib * 2**30), bf16, num_processes, here)
    if torch.cuda.is_available():
        name, total = torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory
        key = _gpu_key(name, total)
        return Target("cuda", name, GPUS[key][0] * 1e12 if key else None, mem or total, torch.cuda.is_bf16_supported(), num_processes)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # a CPU run's memory is the machine's RAM
    return Target("cpu", "this CPU", None, mem or ram, False, num_processes)


def _gpu_key(device_name: str, memory_bytes: int | None = None) -> str | None:
    """The GPUS entry a CUDA device name is, the model matched as a whole word ("NVIDIA A10" is not an A100,
    "NVIDIA L4" not an L40S); an A100 by the size its name states ("A100-SXM4-40GB"), else by `memory_bytes`."""
    words = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    matches = [k for k in GPUS if k.upper().partition("-")[0] in words]
    stated = [k for k in matches if k.upper().partition("-")[2] in words - {""}]
    if stated or len(matches) < 2 or memory_bytes is None:
        return (stated or matches or [None])[0]
    return min(matches, key=lambda k: abs(GPUS[k][1] * 2**30 - memory_bytes))


# ------------------------------------------------------------------------------------------- FLOPs
def flops_per_micro_batch_tokens(
    arch: memory.Architecture, method: str, gradient_checkpointing: bool, frozen: bool = False
) -> tuple[float, float, float]:
    """(FLOPs per computed token, per target token, per attention score cell) of one training step.

    Forward: 2 x the decoder's linear parameters per token, 2 x vocab x hidden per target token (logits
    are computed only there), 4 x layers x heads x head_dim per attention score cell (QK^T and AV, dense).
    Backward: 2 x forward for a full fine-tune (activation and weight gradients), 1 x forward when the
    base is frozen (LoRA / QLoRA: activation gradients only; the adapters are negligible).
    Gradient checkpointing runs the forward once more. `frozen` (objective.regression.freeze_backbone): the forward
    only, as nothing before the head needs a gradient; with gradient checkpointing, transformers makes the embedding
    output require grad, so the backbone runs as a frozen base does (forward, recomputation, activation gradients)."""
    if frozen and not gradient_checkpointing:
        multiplier = 1
    else:
        multiplier = (3 if method == "full" and not frozen else 2) + (1 if gradient_checkpointing else 0)
    per_token = 2 * arch.num_layers * arch.num_layer_linear_params * multiplier
    per_target = 2 * arch.vocab_size * arch.hidden_size * multiplier
    per_cell = 4 * arch.num_layers * arch.num_heads * arch.head_dim * multiplier
    return per_token, per_target, per_cell


def flops_per_hidden_read(arch: memory.Architecture, head_params: int, grad_to_hidden: bool) -> tuple[float, float]:
    """(FLOPs per hidden-state read, per pooling cell (read x computed token)) of one training step, for objectives
    that read hidden states: the head (2 x its parameters forward, x3 with its backward) and the dense pooling product
    (N, B x T) @ (B x T, H): 2 x H per cell forward, as much again for the read state's gradient when it needs one."""
    return 6 * head_params, 2 * arch.hidden_size * (2 if grad_to_hidden else 1)


def probe_cpu_flops(seconds: float = 0.5) -> float:
    """fp32 matmul FLOP/s this CPU sustains (a 1024^3 product repeated for about `seconds`)."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - start)
