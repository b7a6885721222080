"""`finetrack plan` of a weighted mixture (data.sources): what resolve() needs of it (as train.py passes it), its
order of rows for a changed config, and the lines that show each source's share and what the planned steps take from it
(data_report's "sources", filled by PreparedData.note_usage)."""

from __future__ import annotations

import dataclasses
from collections import Counter

from .config import Config, Environment, Resolved
from .data import Example
from .mixture import Mixture


def mixture_env(env: Environment, cfg: Config, mixture: Mixture | None) -> Environment:
    """What resolve() needs of a mixture, as train.py passes it: the number of sources, and with
    data.on_source_end=stop the most steps before a source would repeat."""
    if mixture is None:
        return env
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * env.num_processes
    stop = cfg.data.on_source_end == "stop"
    return dataclasses.replace(
        env, num_sources=len(mixture.names), steps_before_repeat=mixture.steps_before_repeat(rows_per_step) if stop else None
    )


def resized(mixture: Mixture | None, examples: list[Example]) -> Mixture | None:
    """The mixture over `examples` (capped() rows of a changed config: a source may have lost rows); None when a source
    has none left (train would refuse that config: the steps are then walked in the one-source order)."""
    if mixture is None:
        return None
    sizes = Counter(e.channel for e in examples)
    if not all(sizes[i] for i in range(len(mixture.names))):
        return None
    return dataclasses.replace(mixture, sizes=tuple(sizes[i] for i in range(len(mixture.names))))


def mixture_info(cfg: Config, env: Environment, res: Resolved) -> dict:
    """The plan's facts of the mixture beside data_report's "sources": rows per step, planned steps, and whether
    data.on_source_end=stop shortened the run (resolve() says so in the reason of total_steps)."""
    assert res.shape is not None
    return {
        "rows_per_step": res.shape.global_batch_size,
        "total_steps": res.shape.total_steps,
        "on_source_end": cfg.data.on_source_end,
        "steps_before_repeat": env.steps_before_repeat,
        "shortened": env.steps_before_repeat is not None and res.reasons["total_steps"].startswith("data.on_source_end=stop"),
    }


def mixture_lines(data: dict) -> list[str]:
    """A mixture (data.sources): per source its target share, rows and tokens, and what the planned steps take from it
    (data_report's "sources" with "over_the_run": mixture.Mixture.usage); [] with one data source."""
    if "mixture" not in data:
        return []
    mix, sources = data["mixture"], data["sources"]
    steps, per_step = mix["total_steps"], mix["rows_per_step"]
    head = ("source", "weight", "target share", "rows", "tokens", "rows drawn", "realized share", "epochs", "tokens drawn")
    rows = [head] + [
        (
            s["name"],
            f"{s['weight']:g}",
            f"{s['target_share']:.2%}",
            f"{s['rows_kept']:,}",
            f"{s['tokens']:,}",
            f"{s['over_the_run']['rows_drawn']:,}",
            f"{s['over_the_run']['realized_share']:.2%}",
            f"{s['over_the_run']['epochs']:.2f}",
            f"{s['over_the_run']['tokens_drawn']:,}",
        )
        for s in sources
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    title = (
        f"mixture of {len(sources)} sources (data.sources); over the planned {steps} steps x {per_step} rows = {steps * per_step:,} rows"
    )
    out = ["", title + " (epochs: rows drawn / rows; a source past 1 repeats, reshuffled):"]
    for r in rows:
        out.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    if mix["shortened"]:
        out.append(
            f"  data.on_source_end=stop shortened the run to {steps} steps: step {steps + 1} would give a source's row a second time"
        )
    elif mix["on_source_end"] == "stop":
        out.append(f"  data.on_source_end=stop: no source repeats before step {mix['steps_before_repeat'] + 1}; the run ends first")
    return out
