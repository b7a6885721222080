"""`finetrack smoke CONFIG`: the infrastructure test before a long run, as one command, through the real parts.

environment (smoke_env.py: versions, device, kernels, disk, the remote written and read back) -> a short copy of the
run (same model, data, method, objective, remote storage and process count; `--steps N`, checkpoints every N/4
steps) trained by `python -m finetrack train` into a scratch folder, killed with SIGKILL after its 2nd checkpoint and
resumed by the same command -> its checkpoints mirrored with `finetrack sync` and verified -> one checkpoint evaluated
with `finetrack eval --steps latest` -> peak memory against `plan`, the loss going down, throughput projected to the
full run's time and cost -> a PASS / FAIL checklist, exit 0 / 1. The scratch folder and the remote scratch prefix are
deleted unless --keep. The real output.dir and the real remote prefix are never written.

    SCRATCH/run      the short run's directory (output.dir of the copy)
    SCRATCH/mirror   `finetrack sync` of its remote (or of SCRATCH/run without a remote)
    SCRATCH/logs     the output of every command it ran (train-1.log, train-2.log, sync.log, eval.log)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

from . import flags, processes, rundir
from .config import Config, ConfigError, load_config
from .redact import looks_like_url, redact
from .smoke_env import Item, clean_up, device, disk, kernels, missing_folders, probe_remote, scratch_remote, versions

if TYPE_CHECKING:  # plan imports torch: loaded when main() runs
    from .plan import Plan

log = logging.getLogger(__name__)

DEFAULT_STEPS = 20  # a few dozen seconds to minutes of training: enough for 4 checkpoints, a kill and a trend
MIN_STEPS = 4  # checkpoints every N // 4 steps: the kill after the 2nd leaves at least 2 steps to resume
NUM_CHECKPOINTS = 4
KILL_AFTER_CHECKPOINTS = 2
WARMUP_RECORDS = 2  # steps left out of the throughput at the start of each attempt (kernel and allocator warm-up)
MIN_LOSS_DROP = 0.01  # the last quarter's mean loss at least 1% below the first quarter's: a flat loss is not learning
MEMORY_MARGIN = 0.10  # on CUDA, measured above predicted x (1 + this) fails
POLL_S = 0.005  # how often the first attempt's checkpoints are looked at: the kill must land before the run ends


def main(args: argparse.Namespace) -> int:
    """Run the smoke test of a config; prints the checklist; 0 when every check passes, 1 otherwise (2: bad input,
    raised as ConfigError before anything runs)."""
    import torch

    config, overrides = flags.config_and_overrides(args)
    cfg = load_config(config, overrides)
    accelerate_config = _accelerate_config(args.accelerate_config)
    scratch = _scratch_dir(cfg, args.scratch)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    remote = scratch_remote(cfg.checkpoint.remote, stamp) if cfg.checkpoint.remote else None
    from .plan import make_plan, target_for

    target = target_for(None, None, args.num_processes)
    log.info("smoke: planning the run (as `finetrack plan` does)")
    full = make_plan(cfg, target, args.price_per_hour)
    total = full.schedule["total_steps"]
    steps = _steps(args.steps, total)
    smoke_overrides = [*overrides, *_short_run_overrides(cfg, steps, total, scratch / "run", remote)]
    smoke_cfg = load_config(config, smoke_overrides)
    short = make_plan(smoke_cfg, target)  # the memory prediction for exactly the batches the short run trains
    every = max(1, steps // NUM_CHECKPOINTS)
    log.info(
        "smoke: %d of the run's %d steps into %s (checkpoints every %d steps, killed after the 2nd and resumed)%s",
        steps,
        total,
        scratch,
        every,
        f", remote {redact(remote)}" if remote else "",
    )
    runner = _Runner(scratch / "logs", torch.cuda.is_available(), args.num_processes, accelerate_config)
    created = missing_folders(str(scratch)) + missing_folders(remote)
    items: list[Item] = []
    finished = False
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        items += [versions(cfg), device(args.num_processes), kernels(cfg)]
        ckpt_bytes = short.time["checkpoint_bytes"]
        items.append(disk(cfg, full, scratch, ckpt_bytes * (len(short.schedule["checkpoint_steps"]) + 1) * (3 if remote else 2)))
        items.append(
            probe_remote(remote) if remote else Item("SKIP", "remote", "checkpoint.remote is not set: checkpoints stay on this machine")
        )
        blockers = [i.name for i in items if i.status == "FAIL" and i.blocks]
        if blockers:
            why = f"not run: the {' and '.join(blockers)} check failed"
            items += [Item("SKIP", name, why) for name in ("resume", "sync", "eval", "memory", "loss", "throughput")]
        else:
            items += _short_run(runner, config, smoke_overrides, smoke_cfg, scratch, remote, steps, full, short, target.device_type, args)
        finished = True
    finally:
        runner.stop()
        # a FAIL line (or an error) names a log: the logs stay for it
        failing = not finished or any(i.status == "FAIL" for i in items)
        clean_up(scratch, remote, args.keep, created, scratch / "logs" if failing else None)
    failed = [i for i in items if i.status == "FAIL"]
    for item in items:
        print(item.line())
    print(
        "smoke: PASS"
        if not failed
        else f"smoke: FAIL ({len(failed)} item{'s' if len(failed) > 1 else ''}: {', '.join(i.name for i in failed)})"
    )
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------- inputs
def _scratch_dir(cfg: Config, given: str | None) -> Path:
    """The scratch folder: --scratch, default `<output.dir>-smoke`; never the real run directory, inside it or around it,
    and not one left by an earlier smoke (kept with --keep): its checkpoints would be resumed instead of trained."""
    if given and looks_like_url(given):  # Path() would make it a local folder named after the URL, credentials and all
        raise ConfigError(
            f"--scratch {redact(given)}: is a URL; the scratch is a local folder (the remote scratch goes under checkpoint.remote)"
        )
    real = Path(cfg.output.dir)
    scratch = Path(given) if given else real.parent / f"{real.name}-smoke"
    a, b = scratch.absolute(), real.absolute()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise ConfigError(f"--scratch {scratch}: overlaps output.dir={real}; the smoke never writes the real run: choose another folder")
    if scratch.exists() and (not scratch.is_dir() or any(scratch.iterdir())):
        raise ConfigError(f"--scratch {scratch}: already exists (a smoke kept with --keep?); delete it or give another --scratch DIR")
    return scratch


def _steps(given: int | None, total: int) -> int:
    """--steps (default DEFAULT_STEPS), never more than the real run."""
    if given is not None and given > total:
        raise ConfigError(f"--steps {given}: the run itself has {total} optimizer steps; give at most {total}")
    steps = given if given is not None else min(DEFAULT_STEPS, total)
    if steps < MIN_STEPS:
        raise ConfigError(
            f"{'--steps ' + str(given) if given is not None else f'the run has {total} steps'}: a smoke needs at least {MIN_STEPS} "
            "(checkpoints every N/4 steps, a kill after the 2nd and a resume)"
        )
    return steps


def _short_run_overrides(cfg: Config, steps: int, total: int, run_dir: Path, remote: str | None) -> list[str]:
    """The overrides that make the run its short copy, after the user's own (the last of a key wins): its length and
    checkpoint schedule, the scratch run directory and remote prefix. Early stopping could end it before the resume is
    checked and exports would add minutes per checkpoint: both off. Every step is logged (for the loss and the rate)."""
    out = [
        f"output.dir={run_dir}",
        f"train.max_steps={steps}",
        "train.num_epochs=null",
        "train.log_every_steps=1",
        "train.early_stopping=null",
        f"checkpoint.every_steps={max(1, steps // NUM_CHECKPOINTS)}",
        "checkpoint.num_per_epoch=null",
        "checkpoint.num_first_epoch=null",
        "checkpoint.steps=[]",
        "checkpoint.num_log_spaced=null",
        "checkpoint.num_keep_last=null",
        "checkpoint.keep_schedule=true",
        "checkpoint.export=[]",
    ]
    if cfg.train.warmup_steps:  # a fixed warmup is scaled with the run (warmup_ratio scales by itself)
        out.append(f"train.warmup_steps={round(cfg.train.warmup_steps * steps / total)}")
    if remote:
        out.append(f"checkpoint.remote={remote}")
    return out


# -------------------------------------------------------------------------------------- subprocesses
def _accelerate_config(path: str | None) -> Path | None:
    """--accelerate-config, checked before any work."""
    if path and not Path(path).is_file():
        raise ConfigError(f"--accelerate-config: {path}: no such file (an accelerate config, e.g. examples/accelerate/fsdp2.yaml)")
    return Path(path).resolve() if path else None


class _Runner:
    """Starts finetrack commands as a user's job would (`python -m finetrack ...`, under torchrun or accelerate launch
    for several processes), each in its own session so that a kill reaches every process of it, output to a log file."""

    def __init__(self, logs: Path, cuda: bool, num_processes: int, accelerate_config: Path | None = None) -> None:
        self.logs, self.cuda, self.num_processes, self.accelerate_config = logs, cuda, num_processes, accelerate_config
        self.proc: subprocess.Popen | None = None
        self.env = {k: v for k, v in os.environ.items() if k != "FINETRACK_FRESH"}  # a fresh start would defeat the resume
        self.env["PYTHONUNBUFFERED"] = "1"  # the log of a killed process keeps its last lines

    def argv(self, verb: str, *args: str) -> list[str]:
        launcher = ["finetrack"]
        if verb == "train" and self.accelerate_config:  # the real run's launch (FSDP, ...), as its user starts it
            config = ["--config_file", str(self.accelerate_config), "--num_processes", str(self.num_processes)]
            launcher = ["accelerate.commands.launch", *config, "-m", "finetrack"]
        elif verb == "train" and self.num_processes > 1:
            n = str(self.num_processes)
            launcher = (
                ["accelerate.commands.launch", "--multi_gpu", "--num_processes", n, "-m", "finetrack"]
                if self.cuda
                else ["torch.distributed.run", "--standalone", "--nproc_per_node", n, "-m", "finetrack"]
            )
        return [sys.executable, "-m", *launcher, verb, *args]

    def start(self, name: str, argv: list[str]) -> Path:
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.logs / f"{name}.log"
        with open(path, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        return path

    def wait(self) -> int:
        assert self.proc is not None
        rc = self.proc.wait()
        self.proc = None
        return rc

    def run(self, name: str, argv: list[str]) -> tuple[int, Path]:
        path = self.start(name, argv)
        return self.wait(), path

    def kill(self) -> None:
        """SIGKILL to the whole job (a launcher and its workers): a machine lost, as far as the run can tell. A
        launcher's workers run in sessions of their own (torch elastic starts them so): each is killed by pid, before
        the launcher, whose death would ask them to stop cleanly (processes.stop_with_launcher)."""
        if self.proc is not None:
            for pid in [*reversed(processes.descendants(self.proc.pid)), self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.proc = None


def _last_error(log_path: Path) -> str:
    """The line of a command's output that says why it failed: its `error:` / `stopped:` line, else its last line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("error:", "stopped:")) or "internal error" in line]
    return redact((said or lines or ["(no output)"])[-1])[:400]


