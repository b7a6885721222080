"""`model.init_from`: a new run that starts at step 0 from the weights of a checkpoint (a warm start).

Resume continues a run: its step counter, optimizer state, learning-rate schedule and data position. A warm start
begins a new one: the weights (an adapter for LoRA / QLoRA, the full model for a full fine-tune, and a regression
head when the source has one) come from the source, everything else is fresh. Sources:

    RUN_DIR              its newest complete checkpoint (also RUN_DIR:latest)
    RUN_DIR:best         the checkpoint its checkpoints/best.json names
    RUN_DIR:N            its checkpoint of step N
    CHECKPOINT_FOLDER    a checkpoint (MANIFEST.json, verified in full), or a plain adapter / model folder
    URL/checkpoints/step-NNNNNN   a remote checkpoint, downloaded (verified) into RUN_DIR/init_from/

What was used (the spec, the folder, its step and the sha256 of its manifest) is recorded in config.resolved.yaml
(`resolved.init_from`) and in every checkpoint's meta.json (`init_from`), and shown by the report.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from . import checkpoint, rundir
from .checkpoint import CheckpointError
from .config import ConfigError
from .heads import WithHead
from .redact import redact

log = logging.getLogger("finetrack")
_FIELD = "model.init_from"
_SELECTOR = re.compile(r"^(?P<path>.+):(?P<which>best|latest|\d+)$")
ADAPTER_WEIGHTS, FULL_WEIGHTS = "adapter_model.safetensors", ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class WarmStart:
    """The weights a run starts from: where they were found and which checkpoint they are."""

    spec: str  # as the config writes it
    folder: Path  # the local folder read
    step: int | None  # the source checkpoint's step (None: a plain adapter or model folder)
    manifest_sha256: str | None  # of the source checkpoint's MANIFEST.json (None: a plain folder)

    def record(self) -> dict[str, Any]:
        """What config.resolved.yaml and every checkpoint's meta.json say about it (credentials redacted)."""
        return {"from": redact(self.spec), "folder": str(self.folder), "step": self.step, "manifest_sha256": self.manifest_sha256}


def locate(spec: str, run_dir: Path, field: str = _FIELD) -> WarmStart:
    """The folder `spec` names, checked complete; ConfigError naming `field` (model.init_from, or the command's
    argument) and what to do otherwise. A remote checkpoint is downloaded into run_dir/init_from/."""
    if "://" in spec:
        return _remote(spec, run_dir, field)
    match = _SELECTOR.match(spec)
    path, which = (Path(match["path"]), match["which"]) if match and Path(match["path"]).is_dir() else (Path(spec), None)
    if (path / rundir.CHECKPOINTS_DIR).is_dir():
        return _from_run(spec, path, which or "latest", field)
    if which is not None or not path.is_dir():
        raise ConfigError(f"{field}={spec}: no such run directory, checkpoint, adapter or model folder; check the path")
    if (path / rundir.MANIFEST).is_file():
        return _checkpoint(spec, path, field)
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return WarmStart(spec, path.resolve(), None, None)
    raise ConfigError(f"{field}={spec}: {path} holds no checkpoint (MANIFEST.json), adapter (adapter_config.json) or model (config.json)")


def _from_run(spec: str, run_dir: Path, which: str, field: str) -> WarmStart:
    if which == "best":
        try:
            _, folder = rundir.best_checkpoint(run_dir)
        except CheckpointError as e:
            raise ConfigError(f"{field}={spec}: {e}") from None
        return _checkpoint(spec, folder, field)
    if which == "latest":
        found = checkpoint.complete_checkpoints(run_dir)
        if not found:
            raise ConfigError(f"{field}={spec}: {run_dir} has no complete checkpoint")
        return _checkpoint(spec, found[-1].path, field)
    folder = rundir.checkpoint_dir(run_dir, int(which))
    if not folder.is_dir():
        steps = [f.step for f in checkpoint.complete_checkpoints(run_dir, warn=lambda _: None)]
        raise ConfigError(f"{field}={spec}: {run_dir} has no checkpoint of step {which}; its checkpoints: {steps}")
    return _checkpoint(spec, folder, field)


def _checkpoint(spec: str, folder: Path, field: str) -> WarmStart:
    try:
        manifest = checkpoint.verify(folder, full=True)
    except CheckpointError as e:
        raise ConfigError(f"{field}={spec}: {e}") from None
    digest = hashlib.sha256((folder / rundir.MANIFEST).read_bytes()).hexdigest()
    return WarmStart(spec, folder.resolve(), manifest.get("step"), digest)


def _remote(spec: str, run_dir: Path, field: str) -> WarmStart:
    from . import storage

    found = rundir.split_checkpoint_url(spec)
    if found is None:
        raise ConfigError(f"{field}={redact(spec)}: a remote source must end in /checkpoints/step-NNNNNN")
    root, step = found
    try:  # not into this run's checkpoints/: it is not a checkpoint of this run (a resume would continue it)
        folder = storage.pull_checkpoint(root, step, run_dir / "init_from")
    except (CheckpointError, OSError, ValueError) as e:
        raise ConfigError(f"{field}={redact(spec)}: {storage.describe_error(e, spec)}") from None
    return _checkpoint(spec, folder, field)


def check_method(warm: WarmStart, method: str) -> None:
    """The source holds the kind of weights this run trains: an adapter for LoRA / QLoRA, a full model for full."""
    has_adapter = (warm.folder / ADAPTER_WEIGHTS).is_file()
    has_full = any((warm.folder / f).is_file() for f in FULL_WEIGHTS)
    if method in ("lora", "qlora") and not has_adapter:
        raise ConfigError(
            f"{_FIELD}={warm.spec}: {warm.folder} holds no LoRA adapter ({ADAPTER_WEIGHTS}) for model.method={method}; "
            "give a LoRA run's checkpoint, or start a LoRA run on this model with model.name"
        )
    if method == "full" and not has_full:
        raise ConfigError(
            f"{_FIELD}={warm.spec}: {warm.folder} holds no full model (model.safetensors) for model.method=full; "
            "a LoRA adapter warm-starts a LoRA run (model.method=lora)"
        )


def load(model: nn.Module, warm: WarmStart) -> None:
    """The source's weights into the freshly built model (its head too, when both have one; a source without a head
    leaves the new head as initialized). A shape mismatch (another rank, another model) is a ConfigError."""
    from .heads import HEAD_WEIGHTS
    from .models import load_weights

    target = model
    if isinstance(model, WithHead) and not (warm.folder / HEAD_WEIGHTS).is_file():
        log.info("%s: the source has no regression head: the head starts as initialized", _FIELD)
        target = model.lm
    try:
        load_weights(target, warm.folder)
    except (CheckpointError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"{_FIELD}={warm.spec}: its weights do not fit this model ({str(e).splitlines()[0][:300]}); "
            "the source must have the same model and LoRA shape (r, target modules) as this config"
        ) from None
    log.info("warm start: weights from %s (step %s), a new run from step 0", warm.folder, warm.step)
