"""What a run says while it trains: metrics.jsonl lines and the progress bar, from the same figures."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Self

import torch


class Window:
    """Token-weighted averages over the steps since the last log line (time spent in eval and
    checkpoints is not training time and does not count in tokens_per_s)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.loss_sum = self.loss_units = self.targets = self.tokens = 0
        self.grad_norm = 0.0
        self.extra: dict[str, float] = {}
        self.by_source: dict[str, list[float]] = {}  # a mixture: source index -> [loss_sum, loss_units]

    def add(
        self,
        loss_sum: float,
        loss_units: int,
        targets: int,
        tokens: int,
        grad_norm: float,
        extra: dict[str, float],
        seconds: float,
        by_source: dict[int, tuple[float, int]] | None = None,
    ) -> None:
        """One step: its loss as a sum over `loss_units` (target tokens for next-token loss: a token-weighted average),
        and each source's the same way (a mixture)."""
        for c, (source_sum, source_units) in (by_source or {}).items():
            sums = self.by_source.setdefault(str(c), [0.0, 0])
            sums[0] += source_sum
            sums[1] += source_units
        self.seconds += seconds
        self.loss_sum += loss_sum
        self.loss_units += loss_units
        self.targets += targets
        self.tokens += tokens
        self.grad_norm = grad_norm
        self.extra = extra  # the objective's own metrics, from the latest step

    def state(self) -> dict:
        """Plain data for a checkpoint: a resume mid-window logs the same averages as an uninterrupted run.
        `loss_units` is written only where it is not `targets` (objectives other than next-token loss), so a
        next-token run's trainer_state.json keeps the layout of schema /1."""
        state = dict(vars(self))
        if state["loss_units"] == state["targets"]:
            del state["loss_units"]
        if not state["by_source"]:  # one source: the layout of schema /1
            del state["by_source"]
        return state

    def restore(self, state: dict) -> None:
        vars(self).update(state)
        if "loss_units" not in state:  # written before objectives had units: the loss was per target token
            self.loss_units = self.targets

    def flush(self, source_names: tuple[str, ...] = ()) -> dict:
        """The window's averages (each source's loss as `source/<name>.loss`), then a new window."""
        by_source = {f"source/{source_names[int(c)]}.loss": s / u for c, (s, u) in sorted(self.by_source.items()) if u and source_names}
        out = {
            "loss": self.loss_sum / max(1, self.loss_units),
            "grad_norm": self.grad_norm,
            "target_tokens": self.targets,
            "tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 1),
            **self.extra,
            **by_source,
        }
        self.__init__()
        return out


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated, else the process's peak resident set size."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


class MetricsLog:
    """Appends records to metrics.jsonl and mirrors the headline figures on a tqdm bar (main process only)."""

    SHOWN = ("epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_mib")

    def __init__(self, path: Path, total_steps: int, done_steps: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.file = open(path, "a") if enabled else None
        self.watched: list[str] = []  # validation metrics kept on the bar between validations (early stopping, best)
        self.latest: dict[str, float] = {}
        self.bar = tqdm(total=total_steps, initial=done_steps, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if self.file:
            record = {**record, "time": round(time.time(), 1)}  # wall clock: the report's run duration
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            self.latest.update({k: record[k] for k in self.watched if record.get(k) is not None})
            shown = {k: _short(record[k]) for k in self.SHOWN if k in record}
            self.bar.set_postfix({**shown, **{k.removeprefix("val/"): _short(v) for k, v in self.latest.items()}})

    def say(self, text: str) -> None:
        """A line above the bar (checkpoints, uploads) without breaking it."""
        if self.file:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also when the run stops with an error: the bar ends its line, so the error line starts its own


def _short(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)