def _failed(name: str, what: str, log_path: Path) -> Item:
    """A command that failed, with its error line; a run that diverged is the loss item's failure."""
    error = _last_error(log_path)
    return Item("FAIL", "loss" if "training diverged" in error else name, f"{what}: {error} (log: {log_path})")


def _complete_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (a checkpoint is written under a temporary name and renamed when complete)."""
    try:
        names = os.listdir(run_dir / rundir.CHECKPOINTS_DIR)
    except FileNotFoundError:
        return []
    return sorted(s for s in map(rundir.parse_step, names) if s is not None)


# ------------------------------------------------------------------------------------------ the run
def _short_run(
    runner: _Runner,
    config: str | None,
    overrides: list[str],
    cfg: Config,
    scratch: Path,
    remote: str | None,
    steps: int,
    full: Plan,
    short: Plan,
    device_type: str,
    args: argparse.Namespace,
) -> list[Item]:
    """Train the copy (killed and resumed), mirror and verify it, evaluate a checkpoint, and judge what it logged."""
    run_dir, mirror = scratch / "run", scratch / "mirror"
    argv = runner.argv("train", *([config] if config else []), *overrides)
    skip_rest = ("sync", "eval", "memory", "loss", "throughput")

    log.info("smoke: training (1st attempt, to be killed after checkpoint %d)", KILL_AFTER_CHECKPOINTS)
    first_log = runner.start("train-1", argv)
    seen: list[int] = []
    while runner.proc is not None and runner.proc.poll() is None:
        seen = _complete_steps(run_dir)
        if len(seen) >= KILL_AFTER_CHECKPOINTS:
            runner.kill()
            break
        time.sleep(POLL_S)
    rc = runner.wait()
    if len(seen) < KILL_AFTER_CHECKPOINTS:
        if rc == 0:
            failed = Item(
                "FAIL", "resume", f"not killed: the run ended before its checkpoint {KILL_AFTER_CHECKPOINTS} was seen; give more --steps"
            )
        else:
            failed = _failed("train", f"`finetrack train` exited {rc}", first_log)
        return [failed, *(Item("SKIP", n, "not run: the short run failed") for n in ("resume", *skip_rest) if n != failed.name)]
    killed_at = seen[-1]
    log.info("smoke: killed after checkpoint step %d; resuming with the same command", killed_at)
    rc, second_log = runner.run("train-2", argv)
    items = [_resume_item(rc, second_log, run_dir, killed_at, steps)]
    if rc not in (0, 3):  # 3: trained to the end, some checkpoints not uploaded (the sync check names them)
        return items + [Item("SKIP", n, "not run: the resumed run failed") for n in ("resume", *skip_rest) if n != items[0].name]

    log.info("smoke: mirroring the checkpoints with `finetrack sync`")
    items.append(_sync_item(runner, remote or str(run_dir), mirror, run_dir, rc))
    if not cfg.eval.suites:
        items.append(Item("SKIP", "eval", "the config has no eval.suites: nothing for `finetrack eval` to run"))
    else:
        log.info("smoke: evaluating the newest checkpoint with `finetrack eval --steps latest`")
        items.append(_eval_item(runner, mirror if (mirror / "config.resolved.yaml").is_file() else run_dir, steps, cfg))
    records = [r for r in rundir.read_jsonl(run_dir / "metrics.jsonl", []) if "loss" in r and r.get("step", 0) >= 1]
    records.sort(key=lambda r: r["step"])
    items.append(_memory_item(records, short, device_type))
    items.append(_loss_item(records))
    items.append(_throughput_item(records, killed_at, full, args.price_per_hour))
    return items


def _resume_item(rc: int, log_path: Path, run_dir: Path, killed_at: int, steps: int) -> Item:
    """Did the same command resume from the newest checkpoint at the kill and end at the last step, its metrics.jsonl
    holding every step once?"""
    if rc not in (0, 3):
        return Item(
            "FAIL", "resume", f"killed after step {killed_at}; the same command exited {rc}: {_last_error(log_path)} (log: {log_path})"
        )
    text = log_path.read_text(errors="replace")
    said = re.search(r"resuming from \S+: step (\d+) of (\d+)", text)
    logged = [r["step"] for r in rundir.read_jsonl(run_dir / "metrics.jsonl", []) if "loss" in r]
    ended = _complete_steps(run_dir)
    problems = []
    if not said:
        problems.append("it did not say it resumed (no 'resuming from ...' line): it started over")
    elif int(said.group(1)) != killed_at:
        problems.append(f"it resumed from step {said.group(1)}, not from the newest checkpoint at the kill (step {killed_at})")
    if not ended or ended[-1] != steps:
        problems.append(f"its newest checkpoint is step {ended[-1] if ended else 'none'}, not {steps}")
    if sorted(logged) != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl holds steps {_ranges(logged)}, not 1-{steps} once each")
    evidence = f"killed (SIGKILL) after step {killed_at} (checkpoint {rundir.step_name(killed_at)}), resumed"
    if problems:
        return Item("FAIL", "resume", f"{evidence}, but {'; '.join(problems)} (log: {log_path})")
    return Item(
        "PASS",
        "resume",
        f"{evidence} by the same command from step {killed_at}, ended at step {steps}; metrics.jsonl steps 1-{steps} once each",
    )


def _sync_item(runner: _Runner, source: str, mirror: Path, run_dir: Path, train_rc: int) -> Item:
    """`finetrack sync SOURCE MIRROR`, then every mirrored checkpoint verified in full (sha256) against the run's."""
    rc, log_path = runner.run("sync", runner.argv("sync", source, str(mirror)))
    where = f"from {redact(source)}"
    if rc != 0:
        return Item("FAIL", "sync", f"`finetrack sync` {where} exited {rc}: {_last_error(log_path)}")
    want, got = _complete_steps(run_dir), _complete_steps(mirror)
    bad = []
    for step in got:
        try:
            rundir.verify(rundir.checkpoint_dir(mirror, step), full=True)
        except rundir.CheckpointError as e:
            bad.append(str(e))
    missing = sorted(set(want) - set(got))
    note = " (`finetrack train` exited 3: some checkpoints were not uploaded)" if train_rc == 3 else ""
    if bad or missing or train_rc == 3:
        problems = [f"missing steps {_ranges(missing)} (not on the remote)"] if missing else []
        return Item("FAIL", "sync", f"{where}: " + "; ".join(problems + bad) + note)
    return Item(
        "PASS", "sync", f"{len(got)} checkpoint(s) {where} into {mirror}, each verified (sha256): steps {_ranges(got)}, all the run wrote"
    )


