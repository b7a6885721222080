"""`finetrack plan CONFIG`: what a run will need before it runs — data, schedule, memory fit, time and cost.

data (the same preparation as train, for the configured objective) -> schedule (the same resolve() as train) -> workload (the real
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
from .evaluate.spec import validates_at, validation_every_steps
from .fit import ranked_changes
from .mixture import Mixture
from .objective_data import _truncate
from .plan_export import export_cost
from .plan_mixture import mixture_env, mixture_info, resized
from .plan_render import render  # noqa: F401  (re-exported: the CLI and tests import it from here)
from .target import (  # noqa: F401  (parse_bytes, target_for, _gpu_key: re-exported, the CLI and tests import them from here)
    CPU_UTILIZATION,
    GPU_UTILIZATION,
    Target,
    _gpu_key,
    flops_per_hidden_read,
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
    train_tokens: int = 0  # real tokens over all optimizer steps (all processes; every sequence of a triplet)
    computed_tokens: int = 0  # tokens including padding
    target_tokens: int = 0  # tokens with a next-token label (what train logs as target_tokens)
    attention_cells: int = 0  # sum over micro-batches of rows x width^2 (dense attention scores)
    logit_tokens: int = 0  # positions lm_head runs at: the target tokens with a next-token term, else one per row (or none)
    num_reads: int = 0  # hidden-state reads (regression targets, 3 per triplet)
    read_cells: int = 0  # sum over micro-batches of reads x rows x width (the dense pooling product)
    largest_sequences: int = 0  # sequences in the largest micro-batch (3 per triplet row)


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


def workload(
    examples: list[Example], cfg: Config, arch: memory.Architecture, total_steps: int, num_processes: int, mixture: Mixture | None = None
) -> Workload:
    """Walk the run's optimizer steps in their real order (train's step_rows, or a mixture's Mixture.step: loop.step_batches)
    and measure the micro-batches. A triplet runs its anchor, positive and negative in the micro-batch's one forward
    (batches.collate lays out the anchors, then the positives, then the negatives): every sequence counts."""
    shape, attn_tokens = memory.objective_shape(cfg, arch), attn_tokens_for(arch.hidden_size)
    rows_per_process = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    sequences = [[len(s.input_ids) for s in e.sequences()] for e in examples]
    lengths = [sum(x) for x in sequences]
    targets = [sum(s.num_trainable_tokens for s in e.sequences()) for e in examples]
    reads = [sum(len(s.pools) for s in e.sequences()) for e in examples]
    out = Workload(memory.Workload(0, 0, 0, 0))
    for step in range(total_steps):
        if mixture:
            rows = mixture.step(rows_per_process * num_processes, cfg.train.seed, step + 1, cfg.data.shuffle)
        else:
            _, rows = step_rows(len(examples), rows_per_process * num_processes, cfg.train.seed, step, cfg.data.shuffle)
        out.train_tokens += sum(lengths[i] for i in rows)
        for j in range(0, rows_per_process, cfg.train.micro_batch_size):  # process 0's micro-batches
            mb = rows[j : j + cfg.train.micro_batch_size]
            laid_out = [sequences[i][k] for k in range(shape.sequences_per_row) for i in mb]
            num_rows, width, masked = micro_batch_shape(laid_out, cfg.data.pack, cfg.data.pack_row_tokens, attn_tokens)
            tokens, tgt, n = num_rows * width, sum(targets[i] for i in mb), sum(reads[i] for i in mb)
            # logits where a target exists with a next-token term; else logits_to_keep=1 (one per row) when hidden
            # states are read (objectives.py)
            logits = tgt if shape.next_token and tgt else num_rows if shape.reads_hidden else 0
            out.computed_tokens += tokens * num_processes
            out.target_tokens += tgt * num_processes
            out.attention_cells += num_rows * width * width * num_processes
            out.logit_tokens += logits * num_processes
            out.num_reads += n * num_processes
            out.read_cells += n * tokens * num_processes
            if tokens > out.largest.micro_batch_tokens:
                out.largest_sequences = len(laid_out)
                out.largest = memory.Workload(
                    micro_batch_tokens=tokens,
                    longest_row_tokens=width,
                    target_tokens=tgt if shape.next_token else 0,
                    num_rows=num_rows,
                    masked=masked,
                    num_reads=n,
                )
    return out


def capped(examples: list[Example], cfg: Config) -> list[Example]:
    """The examples as data.max_length would leave them (truncated or dropped), without tokenizing again: every
    sequence of a row cut, a row left without a read position dropped (objective_data._fit_length)."""
    n = cfg.data.max_length
    out = []
    for e in examples:
        if max(len(s.input_ids) for s in e.sequences()) <= n:
            out.append(e)
        elif cfg.data.on_overflow != "drop":
            head, *rest = cut = [_truncate(s, n) for s in e.sequences()]
            if all(s.pools for s in cut) or not e.pools:
                out.append(dataclasses.replace(head, pair=(rest[0], rest[1]) if rest else None, channel=e.channel))
    return out


# -------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    target: dict
    data: dict
    schedule: dict
    memory: dict
    time: dict
    assumptions: list[str] = field(default_factory=list)
    objective: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)  # checkpoint.export (plan_export.py)


def make_plan(cfg: Config, target: Target, price_per_hour: float | None = None, measure_steps: int | None = None) -> Plan:
    """Everything `finetrack plan` prints, as plain data."""
    from transformers import AutoConfig

    from . import warm_start
    from .models import check_lora_layers, check_source, load_tokenizer, model_source
    from .redact import looks_like_url

    if measure_steps is not None and measure_steps < 1:
        raise ConfigError(f"--measure-steps {measure_steps}: measure at least 1 optimizer step (default 5)")
    # train's checks that need no weights, where they hold on any machine: the model folder (its kernels, e.g.
    # flash-attn, are the training machine's business); the output folder is only a warning (it may be another machine's)
    check_source(cfg.model.model_copy(update={"attn_implementation": "auto"}))
    if problem := runlock.run_dir_problem(Path(cfg.output.dir)):
        log.warning("warning: %s (on this machine: finetrack train here would refuse it)", problem)
    if cfg.model.init_from and not looks_like_url(cfg.model.init_from):  # as train checks it (a remote one is not fetched);
        try:  # a warning: the run it names may be one still to train (phase 2 planned before phase 1)
            warm_start.check_method(warm_start.locate(cfg.model.init_from, Path(cfg.output.dir)), cfg.model.method)
        except ConfigError as e:
            log.warning("warning: %s (finetrack train would refuse it now)", e)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.train.seed, cfg.objective)
    as_given = cfg  # --measure resolves it again for this machine
    env = Environment(
        device_type=target.device_type, bf16_supported=target.bf16, num_processes=target.num_processes, num_train_rows=len(data.train)
    )
    env = mixture_env(env, cfg, data.mixture)
    cfg, res = resolve(cfg, env)
    shape = res.shape
    assert shape is not None  # resolve() always sets it
    data.note_usage(shape.global_batch_size, shape.total_steps, cfg.train.seed, cfg.data.shuffle)  # a mixture: each source's share
    arch = memory.Architecture.from_hf_config(
        AutoConfig.from_pretrained(
            model_source(cfg.model), revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        ).to_dict()
    )
    check_lora_layers(cfg.model, arch.num_layers)  # as train does once the model is built
    total_steps = shape.total_steps
    work = workload(data.train, cfg, arch, total_steps, target.num_processes, data.mixture)
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
        "largest_micro_batch": {**vars(work.largest), "num_sequences": work.largest_sequences},
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
            mixture = resized(data.mixture, examples)
            changed_env = mixture_env(dataclasses.replace(env, num_train_rows=len(examples)), changed, mixture)
            try:
                steps = resolve(changed, changed_env)[1].shape.total_steps
            except ConfigError:  # resolve refuses it (e.g. fewer rows left than one step takes): the steps its rows fill
                per_step = changed.train.micro_batch_size * changed.train.grad_accum_steps * target.num_processes
                steps = min(total_steps, max(1, len(examples) // per_step))
            return workload(examples, changed, arch, steps, target.num_processes, mixture).largest

        changes = ranked_changes(cfg, arch, work_for, target.device_type, target.memory_bytes, base=work.largest)
        mem["changes"] = [vars(c) for c in changes]

    # --- time and cost
    obj = memory.objective_shape(cfg, arch)
    gc = cfg.model.gradient_checkpointing
    forward_only = obj.frozen and not gc  # a frozen backbone without checkpointing: nothing before the head has a backward
    per_token, per_target, per_cell = flops_per_micro_batch_tokens(arch, cfg.model.method, gc, obj.frozen)
    per_logit = per_target if obj.next_token else 2 * arch.vocab_size * arch.hidden_size  # without a next-token term: forward only
    per_read, per_read_cell = flops_per_hidden_read(arch, obj.head_params, grad_to_hidden=not forward_only)
    train_flops = (
        per_token * work.computed_tokens
        + per_logit * work.logit_tokens
        + per_cell * work.attention_cells
        + per_read * work.num_reads
        + per_read_cell * work.read_cells
    )
    assumptions += objective_assumptions(cfg, obj)
    eval_tokens = sum(len(s.input_ids) for e in data.eval for s in e.sequences())
    eval_targets = sum(s.num_trainable_tokens for e in data.eval for s in e.sequences()) if obj.next_token else 0
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
    tok_bytes = tokenizer_bytes(tokenizer)
    ckpt_bytes = checkpoint_bytes(cfg, arch, tok_bytes)
    ckpt_s = len(shape.checkpoint_steps) * ckpt_bytes / CHECKPOINT_WRITE_BYTES_PER_S
    assumptions.append(f"checkpoints written at {CHECKPOINT_WRITE_BYTES_PER_S / 1e6:.0f} MB/s; loading the model for training not counted")
    timing = {
        "train_tokens": work.train_tokens,
        "computed_tokens": work.computed_tokens,
        "target_tokens": work.target_tokens,
        "logit_tokens": work.logit_tokens,
        "hidden_state_reads": work.num_reads,
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
            speedup = 1 if forward_only else 3  # training a frozen backbone is a forward already
            timing["eval_loss_s"] = len(eval_steps) * eval_tokens / (speedup * tps * devices)
            timing["from_measurement"] = True
            assumptions.append(
                f"measured: {tps:,.0f} tokens/s over {where}"
                + (f" x {devices} GPUs (data parallel)" if devices > 1 else "")
                + f"; held-out loss evaluates {speedup}x as many tokens per second (forward only)"
            )
        else:  # a rate measured here says nothing about another device: keep the estimate, show the measurement apart
            assumptions.append(f"measured {tps:,.0f} tokens/s over {where}: not used for {target.name}, which is not this machine")
    # `finetrack eval` afterwards (or beside, with --watch): a phase of its own, at the same (estimated) rate
    eval_phase = eval_cost.estimate(cfg, arch, tokenizer, len(shape.checkpoint_steps), rate, data.eval)
    assumptions += eval_phase.assumptions
    # suites during training (eval.every_steps): each validation costs what one evaluated step of the eval phase does
    per_step_s = {s["name"]: s["seconds"] / eval_phase.num_steps for s in eval_phase.suites}
    num_validations = {
        s.name: sum(
            validates_at(validation_every_steps(s, cfg.eval.every_steps), step, shape.total_steps) for step in range(shape.total_steps + 1)
        )
        for s in cfg.eval.suites
    }
    timing["num_validations"] = num_validations
    timing["validation_s"] = sum(per_step_s[name] * n for name, n in num_validations.items())
    run_s = timing["train_s"] + timing["eval_loss_s"] + timing["checkpoint_s"] + timing["validation_s"]
    # checkpoint.export: background exports on the CPU; the run waits at its end for the last ones
    cpu_rate = rate if target.device_type == "cpu" else None
    exports, notes = export_cost(cfg, arch, tokenizer, tok_bytes, obj.head_params, shape, run_s, cpu_rate)
    assumptions += notes
    timing["export_wait_s"] = exports.get("wait_s", 0.0)
    timing["total_s"] = run_s + timing["export_wait_s"]
    timing["hours"] = timing["total_s"] / 3600
    timing["cost"] = None if price_per_hour is None else timing["hours"] * price_per_hour
    timing["price_per_hour"] = price_per_hour
    timing["eval_phase"] = {
        **dataclasses.asdict(eval_phase),
        "cost": None if price_per_hour is None else eval_phase.total_s / 3600 * price_per_hour,
    }

    # per source: rows read (counted by the data stage), kept, held out; read - kept - held out = dropped there
    read = data.report["train"]["rows_read_by_source"]
    held = Counter(e.source for e in data.eval) if isinstance(cfg.data.eval_split, float) else Counter()
    not_sampled = data.report["train"]["rows_not_sampled_by_source"]  # data.max_rows: read, not drawn
    sources = {
        name: {"read": n, "rows": 0, "held_out": held[name], "dropped": n - held[name], "tokens": 0, "trainable_tokens": 0}
        for name, n in read.items()
    }
    for name, n in not_sampled.items():
        sources[name].update(not_sampled=n, dropped=sources[name]["dropped"] - n)
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
    data_info = {**data.report, "per_source": sources, "length_histogram": histogram}
    if data.mixture:  # beside data.report["sources"] (each source's share, rows, tokens, what the planned steps take)
        data_info["mixture"] = mixture_info(cfg, env, res)
    return Plan(target_info, data_info, schedule, mem, timing, assumptions, objective_info(cfg, arch, obj), exports)


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
    """Size of one checkpoint folder: the weights save_weights writes (the adapter in float32, or the whole model in its
    dtype; a regression head in float32 beside them), the optimizer state as memory.py counts it (torch AdamW: 2 states
    in each trained parameter's dtype), the tokenizer files and the small files (JSON, safetensors headers;
    CHECKPOINT_SMALL_FILES_BYTES)."""
    trainable = memory.trainable_params(cfg, arch)
    state = memory.optimizer_state_bytes(cfg.train.optimizer, trainable)
    if cfg.model.method == "full":
        weights = arch.num_params * memory.DTYPE_BYTES[str(cfg.model.dtype)]
    else:
        weights = memory.num_adapter_params(cfg, arch) * memory.ADAPTER_BYTES
    head = (trainable.head + 2) * memory.HEAD_BYTES if trainable.head else 0  # + the target mean and std
    return weights + head + state + tokenizer_file_bytes + CHECKPOINT_SMALL_FILES_BYTES


def objective_info(cfg: Config, arch: memory.Architecture, obj: memory.ObjectiveShape) -> dict:
    """The objective as the plan counts it: what runs through the model per row, what trains, whether logits are needed."""
    o, trainable = cfg.objective, memory.trainable_params(cfg, arch)
    backbone = "the whole model" if cfg.model.method == "full" else "the LoRA adapters"
    if o.kind == "regression":
        r = o.regression
        what = f"regression ({r.level} level, pool {r.pool}, layer {r.layer}, {r.loss}): a head of {obj.head_params:,} params on the hidden state"
        lm = f"next-token loss x {r.lm_weight} on answer tokens" if obj.next_token else "no next-token loss (lm_weight 0)"
    elif o.kind == "contrastive":
        c = o.contrastive
        what = f"contrastive ({c.loss}, pool {c.pool}, layer {c.layer}): each triplet runs as 3 sequences in one forward"
        lm = f"next-token loss x {c.lambda_task} on the anchors' answers" if obj.next_token else "no next-token loss (lambda_task 0)"
    elif o.kind == "python":
        what, lm = f"python ({o.python.function}): counted as a next-token run (its code is not read)", "next-token loss assumed"
    else:
        what, lm = "causal_lm", "next-token loss on target tokens"
    trained = "the head only (freeze_backbone)" if obj.frozen else backbone + (" + the head" if obj.head_params else "")
    return {
        "kind": o.kind,
        "sequences_per_row": obj.sequences_per_row,
        "reads_hidden_states": obj.reads_hidden,
        "next_token_loss": obj.next_token,
        "head_params": obj.head_params,
        "freeze_backbone": obj.frozen,
        "trainable_params": trainable.params,
        "description": f"{what}; trains {trained} ({trainable.params:,} params); {lm}",
    }


def objective_assumptions(cfg: Config, obj: memory.ObjectiveShape) -> list[str]:
    """What the memory model and the FLOPs assume of the objective, stated."""
    out = []
    if obj.sequences_per_row > 1:
        out.append(
            "triplets: a micro-batch of B rows runs 3B sequences in one forward (anchors, positives, negatives); tokens, "
            "activations and FLOPs count all of them"
        )
    if obj.reads_hidden:
        out.append(
            "output_hidden_states keeps every layer's output until the model's forward returns: counted at the end of the "
            "forward (phase 'forward'), without counting twice the layer inputs autograd keeps anyway; the hidden states are "
            "read through a dense (reads, tokens) float32 pooling matrix"
        )
    if obj.head_params:
        out.append(
            f"regression head: {obj.head_params:,} float32 params with their gradients and {cfg.train.optimizer} state; its FLOPs "
            "(6 x params per read) and the pooling product (2-4 x hidden per read x token) are counted, small beside the model's"
        )
    if obj.reads_hidden and not obj.next_token:
        out.append("no next-token term: lm_head runs at one position per row (logits_to_keep=1), forward only, freed before backward")
    if obj.frozen:  # with gradient checkpointing too it would recompute and differentiate the backbone: a config error
        out.append("freeze_backbone: only the head trains; the backbone runs forward only and keeps no activations for backward")
    return out


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
