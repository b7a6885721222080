"""One typed config: schema, YAML + `section.key=value` overrides, and `resolve()`.

Every default lives in this file. Every value that is decided automatically ("auto") is decided in
`resolve()`, once, with a human-readable reason, and written to `config.resolved.yaml`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from .evaluate.spec import SampleGenerationConfig, SuiteConfig
from .schedule import ScheduleError, checkpoint_steps, describe
from .schema import EMBEDDED_NAME, ConfigError, Section, fix_yaml_floats, is_file_source


# ---------------------------------------------------------------------------------------- model
class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear' (every linear layer but the output head)."
    )
    layers_to_transform: list[int] | None = Field(None, description="Only adapt these decoder layer indices (None = all).")
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
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a model id.")
    method: Literal["full", "lora", "qlora"] = Field("lora", description="full fine-tune, LoRA, or QLoRA (4-bit base + LoRA).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the model weights; auto = bfloat16 on a GPU that supports it, else float32."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field("auto", description="Attention kernel; auto = sdpa.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% more compute.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub model. Off unless you trust its author.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA options (method lora or qlora).")
    qlora: QloraConfig = Field(default_factory=QloraConfig, description="4-bit quantization options (method qlora).")

    @model_validator(mode="after")
    def _no_effect(self) -> ModelConfig:
        if self.method == "full" and "lora" in self.model_fields_set:
            raise ValueError("model.lora has no effect with model.method=full: remove it or set model.method=lora")
        if self.method != "qlora" and "qlora" in self.model_fields_set:
            raise ValueError(f"model.qlora has no effect with model.method={self.method}: remove it or set model.method=qlora")
        if self.revision is not None and (self.name == EMBEDDED_NAME or Path(self.name).is_dir()):
            raise ValueError(f"model.revision has no effect with model.name={self.name} (not a hub model id): remove it")
        if self.method == "full" and self.dtype == "float16":
            raise ValueError("model.dtype=float16 with method=full trains fp16 weights directly and diverges: use bfloat16 or float32")
        return self


# ----------------------------------------------------------------------------------------- data
class DataConfig(Section):
    path: str | list[str] = Field(
        "builtin:demo-chat",
        description="Training data: file(s) (.jsonl .json .csv .parquet), a directory of them, a `datasets` hub name, "
        "or 'builtin:demo-chat' (the chat set shipped with finetrack).",
    )
    split: str = Field("train", description="Split to read from a `datasets` source.")
    eval_split: float | str | None = Field(
        None, description="Held-out rows for eval loss: a fraction in (0, 1) of the data, or a file path."
    )
    max_length: int = Field(2048, gt=0, description="Maximum tokens per row.")
    on_overflow: Literal["truncate", "drop", "error"] = Field("truncate", description="What to do with a row longer than max_length.")
    on_error: Literal["error", "skip"] = Field("error", description="Malformed rows: stop with file/line/field, or skip and count.")
    train_on: Literal["assistant", "all", "last_assistant"] = Field(
        "assistant", description="Which tokens carry loss: every assistant turn, every token, or only the last assistant turn."
    )
    pack: bool | Literal["auto"] = Field(
        "auto",
        description="Padding-free batches (rows concatenated, boundaries kept by position_ids); "
        "auto = on when the model's attention is verified to respect the boundaries.",
    )
    pack_row_tokens: int | None = Field(
        None,
        gt=0,
        description="Packed row width in tokens. None: chosen per micro-batch to compute least (attention cost grows with "
        "the square of the row on sdpa/eager). Set a large value (e.g. 8192) with flash_attention_2, whose cost does not.",
    )
    shuffle: bool = Field(True, description="Shuffle rows every epoch (deterministic by train.seed).")

    @model_validator(mode="after")
    def _checks(self) -> DataConfig:
        if isinstance(self.eval_split, float) and not 0 < self.eval_split < 1:
            raise ValueError(f"data.eval_split={self.eval_split}: a fraction must be in (0, 1), or give a file path")
        sources = ([self.path] if isinstance(self.path, str) else self.path) + (
            [self.eval_split] if isinstance(self.eval_split, str) else []
        )
        if self.split != "train" and all(is_file_source(s) for s in sources):
            raise ValueError(
                f"data.split={self.split} has no effect on files or builtin data (it picks a split of a `datasets` source): remove it"
            )
        if self.pack is False and "pack_row_tokens" in self.model_fields_set:
            raise ValueError("data.pack_row_tokens has no effect with data.pack=false: remove it or enable packing")
        if self.pack is not False and self.pack_row_tokens is not None and self.pack_row_tokens < self.max_length:
            raise ValueError(
                f"data.pack_row_tokens={self.pack_row_tokens} < data.max_length={self.max_length}: a row could not fit; "
                "raise pack_row_tokens or lower max_length"
            )
        return self


# ---------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    seed: int = Field(42, description="Seed for data order, initialisation of new weights and dropout.")
    micro_batch_size: int = Field(8, gt=0, description="Rows per forward pass on one device.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    num_epochs: float | None = Field(None, gt=0, description="Passes over the training rows; 1 if neither this nor max_steps is set.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; with num_epochs too, training stops at whichever comes first.")
    lr: float | Literal["auto"] = Field("auto", description="Peak learning rate; auto = 2e-4 for LoRA/QLoRA, 2e-5 for full.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup (to 0 for cosine/linear).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warmup as a fraction of total steps (ignored if warmup_steps is set).")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup optimizer steps.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"] = Field(
        "adamw", description="AdamW (torch), or bitsandbytes 8-bit / paged variants (paged ones need CUDA)."
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not applied to biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, description="Clip the global gradient norm to this value (None = no clipping).")
    log_every_steps: int = Field(1, gt=0, description="Write a metrics.jsonl line every N optimizer steps.")
    sample_every_steps: int | None = Field(
        None,
        gt=0,
        description="Answer the sample prompts at step 0 (base model, fresh runs), every N optimizer steps and at the "
        "last step, into samples.jsonl (main process; the training random stream is left untouched).",
    )
    sample_prompts: list[str] = Field(default_factory=list, description="Fixed user prompts answered every sample_every_steps.")
    sample_prompts_file: str | None = Field(
        None,
        description="More sample prompts: a .txt file (one prompt per line, blank lines skipped), or a question file "
        "(.yaml / .jsonl: each item's question / paraphrases).",
    )
    sample_generation: SampleGenerationConfig = Field(
        default_factory=SampleGenerationConfig, description="How samples are generated (greedy, 64 new tokens by default)."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers (through accelerate) that receive every metrics.jsonl record and the "
        "samples; each needs its extra: pip install 'finetrack[tensorboard]' (or [wandb], [mlflow]).",
    )
    report_project: str = Field(
        "finetrack",
        min_length=1,
        description="Tracker project: the W&B project, the MLflow experiment, the folder under "
        "RUN_DIR/tensorboard/. The tracker run is named after output.dir.",
    )

    @model_validator(mode="after")
    def _checks(self) -> TrainConfig:
        if self.warmup_steps is not None and "warmup_ratio" in self.model_fields_set:
            raise ValueError("train.warmup_ratio has no effect when train.warmup_steps is set: remove one of them")
        sample_settings = [
            f"train.{k}" for k in ("sample_prompts", "sample_prompts_file", "sample_generation") if k in self.model_fields_set
        ]
        if self.sample_every_steps is None and sample_settings:
            raise ValueError(
                f"{', '.join(sample_settings)} has no effect without train.sample_every_steps: set it (e.g. train.sample_every_steps=50)"
            )
        if self.sample_every_steps is not None and not self.sample_prompts and self.sample_prompts_file is None:
            raise ValueError("train.sample_every_steps needs prompts: set train.sample_prompts (a list) or train.sample_prompts_file")
        if any(not p.strip() for p in self.sample_prompts):
            raise ValueError("train.sample_prompts: a prompt is empty; remove it")
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"train.report_to={self.report_to}: a tracker is listed twice")
        if "report_project" in self.model_fields_set and not self.report_to:
            raise ValueError(
                "train.report_project has no effect without train.report_to: set train.report_to=[tensorboard] (or wandb, mlflow)"
            )
        return self


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, gt=0, description="Save a checkpoint every N optimizer steps (the last step is always saved).")
    per_epoch: int | None = Field(None, gt=0, description="N checkpoints evenly spaced inside every epoch.")
    first_epoch: int | None = Field(None, gt=0, description="N checkpoints evenly spaced inside epoch 1 only (dense early tracking).")
    steps: list[int] = Field(default_factory=list, description="Explicit optimizer steps to save at, e.g. [10, 50, 200].")
    log_spaced: int | None = Field(None, gt=0, description="N checkpoints spaced evenly in log(step) over the run (dense early).")
    keep_last: int | None = Field(
        None, gt=0, description="Keep only the newest N rolling checkpoints (every_steps, signal); None = keep all."
    )
    keep_schedule: bool = Field(
        True, description="Keep checkpoints from first_epoch/per_epoch/steps/log_spaced whatever keep_last says (they are the science)."
    )
    keep_optimizer_state: Literal["all", "last"] = Field(
        "all", description="Resume state (optimizer, RNG) in every checkpoint, or only in the newest (older ones keep their weights)."
    )
    remote: str | None = Field(
        None,
        description="fsspec URL (s3://bucket/run, gs://, hf://, file://) each checkpoint is uploaded to in the background; "
        "a re-run with no usable local checkpoint resumes from there. Credentials come from each backend's usual env/config.",
    )

    @model_validator(mode="after")
    def _checks(self) -> CheckpointConfig:
        if any(s <= 0 for s in self.steps):
            raise ValueError(f"checkpoint.steps={self.steps}: steps are counted from 1")
        if "keep_schedule" in self.model_fields_set and self.keep_last is None:
            raise ValueError("checkpoint.keep_schedule has no effect without checkpoint.keep_last (nothing is deleted)")
        return self


class EvalConfig(Section):
    loss_every_steps: int | None = Field(
        None, gt=0, description="Held-out loss every N optimizer steps (needs data.eval_split); always computed at the end."
    )
    micro_batch_size: int | None = Field(None, gt=0, description="Rows per eval forward; default train.micro_batch_size.")
    suites: list[SuiteConfig] = Field(
        default_factory=list, description="What `finetrack eval` measures at step 0 (the base model) and every checkpoint (see the README)."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> EvalConfig:
        names = [s.name for s in self.suites]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.suites: names must be unique (got {names})")
        return self


class OutputConfig(Section):
    dir: str = Field("runs/latest", description="Run directory (see the run-directory contract in the README).")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        if self.eval.loss_every_steps is not None and self.data.eval_split is None:
            raise ValueError("eval.loss_every_steps has no effect without data.eval_split: set data.eval_split=0.05 or a file")
        if self.eval.micro_batch_size is not None and self.data.eval_split is None:
            raise ValueError("eval.micro_batch_size has no effect without data.eval_split")
        return self


# ------------------------------------------------------------------------------- load/overrides
def _all_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model_cls.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_all_keys(ann, path + "."))
    return keys


def _closest(key: str) -> str:
    keys = _all_keys(Config)
    leaf_matches = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    guess = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    best = leaf_matches[0] if leaf_matches else (guess[0] if guess else None)
    return f" (did you mean '{best}'?)" if best else ""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "literal[", "list[")))
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'{_closest(loc)}")
        else:
            where = f"'{loc}': " if loc else ""
            msg = e["msg"].removeprefix("Value error, ")
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            lines.append(f"  {where}{msg}{got}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 1e-4). The value is parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not section.key=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{text}': the key must name a section and a field, e.g. train.lr=1e-4{_closest(key)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e.problem})") from None
    # YAML reads 1e-4 as a string (YAML 1.1 wants a dot); a user means a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return parts, value


def _set_path(tree: dict, parts: list[str], value: Any, source: str) -> None:
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {source}: '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate.

    A `resolved:` block (present in a run's config.resolved.yaml) is ignored: it is recomputed.
    """
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, train, ...)")
        tree.pop("resolved", None)
        source = str(path)
    tree = fix_yaml_floats(tree)
    for text in overrides:
        parts, value = parse_override(text)
        _set_path(tree, parts, value, f"'{text}'")
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def help_config() -> str:
    """Every config key with type, default and description (the `--help-config` text)."""
    lines: list[str] = []

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, info in cls.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                lines.append(f"\n[{prefix}{name}]" + (f"  {info.description}" if info.description else ""))
                walk(ann, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            lines.append(f"  {prefix}{name}: {type_name} = {default!r}\n      {info.description or ''}")

    walk(Config, "")
    return "\n".join(lines).lstrip("\n")


# -------------------------------------------------------------------------------------- resolve
@dataclass
class Resolved:
    """Values decided automatically, each with the reason it was chosen."""

    values: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: Any, reason: str) -> None:
        self.values[key] = value
        self.reasons[key] = reason

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


