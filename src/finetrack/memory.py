"""Memory model of one training run: what `finetrack plan` predicts, term by term, without loading the model.

Pure arithmetic over the model's config.json (`Architecture`), the resolved finetrack `Config` and the
largest micro-batch of the data order (`Workload`). Each `Term` says how it was computed. Terms are
tagged with the phases of a training step they are alive in, and the predicted peak is the largest
phase total (`peak_bytes`):

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_BYTES = 4  # PEFT autocast_adapter_dtype: LoRA weights are float32 whatever the base dtype

# bitsandbytes 4-bit: two values per byte, one absmax per 64-value block (float32, or with double
# quantization uint8 plus one float32 per 256 absmax values and one shared 256-entry float32 map), and per
# module its 16-entry float32 code.
QUANT_BLOCK_VALUES = 64
DOUBLE_QUANT_BLOCK_VALUES = 256
# bitsandbytes 8-bit optimizers: uint8 states with one float32 absmax per 256 values; tensors with fewer
# than 4096 values keep float32 states (min_8bit_size).
OPTIM_8BIT_BLOCK_VALUES = 256
OPTIM_8BIT_MIN_VALUES = 4096

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
# CPU, glibc malloc: after the first large free glibc raises its mmap threshold to 32 MiB, so from then on
# activations and temporaries come from the heap, and the holes freed temporaries leave between live
# tensors stay resident. Modeled as a fraction of the activations one forward saves without
# checkpointing (a forward allocates the same tensors checkpointed or not), in the loss / layer phases.
# Measured (default RSS peak - peak with the threshold fixed by MALLOC_TRIM_THRESHOLD_=131072) / those
# activations: 0.3-0.9 (LoRA 0.6-0.9, full 0.3-0.4); one value for all. With the threshold fixed, the
# measured peaks match the other terms alone within 3%, so this term carries the CPU model's uncertainty.
CPU_HEAP_SLACK_PER_FORWARD_BYTE = 0.65
# CPU, QLoRA: quantizing on the CPU leaves bitsandbytes' temporaries as heap holes between the small 4-bit tensors: RSS after
# building the model exceeds its tensors by 0.62-0.68 of the bytes quantized (3 runs; 0.0 in a 4th).
CPU_QUANT_LEFTOVER_PER_WEIGHT_BYTE = 0.65


@dataclass(frozen=True)
class Architecture:
    """The shapes of a Llama / Mistral / Qwen-style decoder, from its Hugging Face config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    checkpoint_dtype: str | None = None  # dtype the weights are stored in (config.json "dtype" / "torch_dtype")

    @classmethod
    def from_hf_config(cls, config: dict) -> Architecture:
        """Read the shapes from a config.json dict; a ValueError names the missing keys."""
        config = config.get("text_config", config)  # multimodal wrappers keep the decoder's config inside
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if config.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}: not a Llama/Mistral/Qwen-style decoder config")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        attention_bias = bool(config.get("attention_bias", False))
        dtype = config.get("dtype") or config.get("torch_dtype")
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),  # the Llama / Mistral / Qwen classes' default
            qkv_bias=attention_bias or config.get("model_type") == "qwen2",  # Qwen2 has q/k/v biases without saying so
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            checkpoint_dtype=dtype if dtype in DTYPE_BYTES else None,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """(in_features, out_features, has_bias) of each linear module kind of one decoder layer."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        return {
            "q_proj": (h, q, self.qkv_bias),
            "k_proj": (h, kv, self.qkv_bias),
            "v_proj": (h, kv, self.qkv_bias),
            "o_proj": (q, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias),
            "up_proj": (h, i, self.mlp_bias),
            "down_proj": (i, h, self.mlp_bias),
        }

    @property
    def num_layer_linear_params(self) -> int:
        """Weights and biases of the linear modules of one decoder layer."""
        return sum(i * o + (o if bias else 0) for i, o, bias in self.linear_shapes().values())

    @property
    def num_embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_lm_head_params(self) -> int:
        """0 when tied: the output head is the embedding matrix."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def num_norm_params(self) -> int:
        """Two RMSNorm weights per layer plus the final norm."""
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def num_params(self) -> int:
        return self.num_layers * self.num_layer_linear_params + self.num_embedding_params + self.num_lm_head_params + self.num_norm_params


@dataclass(frozen=True)
class Workload:
    """What the largest micro-batch of the run looks like (padding included)."""

    micro_batch_tokens: int  # rows x width of the largest micro-batch
    longest_row_tokens: int  # its width: eager attention keeps rows x heads x S x S probabilities, sdpa does not
    target_tokens: int  # positions that carry loss there: logits are computed only at these
    num_rows: int
    # An attention mask is built when rows are padded or packed (several samples per row): sdpa then saves a
    # float copy of it per layer and gets k, v repeated to every head. Only equal-length unpacked rows
    # (or flash_attention_2) run without one.
    masked: bool = True


