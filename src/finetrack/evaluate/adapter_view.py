"""The `adapter` suite: the weight space of a LoRA / QLoRA run, read from the adapter files alone (no forward pass).

Each adapted module's update is delta = scale x B @ A (B: out x r, A: r x in; scale = lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern resolved per module as PEFT does). Per module:

- norm: ||delta||_F; the suite's norm is sqrt(sum over modules of norm^2), the Frobenius norm of the whole update;
- singular values: exact, without forming delta: B = Qb Rb and A^T = Qa Ra (reduced QR), then the SVD of the small
  r x r core scale x Rb Ra^T = Uc S Vc^T gives delta = (Qb Uc) S (Qa Vc)^T, all in float64;
- effective rank: exp(entropy of s / sum(s)) (Roy & Vetterli 2007, "The effective rank: a measure of effective
  dimensionality"); 1 for a rank-1 update, r for r equal singular values; null for an all-zero update;
- rotation: the angle between the top singular component u1 v1^T now and at the previous checkpoint,
  arccos(|<u1, u1'>| x |<v1, v1'>|) in degrees (the cosine of two rank-1 matrices of unit norm, sign-free), in [0, 90].
  When the top two singular values are (nearly) equal, u1 is not well defined and the angle says little.

DoRA: only the low-rank part B @ A is read; the learned magnitude vector (`lora_magnitude_vector`) rescales the
merged weight's columns and is not part of these numbers. A `lora_B.bias` (lora_bias=True) is left out too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .spec import AdapterSuite, EvalError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."  # what PEFT's save_pretrained puts before the base model's own module names
# PEFT saves without the adapter name: `<module>.lora_A.weight` (Linear, Conv), `<module>.lora_embedding_A` (Embedding)
_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<side>[AB])(?:\.weight)?$")
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")  # the first numeric part of a module name: its decoder layer


@dataclass
class ModuleUpdate:
    """One module's update scale x B @ A, as its singular values (descending, float64) and top singular vectors (None
    when the update is zero: it has no top direction)."""

    module: str
    layer: int | None
    shape: tuple[int, int]  # (out, in) of the update
    singular_values: torch.Tensor  # (k,) k = min(r, out, in)
    u1: torch.Tensor | None  # (out,) unit
    v1: torch.Tensor | None  # (in,) unit

    @property
    def norm(self) -> float:
        return float(torch.linalg.vector_norm(self.singular_values))


def low_rank_svd(b: torch.Tensor, a: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Singular values (descending) and top left / right singular vectors of scale x b @ a, never forming the product.

    b: (out, r), a: (r, in); float64 inside (the singular values of a rank-1 update beyond the first are ~1e-16 of it:
    the effective rank is continuous in them, so they move it by about that much)."""
    b, a = b.to(torch.float64), a.to(torch.float64)
    q_b, r_b = torch.linalg.qr(b)  # (out, k1), (k1, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (in, k2), (k2, r)
    u_core, s, vh_core = torch.linalg.svd(scale * (r_b @ r_a.T))  # (k1, k2) core
    if s.numel() == 0 or float(s[0]) == 0.0:
        return s, None, None  # a zero update: no top direction
    return s, q_b @ u_core[:, 0], q_a @ vh_core[0]


def effective_rank(singular_values: torch.Tensor) -> float | None:
    """exp(entropy of s / sum(s)) (Roy & Vetterli 2007); None for an all-zero update."""
    total = float(singular_values.sum())
    if total == 0.0:
        return None
    p = singular_values[singular_values > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def rotation_deg(now: ModuleUpdate, before: ModuleUpdate | None) -> float | None:
    """Angle in degrees between the top singular components of two updates of one module; None when there is no
    previous update or either is zero."""
    if before is None or now.u1 is None or before.u1 is None:
        return None
    assert now.v1 is not None and before.v1 is not None  # set together with u1
    # arccos(|<u,u'>| x |<v,v'>|), computed from 1 - cosine: arccos near 1 turns float64 rounding into ~1e-6 degrees
    # (the same adapter twice would not read 0). For unit x, y: 1 - |<x,y>| = ||x - sign(<x,y>) y||^2 / 2, exact near 0.
    gap_u, gap_v = _one_minus_abs_cosine(now.u1, before.u1), _one_minus_abs_cosine(now.v1, before.v1)
    one_minus_cosine = gap_u + (1.0 - gap_u) * gap_v  # 1 - c_u c_v with c = 1 - gap
    # cos t = 1 - 2 sin^2(t / 2), so t = 2 asin(sqrt((1 - cos t) / 2)): well conditioned on [0, 90] degrees
    return math.degrees(2.0 * math.asin(math.sqrt(min(0.5, max(0.0, one_minus_cosine / 2.0)))))


def _one_minus_abs_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - |<x, y>| for unit vectors x, y, without cancellation when they are nearly parallel."""
    sign = 1.0 if float(x @ y) >= 0 else -1.0
    return float(torch.linalg.vector_norm(x - sign * y)) ** 2 / 2.0


def _pattern_value(patterns: dict, module: str, default):
    """rank_pattern / alpha_pattern as PEFT resolves them (peft.utils.other.get_pattern_key): the first key that
    matches the end of the module name at a dot boundary, as a regular expression."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: cannot read the adapter config ({e}); re-save the adapter with PEFT's save_pretrained") from None
    if not isinstance(config, dict) or "lora_alpha" not in config or "r" not in config:
        raise EvalError(f"{path}: no lora_alpha / r: not a LoRA adapter config; the adapter suite reads LoRA / QLoRA runs only")
    if config.get("peft_type", "LORA") != "LORA":
        raise EvalError(f"{path}: peft_type {config['peft_type']}: the adapter suite reads LoRA adapters only; remove the suite")
    if config.get("target_parameters"):
        raise EvalError(f"{path}: target_parameters (LoRA on raw parameters) is not read by the adapter suite; remove the suite")
    return config