def _eval_item(runner: _Runner, run: Path, steps: int, cfg: Config) -> Item:
    """`finetrack eval RUN --steps latest`: the base model and the newest checkpoint, with the run's suites."""
    rc, log_path = runner.run("eval", runner.argv("eval", str(run), "--steps", "latest"))
    if rc != 0:
        return Item("FAIL", "eval", f"`finetrack eval {run} --steps latest` exited {rc}: {_last_error(log_path)}")
    try:
        done = json.loads(rundir.eval_path(run, steps).read_text())
        base = json.loads(rundir.eval_path(run, 0).read_text())
    except (OSError, ValueError) as e:
        return Item("FAIL", "eval", f"`finetrack eval` exited 0 but its results cannot be read: {e}")
    missing = [s.name for s in cfg.eval.suites if s.name not in done.get("suites", {})]
    if missing:
        return Item("FAIL", "eval", f"step {steps} has no result for suite(s) {', '.join(missing)}")
    shown = [
        f"{name} {_num(base.get('metrics', {}).get(name))} -> {_num(value)}"
        for name, value in list(done.get("metrics", {}).items())[:3]
        if isinstance(value, (int, float))
    ]
    what = ", ".join(shown) or "no numeric metrics"
    return Item("PASS", "eval", f"{len(cfg.eval.suites)} suite(s) on {run} at step 0 -> step {steps}: {what}")