@dataclass(frozen=True)
class Term:
    """One line of the breakdown. phases: the step phases it is alive in (empty: all of them).
    measured: False for memory the benchmark cannot see (the runtime present before the run, the CUDA
    context, paged optimizer state outside PyTorch's allocator)."""

    name: str
    bytes: int
    detail: str
    phases: tuple[str, ...] = ()
    measured: bool = True


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _adapted(cfg: Config, layer: int) -> set[str]:
    """The linear kinds that carry a LoRA adapter in decoder layer `layer` (empty for full fine-tuning)."""
    m = cfg.model
    if m.method == "full" or (m.lora.layers_to_transform is not None and layer not in m.lora.layers_to_transform):
        return set()
    targets = m.lora.target_modules
    if targets == "all-linear":
        return set(LINEAR_KINDS)
    # PEFT matches a module whose name is the target or ends with "." + target
    return {k for k in LINEAR_KINDS if any(t == k or t.endswith("." + k) for t in targets)}


def num_adapter_params(cfg: Config, arch: Architecture) -> int:
    """LoRA weights: r x (in + out) per adapted module (+ a magnitude vector of `out` with DoRA)."""
    if cfg.model.method == "full":
        return 0
    r, shapes, total = cfg.model.lora.r, arch.linear_shapes(), 0
    for layer in range(arch.num_layers):
        for kind in _adapted(cfg, layer):
            fan_in, fan_out, _ = shapes[kind]
            total += r * (fan_in + fan_out) + (fan_out if cfg.model.lora.use_dora else 0)
    return total


def _dtype(cfg: Config) -> str:
    if cfg.model.dtype not in DTYPE_BYTES or cfg.model.attn_implementation == "auto":
        raise ValueError("memory: resolve the config first (config.resolve_model fills model.dtype and attn_implementation)")
    return cfg.model.dtype


def trainable_params(cfg: Config, arch: Architecture) -> tuple[int, int]:
    """(trainable parameters, bytes each): the whole model in its dtype, or the LoRA adapters in float32."""
    return (arch.num_params, DTYPE_BYTES[_dtype(cfg)]) if cfg.model.method == "full" else (num_adapter_params(cfg, arch), ADAPTER_BYTES)


def activation_bytes_per_token(cfg: Config, arch: Architecture, layer: int, row_tokens: int, masked: bool) -> tuple[float, str]:
    """Bytes autograd saves per token in decoder layer `layer` (rows of `row_tokens`: the S^2 terms of
    attention are spread over the row's tokens), with the sum written out."""
    m = cfg.model
    a = 4 if m.method == "qlora" else DTYPE_BYTES[_dtype(cfg)]  # QLoRA: float32 activations (module docstring)
    h, q, kv, inter, heads = (
        arch.hidden_size,
        arch.num_heads * arch.head_dim,
        arch.num_kv_heads * arch.head_dim,
        arch.intermediate_size,
        arch.num_heads,
    )
    full = m.method == "full"
    adapted = _adapted(cfg, layer)
    cast = not full and a != ADAPTER_BYTES  # PEFT casts the input of each adapted layer to float32
    dropout = not full and m.lora.dropout > 0
    parts: dict[str, float] = {}
    # RMSNorm (x2): the float32 view/copy of its input and 1/rms; the normalized input too when its weight trains
    parts["norms"] = 2 * (4 * h + 4 + (a * h if full else 0))

    def inputs(name: str, width: int, consumers: tuple[str, ...], shared_is_free: bool = False) -> None:
        """A tensor of `width` per token feeding `consumers`: saved once if some consumer needs it as is,
        and one float32 copy (plus a dropout mask) per adapted consumer that casts or drops out its input."""
        as_is = full or (adapted & set(consumers) and not cast and not dropout)
        n = 0.0 if shared_is_free or not as_is else a * width
        per_adapter = (ADAPTER_BYTES * width if (cast or dropout) else 0) + (width if dropout else 0)
        n += per_adapter * len(adapted & set(consumers))
        if n:
            parts[name] = n

    inputs("attention input", h, ("q_proj", "k_proj", "v_proj"))
    if m.attn_implementation == "eager":
        # q, k and v repeated to every head (repeat_kv), probabilities (float32 softmax, plus its cast when a < 4)
        parts["q, k, v"] = 3 * a * q
        parts["attention probabilities"] = heads * row_tokens * (4 + (a if a != 4 else 0))
        inputs("attention output", q, ("o_proj",))
    else:
        # sdpa / flash: q, k, v, the output (shared with o_proj's input) and a float32 logsumexp per head;
        # with a mask, transformers repeats k, v to every head and sdpa saves the mask converted to float
        sdpa_mask = masked and m.attn_implementation == "sdpa"
        parts["q, k, v, output"] = a * (2 * q + 2 * (q if sdpa_mask else kv)) + 4 * heads
        if sdpa_mask:
            parts["float mask"] = a * row_tokens
        inputs("attention output", q, ("o_proj",), shared_is_free=True)
    inputs("mlp input", h, ("gate_proj", "up_proj"))
    parts["gate, up, silu"] = 3 * a * inter
    inputs("down input", inter, ("down_proj",))
    if adapted:
        parts["lora_A outputs"] = ADAPTER_BYTES * m.lora.r * len(adapted)
    return sum(parts.values()), " + ".join(f"{k} {v:,.0f}" for k, v in parts.items())


