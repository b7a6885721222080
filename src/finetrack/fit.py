"""When the predicted peak does not fit: config changes that lower it (memory.py's model), ranked, each with the
overrides to paste and its trade-off; a greedy combination when no single change is enough."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Config
from .memory import Architecture, Workload, breakdown, peak_bytes


@dataclass(frozen=True)
class Change:
    """A config change that lowers the peak: what it is, the overrides to paste, and the new prediction."""

    description: str
    overrides: list[str]  # `section.key=value`, as `finetrack train -o` takes them
    peak_bytes: int
    fits: bool


def _override(path: str, value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else "[" + ",".join(value) + "]" if isinstance(value, list) else value
    return f"{path}={text}"


def _apply(cfg: Config, changes: dict[str, Any]) -> Config:
    """A copy of cfg with `section.key` values replaced (each section validates its new value)."""
    new = cfg.model_copy(deep=True)
    for path, value in changes.items():
        *parents, key = path.split(".")
        node = new
        for name in parents:
            node = getattr(node, name)
        setattr(node, key, value)
    return new


def _candidates(cfg: Config) -> list[tuple[str, dict[str, Any]]]:
    """Single changes that lower memory, each with its trade-off, for the config as it is."""
    m, t, d = cfg.model, cfg.train, cfg.data
    out: list[tuple[str, dict[str, Any]]] = []
    probe = cfg.objective.kind == "regression" and cfg.objective.regression.freeze_backbone  # keeps no activations to recompute
    if not m.gradient_checkpointing and not probe:
        out.append(
            ("gradient checkpointing (recomputes activations in backward: ~30% more compute)", {"model.gradient_checkpointing": True})
        )
    for mbs in sorted({t.micro_batch_size // 2, 1}, reverse=True):
        if 0 < mbs < t.micro_batch_size and t.micro_batch_size % mbs == 0:
            accum = t.grad_accum_steps * t.micro_batch_size // mbs
            what = f"micro batch {t.micro_batch_size} -> {mbs} with grad_accum_steps {t.grad_accum_steps} -> {accum} (same rows per step, slower)"
            out.append((what, {"train.micro_batch_size": mbs, "train.grad_accum_steps": accum}))
    if d.max_length >= 256:
        what = (
            f"shorter rows: data.max_length {d.max_length} -> {d.max_length // 2} (longer rows truncated or dropped, per data.on_overflow)"
        )
        out.append((what, {"data.max_length": d.max_length // 2}))
    if m.method == "full":
        out.append(("LoRA adapters instead of full fine-tuning", {"model.method": "lora"}))
    if m.method != "qlora":
        out.append(
            (
                "QLoRA: 4-bit base weights + LoRA adapters" + (" instead of full fine-tuning" if m.method == "full" else ""),
                {"model.method": "qlora"},
            )
        )
    if m.method != "full" and (m.lora.target_modules == "all-linear" or not set(m.lora.target_modules) <= {"q_proj", "v_proj"}):
        out.append(("LoRA on q_proj and v_proj only (fewer adapted modules)", {"model.lora.target_modules": ["q_proj", "v_proj"]}))
    if t.optimizer in ("adamw", "paged_adamw"):
        kind = {"adamw": "adamw_8bit", "paged_adamw": "paged_adamw_8bit"}[t.optimizer]
        out.append((f"8-bit optimizer state ({kind}, bitsandbytes)", {"train.optimizer": kind}))
    return out


def ranked_changes(
    cfg: Config,
    arch: Architecture,
    work_for: Callable[[Config], Workload],
    device_type: str,
    device_bytes: int,
    base: Workload | None = None,
) -> list[Change]:
    """Each change that lowers the predicted peak, applied alone, plus the greedy combination of the most effective ones until
    the run fits (when no single change is enough); those that fit first, then by predicted peak. work_for(c): the largest
    micro-batch of a changed config, asked once per (micro_batch_size, max_length); base: cfg's own, when the caller has it."""
    works = {} if base is None else {(cfg.train.micro_batch_size, cfg.data.max_length): base}

    def peak(c: Config) -> int:
        key = (c.train.micro_batch_size, c.data.max_length)
        works[key] = works.get(key) or work_for(c)
        return peak_bytes(breakdown(c, arch, works[key], device_type))

    base = peak(cfg)
    changes = []
    for description, values in _candidates(cfg):
        predicted = peak(_apply(cfg, values))
        if predicted < base:
            changes.append(Change(description, [_override(k, v) for k, v in values.items()], predicted, predicted <= device_bytes))
    if base > device_bytes and not any(c.fits for c in changes):
        current, current_peak, steps, merged = cfg, base, [], {}
        for _ in range(8):  # each round applies the single change that lowers the peak most
            best = min(((peak(_apply(current, v)), d, v) for d, v in _candidates(current)), key=lambda o: o[0], default=None)
            if best is None or best[0] >= current_peak:
                break
            current_peak, description, values = best
            current, steps, merged = _apply(current, values), steps + [description.split(" (")[0]], {**merged, **values}
            if current_peak <= device_bytes:
                break
        if len(steps) > 1:
            changes.append(
                Change(" + ".join(steps), [_override(k, v) for k, v in merged.items()], current_peak, current_peak <= device_bytes)
            )
    return sorted(changes, key=lambda c: (not c.fits, c.peak_bytes))
