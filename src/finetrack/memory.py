"""Memory model of one training run: what `finetrack plan` predicts, term by term, without loading the model.

Pure arithmetic over the model's config.json (`Architecture`), the resolved finetrack `Config` and the
largest micro-batch of the data order (`Workload`). Each `Term` says how it was computed. Terms are
tagged with the phases of a training step they are alive in, and the predicted peak is the largest
phase total (`peak_bytes`):

- "forward": objectives that read hidden states (regression, contrastive) only: the end of the forward, where
  output_hidden_states still holds every layer's output (and, with a frozen backbone, the only activations);
- "loss": the start of backward: every saved activation plus the logits / cross-entropy buffers;
- "layer": gradient checkpointing only: the kept layer inputs plus one layer recomputed in backward;
- "step": the optimizer step: every gradient plus the optimizer's temporaries.

What autograd saves per token and layer was derived for the Hugging Face Llama block (RMSNorm, RoPE,
SwiGLU MLP, GQA) and checked tensor by tensor with `torch.autograd.graph.saved_tensors_hooks` on
SmolLM2-135M (fp32 and bf16; full, LoRA, QLoRA; sdpa and eager). Facts of the libraries it relies on:
PEFT keeps LoRA weights in float32 whatever the base dtype (`autocast_adapter_dtype`) and so casts each
adapted layer's input to float32, a copy that lora_A saves; `prepare_model_for_kbit_training` (QLoRA)
upcasts embeddings, norms and lm_head to float32, so the residual stream, every Linear4bit output and
hence every activation of QLoRA is float32 whatever the compute dtype; a frozen linear layer saves no
input (its weight gradient is never computed); sdpa saves its output and a float32 logsumexp, eager
attention saves the full (rows, heads, S, S) probabilities.

The arithmetic lives by stage: memory_shapes.py (the model, the micro-batch, the objective, what trains),
memory_params.py (weights, adapters, the head, gradients, optimizer state), memory_activations.py (activations,
logits, hidden-state reads, the CPU heap). This module adds the runtime and sums the terms into phases.
"""

from __future__ import annotations

from .config import Config
from .memory_activations import CPU_HEAP_SLACK_PER_FORWARD_BYTE, activation_bytes_per_token, activation_terms  # noqa: F401  (re-exported)
from .memory_params import (  # noqa: F401  (re-exported: plan, tests and benchmarks import them from here)
    CPU_QUANT_LEFTOVER_PER_WEIGHT_BYTE,
    optimizer_state_bytes,
    parameter_terms,
)
from .memory_shapes import (  # noqa: F401  (re-exported)
    ADAPTER_BYTES,
    DTYPE_BYTES,
    HEAD_BYTES,
    LINEAR_KINDS,
    Architecture,
    ObjectiveShape,
    Term,
    Trainable,
    Workload,
    head_params,
    mib,
    num_adapter_params,
    objective_shape,
    trainable_params,
)

# Calibration constants per device type; the CPU figures measured with benchmarks/memory_model.py --verbose (2-core machine, 2026-11).
# CUDA: the context and kernel images take device memory outside PyTorch's allocator (so outside
# max_memory_allocated): ~500 MiB for a CUDA 12 context with lazy module loading (not measured here).
CUDA_CONTEXT_BYTES = 500 * 2**20
# CPU: RSS of `import torch, transformers, peft, accelerate, bitsandbytes, finetrack` (444 MiB measured,
# torch 2.13 CPU, Linux); there before the run starts, so the benchmark measures growth above it.
CPU_RUNTIME_BYTES = 444 * 2**20
# CPU: memory of a run that is not tensors of the model: tokenizer, tokenized rows, module objects (~45 MiB
# measured after building the model), autograd and oneDNN/OpenMP scratch once training (~25 MiB more).
CPU_RUN_OBJECTS_BYTES = 70 * 2**20


def breakdown(cfg: Config, arch: Architecture, work: Workload, device_type: str) -> list[Term]:
    """Every term of the training peak for this config, model and largest micro-batch on `device_type`
    ("cuda", or "cpu"; other devices are treated as "cpu"). `cfg` must be resolved (concrete dtype)."""
    terms = parameter_terms(cfg, arch, device_type) + activation_terms(cfg, arch, work, device_type)
    if device_type == "cuda":
        terms.append(
            Term(
                "framework overhead",
                CUDA_CONTEXT_BYTES,
                "CUDA context and kernel images (outside PyTorch's allocator); allocator fragmentation is not modeled",
                measured=False,
            )
        )
    else:
        terms.append(
            Term(
                "framework overhead",
                CPU_RUNTIME_BYTES,
                "Python + torch/transformers/peft/accelerate imported (resident before the run)",
                measured=False,
            )
        )
        terms.append(Term("run objects", CPU_RUN_OBJECTS_BYTES, "tokenizer, tokenized rows, module objects, oneDNN/OpenMP scratch"))
    return terms


def phases(terms: list[Term]) -> list[str]:
    """The step phases the terms name, in order of first mention."""
    return list(dict.fromkeys(ph for term in terms for ph in term.phases))


def phase_bytes(terms: list[Term], phase: str, measured_only: bool = False) -> int:
    """Total of the terms alive in `phase` (optionally only those the benchmark can measure)."""
    return sum(t.bytes for t in terms if (not t.phases or phase in t.phases) and (t.measured or not measured_only))


def peak_bytes(terms: list[Term], measured_only: bool = False) -> int:
    """The predicted peak: the largest phase total. measured_only: leave out what the benchmark's measurement
    cannot see (RSS growth over the post-import baseline; torch.cuda.max_memory_allocated)."""
    return max([phase_bytes(terms, ph, measured_only) for ph in phases(terms)] or [phase_bytes(terms, "", measured_only)])


def peak_phase(terms: list[Term]) -> str:
    """Which phase the peak falls in ("" when no term names a phase)."""
    return max(phases(terms), key=lambda ph: phase_bytes(terms, ph), default="")