@dataclass(frozen=True)
class Environment:
    """What resolve() needs to know about the machine and the data."""

    device_type: str  # "cpu" | "cuda" | "mps"
    bf16_supported: bool
    num_processes: int
    num_train_rows: int


def resolve_model(cfg: Config, env: Environment) -> tuple[Config, Resolved]:
    """The 'auto' values of the model and data sections (what loading a model for training or eval needs)."""
    res = Resolved()
    cfg = cfg.model_copy(deep=True)
    m, d = cfg.model, cfg.data
    if m.dtype == "auto":
        if env.device_type == "cuda" and env.bf16_supported:
            res.set("model.dtype", "bfloat16", "auto: the GPU supports bfloat16")
        else:
            why = (
                "CPU training: fp32 is faster than bf16 on most CPUs" if env.device_type == "cpu" else f"{env.device_type} without bfloat16"
            )
            res.set("model.dtype", "float32", f"auto: {why}")
        m.dtype = res["model.dtype"]
    if m.method == "qlora" and m.qlora.compute_dtype == "auto":
        res.set("model.qlora.compute_dtype", m.dtype, "auto: same as model.dtype")
        m.qlora.compute_dtype = m.dtype
    if m.attn_implementation == "auto":
        res.set("model.attn_implementation", "sdpa", "auto: PyTorch scaled-dot-product attention, supports padding-free packing")
        m.attn_implementation = "sdpa"
    if d.pack == "auto":
        # transformers builds a block-diagonal mask from restarting position_ids for these kernels;
        # train.run also checks it numerically on the loaded model before step 1.
        ok = m.attn_implementation in ("sdpa", "eager", "flash_attention_2")
        res.set(
            "data.pack",
            ok,
            f"auto: attn_implementation={m.attn_implementation} " + ("supports" if ok else "does not support") + " padding-free packing",
        )
        d.pack = ok
    return cfg, res


