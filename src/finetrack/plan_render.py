"""`finetrack plan`'s text: the plan (plan.make_plan's plain data) as the lines the command prints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import memory
from .plan_export import export_lines
from .plan_mixture import mixture_lines

if TYPE_CHECKING:
    from .plan import Plan


def render(plan: Plan) -> str:
    """The plan as the text `finetrack plan` prints."""
    from .data import report_line
    from .schedule import describe, elided

    s, m, t = plan.schedule, plan.memory, plan.time
    lines = [f"objective: {plan.objective['description']}", f"data: {report_line(plan.data)}"]
    for source, c in plan.data["per_source"].items():
        lines.append(
            f"  {source}: {c['read']:,} read, "
            + (f"{c['not_sampled']:,} not sampled, " if "not_sampled" in c else "")
            + f"{c['rows']:,} to train on ({c['held_out']:,} held out, {c['dropped']:,} dropped), "
            f"{c['tokens']:,} tokens, {c['trainable_tokens']:,} trainable"
        )
    most = max(n for _, n in plan.data["length_histogram"])
    for bound, n in plan.data["length_histogram"]:
        lines.append(f"  rows of <= {bound:>6} tokens: {n:>7,}  {'#' * max(1, round(40 * n / most))}")
    reasons = s["reasons"]
    lines += [
        "",
        (
            f"schedule: {s['total_steps']} optimizer steps ({reasons.get('total_steps', '')}); {s['steps_per_epoch']} per epoch "
            f"({reasons.get('steps_per_epoch', '')}); global batch {s['global_batch_size']} rows; warmup {s['warmup_steps']} steps"
        ),
    ]
    lines.append("  " + describe({step: rules.split("+") for step, rules in s["checkpoint_steps"].items()}, s["steps_per_epoch"]))
    lines.append(
        f"  held-out loss at steps {elided(s['eval_loss_steps'])}"
        if s["eval_loss_steps"]
        else "  no held-out loss (data.eval_split not set)"
    )
    lines += mixture_lines(plan.data)
    w = m["largest_micro_batch"]
    sequences = f" ({w['num_sequences']} sequences: anchors, positives, negatives)" if plan.objective["sequences_per_row"] > 1 else ""
    reads = f", {w['num_reads']:,} hidden-state read(s)" if plan.objective["reads_hidden_states"] else ""
    lines += [
        "",
        (
            f"memory on {plan.target['name']} ({plan.target['device_type']}); largest micro-batch: {w['num_rows']} row(s){sequences} x "
            f"{w['longest_row_tokens']} tokens = {w['micro_batch_tokens']:,} tokens, {w['target_tokens']:,} carrying the next-token loss{reads}"
        ),
    ]
    if plan.target["num_processes"] > 1:  # the model has no sharded terms yet: an upper bound under FSDP2 / ZeRO
        lines.append(
            f"  per process: each of the {plan.target['num_processes']} holds a full replica (data parallel); under FSDP2 or "
            "DeepSpeed ZeRO a process holds less (not modelled: an upper bound there)"
        )
    width = max(len(term["name"]) for term in m["terms"])
    for term in m["terms"]:
        alive = ",".join(term["phases"]) or "always"
        lines.append(f"  {term['name']:<{width}}  {memory.mib(term['bytes']):>10}  [{alive}]  {term['detail']}")
    verdict = ""
    if m["device_bytes"] is not None:
        share = m["peak_bytes"] / m["device_bytes"]
        verdict = f" of {memory.mib(m['device_bytes'])}: " + ("fits" if m["fits"] else "DOES NOT FIT") + f" ({share:.0%})"
    during = f"  during '{m['peak_phase']}' (the terms alive then)" if m["peak_phase"] else ""
    lines.append(f"  {'predicted peak':<{width}}  {memory.mib(m['peak_bytes']):>10}{during}{verdict}")
    for setting, g in m["gradient_checkpointing"].items():
        which = "as configured" if g["configured"] else "the other setting"
        lines.append(
            f"  activations with gradient checkpointing {setting:<3}: {memory.mib(g['activation_bytes'])}, predicted peak "
            f"{memory.mib(g['peak_bytes'])} ({which})"
        )
    if m["changes"]:
        lines.append("  changes, best first (predicted peak with each):")
        for c in m["changes"]:
            lines.append(
                f"    {memory.mib(c['peak_bytes']):>10}  {'fits' if c['fits'] else 'still too big'}  {c['description']}  ({' '.join(c['overrides'])})"
            )
    how = "measured on this machine" if t["from_measurement"] else "estimated from FLOPs"
    cost = "" if t["cost"] is None else f"; at {t['price_per_hour']:.2f}/h: {t['cost']:.2f}"
    targets = (
        f"{t['target_tokens']:,} carrying loss"
        if plan.objective["next_token_loss"]
        else f"{t['target_tokens']:,} answer tokens, no next-token loss"
    )
    reads = f", {t['hidden_state_reads']:,} hidden-state reads" if plan.objective["reads_hidden_states"] else ""
    lines += [
        "",
        f"time and cost ({how}): {t['train_tokens']:,} tokens to train ({t['computed_tokens']:,} computed with padding, {targets}{reads})",
    ]
    validations = sum(t["num_validations"].values())
    validation = f" + {validations} suite validation(s) {_hours(t['validation_s'])}" if validations else ""
    exports = f" + waiting for the last exports {_hours(t['export_wait_s'])}" if t["export_wait_s"] else ""
    lines.append(
        f"  training {_hours(t['train_s'])} + held-out loss {_hours(t['eval_loss_s'])}{validation} + {t['num_checkpoints']} checkpoint(s) of "
        f"{memory.mib(t['checkpoint_bytes'])} {_hours(t['checkpoint_s'])}{exports} = {_hours(t['total_s'])}{cost}"
    )
    lines += export_lines(plan.exports)
    lines.append(_eval_phase_line(t["eval_phase"], t["price_per_hour"]))
    if t["measured"] and not t["from_measurement"]:
        lines.append(
            f"  measured on this machine ({t['measured']['device']}, one process): {t['measured']['tokens_per_s']:,.0f} tokens/s, "
            f"training {_hours(t['measured']['train_s_here'])} here; NOT used for {plan.target['name']} (a measurement times only "
            "the machine it ran on; plan without --gpu to use it)"
        )
    if t["measured"]:
        lines.append(f"  measured peak memory on this machine: {t['measured']['peak_mem_mib']:,.0f} MiB ({t['measured']['device']})")
    lines += ["", "assumptions:", *(f"  - {a}" for a in plan.assumptions)]
    return "\n".join(lines)


def _eval_phase_line(e: dict, price_per_hour: float | None) -> str:
    """`finetrack eval` over the base model and every scheduled checkpoint: a line of its own (an estimate)."""
    if not e["suites"]:
        return "  eval phase: no eval.suites (`finetrack eval` has nothing to run)"
    parts = [f"model loads {_hours(e['load_s'])}"] + [
        f"{s['name']} ({s['kind']}: {s['per_step']}) {_hours(s['seconds'])}" for s in e["suites"]
    ]
    cost = "" if e["cost"] is None else f"; at {price_per_hour:.2f}/h: {e['cost']:.2f}"
    return f"  eval phase (estimate; base model + {e['num_steps'] - 1} checkpoint(s)): {' + '.join(parts)} = {_hours(e['total_s'])}{cost}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