def _memory_item(records: list[dict], short: Plan, device_type: str) -> Item:
    """The measured peak (metrics.jsonl peak_mem_mib) against plan's prediction for the same settings and batches. On
    CUDA both count what torch allocates (the CUDA context, which max_memory_allocated does not see, is left out of
    the prediction) and a peak above the prediction by more than MEMORY_MARGIN fails; on a CPU the measured peak is the
    process's resident set, which the prediction models with stated constants: reported, not judged."""
    from . import memory

    measured = max((r.get("peak_mem_mib", 0.0) for r in records), default=0.0)
    terms = [memory.Term(**t) for t in short.memory["terms"]]
    if device_type == "cuda":
        predicted = memory.peak_bytes(terms, measured_only=True) / 2**20
        ratio = measured / predicted
        text = (
            f"peak {measured:,.0f} MiB allocated (max_memory_allocated) vs {predicted:,.0f} MiB predicted by plan for these "
            f"settings (without the CUDA context): ratio {ratio:.2f}; rule: FAIL above {1 + MEMORY_MARGIN:.2f}"
        )
        return Item("PASS" if ratio <= 1 + MEMORY_MARGIN else "FAIL", "memory", text)
    predicted = memory.peak_bytes(terms) / 2**20
    return Item(
        "INFO",
        "memory",
        f"peak {measured:,.0f} MiB resident (the process's max RSS) vs {predicted:,.0f} MiB predicted by plan for these settings: "
        f"ratio {measured / predicted:.2f} (on a CPU the prediction includes the imported libraries and glibc's heap: information only)",
    )


