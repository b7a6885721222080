"""Memory of the activations: what autograd saves per token and layer (with or without gradient checkpointing), what
lives outside the layers, the logits and loss buffers, the hidden states an objective reads (regression head,
contrastive triplets) and, on the CPU, the freed temporaries glibc keeps on the heap.

What autograd saves per token and layer was derived for the Hugging Face Llama block (RMSNorm, RoPE, SwiGLU MLP, GQA)
and checked tensor by tensor with `torch.autograd.graph.saved_tensors_hooks` on SmolLM2-135M (module docstring of
memory.py). A frozen backbone (objective.regression.freeze_backbone) saves nothing: no tensor before the head requires
grad, so autograd records nothing there (checked the same way). With gradient checkpointing transformers would make the
embedding output require grad (`enable_input_require_grads`) and recompute the backbone for nothing: the config refuses
that combination, and the branches below that allow it are kept only so the arithmetic stays whole.
"""

from __future__ import annotations

from .config import Config
from .memory_shapes import ADAPTER_BYTES, DTYPE_BYTES, Architecture, Term, Workload, _adapted, _dtype, forward_phase, mib, objective_shape

# CPU, glibc malloc: after the first large free glibc raises its mmap threshold to 32 MiB, so from then on
# activations and temporaries come from the heap, and the holes freed temporaries leave between live
# tensors stay resident. Modeled as a fraction of the activations one forward saves without
# checkpointing (a forward allocates the same tensors checkpointed or not), in the forward / loss / layer phases.
# Measured (default RSS peak - peak with the threshold fixed by MALLOC_TRIM_THRESHOLD_=131072) / those
# activations: 0.3-0.9 (LoRA 0.6-0.9, full 0.3-0.4); one value for all. With the threshold fixed, the
# measured peaks match the other terms alone within 3%, so this term carries the CPU model's uncertainty.
CPU_HEAP_SLACK_PER_FORWARD_BYTE = 0.65


def activation_bytes_per_token(cfg: Config, arch: Architecture, layer: int, row_tokens: int, masked: bool) -> tuple[float, str]:
    """Bytes autograd saves per token in decoder layer `layer` (rows of `row_tokens`: the S^2 terms of
    attention are spread over the row's tokens), with the sum written out. With a frozen backbone: what the layer
    would save with its input requiring grad and no weight training (gradient checkpointing; see the module docstring)."""
    m = cfg.model
    a = 4 if m.method == "qlora" else DTYPE_BYTES[_dtype(cfg)]  # QLoRA: float32 activations (memory.py docstring)
    h, q, kv, inter, heads = (
        arch.hidden_size,
        arch.num_heads * arch.head_dim,
        arch.num_kv_heads * arch.head_dim,
        arch.intermediate_size,
        arch.num_heads,
    )
    frozen = objective_shape(cfg, arch).frozen
    full = m.method == "full" and not frozen
    adapted = set() if frozen else _adapted(cfg, layer)
    lora = m.method != "full" and not frozen
    cast = lora and a != ADAPTER_BYTES  # PEFT casts the input of each adapted layer to float32
    dropout = lora and m.lora.dropout > 0
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