def _weights(cfg: Config, arch: Architecture, device_type: str) -> list[Term]:
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
    # backward dequantizes each 4-bit weight again (compute dtype) for its input gradient, one at a time
    largest_weight = max(weights_per_module) * DTYPE_BYTES[compute]
    terms.append(Term("dequantized weight (transient)", largest_weight, f"largest linear weight in {compute}", ("loss", "layer")))
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


def optimizer_state_bytes(optimizer: str, trainable: int, param_bytes: int) -> int:
    """AdamW's two states for `trainable` parameters of `param_bytes` each: torch keeps them in the parameters'
    dtype, bitsandbytes' 32-bit (paged) AdamW in float32, its 8-bit ones as uint8 with a float32 absmax per block."""
    per_param = {"adamw": 2 * param_bytes, "paged_adamw": 8}.get(optimizer, 2 * (1 + 4 / OPTIM_8BIT_BLOCK_VALUES))
    return math.ceil(per_param * trainable)


def _optimizer(cfg: Config, trainable: int, param_bytes: int, largest: int, device_type: str) -> list[Term]:
    kind, state_bytes = cfg.train.optimizer, optimizer_state_bytes(cfg.train.optimizer, trainable, param_bytes)
    if kind == "adamw":
        state = Term("optimizer state", state_bytes, f"AdamW: 2 states x {trainable:,} params x {param_bytes} B")
        if device_type == "cuda":  # foreach AdamW: one sqrt(exp_avg_sq) buffer for all parameters
            temp = Term(
                "optimizer step buffers",
                trainable * param_bytes,
                f"foreach AdamW: sqrt(v) of {trainable:,} params x {param_bytes} B",
                ("step",),
            )
        else:  # per-tensor AdamW: sqrt(v) and sqrt(v)/c of the largest tensor
            temp = Term(
                "optimizer step buffers",
                2 * largest * param_bytes,
                f"per-tensor AdamW: 2 x largest tensor {largest:,} x {param_bytes} B",
                ("step",),
            )
        return [state, temp]
    paged = kind.startswith("paged")
    where = "; paged: CUDA unified memory, spills to CPU RAM under pressure, outside torch's allocator" if paged else ""
    if kind == "paged_adamw":  # 32-bit bitsandbytes states are float32 whatever the parameter dtype
        return [Term("optimizer state", state_bytes, f"paged AdamW: 2 float32 states x {trainable:,} params{where}", measured=not paged)]
    return [
        Term(
            "optimizer state",
            state_bytes,
            f"8-bit AdamW: 2 uint8 states + float32 absmax per {OPTIM_8BIT_BLOCK_VALUES} x {trainable:,} params "
            f"(float32 states of tensors under {OPTIM_8BIT_MIN_VALUES} values not counted apart){where}",
            measured=not paged,
        )
    ]


