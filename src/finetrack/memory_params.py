"""Memory of the parameters: the weights (by dtype, or 4-bit with their quantization constants), the LoRA adapters,
the regression head, the gradients of what trains and the optimizer's state and step temporaries."""

from __future__ import annotations

import math

from .config import Config
from .memory_shapes import (
    ADAPTER_BYTES,
    DTYPE_BYTES,
    HEAD_BYTES,
    LINEAR_KINDS,
    Architecture,
    Term,
    Trainable,
    _dtype,
    forward_phase,
    mib,
    num_adapter_params,
    objective_shape,
    trainable_params,
)

# bitsandbytes 4-bit: two values per byte, one absmax per 64-value block (float32, or with double
# quantization uint8 plus one float32 per 256 absmax values and one shared 256-entry float32 map), and per
# module its 16-entry float32 code.
QUANT_BLOCK_VALUES = 64
DOUBLE_QUANT_BLOCK_VALUES = 256
# bitsandbytes 8-bit optimizers: uint8 states with one float32 absmax per 256 values; tensors with fewer
# than 4096 values keep float32 states (min_8bit_size).
OPTIM_8BIT_BLOCK_VALUES = 256
OPTIM_8BIT_MIN_VALUES = 4096
# CPU, QLoRA: quantizing on the CPU leaves bitsandbytes' temporaries as heap holes between the small 4-bit tensors: RSS after
# building the model exceeds its tensors by 0.62-0.68 of the bytes quantized (3 runs; 0.0 in a 4th).
CPU_QUANT_LEFTOVER_PER_WEIGHT_BYTE = 0.65


def parameter_terms(cfg: Config, arch: Architecture, device_type: str) -> list[Term]:
    """Weights, adapters, the head, gradients and optimizer state of this config."""
    m, t = cfg.model, cfg.train
    terms = weight_terms(cfg, arch, device_type)
    trainable = trainable_params(cfg, arch)
    frozen = objective_shape(cfg, arch).frozen
    if m.method != "full":
        adapters = num_adapter_params(cfg, arch)
        terms.append(
            Term(
                "LoRA adapters",
                adapters * ADAPTER_BYTES,
                f"{adapters:,} params (r={m.lora.r} x (in + out) per adapted module) x 4 B (float32: PEFT autocast_adapter_dtype)"
                + ("; DoRA's per-step weight-norm buffers are not modeled" if m.lora.use_dora else "")
                + ("; frozen (freeze_backbone)" if frozen else ""),
            )
        )
    if trainable.head:
        terms.append(
            Term(
                "regression head",
                trainable.head * HEAD_BYTES + 2 * HEAD_BYTES,
                f"{trainable.head:,} params (hidden sizes {cfg.objective.regression.head.hidden_sizes or 'none'}, 1 output) x 4 B "
                "(float32) + the target mean and std",
            )
        )
    accumulating = t.grad_accum_steps > 1  # then gradients of earlier micro-batches live through every forward
    only_head = "; the head only (freeze_backbone)" if frozen else ""
    terms.append(
        Term(
            "gradients",
            trainable.bytes,
            f"{trainable.params:,} trainable params: {trainable.describe()}{only_head}"
            + ("; kept across accumulated micro-batches" if accumulating else "; set to None after each step"),
            () if accumulating else ("step",),
        )
    )
    return terms + optimizer_terms(cfg, trainable, device_type)


