"""Your code during training (`train.callbacks`, or `train.run(cfg, callbacks=[...])`): four hooks, each given a
read-only view of the run, that may log metrics of their own and ask the run to stop.

    on_validation(view)   after a validation (held-out loss, suites): view.validation holds its values
    on_step_end(view)     after every optimizer step: view.metrics is the step's metrics.jsonl line (empty if none)
    on_checkpoint(view)   after a checkpoint is complete: view.checkpoint is its folder
    on_stop(view)         once, when training ends: view.stop_reason says why, view.checkpoint is the final one

A callback is any object with some of these methods; from the config, `function` names a class (or a function
returning such an object) called with `options` as keyword arguments. `view.request_stop(reason)` (in
on_validation / on_step_end) ends the run after this step with a final checkpoint whose meta.json records the reason.
A callback that raises stops the run: a checkpoint of the step is written first, then the error names the callback.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import nn

from . import user_code
from .config import CallbackConfig
from .errors import UserError

log = logging.getLogger("finetrack")
HOOKS = ("on_validation", "on_step_end", "on_checkpoint", "on_stop")
_MAY_ACT = ("on_validation", "on_step_end")  # the hooks that may log metrics and ask for a stop
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class CallbackError(UserError, RuntimeError):
    """A callback raised: the run stopped after writing a checkpoint; the message names the callback and the hook."""


@dataclass
class Requests:
    """What the hooks of one step asked for: metrics to add to its line, and stops (callback, reason)."""

    logged: dict[str, float] = field(default_factory=dict)
    stops: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class RunView:
    """What a hook sees: the run at one step. Read it; change nothing (the model is the one being trained)."""

    step: int
    total_steps: int
    epoch: float
    run_dir: Path
    model: nn.Module  # unwrapped (a heads.WithHead on a regression run)
    metrics: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)  # this step's metrics.jsonl line, as written
    validation: Mapping[str, float | None] = field(default_factory=lambda: _EMPTY)  # on_validation: eval_loss, val/<suite>.<metric>
    checkpoint: Path | None = None  # on_checkpoint: the checkpoint just written; on_stop: the final one
    stop_reason: Mapping[str, Any] | None = None  # on_stop: {"kind": "end" | "early_stopping" | "callback" | "signal", ...}
    _requests: Requests = field(default_factory=Requests, repr=False)
    _hook: str = field(default="", repr=False)
    _caller: str = field(default="", repr=False)

    def request_stop(self, reason: str) -> None:
        """End the run after this step, with a final checkpoint recording `reason` (on_validation, on_step_end)."""
        self._check("request_stop")
        self._requests.stops.append((self._caller, str(reason)))

    def log(self, metrics: Mapping[str, float]) -> None:
        """Add metrics to this step's metrics.jsonl line and the trackers (on_validation, on_step_end)."""
        self._check("log")
        for key, value in metrics.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"log takes {{name: number}}, got {key!r}: {value!r}")
            self._requests.logged[key] = value

    def _check(self, what: str) -> None:
        if self._hook not in _MAY_ACT:
            raise RuntimeError(f"{what} works in {' and '.join(_MAY_ACT)}, not in {self._hook}")


class Callbacks:
    """The run's callbacks, called in order; a callback that raises becomes one CallbackError naming it."""

    def __init__(self, named: list[tuple[str, Any]]) -> None:
        self.named = named
        for name, cb in named:
            if not any(callable(getattr(cb, h, None)) for h in HOOKS):
                raise UserError(f"callback {name}: {type(cb).__name__} has none of the hooks {', '.join(HOOKS)}")

    @classmethod
    def build(cls, configs: list[CallbackConfig], objects: list[Any] = ()) -> Callbacks:
        """The config's callbacks (each `function(**options)`), then the Python objects given to train.run."""
        named = [(c.function, _create(c, f"train.callbacks[{i}].function")) for i, c in enumerate(configs)]
        return cls(named + [(type(o).__name__, o) for o in objects])

    def __bool__(self) -> bool:
        return bool(self.named)

    def call(self, hook: str, view: RunView) -> None:
        """Call `hook` on every callback that has it; what they ask for lands in view's Requests."""
        for name, cb in self.named:
            method = getattr(cb, hook, None)
            if not callable(method):
                continue
            try:
                method(replace(view, _hook=hook, _caller=name))
            except Exception as e:
                log.debug("%s", traceback.format_exc())  # --verbose shows where in the callback
                raise CallbackError(f"callback {name} raised in {hook} at step {view.step}: {type(e).__name__}: {e}") from e


def _create(config: CallbackConfig, field: str) -> Any:
    """The callback object: `function(**options)`; a failure is a CallbackError naming it."""
    factory = user_code.load(config.function, field)
    try:
        return factory(**config.options)
    except Exception as e:
        log.debug("%s", traceback.format_exc())
        raise CallbackError(f"callback {config.function}: creating it with options {config.options} raised {type(e).__name__}: {e}") from e