def _loss_item(records: list[dict]) -> Item:
    """First vs last quarter of the steps: the mean loss must be finite and lower at the end by MIN_LOSS_DROP."""
    if len(records) < 2:
        return Item("FAIL", "loss", f"{len(records)} logged step(s): nothing to compare")
    window = max(1, len(records) // 4)
    head, tail = records[:window], records[-window:]
    first, last = (sum(r["loss"] for r in part) / len(part) for part in (head, tail))
    text = f"{first:.4g} (mean of steps {_ranges([r['step'] for r in head])}) -> {last:.4g} (steps {_ranges([r['step'] for r in tail])})"
    rule = f"rule: the mean loss of the last quarter of the steps at least {MIN_LOSS_DROP:.0%} below that of the first quarter"
    if not (math.isfinite(first) and math.isfinite(last)):
        return Item("FAIL", "loss", f"{text}: not finite; {rule}")
    change = last / first - 1 if first else 0.0
    return Item("PASS" if last <= first * (1 - MIN_LOSS_DROP) else "FAIL", "loss", f"{text}, {change:+.1%}; {rule}")


def _throughput_item(records: list[dict], killed_at: int, full: Plan, price_per_hour: float | None) -> Item:
    """Tokens/s over the steps after each attempt's first WARMUP_RECORDS (metrics.jsonl: each step's tokens over its
    tokens_per_s is its time), projected to the full run's tokens (plan), with plan's other phases added as it
    estimates them; the cost at --price-per-hour."""
    skip = set(range(1, WARMUP_RECORDS + 1)) | set(range(killed_at + 1, killed_at + WARMUP_RECORDS + 1))
    timed = [
        (b["tokens"] - a["tokens"], b["tokens_per_s"]) for a, b in pairwise(records) if b["step"] == a["step"] + 1 and b["step"] not in skip
    ]
    timed = [(n, rate) for n, rate in timed if n > 0 and rate > 0] or [
        (b["tokens"] - a["tokens"], b["tokens_per_s"]) for a, b in pairwise(records) if b["tokens_per_s"] > 0
    ]
    if not timed:
        return Item("FAIL", "throughput", "no timed steps in metrics.jsonl")
    tokens = sum(n for n, _ in timed)
    rate = tokens / sum(n / r for n, r in timed)
    t = full.time
    train_s = t["train_tokens"] / rate
    other_s = max(0.0, t["total_s"] - t["train_s"])
    total_s = train_s + other_s
    planned = t["train_tokens"] / t["train_s"] if t["train_s"] else float("nan")
    text = (
        f"{rate:,.0f} tokens/s over {len(timed)} steps ({tokens:,} tokens; the first {WARMUP_RECORDS} of each attempt left out; "
        f"plan estimated {planned:,.0f}); the full run: {t['train_tokens']:,} tokens in {full.schedule['total_steps']:,} steps "
        f"-> {_duration(train_s)} training + {_duration(other_s)} held-out loss, checkpoints, validation and exports as plan "
        f"estimates them = {_duration(total_s)}"
    )
    if price_per_hour is not None:
        text += f", {total_s / 3600 * price_per_hour:,.2f} at {price_per_hour:g} per hour"
    return Item("INFO", "throughput", text)


# ---------------------------------------------------------------------------------------- helpers
def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    out: list[str] = []
    for s in sorted(steps):
        if out and out[-1].split("-")[-1] == str(s - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{s}"
        else:
            out.append(str(s))
    return ", ".join(out) or "none"


def _num(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"
