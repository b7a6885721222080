"""What a checkpoint stores about a run's progress besides the optimizer and the RNG, as one typed object.

Serialized to trainer_state.json (beside `format`, `rng` and `optimizer`, which checkpoint.py writes) with the
keys and layout of schema `finetrack-trainer-state/1`: checkpoints written before this type existed resume
unchanged (tests/data/checkpoint_v1 is one, kept from that code). Change the layout only with a new schema
version in checkpoint.STATE_FORMAT, and keep reading the old one here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .metrics import Window


@dataclass(frozen=True)
class DataPosition:
    """Where a step's rows come from: batches.step_rows(num_rows, rows_per_step, seed, step - 1, shuffle), or for a
    mixture (data.sources) mixture.Mixture.step(rows_per_step, seed, step, shuffle)."""

    seed: int
    shuffle: bool
    num_rows: int
    rows_per_step: int  # over all processes
    mixture: Any = None  # mixture.Mixture (written as its names, weights and sizes; left out with one source)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "mixture"}
        if self.mixture is not None:
            out["mixture"] = {"names": list(self.mixture.names), "weights": list(self.mixture.weights), "sizes": list(self.mixture.sizes)}
        return out


@dataclass(frozen=True)
class LrSchedule:
    """The inputs of optim.lr_at, recorded so a checkpoint says which schedule its learning rate followed."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    kind: str


@dataclass
class Watch:
    """A validation metric followed over a run (early stopping, the best checkpoint): part of the train state, so a run
    resumed from any checkpoint decides exactly as the uninterrupted run did."""

    metric: str
    mode: str  # "min" | "max": which way is better
    min_delta: float = 0.0  # a change smaller than this is no improvement
    best_value: float | None = None
    best_step: int | None = None
    num_bad: int = 0  # validations in a row without improvement
    history: list[tuple[int, float | None]] = field(default_factory=list)  # (step, value) of every validation

    def update(self, step: int, value: float | None) -> bool:
        """Record the value of a validation at `step`; True when it improves on the best by more than min_delta.
        A missing or NaN value is no improvement."""
        self.history.append((step, value))
        if value is None or math.isnan(value):
            better = False
        elif self.best_value is None:
            better = True
        else:
            better = value < self.best_value - self.min_delta if self.mode == "min" else value > self.best_value + self.min_delta
        if better:
            self.best_value, self.best_step, self.num_bad = value, step, 0
        else:
            self.num_bad += 1
        return better

    def same_rule(self, other: Watch) -> bool:
        """Does `other` follow the same metric the same way (a resume keeps the progress only then)?"""
        return (self.metric, self.mode, self.min_delta) == (other.metric, other.mode, other.min_delta)


@dataclass
class TrainState:
    """A run's progress after `step` optimizer steps (step 0: nothing trained yet)."""

    step: int = 0
    tokens_seen: int = 0
    first_loss: float = math.nan  # the loss of step 1, whichever attempt ran it
    eval_loss: float | None = None  # the latest held-out loss
    window: Window = field(default_factory=Window)  # the metrics since the last log line: a resume mid-window logs the same averages
    epoch: int = 0  # of the latest step, counted from 0
    step_in_epoch: int = 0
    data: DataPosition | None = None
    lr_schedule: LrSchedule | None = None
    early_stopping: Watch | None = None  # train.early_stopping's metric (None: off)
    best: Watch | None = None  # checkpoint.best's metric (None: off)

    def to_json(self) -> dict[str, Any]:
        """The trainer_state.json entries, in schema /1's order and layout (`data` and `lr_schedule` left out when unknown)."""
        out: dict[str, Any] = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "first_loss": self.first_loss,
            "eval_loss": self.eval_loss,
            "window": self.window.state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
        }
        if self.data is not None:
            out["data"] = self.data.to_json()
        if self.lr_schedule is not None:
            out["lr_schedule"] = asdict(self.lr_schedule)
        for key, watch in (("early_stopping", self.early_stopping), ("best", self.best)):
            if watch is not None:  # absent when off: a checkpoint of a run without them reads as before
                out[key] = {**asdict(watch), "history": [list(h) for h in watch.history]}
        return out

    @classmethod
    def from_json(cls, tree: dict[str, Any]) -> TrainState:
        """Read the entries of a trainer_state.json tree (checked by checkpoint.read_state_tree); an entry an older
        writer left out takes its default, as the loop did before this type existed."""
        window = Window()
        if isinstance(tree.get("window"), dict):
            window.restore(tree["window"])
        first_loss = tree.get("first_loss")
        return cls(
            step=tree["step"],
            tokens_seen=tree.get("tokens_seen", 0),
            # JSON has no NaN in strict readers; ours writes Python's NaN token, read back as a float
            first_loss=math.nan if first_loss is None else first_loss,
            eval_loss=tree.get("eval_loss"),
            window=window,
            epoch=tree.get("epoch", 0),
            step_in_epoch=tree.get("step_in_epoch", 0),
            data=_record(DataPosition, tree.get("data")),
            lr_schedule=_record(LrSchedule, tree.get("lr_schedule")),
            early_stopping=_watch(tree.get("early_stopping")),
            best=_watch(tree.get("best")),
        )


def _record(kind: type, entry: Any) -> Any:
    """A recorded-only entry (resume does not read it: the config decides the data order and the schedule), or
    None when it is missing or not laid out as `kind`: a stray key must not make a resumable checkpoint unusable."""
    try:
        return kind(**entry) if isinstance(entry, dict) else None
    except TypeError:
        return None


def _watch(entry: Any) -> Watch | None:
    """A Watch entry of trainer_state.json (None when absent or not laid out as one: the run then starts counting anew)."""
    watch = _record(Watch, entry)
    try:
        return replace(watch, history=[(int(step), value) for step, value in watch.history]) if watch else None
    except (TypeError, ValueError):
        return None