def resolve(cfg: Config, env: Environment) -> tuple[Config, Resolved]:
    """Fill every 'auto' value and derive step counts. Returns the concrete config and the reasons."""
    cfg, res = resolve_model(cfg, env)
    m, t = cfg.model, cfg.train
    if t.optimizer.startswith("paged") and env.device_type != "cuda":
        raise ConfigError(
            f"train.optimizer={t.optimizer} pages optimizer state to CPU memory and needs a CUDA GPU; use adamw or adamw_8bit"
        )
    if t.lr == "auto":
        lr = 2e-5 if m.method == "full" else 2e-4
        res.set("train.lr", lr, f"auto: usual starting point for method={m.method}")
        t.lr = lr

    global_batch_rows = t.micro_batch_size * t.grad_accum_steps * env.num_processes
    res.set(
        "global_batch_size",
        global_batch_rows,
        f"micro_batch_size {t.micro_batch_size} x grad_accum_steps {t.grad_accum_steps} x {env.num_processes} process(es)",
    )
    if env.num_train_rows < global_batch_rows:
        raise ConfigError(
            f"only {env.num_train_rows} training rows but one optimizer step needs {global_batch_rows}: "
            "lower train.micro_batch_size or train.grad_accum_steps, or add data"
        )
    # Incomplete trailing batches are dropped so every optimizer step has the same number of rows.
    steps_per_epoch = env.num_train_rows // global_batch_rows
    res.set(
        "steps_per_epoch",
        steps_per_epoch,
        f"{env.num_train_rows} rows // {global_batch_rows} rows per step (the last {env.num_train_rows - steps_per_epoch * global_batch_rows} rows of each shuffled epoch are left out)",
    )
    epoch_steps = None if t.num_epochs is None else max(1, math.ceil(t.num_epochs * steps_per_epoch))
    if t.max_steps is not None and (epoch_steps is None or t.max_steps <= epoch_steps):
        total, why = t.max_steps, "train.max_steps" + (f" (before num_epochs {t.num_epochs} = {epoch_steps} steps)" if epoch_steps else "")
    elif epoch_steps is not None:
        total = epoch_steps
        why = f"ceil(num_epochs {t.num_epochs} x steps_per_epoch {steps_per_epoch})" + (
            f" (before max_steps {t.max_steps})" if t.max_steps else ""
        )
    else:
        total, why = steps_per_epoch, "one epoch (neither train.num_epochs nor train.max_steps is set)"
    res.set("total_steps", total, why)
    ck = cfg.checkpoint
    try:
        plan = checkpoint_steps(
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            every_steps=ck.every_steps,
            per_epoch=ck.per_epoch,
            first_epoch=ck.first_epoch,
            steps=ck.steps,
            log_spaced_n=ck.log_spaced,
        )
    except ScheduleError as e:
        raise ConfigError(str(e)) from None
    res.set("checkpoint_steps", {s: "+".join(rules) for s, rules in plan.items()}, describe(plan))
    if t.warmup_steps is None:
        warm = int(round(t.warmup_ratio * total))
        res.set("warmup_steps", warm, f"round(warmup_ratio {t.warmup_ratio} x total_steps {total})")
    else:
        res.set("warmup_steps", t.warmup_steps, "train.warmup_steps")
    return cfg, res


