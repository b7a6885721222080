"""The checkpoint schedule: rules -> an explicit list of optimizer steps.

Pure arithmetic shared by `train` (which saves at these steps) and `plan` (which prints them).
Rules combine as a union; each step remembers which rules asked for it, because retention keeps
the scheduled ones (the science) and rolls the periodic ones.
"""

from __future__ import annotations

import math

from .errors import UserError


class ScheduleError(UserError, ValueError):
    """A checkpoint rule that cannot be met by this run; the message says what to change."""


def evenly_spaced(steps_in_epoch: int, n: int) -> list[int]:
    """n steps evenly spaced inside an epoch of `steps_in_epoch` steps: round-half-up of k*S/n, k = 1..n.

    Integer arithmetic, so 62.5 rounds to 63 exactly: floor(k*S/n + 1/2) = (2kS + n) // 2n.
    """
    return [(2 * k * steps_in_epoch + n) // (2 * n) for k in range(1, n + 1)]


def log_spaced(total_steps: int, n: int) -> list[int]:
    """n distinct steps from 1 to total_steps, spaced evenly in log(step) (dense early, sparse late).

    Geometric points are rounded half up; where rounding makes neighbours collide (early, where the
    spacing is below one step) each is pushed to the next free step, keeping exactly n steps and the
    last one at total_steps.
    """
    assert 1 <= n <= total_steps, "config validation keeps log_spaced within the run"
    if n == 1:
        return [total_steps]
    raw = [math.floor(math.exp(math.log(total_steps) * i / (n - 1)) + 0.5) for i in range(n)]
    out: list[int] = []
    for i, s in enumerate(raw):
        s = max(s, out[-1] + 1 if out else 1)
        out.append(min(s, total_steps - (n - 1 - i)))
    return out


def checkpoint_steps(
    *,
    steps_per_epoch: int,
    total_steps: int,
    every_steps: int | None = None,
    num_per_epoch: int | None = None,
    num_first_epoch: int | None = None,
    steps: list[int] | tuple[int, ...] = (),
    num_log_spaced: int | None = None,
) -> dict[int, list[str]]:
    """Every checkpoint step of a run, ascending, with the rules that produced it ('last' for the final step).

    A rule is named after its setting without the count prefix ('first_epoch' for checkpoint.num_first_epoch);
    those names are stored in each checkpoint's meta.json. Example from the README: 2000 rows, micro batch 8,
    accumulation 2 -> 125 steps per epoch; num_first_epoch=4, num_per_epoch=1, 3 epochs -> {31, 63, 94, 125, 250, 375}.
    """
    wanted: dict[int, list[str]] = {}

    def add(step: int, rule: str) -> None:
        if 1 <= step <= total_steps and rule not in wanted.setdefault(step, []):
            wanted[step].append(rule)

    for rule, n in (("per_epoch", num_per_epoch), ("first_epoch", num_first_epoch)):
        if n is not None and n > steps_per_epoch:
            raise ScheduleError(
                f"checkpoint.num_{rule}={n} but an epoch has only {steps_per_epoch} optimizer steps: use at most {steps_per_epoch}"
            )
    if every_steps is not None:
        for s in range(every_steps, total_steps + 1, every_steps):
            add(s, "every_steps")
    if num_first_epoch is not None:
        for s in evenly_spaced(steps_per_epoch, num_first_epoch):
            add(s, "first_epoch")
    if num_per_epoch is not None:
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        for e in range(num_epochs):
            for s in evenly_spaced(steps_per_epoch, num_per_epoch):
                add(e * steps_per_epoch + s, "per_epoch")
    late = sorted(s for s in steps if s > total_steps)
    if late:
        raise ScheduleError(f"checkpoint.steps {late} lie after the last step ({total_steps}): remove them or train longer")
    for s in steps:
        add(s, "steps")
    if num_log_spaced is not None:
        if num_log_spaced > total_steps:
            raise ScheduleError(f"checkpoint.num_log_spaced={num_log_spaced} but the run has only {total_steps} steps")
        for s in log_spaced(total_steps, num_log_spaced):
            add(s, "log_spaced")
    add(total_steps, "last")
    return {s: wanted[s] for s in sorted(wanted)}


def describe(schedule: dict[int, list[str]], steps_per_epoch: int | None = None, max_listed: int = 40) -> str:
    """The schedule as rules a person reads, e.g. `6 checkpoints: 4 evenly spaced in epoch 1 (num_first_epoch: steps
    31, 63, 94, 125); 1 at the end of every epoch (num_per_epoch: steps 125, 250, 375); and the last step, 375`.

    `steps_per_epoch` lets the per-epoch rule say how many per epoch; long step lists are elided in the middle."""
    by_rule: dict[str, list[int]] = {}
    for step, rules in schedule.items():
        for r in rules:
            by_rule.setdefault(r, []).append(step)
    parts = []
    order = ["every_steps", "first_epoch", "per_epoch", "steps", "log_spaced"]
    for rule, steps in sorted(by_rule.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        listed = elided(steps, max_listed)
        if rule == "every_steps":
            parts.append(f"every {steps[0]} steps (every_steps: steps {listed})")
        elif rule == "first_epoch":
            parts.append(f"{len(steps)} evenly spaced in epoch 1 (num_first_epoch: steps {listed})")
        elif rule == "per_epoch":
            n = sum(s <= steps_per_epoch for s in steps) if steps_per_epoch else None
            what = (
                f"{n} evenly spaced in every epoch"
                if n and n > 1
                else "1 at the end of every epoch"
                if n
                else "evenly spaced in every epoch"
            )
            parts.append(f"{what} (num_per_epoch: steps {listed})")
        elif rule == "steps":
            parts.append(f"the listed steps (steps: {listed})")
        elif rule == "log_spaced":
            parts.append(f"{len(steps)} spaced evenly in log(step) (num_log_spaced: steps {listed})")
        elif rule != "last":
            parts.append(f"{rule}: steps {listed}")
    last = max(schedule) if schedule else 0
    tail = f"the last step, {last}" if last else ""
    text = "; ".join(parts) + ("; and " if parts else "") + tail
    return f"{len(schedule)} checkpoint{'s' if len(schedule) != 1 else ''}: {text}"


def elided(steps: list[int], max_listed: int = 20) -> str:
    """Steps as text, the middle of a long list elided: '1, 2, ..., 99, 100'."""
    shown = steps if len(steps) <= max_listed else [*steps[: max_listed // 2], "...", *steps[-max_listed // 2 :]]
    return ", ".join(map(str, shown))