def activation_terms(cfg: Config, arch: Architecture, work: Workload, device_type: str) -> list[Term]:
    """Activations, logits and loss buffers, the objective's hidden-state reads and the CPU heap slack of the largest
    micro-batch."""
    m = cfg.model
    shape, fwd = objective_shape(cfg, arch), forward_phase(cfg)
    p = DTYPE_BYTES[_dtype(cfg)]
    a = 4 if m.method == "qlora" else p
    tokens, rows, width, targets = work.micro_batch_tokens, work.num_rows, work.longest_row_tokens, work.target_tokens
    h, v, L = arch.hidden_size, arch.vocab_size, arch.num_layers
    full = m.method == "full" and not shape.frozen
    keeps_nothing = shape.frozen and not m.gradient_checkpointing  # no tensor before the head requires grad
    terms: list[Term] = []

    # per layer what autograd saves, plus what lives outside the layers
    per_layer = [activation_bytes_per_token(cfg, arch, i, width, work.masked) for i in range(L)]
    layer_bytes = [per_token * tokens for per_token, _ in per_layer]
    biggest = max(range(L), key=lambda i: layer_bytes[i])
    # where lm_head runs: the target tokens, else one position per row when the objective reads hidden states (logits_to_keep=1)
    logit_rows = targets or (rows if shape.reads_hidden else 0)
    outside = tokens * (4 * h + 4 + (a * h if full else 0))  # final norm
    outside_how = f"final norm {4 * h + 4 + (a * h if full else 0)} B/token"
    if full:  # embedding backward keeps the input ids; lm_head's weight gradient keeps its input rows
        outside += 8 * tokens + a * h * logit_rows
        outside_how += f" + input ids 8 B/token + lm_head input {logit_rows:,} x {a * h} B"
    mask = 0
    if m.attn_implementation == "eager" or (work.masked and m.attn_implementation == "sdpa"):
        mask_bytes = 1 if m.attn_implementation == "sdpa" else a  # the 4D mask transformers builds: bool, or float for eager
        mask = rows * width * width * mask_bytes
        outside += mask
        outside_how += f" + attention mask {rows} x {width}^2 x {mask_bytes} B"
    if keeps_nothing:
        terms.append(
            Term(
                "activations (frozen backbone: none kept)",
                layer_bytes[biggest] + mask,
                f"nothing is saved for backward (no parameter before the head trains); one layer's tensors in flight: "
                f"{tokens:,} tokens x {per_layer[biggest][0]:,.0f} B ({per_layer[biggest][1]})"
                + (f" + attention mask {mib(mask)}" if mask else ""),
                fwd,
            )
        )
    elif m.gradient_checkpointing:
        kept = L * a * h * tokens
        terms.append(
            Term(
                "activations (checkpointed)",
                kept + outside,
                f"{L} layer inputs x {tokens:,} tokens x {a * h:,} B + {outside_how}",
                (*fwd, "loss", "layer"),
            )
        )
        flowing = 2 * a * (h + arch.intermediate_size)  # gradients passing through the layer (residual, MLP)
        terms.append(
            Term(
                "activations (one layer recomputed)",
                layer_bytes[biggest] + flowing * tokens,
                f"{tokens:,} tokens x ({per_layer[biggest][0]:,.0f} B ({per_layer[biggest][1]}) + {flowing} B of gradients in flight)"
                + ("; frozen backbone: transformers makes the embedding output require grad with checkpointing on" if shape.frozen else ""),
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
        terms.append(Term("activations", sum(layer_bytes) + outside, f"{how} + {outside_how}", (*fwd, "loss")))

    if shape.reads_hidden:
        terms += _hidden_state_terms(cfg, arch, work, a, keeps_nothing)

    # logits exist only at target positions: float32 log-softmax output, its gradient and the gradient it
    # receives from nll_loss (12 B); full fine-tuning also gets lm_head's weight gradient while the logits'
    # gradient (activation dtype) is alive
    if targets or not shape.reads_hidden:
        head_grad = (arch.num_embedding_params if arch.tie_word_embeddings else arch.num_lm_head_params) * p if full else 0
        logits = max(12 * targets * v, a * targets * v + head_grad)
        how = f"{targets:,} target tokens x {v:,} vocab x 12 B (float32 log-softmax output, its gradient, nll_loss gradient)"
        if logits != 12 * targets * v:
            how = f"{targets:,} x {v:,} x {a} B logits gradient + lm_head weight gradient {mib(head_grad)}"
        terms.append(Term("logits and loss", logits, how, ("loss",)))

    # a forward allocates the same tensors whether it keeps them or not (checkpointing); a frozen backbone that keeps
    # nothing leaves no live tensors between its freed temporaries but the hidden states: measured 6 MiB of slack
    # (634 MiB peak vs 628 MiB with the mmap threshold fixed; benchmarks/memory_model.py regression-frozen), so none
    if device_type != "cuda" and not keeps_nothing:
        forward = sum(layer_bytes) + outside
        terms.append(
            Term(
                "CPU heap slack",
                int(CPU_HEAP_SLACK_PER_FORWARD_BYTE * forward),
                f"{CPU_HEAP_SLACK_PER_FORWARD_BYTE} x {mib(forward)} (one forward's activations, not checkpointed): "
                "freed temporaries glibc keeps on the heap",
                (*fwd, "loss", "layer"),
            )
        )
    return terms


def _hidden_state_terms(cfg: Config, arch: Architecture, work: Workload, a: int, keeps_nothing: bool) -> list[Term]:
    """What reading hidden states adds (regression head, contrastive triplets): the layer outputs
    output_hidden_states holds until the forward returns, the logits of the forward, the pooling matrices and the
    head. The hidden-states tuple is dropped when the model's forward returns (objectives.py keeps only the pooled
    reads), so it counts at the end of the forward, not at the start of backward."""
    m = cfg.model
    shape = objective_shape(cfg, arch)
    tokens, rows, reads, targets = work.micro_batch_tokens, work.num_rows, work.num_reads, work.target_tokens
    h, v, L = arch.hidden_size, arch.vocab_size, arch.num_layers
    trains = not shape.frozen or m.gradient_checkpointing  # the read hidden state requires grad
    if keeps_nothing:
        held, what = L + 1, f"{L} layer inputs and the final norm's output, kept by nothing else (frozen backbone)"
    elif a != 4 and not m.gradient_checkpointing:
        held, what = L + 1, f"{L} layer inputs (autograd keeps float32 copies only, not these {a}-byte ones) and the final norm's output"
    else:
        held, what = 1, "the final norm's output (the layer inputs are what autograd or checkpointing keeps anyway)"
    logits = a * v * (targets or rows)
    terms = [
        Term(
            "hidden states (output_hidden_states)",
            held * a * h * tokens,
            f"{held} x {tokens:,} tokens x {a * h:,} B: {what}; freed when the forward returns",
            ("forward",),
        ),
        Term(
            "logits (end of forward)",
            logits,
            f"{targets or rows:,} {'target tokens' if targets else 'rows (logits_to_keep=1: no next-token term)'} x {v:,} x {a} B",
            ("forward",),
        ),
    ]
    # every micro-batch of a step is collated before the first forward (loop.step_batches): their pooling matrices live
    # through the step; the largest micro-batch's size is taken for each
    pools = 4 * reads * tokens * cfg.train.grad_accum_steps
    terms.append(
        Term(
            "pooling matrices",
            pools,
            f"{cfg.train.grad_accum_steps} micro-batch(es) x {reads:,} reads x {tokens:,} tokens x 4 B (float32 (N, B x T) weights)",
        )
    )
    # pool @ hidden: the pool in the activations' dtype is saved when the hidden state requires grad, and the
    # backward starts with that state's dense gradient; the head (float32) saves its inputs
    head = cfg.objective.regression.head
    widths = sum(head.hidden_sizes) if shape.head_params else 0
    per_read = 4 * (h + 2 * widths) + ((h + widths) if shape.head_params and head.dropout > 0 else 0)
    reads_bytes = reads * per_read + ((reads * tokens * a if a != 4 else 0) + tokens * h * a if trains else 0)
    how = f"{reads:,} reads x {per_read:,} B (pooled float32 states" + (", the head's saved inputs" if shape.head_params else "") + ")"
    if trains:
        how += f" + gradient of the read hidden state {tokens:,} x {h * a:,} B" + (f" + the pool in {a}-byte copies" if a != 4 else "")
    terms.append(Term("hidden-state reads", reads_bytes, how, ("forward", "loss")))
    return terms