def _missing(folder: Path) -> EvalError:
    """The error for a folder without adapter files, pointing at a subfolder that has them (PEFT saves an adapter not
    named 'default' into a subfolder of that name)."""
    nested = sorted(p.parent.name for p in folder.glob(f"*/{WEIGHTS}")) if folder.is_dir() else []
    hint = f"; the adapter is in subfolder {nested[0]}: point at {folder / nested[0]}" if nested else ""
    if (folder / "adapter_model.bin").is_file():
        hint = "; it has adapter_model.bin (pickle): re-save it with safe_serialization=True"
    return EvalError(
        f"{folder}: no {WEIGHTS} and {CONFIG} (not a LoRA adapter or LoRA checkpoint folder){hint}; "
        "the adapter suite reads LoRA / QLoRA runs (model.method lora or qlora)"
    )


def read_adapter(folder: Path) -> dict[str, ModuleUpdate]:
    """Every LoRA module of a PEFT adapter folder (a finetrack checkpoint of a LoRA / QLoRA run is one), by module name
    as the base model names it ('model.layers.0.self_attn.q_proj'), by layer (modules outside the layers, as lm_head,
    last), then by name."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise _missing(folder)
    config = _read_config(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            for name in list(f.keys()):  # a safe_open handle is not iterable
                m = _TENSOR.match(name)
                if m:
                    pairs.setdefault(m["module"].removeprefix(_PREFIX), {})[m["side"]] = f.get_tensor(name)
    except (OSError, SafetensorError) as e:
        raise EvalError(f"{folder / WEIGHTS}: unreadable ({e}); the checkpoint is damaged: re-save or delete it") from None
    updates = {}
    for module in sorted(pairs, key=_order):
        side = pairs[module]
        if set(side) != {"A", "B"}:
            raise EvalError(f"{folder / WEIGHTS}: module {module} has lora_{''.join(side)} only; the adapter is incomplete: re-save it")
        # Linear: A (r, in), B (out, r); Embedding: A (r, vocab), B (dim, r); Conv: A (r, in, k, k), B (out, r, 1, 1)
        a = side["A"].reshape(side["A"].shape[0], -1)
        b = side["B"].reshape(side["B"].shape[0], -1)
        if not (a.isfinite().all() and b.isfinite().all()):
            raise EvalError(f"{folder / WEIGHTS}: module {module} has NaN or infinite weights (the run diverged); evaluate another step")
        rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if a.shape[0] != rank or b.shape[1] != rank:
            raise EvalError(
                f"{folder}: module {module} has rank {a.shape[0]} in {WEIGHTS} but {rank} by {CONFIG} (r / rank_pattern); "
                "the two files do not belong together: re-save the adapter"
            )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        s, u1, v1 = low_rank_svd(b, a, scale)
        updates[module] = ModuleUpdate(module, _layer(module), (b.shape[0], a.shape[1]), s, u1, v1)
    return updates


def _layer(module: str) -> int | None:
    """The decoder layer of a module: the first number in its name (None for lm_head, embed_tokens)."""
    found = _LAYER.search(module)
    return int(found[1]) if found else None


def _order(module: str) -> tuple:
    """Sort key: by layer (layer-less modules last), then by name."""
    layer = _layer(module)
    return (layer is None, layer or 0, module)


def _where(folder: Path) -> str:
    """A checkpoint folder as step files name it: relative to its run (checkpoints/step-N), else the path itself."""
    return f"{folder.parent.name}/{folder.name}" if folder.parent.name == "checkpoints" else str(folder)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run(suite: AdapterSuite, folder: Path | None, previous: Path | None) -> dict:
    """The adapter suite's result at one step: `folder` is the checkpoint (None: step 0, the base model, whose update is
    zero), `previous` the run's checkpoint before it (None: none; rotations are then null). Modules missing from the
    previous checkpoint get rotation null; a module whose shape changed between the two is an EvalError."""
    now = read_adapter(folder) if folder is not None else {}
    before = read_adapter(previous) if previous is not None and folder is not None else {}
    for name, update in now.items():
        if name in before and before[name].shape != update.shape:
            raise EvalError(
                f"{folder} and {previous}: module {name} is {update.shape[0]} x {update.shape[1]} in one and "
                f"{before[name].shape[0]} x {before[name].shape[1]} in the other; they are not checkpoints of one run"
            )
    updates = list(now.values())
    norms = [u.norm for u in updates]
    ranks = [effective_rank(u.singular_values) for u in updates]
    rotations = [rotation_deg(u, before.get(u.module)) for u in updates]
    measured_ranks = [r for r in ranks if r is not None]
    measured_rotations = [r for r in rotations if r is not None]
    keep = suite.num_singular_values
    return {
        "metrics": {
            "norm": math.sqrt(sum(n * n for n in norms)),
            "max_norm": max(norms, default=0.0),
            "effective_rank": _mean(measured_ranks),
            "rotation_deg": _mean(measured_rotations),
            "max_rotation_deg": max(measured_rotations, default=None),
        },
        "counts": {"modules": len(updates)},
        "modules": {
            "module": [u.module for u in updates],
            "layer": [u.layer for u in updates],
            "norm": norms,
            "effective_rank": ranks,
            "singular_values": [u.singular_values[:keep].tolist() for u in updates],
            "rotation_deg": rotations,
        },
        "previous": _where(previous) if previous is not None and folder is not None else None,
    }


# PyTorch's words (Module.load_state_dict) for a tensor of the file that does not fit the model PEFT built from the config
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<name>\S+): copying a param with shape torch\.Size\(\[(?P<file>[^\]]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[(?P<model>[^\]]*)\]\)"
)


@contextmanager
def adapter_load_errors(folder: Path) -> Iterator[None]:
    """Around a PEFT load of `folder`: PyTorch's "size mismatch" list (its files disagree) as one CheckpointError
    naming the folder (load_error); anything else as it is."""
    try:
        yield
    except RuntimeError as e:
        error = load_error(folder, e)
        if error is None:
            raise
        raise error from None


def load_error(folder: Path, error: BaseException) -> Exception | None:
    """The user error for an adapter folder PEFT could not load because its files disagree (adapter_config.json and
    adapter_model.safetensors of different runs, or an adapter of another base model), naming the folder and the first
    tensor that does not fit; None when `error` is something else (then it is re-raised as it is)."""
    from ..rundir import CheckpointError

    found = _SIZE_MISMATCH.search(str(error)) if isinstance(error, RuntimeError) else None
    if found is None:
        return None
    count = len(_SIZE_MISMATCH.findall(str(error)))
    name = found["name"].removeprefix(_PREFIX).replace(".default.", ".")  # as the file names it, without PEFT's adapter name
    in_file, in_model = (tuple(int(x) for x in found[k].split(",") if x.strip()) for k in ("file", "model"))
    more = f" and {count - 1} more tensor(s)" if count > 1 else ""
    what = f"size mismatch for {name}{more}: {list(in_file)} in the file, {list(in_model)} by the config"
    # a LoRA factor's rank is its first axis (lora_A: r x in) or its second (lora_B: out x r); another side that
    # differs is a base-model dimension: the adapter was trained on another base model
    rank_axis = 1 if re.search(r"\.lora_(?:embedding_)?B", name) else 0
    other_sides_equal = len(in_file) == len(in_model) and all(a == b for i, (a, b) in enumerate(zip(in_file, in_model)) if i != rank_axis)
    if other_sides_equal:
        return CheckpointError(
            f"{folder}: {CONFIG} does not match {WEIGHTS} ({what}): the folder mixes files of different runs; "
            "restore the checkpoint's own files (or evaluate / export another step)"
        )
    return CheckpointError(
        f"{folder}: {WEIGHTS} does not fit the base model ({what}): the adapter was trained on another base model; "
        f"set the base it was trained on (base_model_name_or_path in {CONFIG}, or the run's model.name)"
    )
