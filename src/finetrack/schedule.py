"""The checkpoint schedule: rules -> an explicit list of optimizer steps.

Pure arithmetic shared by `train` (which saves at these steps) and `plan` (which prints them).
Rules combine as a union; each step remembers which rules asked for it, because retention keeps
the scheduled ones (the science) and rolls the periodic ones.
"""

from __future__ import annotations

import math


class ScheduleError(ValueError):
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
    per_epoch: int | None = None,
    first_epoch: int | None = None,
    steps: list[int] | tuple[int, ...] = (),
    log_spaced_n: int | None = None,
) -> dict[int, list[str]]:
    """Every checkpoint step of a run, ascending, with the rules that produced it ('last' for the final step).

    Example from the README: 2000 rows, micro batch 8, accumulation 2 -> 125 steps per epoch;
    first_epoch=4, per_epoch=1, 3 epochs -> {31, 63, 94, 125, 250, 375}.
    """
    wanted: dict[int, list[str]] = {}

    def add(step: int, rule: str) -> None:
        if 1 <= step <= total_steps and rule not in wanted.setdefault(step, []):
            wanted[step].append(rule)

    for rule, n in (("per_epoch", per_epoch), ("first_epoch", first_epoch)):
        if n is not None and n > steps_per_epoch:
            raise ScheduleError(
                f"checkpoint.{rule}={n} but an epoch has only {steps_per_epoch} optimizer steps: use at most {steps_per_epoch}"
            )
    if every_steps is not None:
        for s in range(every_steps, total_steps + 1, every_steps):
            add(s, "every_steps")
    if first_epoch is not None:
        for s in evenly_spaced(steps_per_epoch, first_epoch):
            add(s, "first_epoch")
    if per_epoch is not None:
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        for e in range(num_epochs):
            for s in evenly_spaced(steps_per_epoch, per_epoch):
                add(e * steps_per_epoch + s, "per_epoch")
    late = sorted(s for s in steps if s > total_steps)
    if late:
        raise ScheduleError(f"checkpoint.steps {late} lie after the last step ({total_steps}): remove them or train longer")
    for s in steps:
        add(s, "steps")
    if log_spaced_n is not None:
        if log_spaced_n > total_steps:
            raise ScheduleError(f"checkpoint.log_spaced={log_spaced_n} but the run has only {total_steps} steps")
        for s in log_spaced(total_steps, log_spaced_n):
            add(s, "log_spaced")
    add(total_steps, "last")
    return {s: wanted[s] for s in sorted(wanted)}


def describe(schedule: dict[int, list[str]], max_listed: int = 40) -> str:
    """`31, 63, 94, 125, 250, 375` (long lists elided in the middle) with a count per rule."""
    steps = list(schedule)
    shown = steps if len(steps) <= max_listed else [*steps[: max_listed // 2], "...", *steps[-max_listed // 2 :]]
    counts: dict[str, int] = {}
    for rules in schedule.values():
        for r in rules:
            counts[r] = counts.get(r, 0) + 1
    return (
        f"{len(steps)} checkpoint(s) at steps "
        + ", ".join(map(str, shown))
        + " ("
        + ", ".join(f"{r}: {n}" for r, n in counts.items())
        + ")"
    )