def breakdown(cfg: Config, arch: Architecture, work: Workload, device_type: str) -> list[Term]:
    """Every term of the training peak for this config, model and largest micro-batch on `device_type`
    ("cuda", or "cpu"; other devices are treated as "cpu"). `cfg` must be resolved (concrete dtype)."""
    m, t = cfg.model, cfg.train
    p = DTYPE_BYTES[_dtype(cfg)]
    a = 4 if m.method == "qlora" else p
    tokens, rows, width, targets = work.micro_batch_tokens, work.num_rows, work.longest_row_tokens, work.target_tokens
    h, v, L = arch.hidden_size, arch.vocab_size, arch.num_layers
    full = m.method == "full"
    terms = _weights(cfg, arch, device_type)

    # trainable parameters, their gradients and optimizer state
    trainable, param_bytes = trainable_params(cfg, arch)
    if full:
        largest = max([arch.num_embedding_params] + [s[0] * s[1] for s in arch.linear_shapes().values()])
    else:
        largest = m.lora.r * max(max(s[0], s[1]) for s in arch.linear_shapes().values())
        terms.append(
            Term(
                "LoRA adapters",
                trainable * ADAPTER_BYTES,
                f"{trainable:,} params (r={m.lora.r} x (in + out) per adapted module) x 4 B (float32: PEFT autocast_adapter_dtype)"
                + ("; DoRA's per-step weight-norm buffers are not modeled" if m.lora.use_dora else ""),
            )
        )
    accumulating = t.grad_accum_steps > 1  # then gradients of earlier micro-batches live through every forward
    terms.append(
        Term(
            "gradients",
            trainable * param_bytes,
            f"{trainable:,} trainable params x {param_bytes} B"
            + ("; kept across accumulated micro-batches" if accumulating else "; set to None after each step"),
            () if accumulating else ("step",),
        )
    )
    terms += _optimizer(cfg, trainable, param_bytes, largest, device_type)

    # activations: per layer what autograd saves, plus what lives outside the layers
    per_layer = [activation_bytes_per_token(cfg, arch, i, width, work.masked) for i in range(L)]
    layer_bytes = [per_token * tokens for per_token, _ in per_layer]
    biggest = max(range(L), key=lambda i: layer_bytes[i])
    outside = tokens * (4 * h + 4 + (a * h if full else 0))  # final norm
    outside_how = f"final norm {4 * h + 4 + (a * h if full else 0)} B/token"
    if full:  # embedding backward keeps the input ids; lm_head's weight gradient keeps its input rows
        outside += 8 * tokens + a * h * targets
        outside_how += f" + input ids 8 B/token + lm_head input {targets:,} x {a * h} B"
    if m.attn_implementation == "eager" or (work.masked and m.attn_implementation == "sdpa"):
        mask_bytes = 1 if m.attn_implementation == "sdpa" else a  # the 4D mask transformers builds: bool, or float for eager
        outside += rows * width * width * mask_bytes
        outside_how += f" + attention mask {rows} x {width}^2 x {mask_bytes} B"
    if m.gradient_checkpointing:
        kept = L * a * h * tokens
        terms.append(
            Term(
                "activations (checkpointed)",
                kept + outside,
                f"{L} layer inputs x {tokens:,} tokens x {a * h:,} B + {outside_how}",
                ("loss", "layer"),
            )
        )
        flowing = 2 * a * (h + arch.intermediate_size)  # gradients passing through the layer (residual, MLP)
        terms.append(
            Term(
                "activations (one layer recomputed)",
                layer_bytes[biggest] + flowing * tokens,
                f"{tokens:,} tokens x ({per_layer[biggest][0]:,.0f} B ({per_layer[biggest][1]}) + {flowing} B of gradients in flight)",
                ("layer",),
            )
        )
    else:
        same = all(b == layer_bytes[0] for b in layer_bytes)
        how = (
            f"{L} layers x {tokens:,} tokens x {per_layer[0][0]:,.0f} B ({per_layer[0][1]})"
            if same
            else f"{tokens:,} tokens x per-layer bytes (adapted layers differ), e.g. layer {biggest}: {per_layer[biggest][1]}"
        )
        terms.append(Term("activations", sum(layer_bytes) + outside, f"{how} + {outside_how}", ("loss",)))

    # logits exist only at target positions: float32 log-softmax output, its gradient and the gradient it
    # receives from nll_loss (12 B); full fine-tuning also gets lm_head's weight gradient while the logits'
    # gradient (activation dtype) is alive
    head_grad = (arch.num_embedding_params if arch.tie_word_embeddings else arch.num_lm_head_params) * p if full else 0
    logits = max(12 * targets * v, a * targets * v + head_grad)
    how = f"{targets:,} target tokens x {v:,} vocab x 12 B (float32 log-softmax output, its gradient, nll_loss gradient)"
    if logits != 12 * targets * v:
        how = f"{targets:,} x {v:,} x {a} B logits gradient + lm_head weight gradient {mib(head_grad)}"
    terms.append(Term("logits and loss", logits, how, ("loss",)))

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
        forward = sum(layer_bytes) + outside  # what one forward saves without checkpointing
        terms.append(
            Term(
                "CPU heap slack",
                int(CPU_HEAP_SLACK_PER_FORWARD_BYTE * forward),
                f"{CPU_HEAP_SLACK_PER_FORWARD_BYTE} x {mib(forward)} (one forward's activations, not checkpointed): "
                "freed temporaries glibc keeps on the heap",
                ("loss", "layer"),
            )
        )
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
