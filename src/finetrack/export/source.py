"""What an export starts from: a checkpoint (of a run directory at a step, or a folder), a plain adapter folder or a
model folder, located and checked as `model.init_from` locates a warm start, and loaded as the trained model it is
(the base model with the adapter applied, 4-bit for QLoRA as it was trained; a regression head when it has one)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint, rundir
from ..config import Config, ConfigError, ModelConfig
from ..heads import HEAD_CONFIG
from ..warm_start import WarmStart, locate

log = logging.getLogger("finetrack")
FIELD = "SOURCE"


@dataclass(frozen=True)
class Source:
    """A located export source: the folder, which checkpoint it is, and how its model was trained."""

    found: WarmStart  # spec, folder, step, manifest sha256 (a plain folder: step and manifest None)
    model: ModelConfig  # how to build its base (a checkpoint: its run's model section)
    adapter: bool  # a LoRA / DoRA / QLoRA adapter over `model` (else full weights)
    head: bool  # a regression head beside the weights (head.json + head.safetensors)
    prompts: tuple[str, ...] = ()  # the run's sample prompts (train.sample_prompts): verification probes them

    @property
    def folder(self) -> Path:
        return self.found.folder

    def record(self) -> dict:
        """What EXPORT.json says about the source."""
        return {**self.found.record(), "method": self.model.method if self.adapter else "full", "head": self.head}


def find(spec: str, step: str | None, scratch: Path) -> Source:
    """The checkpoint SOURCE names: a run directory (its `step`: N, best or latest; default latest), a checkpoint folder
    or URL (downloaded into `scratch`), an adapter folder or a model folder. ConfigError naming SOURCE otherwise."""
    if step is not None:
        if not (Path(spec) / rundir.CHECKPOINTS_DIR).is_dir():
            raise ConfigError(f"--step {step}: {spec} is not a run directory (only a run directory has steps to choose from)")
        spec = f"{spec}:{step}"
    found = locate(spec, scratch, FIELD)
    folder = found.folder
    adapter = (folder / "adapter_config.json").is_file()
    if not adapter and not (folder / "config.json").is_file():
        raise ConfigError(f"{FIELD}={spec}: {folder} holds neither an adapter (adapter_config.json) nor a model (config.json)")
    return Source(found, _model_config(folder, adapter), adapter, (folder / HEAD_CONFIG).is_file(), _sample_prompts(folder))


def _sample_prompts(folder: Path) -> tuple[str, ...]:
    """The run's train.sample_prompts (at most 4), from the checkpoint's meta.json; () for a plain folder."""
    if not (folder / "meta.json").is_file():
        return ()
    prompts = (checkpoint.read_meta(folder).get("config") or {}).get("train", {}).get("sample_prompts") or []
    return tuple(p for p in prompts if isinstance(p, str) and p.strip())[:4]


def _model_config(folder: Path, adapter: bool) -> ModelConfig:
    """How the checkpoint's model was built: its run's model section (meta.json), or for a plain folder the base its
    adapter_config.json names (LoRA) or the folder itself (a full model)."""
    meta = folder / "meta.json"
    if meta.is_file():
        tree = checkpoint.read_meta(folder).get("config") or {}
        try:
            return Config.model_validate({"model": tree.get("model", {})}).model
        except ValueError as e:
            raise ConfigError(f"{meta}: its model section does not load ({str(e).splitlines()[0]})") from None
    if adapter:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{folder}/adapter_config.json names no base model (base_model_name_or_path)")
        return ModelConfig(name=base, method="lora", dtype="float32")
    return ModelConfig(name=str(folder), method="full", dtype="float32")


def load_trained(source: Source, device: torch.device) -> tuple[nn.Module, object]:
    """(the model as it was trained and evaluated, its tokenizer): base + adapter (PEFT, not merged), or the full
    model; a heads.WithHead around it when the checkpoint has a regression head. In eval mode."""
    from ..models import load_base_model
    from ..models import load_tokenizer as base_tokenizer

    cfg = _concrete(source.model, device)
    if source.adapter:
        from peft import PeftModel

        from ..evaluate.adapter_view import adapter_load_errors

        base = load_base_model(cfg, device)
        with adapter_load_errors(source.folder):  # a folder whose adapter_config.json and weights disagree: one error line
            model = PeftModel.from_pretrained(base, source.folder, is_trainable=False)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=_dtype(cfg)).to(device)
    tokenizer = _tokenizer(source.folder) or base_tokenizer(cfg)
    if source.head:
        from ..heads import WithHead, read_head

        head, layer = read_head(source.folder)
        model = WithHead(model, head.to(device), layer)
    return model.eval(), tokenizer


def _tokenizer(folder: Path):
    """The tokenizer saved with the checkpoint (every finetrack checkpoint holds one), else None."""
    if not (folder / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _concrete(cfg: ModelConfig, device: torch.device) -> ModelConfig:
    """`auto` values decided as training decided them on this device (config.resolved.yaml has them for a run)."""
    from ..config_resolve import Environment, resolve_model

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return resolve_model(Config(model=cfg), Environment(device.type, bf16, 1, 0))[0].model


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return getattr(torch, cfg.dtype) if cfg.dtype != "auto" else torch.float32
