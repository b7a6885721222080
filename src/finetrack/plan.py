"""`finetrack plan CONFIG`: what a run will need before it runs — data, schedule, memory fit, time and cost.

data (the same preparation as train) -> schedule (the same resolve() as train) -> workload (the real
data order: the largest micro-batch, tokens to train) -> memory (memory.py) -> time and cost (target.py: a
FLOPs estimate with its assumptions stated, or --measure: a few real optimizer steps on this machine) -> the
eval phase (evaluate/cost.py: `finetrack eval` over the base model and the scheduled checkpoints).
Nothing is trained and no weights are loaded unless --measure is given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from . import memory, runlock
from .batches import attn_tokens_for, micro_batch_shape, step_rows
from .config import Config, ConfigError, Environment, measure_dump, resolve
from .data import Example, prepare
from .evaluate import cost as eval_cost
from .fit import ranked_changes
from .target import (  # noqa: F401  (parse_bytes, target_for, _gpu_key: re-exported, the CLI and tests import them from here)
    CPU_UTILIZATION,
    GPU_UTILIZATION,
    Target,
    _gpu_key,
    flops_per_micro_batch_tokens,
    parse_bytes,
    probe_cpu_flops,
    target_for,
)

log = logging.getLogger(__name__)

CHECKPOINT_WRITE_BYTES_PER_S = 500e6  # local disk, written with fsync
# meta.json, MANIFEST.json, trainer_state.json (RNG states: ~20 KB), model / adapter configs, PEFT's README.md
# and the safetensors headers: 30-45 KiB in a checkpoint of the tiny test model, LoRA or full
CHECKPOINT_SMALL_FILES_BYTES = 40 * 2**10


# ---------------------------------------------------------------------------------------- workload
@dataclass
class Workload:
    """What the run computes, from the real data order (process 0's share on several processes)."""

    largest: memory.Workload  # the micro-batch with the most tokens (padding included)
    train_tokens: int = 0  # real tokens over all optimizer steps (all processes)
    computed_tokens: int = 0  # tokens including padding
    target_tokens: int = 0
    attention_cells: int = 0  # sum over micro-batches of rows x width^2 (dense attention scores)


def checkpointing_both_ways(
    cfg: Config, arch: memory.Architecture, largest: memory.Workload, device_type: str, terms: list[memory.Term]
) -> dict[str, dict]:
    """Activation bytes (every activation term: with checkpointing the kept layer inputs plus the recomputed
    layer) and the predicted peak with gradient checkpointing "off" and "on", the configured one marked.
    `terms`: the configured setting's breakdown (only the other one is computed here)."""
    configured = cfg.model.gradient_checkpointing
    model = cfg.model.model_copy(update={"gradient_checkpointing": not configured})
    other = memory.breakdown(cfg.model_copy(update={"model": model}), arch, largest, device_type)
    out = {}
    for on in (False, True):
        these = terms if on == configured else other
        out["on" if on else "off"] = {
            "activation_bytes": sum(t.bytes for t in these if t.name.startswith("activations")),
            "peak_bytes": memory.peak_bytes(these),
            "configured": on == configured,
        }
    return out


def workload(examples: list[Example], cfg: Config, total_steps: int, num_processes: int, attn_tokens: int) -> Workload:
    """Walk the run's optimizer steps in their real order (train's step_rows) and measure the micro-batches."""
    rows_per_process = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    lengths = [len(e.input_ids) for e in examples]
    targets = [e.num_trainable_tokens for e in examples]
    out = Workload(memory.Workload(0, 0, 0, 0))
    for step in range(total_steps):
        _, rows = step_rows(len(examples), rows_per_process * num_processes, cfg.train.seed, step, cfg.data.shuffle)
        out.train_tokens += sum(lengths[i] for i in rows)
        for j in range(0, rows_per_process, cfg.train.micro_batch_size):  # process 0's micro-batches
            mb = rows[j : j + cfg.train.micro_batch_size]
            num_rows, width, masked = micro_batch_shape([lengths[i] for i in mb], cfg.data.pack, cfg.data.pack_row_tokens, attn_tokens)
            tokens, tgt = num_rows * width, sum(targets[i] for i in mb)
            out.computed_tokens += tokens * num_processes
            out.target_tokens += tgt * num_processes
            out.attention_cells += num_rows * width * width * num_processes
            if tokens > out.largest.micro_batch_tokens:
                out.largest = memory.Workload(
                    micro_batch_tokens=tokens, longest_row_tokens=width, target_tokens=tgt, num_rows=num_rows, masked=masked
                )
    return out


def capped(examples: list[Example], cfg: Config) -> list[Example]:
    """The examples as data.max_length would leave them (truncated or dropped), without tokenizing again."""
    n = cfg.data.max_length
    if cfg.data.on_overflow == "drop":
        return [e for e in examples if len(e.input_ids) <= n]
    return [e if len(e.input_ids) <= n else Example(e.input_ids[:n], e.labels[:n], e.source, e.line) for e in examples]


# -------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    target: dict
    data: dict
    schedule: dict
    memory: dict
    time: dict
    assumptions: list[str] = field(default_factory=list)


def make_plan(cfg: Config, target: Target, price_per_hour: float | None = None, measure_steps: int | None = None) -> Plan:
    """Everything `finetrack plan` prints, as plain data."""
    from transformers import AutoConfig

    from .models import check_source, load_tokenizer, model_source

    if measure_steps is not None and measure_steps < 1:
        raise ConfigError(f"--measure-steps {measure_steps}: measure at least 1 optimizer step (default 5)")
    # train's checks that need no weights, where they hold on any machine: the model folder (its kernels, e.g.
    # flash-attn, are the training machine's business); the output folder is only a warning (it may be another machine's)
    check_source(cfg.model.model_copy(update={"attn_implementation": "auto"}))
    if problem := runlock.run_dir_problem(Path(cfg.output.dir)):
        log.warning("warning: %s (on this machine: finetrack train here would refuse it)", problem)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.train.seed)
    as_given = cfg  # --measure resolves it again for this machine
    env = Environment(
        device_type=target.device_type, bf16_supported=target.bf16, num_processes=target.num_processes, num_train_rows=len(data.train)
    )
    cfg, res = resolve(cfg, env)
    shape = res.shape
    assert shape is not None  # resolve() always sets it
    arch = memory.Architecture.from_hf_config(
        AutoConfig.from_pretrained(
            model_source(cfg.model), revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        ).to_dict()
    )
    attn = attn_tokens_for(arch.hidden_size)
    total_steps = shape.total_steps
    work = workload(data.train, cfg, total_steps, target.num_processes, attn)
    assumptions: list[str] = []

    # --- schedule
    every_eval = cfg.eval.loss_every_steps
    eval_steps = sorted({s for s in range(1, total_steps + 1) if every_eval and s % every_eval == 0} | {total_steps}) if data.eval else []
    schedule = {
        "steps_per_epoch": shape.steps_per_epoch,
        "total_steps": total_steps,
        "global_batch_size": shape.global_batch_size,
        "warmup_steps": shape.warmup_steps,
        "checkpoint_steps": res.values["checkpoint_steps"],  # as config.resolved.yaml shows it ("rule+rule")
        "eval_loss_steps": eval_steps,
        "reasons": {k: res.reasons[k] for k in ("steps_per_epoch", "total_steps", "checkpoint_steps") if k in res.reasons},
    }

    # --- memory
    terms = memory.breakdown(cfg, arch, work.largest, target.device_type)
    peak = memory.peak_bytes(terms)
    mem = {
        "largest_micro_batch": vars(work.largest),
        "terms": [vars(t) for t in terms],
        "peak_bytes": peak,
        "peak_phase": memory.peak_phase(terms),
        "device_bytes": target.memory_bytes,
        "fits": None if target.memory_bytes is None else peak <= target.memory_bytes,
        "changes": [],
        "gradient_checkpointing": checkpointing_both_ways(cfg, arch, work.largest, target.device_type, terms),
    }
    if target.memory_bytes is not None and peak > target.memory_bytes:

        def work_for(changed: Config) -> memory.Workload:
            """The largest micro-batch over every step of a changed config, its steps resolved as train would."""
            examples = capped(data.train, changed)
            try:
                steps = resolve(changed, dataclasses.replace(env, num_train_rows=len(examples)))[1].shape.total_steps
            except ConfigError:  # resolve refuses it (e.g. fewer rows left than one step takes): the steps its rows fill
                per_step = changed.train.micro_batch_size * changed.train.grad_accum_steps * target.num_processes
                steps = min(total_steps, max(1, len(examples) // per_step))
            return workload(examples, changed, steps, target.num_processes, attn).largest

        changes = ranked_changes(cfg, arch, work_for, target.device_type, target.memory_bytes, base=work.largest)
        mem["changes"] = [vars(c) for c in changes]

    # --- time and cost
    per_token, per_target, per_cell = flops_per_micro_batch_tokens(arch, cfg.model.method, cfg.model.gradient_checkpointing)
    train_flops = per_token * work.computed_tokens + per_target * work.target_tokens + per_cell * work.attention_cells
    eval_tokens = sum(len(e.input_ids) for e in data.eval)
    eval_targets = sum(e.num_trainable_tokens for e in data.eval)
    eval_flops = (
        len(eval_steps)
        * 2
        * (arch.num_layers * arch.num_layer_linear_params * eval_tokens + arch.vocab_size * arch.hidden_size * eval_targets)
    )  # forward only
    # the FLOPs above are every process's: on GPUs each process has its own device, so the rate scales with
    # them; on a CPU the processes share this machine's cores
    devices = target.num_processes if target.device_type == "cuda" else 1
    if target.peak_flops_per_s:
        util, rate = GPU_UTILIZATION, target.peak_flops_per_s * GPU_UTILIZATION * devices
        assumptions.append(
            f"{target.name}: {target.peak_flops_per_s / 1e12:.0f} TFLOP/s peak dense tensor throughput x {util:.0%} utilization"
            + (f" x {devices} GPUs (data parallel; gradient communication not counted)" if devices > 1 else "")
        )
    else:
        probed = probe_cpu_flops()
        rate = probed * CPU_UTILIZATION
        assumptions.append(
            f"this CPU sustains {probed / 1e9:.1f} GFLOP/s in an fp32 matmul (probed); training reaches {CPU_UTILIZATION:.0%} of it"
            + (f"; the {target.num_processes} processes share it" if target.num_processes > 1 else "")
        )
    if cfg.model.method == "qlora":
        assumptions.append("QLoRA's 4-bit dequantization is not counted (it adds time, mostly on small batches)")
    train_s = train_flops / rate
    eval_s = eval_flops / rate
    ckpt_bytes = checkpoint_bytes(cfg, arch, tokenizer_bytes(tokenizer))
    ckpt_s = len(shape.checkpoint_steps) * ckpt_bytes / CHECKPOINT_WRITE_BYTES_PER_S
    assumptions.append(f"checkpoints written at {CHECKPOINT_WRITE_BYTES_PER_S / 1e6:.0f} MB/s; loading the model for training not counted")
    timing = {
        "train_tokens": work.train_tokens,
        "computed_tokens": work.computed_tokens,
        "target_tokens": work.target_tokens,
        "train_flops": train_flops,
        "flops_per_s": rate,
        "train_s": train_s,
        "eval_loss_s": eval_s,
        "checkpoint_bytes": ckpt_bytes,
        "num_checkpoints": len(shape.checkpoint_steps),
        "checkpoint_s": ckpt_s,
        "measured": None,
        "from_measurement": False,
    }
    if measure_steps:
        measured = timing["measured"] = measure(as_given, measure_steps)
        tps = measured["tokens_per_s"]  # one process on this machine
        measured["train_s_here"] = work.train_tokens / tps
        where = f"{measure_steps} real optimizer steps on this machine ({measured['device']}, one process)"
        if target.this_machine:
            # N processes on GPUs like this one: N devices at the measured rate each; on a CPU they share it
            timing["train_s"] = work.train_tokens / (tps * devices)
            timing["eval_loss_s"] = len(eval_steps) * eval_tokens / (3 * tps * devices)
            timing["from_measurement"] = True
            assumptions.append(
                f"measured: {tps:,.0f} tokens/s over {where}"
                + (f" x {devices} GPUs (data parallel)" if devices > 1 else "")
                + "; held-out loss evaluates 3x as many tokens per second (forward only)"
            )
        else:  # a rate measured here says nothing about another device: keep the estimate, show the measurement apart
            assumptions.append(f"measured {tps:,.0f} tokens/s over {where}: not used for {target.name}, which is not this machine")
    timing["total_s"] = timing["train_s"] + timing["eval_loss_s"] + timing["checkpoint_s"]
    timing["hours"] = timing["total_s"] / 3600
    timing["cost"] = None if price_per_hour is None else timing["hours"] * price_per_hour
    timing["price_per_hour"] = price_per_hour
    # `finetrack eval` afterwards (or beside, with --watch): a phase of its own, at the same (estimated) rate
    eval_phase = eval_cost.estimate(cfg, arch, tokenizer, len(shape.checkpoint_steps), rate, data.eval)
    assumptions += eval_phase.assumptions
    timing["eval_phase"] = {
        **dataclasses.asdict(eval_phase),
        "cost": None if price_per_hour is None else eval_phase.total_s / 3600 * price_per_hour,
    }

    # per source: rows read (counted by the data stage), kept, held out; read - kept - held out = dropped there
    read = data.report["train"]["rows_read_by_source"]
    held = Counter(e.source for e in data.eval) if isinstance(cfg.data.eval_split, float) else Counter()
    sources = {
        name: {"read": n, "rows": 0, "held_out": held[name], "dropped": n - held[name], "tokens": 0, "trainable_tokens": 0}
        for name, n in read.items()
    }
    for e in data.train:
        s = sources[e.source]
        s["rows"] += 1
        s["dropped"] -= 1
        s["tokens"] += len(e.input_ids)
        s["trainable_tokens"] += e.num_trainable_tokens
    histogram = length_histogram([len(e.input_ids) for e in data.train])
    target_info = {
        "device_type": target.device_type,
        "name": target.name,
        "memory_bytes": target.memory_bytes,
        "num_processes": target.num_processes,
    }
    return Plan(target_info, {**data.report, "per_source": sources, "length_histogram": histogram}, schedule, mem, timing, assumptions)


def length_histogram(lengths: list[int]) -> list[tuple[int, int]]:
    """(upper bound, rows) per power-of-two bucket of row length in tokens: (64, 10) = 10 rows of 33-64 tokens."""
    counts: dict[int, int] = {}
    for n in lengths:
        bound = 1 << max(0, (n - 1).bit_length())
        counts[bound] = counts.get(bound, 0) + 1
    return sorted(counts.items())


def tokenizer_bytes(tokenizer) -> int:
    """What the tokenizer's files take in a checkpoint folder: it is saved there as every checkpoint saves it
    (about 2 MB for SmolLM2, more than a small LoRA adapter)."""
    with tempfile.TemporaryDirectory(prefix="finetrack-plan-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def checkpoint_bytes(cfg: Config, arch: memory.Architecture, tokenizer_file_bytes: int) -> int:
    """Size of one checkpoint folder: the trained weights (the adapter in float32, or the whole model in its
    dtype), the optimizer state as memory.py counts it (torch AdamW: 2 states in the parameters' dtype),
    the tokenizer files and the small files (JSON, safetensors headers; CHECKPOINT_SMALL_FILES_BYTES)."""
    trained, weight_bytes = memory.trainable_params(cfg, arch)
    state = memory.optimizer_state_bytes(cfg.train.optimizer, trained, weight_bytes)
    return trained * weight_bytes + state + tokenizer_file_bytes + CHECKPOINT_SMALL_FILES_BYTES


def measure(cfg: Config, steps: int) -> dict:
    """Run `steps` real optimizer steps of this config on this machine (a scratch run directory) and read
    back what train logged: tokens/s (steps after the first) and peak memory."""
    import torch

    from .train import run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="finetrack-plan-") as tmp:
        # the trial: these steps only, nothing but metrics and one checkpoint written; what it leaves out (samples,
        # trackers, checkpoint rules, eval, output) is marked on each field (Knob measured=False in config.py)
        tree = measure_dump(cfg)
        tree["train"].update(max_steps=steps, num_epochs=None, log_every_steps=1)
        tree["output"] = {"dir": tmp}
        run(Config.model_validate(tree))
        records = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    # steps after the first (which includes warm-up): each record's tokens over its tokens/s is its time
    timed = [(b["tokens"] - a["tokens"], b["tokens_per_s"]) for a, b in pairwise(records)] or [
        (records[0]["tokens"], records[0]["tokens_per_s"])
    ]
    tokens_per_s = sum(t for t, _ in timed) / sum(t / r for t, r in timed)
    return {"steps": steps, "tokens_per_s": tokens_per_s, "peak_mem_mib": max(r["peak_mem_mib"] for r in records), "device": device}


# ------------------------------------------------------------------------------------------ output
def render(plan: Plan) -> str:
    """The plan as the text `finetrack plan` prints."""
    from .data import report_line
    from .schedule import describe, elided

    s, m, t = plan.schedule, plan.memory, plan.time
    lines = [f"data: {report_line(plan.data)}"]
    for source, c in plan.data["per_source"].items():
        lines.append(
            f"  {source}: {c['read']:,} read, {c['rows']:,} to train on ({c['held_out']:,} held out, {c['dropped']:,} dropped), "
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
    w = m["largest_micro_batch"]
    lines += [
        "",
        (
            f"memory on {plan.target['name']} ({plan.target['device_type']}); largest micro-batch: {w['num_rows']} row(s) x "
            f"{w['longest_row_tokens']} tokens = {w['micro_batch_tokens']:,} tokens, {w['target_tokens']:,} carrying loss"
        ),
    ]
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
    lines += [
        "",
        (
            f"time and cost ({how}): {t['train_tokens']:,} tokens to train ({t['computed_tokens']:,} computed with padding, "
            f"{t['target_tokens']:,} carrying loss)"
        ),
    ]
    lines.append(
        f"  training {_hours(t['train_s'])} + held-out loss {_hours(t['eval_loss_s'])} + {t['num_checkpoints']} checkpoint(s) of "
        f"{memory.mib(t['checkpoint_bytes'])} {_hours(t['checkpoint_s'])} = {_hours(t['total_s'])}{cost}"
    )
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