def weight_terms(cfg: Config, arch: Architecture, device_type: str) -> list[Term]:
    m = cfg.model
    dtype = _dtype(cfg)
    if m.method != "qlora":
        n = arch.num_params
        return [Term("weights", n * DTYPE_BYTES[dtype], f"{n:,} params x {DTYPE_BYTES[dtype]} B ({dtype})")]
    weights_per_module = [i * o for i, o, _ in arch.linear_shapes().values()]
    linear_weights = arch.num_layers * sum(weights_per_module)
    num_modules = arch.num_layers * len(LINEAR_KINDS)
    blocks = math.ceil(linear_weights / QUANT_BLOCK_VALUES)
    if m.qlora.double_quant:
        constants = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK_VALUES) + 4 * 256 + num_modules * 4 * 16
        how = f"absmax uint8 per {QUANT_BLOCK_VALUES} + float32 per {QUANT_BLOCK_VALUES * DOUBLE_QUANT_BLOCK_VALUES} (double quant)"
    else:
        constants = 4 * blocks + num_modules * 4 * 16
        how = f"absmax float32 per {QUANT_BLOCK_VALUES}"
    packed = math.ceil(linear_weights / 2)
    compute = m.qlora.compute_dtype if m.qlora.compute_dtype in DTYPE_BYTES else dtype
    rest = arch.num_params - linear_weights  # embeddings, lm_head, norms, biases
    terms = [
        Term(
            "weights (4-bit)",
            packed + constants,
            f"{linear_weights:,} linear params x 0.5 B ({m.qlora.quant_type}) + {mib(constants)} constants ({how})",
        ),
        Term(
            "weights (not quantized)",
            rest * 4,
            f"{rest:,} params (embeddings, lm_head, norms, biases) x 4 B (float32: prepare_model_for_kbit_training upcasts them)",
        ),
    ]
    # the forward and backward dequantize each 4-bit weight again (compute dtype), one at a time
    largest_weight = max(weights_per_module) * DTYPE_BYTES[compute]
    terms.append(
        Term(
            "dequantized weight (transient)", largest_weight, f"largest linear weight in {compute}", (*forward_phase(cfg), "loss", "layer")
        )
    )
    if device_type != "cuda":
        read_bytes = linear_weights * DTYPE_BYTES[compute]
        terms.append(
            Term(
                "quantization leftovers (CPU heap)",
                int(CPU_QUANT_LEFTOVER_PER_WEIGHT_BYTE * read_bytes),
                f"{CPU_QUANT_LEFTOVER_PER_WEIGHT_BYTE} x {mib(read_bytes)} quantized: freed temporaries glibc keeps",
            )
        )
    if device_type != "cuda" and arch.checkpoint_dtype == compute == "float32":
        # The unquantized tensors are zero-copy views of the mmap'd safetensors file, so the mapping stays
        # open, and every page quantization read stays resident (clean, reclaimable under pressure).
        terms.append(
            Term(
                "checkpoint pages kept mapped",
                linear_weights * 4,
                f"{linear_weights:,} linear params x 4 B of the float32 file, read to quantize; counted in RSS, "
                "reclaimable by the kernel under memory pressure",
            )
        )
    return terms


def optimizer_state_bytes(optimizer: str, trainable: Trainable) -> int:
    """AdamW's two states for the trainable parameters: torch keeps them in each parameter's dtype (the head's in
    float32), bitsandbytes' 32-bit (paged) AdamW in float32, its 8-bit ones as uint8 with a float32 absmax per block."""
    if optimizer == "adamw":
        return 2 * trainable.bytes
    per_param = 8 if optimizer == "paged_adamw" else 2 * (1 + 4 / OPTIM_8BIT_BLOCK_VALUES)
    return math.ceil(per_param * trainable.params)


def optimizer_terms(cfg: Config, trainable: Trainable, device_type: str) -> list[Term]:
    kind, state_bytes, n = cfg.train.optimizer, optimizer_state_bytes(cfg.train.optimizer, trainable), trainable.params
    if kind == "adamw":
        state = Term("optimizer state", state_bytes, f"AdamW: 2 states x ({trainable.describe()})")
        if device_type == "cuda":  # foreach AdamW: one sqrt(exp_avg_sq) buffer for all parameters
            temp = Term("optimizer step buffers", trainable.bytes, f"foreach AdamW: sqrt(v) of {trainable.describe()}", ("step",))
        else:  # per-tensor AdamW: sqrt(v) and sqrt(v)/c of the largest tensor
            temp = Term(
                "optimizer step buffers",
                2 * trainable.largest_bytes,
                f"per-tensor AdamW: 2 x largest tensor {mib(trainable.largest_bytes)}",
                ("step",),
            )
        return [state, temp]
    paged = kind.startswith("paged")
    where = "; paged: CUDA unified memory, spills to CPU RAM under pressure, outside torch's allocator" if paged else ""
    if kind == "paged_adamw":  # 32-bit bitsandbytes states are float32 whatever the parameter dtype
        return [Term("optimizer state", state_bytes, f"paged AdamW: 2 float32 states x {n:,} params{where}", measured=not paged)]
    return [
        Term(
            "optimizer state",
            state_bytes,
            f"8-bit AdamW: 2 uint8 states + float32 absmax per {OPTIM_8BIT_BLOCK_VALUES} x {n:,} params "
            f"(float32 states of tensors under {OPTIM_8BIT_MIN_VALUES} values not counted apart){where}",
            measured=not paged,
        )
    ]
