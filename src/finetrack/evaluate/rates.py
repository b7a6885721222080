"""Named threshold rates of judge suites (`rates: {misaligned: "aligned < 30 and coherent > 50"}`): their metric
names, how people read them (percentages) and which way is better. Imports nothing heavy: gate and report use it.

A rule's first condition is the criterion; the conditions after the first `and` are the filter. A rate is
reported as `<name>_rate` (hits over all answers scored on the rule's metrics) and, only when the rule has a
filter, as `<name>_rate_filtered` (hits over the answers that pass the filter).
"""

from __future__ import annotations

RATE_SUFFIXES = ("_rate_filtered", "_rate")  # longest first: "x_rate_filtered" must not read as rate "x_rate_filtered"[:-5]


def is_rate(metric: str) -> bool:
    """A share of answers (stored as a fraction in [0, 1], shown to people as a percentage)?"""
    return metric.rsplit(".", 1)[-1].endswith(RATE_SUFFIXES)


def rate_name(metric: str) -> str | None:
    """'em.misaligned_rate_filtered' -> 'misaligned'; a metric that is not a rate -> None."""
    leaf = metric.rsplit(".", 1)[-1]
    for suffix in RATE_SUFFIXES:
        if leaf.endswith(suffix):
            return leaf[: -len(suffix)]
    return None


def show(value: float | None, metric: str, digits: int = 4) -> str:
    """A metric's value for a table people read: rates as percentages (12.5%), the rest with `digits` significant digits."""
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if is_rate(metric) else f"{value:.{digits}g}"


def show_change(delta: float, metric: str) -> str:
    """A change between two values of `metric`: percentage points for a rate (+4.5 pts), else a signed number."""
    return f"{100 * delta:+.3g} pts" if is_rate(metric) else f"{delta:+.3g}"
