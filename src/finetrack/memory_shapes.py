"""What the memory model computes over: the model's shapes (`Architecture`, from config.json), the largest
micro-batch (`Workload`), what the objective adds to a plain next-token run (`ObjectiveShape`: a regression head,
hidden-state reads, triplets, a frozen backbone), the parameters that train (`Trainable`), and one line of the
breakdown (`Term`). Pure arithmetic: no torch, no weights."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from .config import Config, HeadConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_BYTES = 4  # PEFT autocast_adapter_dtype: LoRA weights are float32 whatever the base dtype
HEAD_BYTES = 4  # heads.attach builds the regression head in float32 whatever the model's dtype


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
    """What the largest micro-batch of the run looks like (padding included). A triplet micro-batch runs its anchors,
    positives and negatives in one forward (batches.collate): its rows and tokens count every sequence."""

    micro_batch_tokens: int  # rows x width of the largest micro-batch
    longest_row_tokens: int  # its width: eager attention keeps rows x heads x S x S probabilities, sdpa does not
    target_tokens: int  # positions where logits are computed for the next-token loss (0 when the objective has none)
    num_rows: int  # rows of the input tensor (3 per triplet when not packed)
    # An attention mask is built when rows are padded or packed (several samples per row): sdpa then saves a
    # float copy of it per layer and gets k, v repeated to every head. Only equal-length unpacked rows
    # (or flash_attention_2) run without one.
    masked: bool = True
    num_reads: int = 0  # hidden-state reads (rows of the batch's (N, rows x width) pooling matrix): regression targets, 3 per triplet


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


# ------------------------------------------------------------------------------------------ objective
def head_params(hidden_size: int, head: HeadConfig) -> int:
    """Weights and biases of heads.Head: Linear(hidden, s1), ..., Linear(s_k, 1)."""
    widths = [hidden_size, *head.hidden_sizes, 1]
    return sum(i * o + o for i, o in pairwise(widths))


@dataclass(frozen=True)
class ObjectiveShape:
    """What objective.* changes in the memory and FLOPs of a step (objectives.py, heads.py)."""

    kind: str
    reads_hidden: bool  # output_hidden_states=True and a pooled read (regression, contrastive)
    next_token: bool  # a next-token loss term: logits at target tokens (else at one position per row, or none)
    frozen: bool  # regression.freeze_backbone: only the head trains
    head_params: int  # the regression head (float32), 0 without one
    sequences_per_row: int  # 3 for a triplet (anchor, positive, negative), else 1


def objective_shape(cfg: Config, arch: Architecture) -> ObjectiveShape:
    o = cfg.objective
    if o.kind == "regression":
        r = o.regression
        return ObjectiveShape("regression", True, r.lm_weight > 0, r.freeze_backbone, head_params(arch.hidden_size, r.head), 1)
    if o.kind == "contrastive":
        return ObjectiveShape("contrastive", True, o.contrastive.lambda_task > 0, False, 0, 3)
    # causal_lm; a python objective is assumed to run the next-token forward (its code is not read)
    return ObjectiveShape(o.kind, False, True, False, 0, 1)


def forward_phase(cfg: Config) -> tuple[str, ...]:
    """("forward",) when the objective reads hidden states: the forward then keeps every layer's output until it
    returns (output_hidden_states), so the end of the forward is a phase of its own; () for a next-token run, whose
    start of backward ("loss") always holds more."""
    return ("forward",) if cfg.objective.kind in ("regression", "contrastive") else ()


# ------------------------------------------------------------------------------------ parameters
def _dtype(cfg: Config) -> str:
    if cfg.model.dtype not in DTYPE_BYTES or cfg.model.attn_implementation == "auto":
        raise ValueError("memory: resolve the config first (config.resolve_model fills model.dtype and attn_implementation)")
    return cfg.model.dtype


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


@dataclass(frozen=True)
class Trainable:
    """The parameters that get gradients and optimizer state: the backbone's (the whole model in its dtype, or the
    LoRA adapters in float32; none when frozen) and the regression head's (float32)."""

    backbone: int
    backbone_bytes: int  # bytes per backbone parameter
    head: int = 0
    largest_bytes: int = 0  # the largest trainable tensor (the CPU AdamW step's temporaries are its size)

    @property
    def params(self) -> int:
        return self.backbone + self.head

    @property
    def bytes(self) -> int:
        return self.backbone * self.backbone_bytes + self.head * HEAD_BYTES

    def describe(self) -> str:
        parts = [f"{self.backbone:,} x {self.backbone_bytes} B"] if self.backbone else []
        parts += [f"head {self.head:,} x {HEAD_BYTES} B"] if self.head else []
        return " + ".join(parts) or "none"


def trainable_params(cfg: Config, arch: Architecture) -> Trainable:
    """What trains: the whole model (full), the LoRA adapters (lora, qlora), plus the regression head; only the head
    with freeze_backbone. Full fine-tuning without a next-token term: an untied lm_head gets no gradient (its logits
    do not reach the loss), so torch's AdamW keeps no state for it."""
    shape = objective_shape(cfg, arch)
    widths = [arch.hidden_size, *cfg.objective.regression.head.hidden_sizes, 1]
    head_largest = HEAD_BYTES * max(i * o for i, o in pairwise(widths)) if shape.head_params else 0
    p = DTYPE_BYTES[_dtype(cfg)]
    if shape.frozen:
        return Trainable(0, p, shape.head_params, head_largest)
    if cfg.model.method == "full":
        n = arch.num_params - (0 if shape.next_token else arch.num_lm_head_params)
        largest = max([arch.num_embedding_params] + [i * o for i, o, _ in arch.linear_shapes().values()])
        return Trainable(n, p, shape.head_params, max(p * largest, head_largest))
    largest = cfg.model.lora.r * max(max(i, o) for i, o, _ in arch.linear_shapes().values())
    return Trainable(num_adapter_params(cfg, arch), ADAPTER_BYTES, shape.head_params, max(ADAPTER_BYTES * largest, head_largest))