def resolved_yaml(cfg: Config, res: Resolved) -> str:
    """The text of config.resolved.yaml: the concrete config plus derived values with their reasons."""
    tree = effective_dump(cfg)
    tree["resolved"] = {k: {"value": v, "reason": res.reasons[k]} for k, v in res.values.items()}
    return yaml.safe_dump(tree, sort_keys=False, width=120)


def effective_dump(cfg: Config) -> dict:
    """The config as plain data, without settings that have no effect on the chosen path (so the dump
    loads again without tripping the no-effect checks)."""
    tree = cfg.model_dump(mode="json")
    if cfg.model.method == "full":
        del tree["model"]["lora"]
    if cfg.model.method != "qlora":
        del tree["model"]["qlora"]
    if cfg.data.pack is False:
        del tree["data"]["pack_row_tokens"]
    if cfg.train.warmup_steps is not None:
        del tree["train"]["warmup_ratio"]
    if cfg.checkpoint.keep_last is None:
        del tree["checkpoint"]["keep_schedule"]
    if cfg.train.sample_every_steps is None:
        for key in ("sample_prompts", "sample_prompts_file", "sample_generation"):
            del tree["train"][key]
    if not cfg.train.report_to:
        del tree["train"]["report_project"]
    return tree


def config_hash(cfg: Config) -> str:
    """A short stable hash of the concrete config (for checkpoint meta and run identity)."""
    blob = json.dumps(effective_dump(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
