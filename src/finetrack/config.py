"""One typed config, the schema: one section per stage, every default, and on each field the facts of
which settings matter (`Knob`, see schema.py), from which the effective dump, the no-effect checks, the
resume rule, the eval cache key and `plan --measure` are derived.

Loading (YAML, overrides, messages) lives in config_load.py, `resolve()` in config_resolve.py; both are
re-exported here, so `from finetrack.config import load_config, resolve` is the one import callers need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .config_data import DataConfig
from .config_monitor import BestConfig, CallbackConfig, EarlyStoppingConfig, MonitorConfig, monitor_problem
from .evaluate.spec import SampleGenerationConfig, SuiteConfig
from .redact import looks_like_url
from .schema import (
    EMBEDDED_NAME,
    ConfigError,
    Knob,
    Section,
    effective_dump,
    eval_key_settings,
    harmless_on_resume_prefixes,
    measure_dump,
    no_effect_problems,
)


def _is_hub_id(m: ModelConfig, _: object) -> bool:
    """A revision picks a commit of a hub model: not of the embedded model or a local directory."""
    return not (m.name == EMBEDDED_NAME or Path(m.name).is_dir())


_Beta = Annotated[float, Field(ge=0, lt=1)]
_LENGTH = Knob(harmless_on_resume=True)  # how long the run goes and how often it logs: a resume may change it
_WATCH = Knob(harmless_on_resume=True, measured=False)  # samples and trackers watch the training, never change its numbers
_SAMPLE = Knob(
    lambda t, _: t.sample_every_steps is not None,
    "without train.sample_every_steps: set it (e.g. train.sample_every_steps=50)",
    harmless_on_resume=True,
    measured=False,
)
_NEEDS_EVAL_SPLIT = Knob(lambda _, c: c.data.has_held_out(), "without data.eval_split: set data.eval_split=0.05 or a file", measured=False)


# ---------------------------------------------------------------------------------------- model
class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear' (every linear layer but the output head)."
    )
    # an empty list is refused: PEFT reads [] as "not set" and adapted every layer
    layers_to_transform: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = Field(
        None, description="Only adapt these decoder layer indices (None = all)."
    )

    @field_validator("target_modules")
    @classmethod
    def _all_linear_alone(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and "all-linear" in value:
            raise ValueError("'all-linear' is a value of its own, not a module name: write target_modules: all-linear")
        return value

    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class QloraConfig(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Also quantize the quantization constants (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the 4-bit matmuls; auto = model.dtype."
    )


class ModelConfig(Section):
    name: str = Field(
        EMBEDDED_NAME,
        description="'smollm2-135m-instruct' (the embedded model), a Hugging Face model id, or a local directory.",
    )
    revision: Annotated[str | None, Knob(_is_hub_id, "with model.name={s.name} (not a hub model id): remove it")] = Field(
        None, description="Hub revision (branch, tag or commit) for a model id."
    )
    method: Literal["full", "lora", "qlora"] = Field("lora", description="full fine-tune, LoRA, or QLoRA (4-bit base + LoRA).")
    init_from: str | None = Field(
        None,
        min_length=1,
        description="Start a NEW run at step 0 from a checkpoint's weights (adapter or full model, and a regression head): "
        "RUN_DIR (its newest checkpoint), RUN_DIR:best, RUN_DIR:N, a checkpoint / adapter / model folder, or a "
        "URL/checkpoints/step-N. Fresh optimizer and schedule (a resume continues a run instead).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the model weights; auto = bfloat16 on a GPU that supports it, else float32 (and float32 "
        "whenever model.mixed_precision=bf16).",
    )
    mixed_precision: Literal["auto", "none", "bf16"] = Field(
        "auto",
        description="bf16: the forward runs under torch.autocast(bfloat16) (matmuls and attention in bfloat16, the backward "
        "follows) while weights, gradients and optimizer state stay float32: mixed precision with float32 master weights "
        "(accelerate's mixed_precision=bf16), not bfloat16 weights (that is model.dtype). auto = bf16 on a CPU with "
        "AVX512-BF16 or AMX for the methods precision.AUTO_BF16_METHODS lists (none yet: fine-tuning losses left the 2% "
        "tolerance of float32, see the README), else none (no autocast); config.resolved.yaml says why.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field("auto", description="Attention kernel; auto = sdpa.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% more compute.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub model. Off unless you trust its author.")
    lora: Annotated[LoraConfig, Knob(lambda m, _: m.method != "full", "with model.method=full: remove it or set model.method=lora")] = (
        Field(default_factory=LoraConfig, description="LoRA options (method lora or qlora).")
    )
    qlora: Annotated[
        QloraConfig, Knob(lambda m, _: m.method == "qlora", "with model.method={s.method}: remove it or set model.method=qlora")
    ] = Field(default_factory=QloraConfig, description="4-bit quantization options (method qlora).")

    @model_validator(mode="after")
    def _checks(self) -> ModelConfig:
        if self.method == "full" and self.dtype == "float16":
            raise ValueError("model.dtype=float16 with method=full trains fp16 weights directly and diverges: use bfloat16 or float32")
        if self.mixed_precision == "bf16" and self.dtype in ("bfloat16", "float16"):
            raise ValueError(
                f"model.mixed_precision=bf16 autocasts float32 weights, and model.dtype={self.dtype} computes in {self.dtype} "
                "already: set model.dtype=float32 (or auto) for mixed precision, or remove model.mixed_precision"
            )
        if self.mixed_precision == "bf16" and self.method == "qlora":
            raise ValueError(
                "model.mixed_precision=bf16 with model.method=qlora: the 4-bit matmuls compute in model.qlora.compute_dtype; "
                "set model.qlora.compute_dtype=bfloat16 instead"
            )
        return self


# ------------------------------------------------------------------------------------ objective
def _kind_is(kind: str) -> Knob:
    return Knob(lambda o, _: o.kind == kind, f"with objective.kind={{s.kind}}: remove it or set objective.kind={kind}")


class HeadConfig(Section):
    hidden_sizes: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=list, description="Hidden layer widths of the head: [] = one linear layer, [256] = a small MLP."
    )
    activation: Literal["gelu", "relu", "tanh", "silu"] = Field("gelu", description="Activation between the head's layers.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the pooled state and between the head's layers.")


class RegressionConfig(Section):
    level: Literal["sequence", "step"] = Field(
        "sequence",
        description="sequence: one target per row (row field `target`); step: one label per reasoning step (rows with "
        "`prompt`, `steps` and `labels`), read at the separator after each step (process reward).",
    )
    target_field: str = Field("target", min_length=1, description="Row field holding the target of a sequence-level row.")
    layer: int = Field(-1, description="Hidden state read by the head: -1 = the last layer (after the final norm), 0 = the embeddings.")
    pool: Literal["last", "mean", "prompt_mean", "answer_mean", "marker"] = Field(
        "last",
        description="Where a sequence-level row is read: its last token, the mean of all / prompt / answer tokens, or the "
        "last occurrence of `marker`. Step-level rows are read at each step's separator.",
    )
    marker: Annotated[
        str | None, Knob(lambda r, _: r.pool == "marker" and r.level == "sequence", "unless pool=marker (sequence level)")
    ] = Field(None, min_length=1, description="Text whose last occurrence in a row is read (pool=marker).")
    step_separator: Annotated[str, Knob(lambda r, _: r.level == "step", "with level=sequence: remove it")] = Field(
        "\n", min_length=1, description="Text after each step (level=step); its last token carries the step's label."
    )
    head: HeadConfig = Field(default_factory=HeadConfig, description="The head on the pooled hidden state (1 output).")
    loss: Literal["mse", "huber", "mae"] = Field("mse", description="Regression loss, summed over targets and divided by their number.")
    huber_delta: Annotated[float, Knob(lambda r, _: r.loss == "huber", "with loss={s.loss}: remove it")] = Field(
        1.0, gt=0, description="Where huber turns from quadratic to linear."
    )
    normalize_targets: bool = Field(
        False, description="Train on (target - mean) / std of the training targets (stored with the head; predictions are un-normalized)."
    )
    lm_weight: float = Field(0.0, ge=0, description="Also train the next-token loss on answer tokens, with this weight (0 = off).")
    freeze_backbone: bool = Field(False, description="Train only the head (a probe): the model (and its adapters) stay frozen.")

    @model_validator(mode="after")
    def _checks(self) -> RegressionConfig:
        if self.level == "sequence" and self.pool == "marker" and self.marker is None:
            raise ValueError("objective.regression.pool=marker needs objective.regression.marker (the text to read at)")
        return self


class ContrastiveConfig(Section):
    layer: int = Field(-1, description="Hidden state compared: -1 = the last layer (after the final norm).")
    pool: Literal["last", "mean"] = Field(
        "last", description="Representation of a prompt: its last token's state, or the mean of its tokens."
    )
    loss: Literal["weighted", "infonce"] = Field(
        "weighted",
        description="weighted: lambda_task*CE(anchor) - lambda_pos*cos(a,p)/tau + lambda_neg*cos(a,n)/tau; "
        "infonce: lambda_task*CE(anchor) + lambda_pos*InfoNCE (the other rows' positives and negatives of a micro-batch are negatives too).",
    )
    tau: float = Field(0.07, gt=0, description="Temperature dividing the cosine similarities.")
    lambda_task: float = Field(1.0, ge=0, description="Weight of the anchor's next-token loss (rows with a `completion`).")
    lambda_pos: float = Field(1.0, ge=0, description="Weight of the pull towards the positive (the InfoNCE term for loss=infonce).")
    lambda_neg: Annotated[float, Knob(lambda c, _: c.loss == "weighted", "with loss=infonce: remove it")] = Field(
        1.0, ge=0, description="Weight of the push away from the negative."
    )


class PythonObjectiveConfig(Section):
    function: str = Field(
        pattern=r"^[^:]+:\w+$",
        description="'path/to/file.py:function' (relative to the working directory, like data paths) or 'module:function' "
        "(importable), called as function(model, batch) -> {name: finetrack.objectives.Term}; see the README's objective protocol.",
    )


class ObjectiveConfig(Section):
    kind: Literal["causal_lm", "regression", "contrastive", "python"] = Field(
        "causal_lm", description="What training minimizes: next-token loss, a regression head, contrastive triplets, or your function."
    )
    regression: Annotated[RegressionConfig, _kind_is("regression")] = Field(default_factory=RegressionConfig)
    contrastive: Annotated[ContrastiveConfig, _kind_is("contrastive")] = Field(default_factory=ContrastiveConfig)
    python: Annotated[PythonObjectiveConfig | None, _kind_is("python")] = Field(None, description="Your objective (kind python).")

    @model_validator(mode="after")
    def _checks(self) -> ObjectiveConfig:
        if self.kind == "python" and self.python is None:
            raise ValueError("objective.kind=python needs objective.python.function: 'module:function'")
        return self


# ---------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    seed: Annotated[int, Knob(eval_key=True)] = Field(  # the held-out split: what a loss suite measures
        42, ge=0, le=2**32 - 1, description="Seed for data order, initialisation of new weights and dropout (0 .. 2**32-1)."
    )
    micro_batch_size: int = Field(8, gt=0, description="Rows per forward pass on one device.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    num_epochs: Annotated[float | None, _LENGTH] = Field(
        None, gt=0, description="Passes over the training rows; 1 if neither this nor max_steps is set."
    )
    max_steps: Annotated[int | None, _LENGTH] = Field(
        None, gt=0, description="Optimizer steps; with num_epochs too, training stops at whichever comes first."
    )
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Peak learning rate, a finite number > 0; auto = 2e-4 for LoRA/QLoRA, 2e-5 for full."
    )
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup (to 0 for cosine/linear).")
    warmup_ratio: Annotated[float, Knob(lambda t, _: t.warmup_steps is None, "when train.warmup_steps is set: remove one of them")] = Field(
        0.03, ge=0, lt=1, description="Warmup as a fraction of total steps (ignored if warmup_steps is set)."
    )
    warmup_steps: int | None = Field(None, ge=0, description="Warmup optimizer steps.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"] = Field(
        "adamw", description="AdamW (torch), or bitsandbytes 8-bit / paged variants (paged ones need CUDA)."
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not applied to biases and norms).")
    adam_betas: tuple[_Beta, _Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this value, > 0 (None = no clipping).")
    log_every_steps: Annotated[int, _LENGTH] = Field(1, gt=0, description="Write a metrics.jsonl line every N optimizer steps.")
    sample_every_steps: Annotated[int | None, _WATCH] = Field(
        None,
        gt=0,
        description="Answer the sample prompts at step 0 (base model, fresh runs), every N optimizer steps and at the "
        "last step, into samples.jsonl (main process; the training random stream is left untouched).",
    )
    sample_prompts: Annotated[list[str], _SAMPLE] = Field(
        default_factory=list, description="Fixed user prompts answered every sample_every_steps."
    )
    sample_prompts_file: Annotated[str | None, _SAMPLE] = Field(
        None,
        description="More sample prompts: a .txt file (one prompt per line, blank lines skipped), or a question file "
        "(.yaml / .jsonl: each item's question / paraphrases).",
    )
    sample_generation: Annotated[SampleGenerationConfig, _SAMPLE] = Field(
        default_factory=SampleGenerationConfig, description="How samples are generated (greedy, 64 new tokens by default)."
    )
    report_to: Annotated[list[Literal["tensorboard", "wandb", "mlflow"]], _WATCH] = Field(
        default_factory=list,
        description="Experiment trackers (through accelerate) that receive every metrics.jsonl record and the "
        "samples; each needs its extra: pip install 'finetrack[tensorboard]' (or [wandb], [mlflow]).",
    )
    report_project: Annotated[
        str,
        Knob(
            lambda t, _: bool(t.report_to),
            "without train.report_to: set train.report_to=[tensorboard] (or wandb, mlflow)",
            harmless_on_resume=True,
            measured=False,
        ),
    ] = Field(
        "finetrack",
        min_length=1,
        description="Tracker project: the W&B project, the MLflow experiment, the folder under "
        "RUN_DIR/tensorboard/. The tracker run is named after output.dir.",
    )
    early_stopping: Annotated[EarlyStoppingConfig | None, Knob(harmless_on_resume=True, measured=False)] = Field(
        None,
        description="Stop when a validation metric stops improving (patience counted in validations); a final checkpoint "
        "records why. None = train to the end.",
    )
    callbacks: Annotated[list[CallbackConfig], _WATCH] = Field(
        default_factory=list,
        description="Your code called during training: 'module:Name' or {function: 'file.py:Name', options: {...}} (see the README).",
    )

    @field_validator("callbacks", mode="before")
    @classmethod
    def _callback_strings(cls, value: object) -> object:
        return [{"function": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _checks(self) -> TrainConfig:
        if self.sample_every_steps is not None and not self.sample_prompts and self.sample_prompts_file is None:
            raise ValueError("train.sample_every_steps needs prompts: set train.sample_prompts (a list) or train.sample_prompts_file")
        if any(not p.strip() for p in self.sample_prompts):
            raise ValueError("train.sample_prompts: a prompt is empty; remove it")
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"train.report_to={self.report_to}: a tracker is listed twice")
        return self


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, gt=0, description="Save a checkpoint every N optimizer steps (the last step is always saved).")
    num_per_epoch: int | None = Field(None, gt=0, description="N checkpoints evenly spaced inside every epoch.")
    num_first_epoch: int | None = Field(None, gt=0, description="N checkpoints evenly spaced inside epoch 1 only (dense early tracking).")
    steps: list[int] = Field(default_factory=list, description="Explicit optimizer steps to save at, e.g. [10, 50, 200].")
    num_log_spaced: int | None = Field(None, gt=0, description="N checkpoints spaced evenly in log(step) over the run (dense early).")
    num_keep_last: int | None = Field(
        None, gt=0, description="Keep only the newest N rolling checkpoints (every_steps, signal); None = keep all."
    )
    keep_schedule: Annotated[
        bool, Knob(lambda c, _: c.num_keep_last is not None, "without checkpoint.num_keep_last (nothing is deleted): remove it")
    ] = Field(
        True,
        description="Keep the checkpoints of num_first_epoch/num_per_epoch/steps/num_log_spaced whatever num_keep_last says "
        "(they are the science).",
    )
    keep_optimizer_state: Literal["all", "last"] = Field(
        "all", description="Resume state (optimizer, RNG) in every checkpoint, or only in the newest (older ones keep their weights)."
    )
    best: BestConfig | None = Field(
        None,
        description="Track the best checkpoint by a validation metric: a checkpoint is saved when it improves, "
        "checkpoints/best.json names it, and retention keeps it. None = off.",
    )
    remote: str | None = Field(
        None,
        description="fsspec URL (s3://bucket/run, gs://, hf://, file://) each checkpoint is uploaded to in the background; "
        "a re-run with no usable local checkpoint resumes from there. Credentials come from each backend's usual env/config.",
    )
    export: Annotated[
        list[Literal["merged", "onnx", "onnx:int8", "gguf", "gguf:f16", "gguf:q8_0", "gguf:q4_k_m"]],
        Knob(harmless_on_resume=True, measured=False),
    ] = Field(
        default_factory=list,
        description="Export every checkpoint as it is saved (in a background process, verified like `finetrack export`) into "
        "RUN_DIR/exports/step-N-<format>[-<type>], e.g. [merged, onnx:int8].",
    )

    @model_validator(mode="after")
    def _checks(self) -> CheckpointConfig:
        if any(s <= 0 for s in self.steps):
            raise ValueError(f"checkpoint.steps={self.steps}: steps are counted from 1")
        return self


class EvalConfig(Section):
    loss_every_steps: Annotated[int | None, _NEEDS_EVAL_SPLIT] = Field(
        None, gt=0, description="Held-out loss every N optimizer steps (needs data.eval_split); always computed at the end."
    )
    micro_batch_size: Annotated[int | None, Knob(lambda _, c: c.data.has_held_out(), "without data.eval_split")] = Field(
        None, gt=0, description="Rows per eval forward; default train.micro_batch_size."
    )
    every_steps: Annotated[
        int | None, Knob(lambda e, _: bool(e.suites), "without eval.suites: add suites or remove it", measured=False)
    ] = Field(
        None,
        gt=0,
        description="Run every suite during training on the live model every N optimizer steps, at the last step and at "
        "step 0 of a fresh start; results go to metrics.jsonl (val/<suite>.<metric>) and eval/ (a suite's every_steps overrides).",
    )
    suites: Annotated[list[SuiteConfig], Knob(measured=False)] = Field(
        default_factory=list, description="What `finetrack eval` measures at step 0 (the base model) and every checkpoint (see the README)."
    )
    engine: Annotated[Literal["auto", "hf", "vllm"], Knob(measured=False)] = Field(
        "auto",
        description="What generates the answers of `finetrack eval` (judge suites, distribution method=sample): hf "
        "(transformers), vllm (one base model, each checkpoint a LoRA request; needs a CUDA GPU and pip install vllm), "
        "auto = vllm when both are there, else hf. Falls back to hf, saying why, for what vLLM cannot serve.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> EvalConfig:
        names = [s.name for s in self.suites]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.suites: names must be unique (got {names})")
        return self


class OutputConfig(Section):
    dir: str = Field("runs/latest", description="Run directory (see the run-directory contract in the README).")

    @field_validator("dir")
    @classmethod
    def _local(cls, value: str) -> str:
        if looks_like_url(value):  # Path() would make `s3://...` a local folder named after the URL, credentials and all
            raise ValueError("is a URL; output.dir is a local folder: mirror the run to remote storage with checkpoint.remote")
        return value


_STORED = Knob(harmless_on_resume=True, measured=False)  # where and when results are stored: not the training numbers


class Config(Section):
    model: Annotated[ModelConfig, Knob(eval_key=True)] = Field(default_factory=ModelConfig)  # dtype, template, adapter shape
    data: Annotated[DataConfig, Knob(eval_key=True)] = Field(default_factory=DataConfig)  # max_length, the held-out rows
    objective: Annotated[ObjectiveConfig, Knob(eval_key=True)] = Field(default_factory=ObjectiveConfig)  # what a loss suite measures
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: Annotated[CheckpointConfig, _STORED] = Field(default_factory=CheckpointConfig)
    # eval: micro_batch_size stays in a plan --measure trial (the held-out loss at its end uses it)
    eval: Annotated[EvalConfig, Knob(harmless_on_resume=True)] = Field(default_factory=EvalConfig)
    output: Annotated[OutputConfig, _STORED] = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _no_effect(self) -> Config:
        """Every setting whose Knob says it acts only on another path, checked against its default (not against
        "was it written": config.resolved.yaml writes every key)."""
        problems = no_effect_problems(self)
        if problems:
            raise ValueError("\n".join(problems))  # one line each in the message
        return self

    @model_validator(mode="after")
    def _monitors(self) -> Config:
        """A monitored metric must be produced during training, and which way is better must be known."""
        monitors = [("train.early_stopping", self.train.early_stopping), ("checkpoint.best", self.checkpoint.best)]
        problems = [p for field, m in monitors if m is not None and (p := monitor_problem(field, m, self))]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _probe_without_recompute(self) -> Config:
        # transformers makes the embedding output require grad under gradient checkpointing, so backward would
        # recompute and run through a frozen backbone that keeps nothing for backward (~3x the forward, measured)
        if self.objective.kind == "regression" and self.objective.regression.freeze_backbone and self.model.gradient_checkpointing:
            raise ValueError(
                "model.gradient_checkpointing with objective.regression.freeze_backbone recomputes a frozen model that keeps "
                "no activations for backward (only the head trains): set model.gradient_checkpointing=false"
            )
        return self


# Loading and resolving, re-exported: callers import everything config from here.
from .config_load import config_keys, help_config, load_config, parse_override
from .config_resolve import Environment, Resolved, RunShape, config_hash, resolve, resolve_model, resolved_yaml

__all__ = [
    "BestConfig",
    "CallbackConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "ContrastiveConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "Environment",
    "EvalConfig",
    "HeadConfig",
    "LoraConfig",
    "ModelConfig",
    "MonitorConfig",
    "ObjectiveConfig",
    "OutputConfig",
    "PythonObjectiveConfig",
    "QloraConfig",
    "RegressionConfig",
    "Resolved",
    "RunShape",
    "TrainConfig",
    "config_hash",
    "config_keys",
    "effective_dump",
    "eval_key_settings",
    "harmless_on_resume_prefixes",
    "help_config",
    "load_config",
    "measure_dump",
    "parse_override",
    "resolve",
    "resolve_model",
    "resolved_yaml",
]
