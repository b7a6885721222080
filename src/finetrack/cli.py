"""Command line: verbs -> functions. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError, help_config, load_config
from .data import DataError
from .evaluate.spec import EvalError
from .interrupt import Interrupted


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetrack", description="Fine-tune causal LMs and study the trajectory of a run.")
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser(
        "train", help="train one run from a YAML config", description="Train one run: finetrack train CONFIG.yaml [section.key=value ...]"
    )
    t.add_argument("config", nargs="?", help="YAML config file (omit to use defaults)")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 model.lora.r=8")
    t.add_argument("--help-config", action="store_true", help="list every config key with its type, default and meaning")
    t.add_argument(
        "--fresh", action="store_true", help="start over: move this run's files to RUN_DIR/superseded/ (also: env FINETRACK_FRESH=1)"
    )
    t.add_argument("--delete-remote", action="store_true", help="with --fresh: also delete the checkpoints under checkpoint.remote")
    t.add_argument(
        "--resume-from", metavar="PATH", help="resume from this checkpoint folder, run directory or remote .../checkpoints/step-N URL"
    )
    t.add_argument("--allow-config-change", action="store_true", help="resume even if model, data, lr, batch or method changed")
    s = sub.add_parser(
        "sync",
        help="mirror complete checkpoints of a run (remote URL or local path) into a local run directory",
        description="Copy every complete checkpoint (manifest verified after download) from SRC to DST, skipping those already there.",
    )
    s.add_argument("src", help="run directory: fsspec URL (s3://bucket/run, gs://, hf://, file://) or local path")
    s.add_argument("dst", help="local run directory to mirror into")
    s.add_argument("--watch", type=float, metavar="SECONDS", help="keep polling every SECONDS until Ctrl+C")
    e = sub.add_parser(
        "eval",
        help="evaluate the base model (step 0) and every checkpoint of a run with its eval suites",
        description="finetrack eval RUN_DIR [--steps all|latest|0,47,94] [--suite NAME ...] [eval.key=value ...]",
    )
    e.add_argument("run_dir", help="run directory (holding config.resolved.yaml and checkpoints/), or a model or adapter folder")
    e.add_argument("overrides", nargs="*", help="eval.key=value applied to the run's eval section")
    e.add_argument("--steps", help="a run: all (default), latest, or a comma-separated list such as 0,47,94 (0 = the base model)")
    e.add_argument("--suite", action="append", metavar="NAME", help="only these suites (repeatable); default: all of eval.suites")
    e.add_argument("--config", help="a model or adapter folder: the config whose eval.suites (and model settings) to use")
    e.add_argument("--output", help="a model or adapter folder: where results go (default ./eval-<folder name>)")
    e.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="a run: follow training, evaluating each checkpoint as it completes, until its last one",
    )
    g = sub.add_parser("gate", help="GO / NO-GO on an eval metric vs the base model: exit 0 GO, 1 NO-GO, 2 missing data")
    from . import gate

    gate.add_arguments(g)
    r = sub.add_parser(
        "report",
        help="write a self-contained HTML report (curves, trajectory, sample answers, run facts) of one or more runs",
        description="finetrack report RUN_DIR [RUN_DIR ...] [-o report.html]: several runs are overlaid, one colour per run.",
    )
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (holding config.resolved.yaml)")
    r.add_argument("-o", "--output", help="HTML file to write (default: RUN_DIR/report.html for one run, ./report.html for several)")
    pl = sub.add_parser(
        "plan",
        help="before training: data report, schedule, memory fit, time and cost (nothing is trained without --measure)",
        description="finetrack plan CONFIG.yaml [section.key=value ...] [--device-memory 24GB] [--gpu H100] [--price-per-hour 3.80] [--measure [--measure-steps N]]",
    )
    pl.add_argument("config", nargs="?", help="YAML config file (omit to use defaults)")
    pl.add_argument("overrides", nargs="*", help="section.key=value, as for train")
    pl.add_argument("--device-memory", metavar="SIZE", help="memory of the target device, e.g. 24GB (read as GiB), 80GiB, 16000MB")
    pl.add_argument(
        "--gpu",
        metavar="NAME",
        help="plan for this GPU (its peak FLOP/s and memory), e.g. H100, A100-80GB, L4; an unknown name lists the known ones",
    )
    pl.add_argument("--num-processes", type=int, default=1, metavar="N", help="data-parallel processes (accelerate launch)")
    pl.add_argument("--price-per-hour", type=float, metavar="PRICE", help="machine price per hour: prints the cost")
    pl.add_argument(
        "--measure",
        action="store_true",
        help="run a few real optimizer steps on this machine for tokens/s and peak memory "
        "(they time the run only when the plan is for this machine: not with another --gpu)",
    )
    pl.add_argument("--measure-steps", type=int, metavar="N", help="how many optimizer steps --measure runs (default 5; implies --measure)")
    pl.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    d = sub.add_parser("demo", help="fine-tune the embedded model on the demo chat set and show what changed")
    d.add_argument("overrides", nargs="*", help="section.key=value applied to the demo config, e.g. train.max_steps=20")
    return p


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`train k=v` without a config file: the first override landed in the config slot."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, overrides


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "datasets", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.verb == "train":
            if args.help_config:
                print(help_config())
                return 0
            config, overrides = _config_and_overrides(args)
            from .resume import Request
            from .train import run

            request = Request.from_env(
                fresh=args.fresh,
                delete_remote=args.delete_remote,
                resume_from=args.resume_from,
                allow_config_change=args.allow_config_change,
            )
            result = run(load_config(config, overrides), request=request)
            if result.resumed_from_step == result.total_steps:
                print(f"already complete: {result.total_steps} steps; final checkpoint {result.final_checkpoint}")
            else:
                print(
                    f"done: {result.total_steps} steps, loss {result.first_loss:.4f} -> {result.final_loss:.4f}; final checkpoint {result.final_checkpoint}"
                )
            if result.not_uploaded:
                return 3
        elif args.verb == "sync":
            from .storage import describe_error, sync

            try:
                sync(args.src, Path(args.dst), watch_seconds=args.watch)
            except (ValueError, ImportError, OSError) as e:  # bad source, missing backend, network: no traceback
                print(f"error: {describe_error(e, args.src)}", file=sys.stderr)
                return 2
        elif args.verb == "eval":
            from .evaluate.runner import evaluate_model, evaluate_run

            if not (Path(args.run_dir) / "config.resolved.yaml").is_file() and Path(args.run_dir).is_dir():
                ignored = [flag for flag, value in (("--steps", args.steps), ("--watch", args.watch)) if value is not None]
                if ignored:  # a model folder is step 0, an adapter steps 0 and 1: there is nothing to pick or follow
                    raise ConfigError(f"{' and '.join(ignored)}: only for a run directory; {args.run_dir} is a model or adapter folder")
                evaluate_model(
                    Path(args.run_dir),
                    args.output and Path(args.output),
                    args.config and Path(args.config),
                    list(args.overrides),
                    suite_names=args.suite,
                )
                return 0
            ignored = [flag for flag, value in (("--config", args.config), ("--output", args.output)) if value is not None]
            if ignored:  # a run is evaluated with its own config, into RUN_DIR/eval
                raise ConfigError(
                    f"{' and '.join(ignored)}: only for a model or adapter folder; a run uses its config.resolved.yaml "
                    "(change suites with eval.* overrides) and writes RUN_DIR/eval"
                )
            evaluate_run(
                args.run_dir, steps=args.steps or "all", suite_names=args.suite, overrides=list(args.overrides), watch_seconds=args.watch
            )
        elif args.verb == "gate":
            from . import gate

            return gate.main(args)
        elif args.verb == "report":
            from .report import write_report

            path = write_report([Path(d) for d in args.run_dirs], args.output and Path(args.output))
            print(f"report: {path.resolve()}")
        elif args.verb == "plan":
            import dataclasses
            import json

            from .plan import make_plan, render, target_for

            config, overrides = _config_and_overrides(args)
            plan = make_plan(
                load_config(config, overrides),
                target_for(args.gpu, args.device_memory, args.num_processes),
                args.price_per_hour,
                5 if args.measure and args.measure_steps is None else args.measure_steps,
            )
            print(render(plan))
            if args.json:
                Path(args.json).write_text(json.dumps(dataclasses.asdict(plan), indent=2) + "\n")
                print(f"plan written to {args.json}")
        elif args.verb == "demo":
            from .demo import demo

            demo(list(args.overrides))
    except (ConfigError, DataError, CheckpointError, EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    return 0
