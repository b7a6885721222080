"""Command line: verbs -> functions. No logic lives here.

Nothing heavy is imported at module level: a Ctrl+C while torch or transformers load must end in one
`stopped:` line, and `report` / `gate` never load torch at all. Every failure a user can cause ends in one
`error:` line and exit 2 (see errors.py); overrides (`section.key=value`) may come before or after flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import flags
from .errors import handle
from .redact import looks_like_url, redact

# Noise from libraries (their deprecation warnings, weight-loading and download progress bars) stays out of
# finetrack's output unless --verbose; set before they are imported, and only where the user has not chosen.
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "DATASETS_VERBOSITY": "error",
}
_THIRD_PARTY_LOGGERS = ("transformers", "accelerate", "datasets", "peft", "huggingface_hub", "torch", "fsspec", "s3fs", "botocore")


class _RedactingFormatter(logging.Formatter):
    """Log lines (tracebacks included) without the credentials of any URL in them: a last line of defence."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (not the stream of when it was set up): `main()` called
    again in one process (tests, notebooks) must not log into a stream an earlier caller replaced and closed."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _main_process() -> bool:
    """Rank 0 of a launch (torchrun, accelerate launch), or a process started alone."""
    return os.environ.get("RANK", "0") == "0"


def _setup_output(verbose: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(_RedactingFormatter("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    if not _main_process() and not verbose:  # the other processes of a launch would repeat each line; warnings still show
        logging.getLogger("finetrack").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        return
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for noisy in _THIRD_PARTY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    # libraries' FutureWarning / UserWarning / DeprecationWarning: not the user's to act on; finetrack's own stay
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"finetrack(\.|$)")


def main(argv: list[str] | None = None) -> int:
    """Run one `finetrack` command; returns the exit status (0 ok, 2 user error, 130 / 143 interrupted)."""
    return handle(lambda: _run(argv), argv if argv is not None else sys.argv[1:])


def _run(argv: list[str] | None) -> int:
    args = flags.parser().parse_args(argv)
    _setup_output(args.verbose)
    if args.verb not in ("report", "gate"):  # those two read JSON and YAML only: torch is never imported
        _quiet_deepspeed()
    return _VERBS[args.verb](args)


def _quiet_deepspeed() -> None:
    """transformers and accelerate import DeepSpeed whenever it is installed, and without a GPU its accelerator
    detection prints a warning in every command: tell it there is none (zero.py trains with it on CPU)."""
    import importlib.util

    if "DS_ACCELERATOR" not in os.environ and importlib.util.find_spec("deepspeed") is not None:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def _share_cores() -> None:
    """A command about to compute with torch shares the CPU with the other finetrack processes (processes.py); called
    once its input is read, so a command that fails on its input neither registers nor says anything about threads."""
    from .processes import configure_threads

    configure_threads()


def _train(args: argparse.Namespace) -> int:
    from .config import help_config, load_config

    if args.help_config:
        print(help_config())
        return 0
    config, overrides = flags.config_and_overrides(args)
    from .resume import Request
    from .train import run

    request = Request.from_env(
        fresh=args.fresh, delete_remote=args.delete_remote, resume_from=args.resume_from, allow_config_change=args.allow_config_change
    )
    cfg = load_config(config, overrides)
    _share_cores()
    result = run(cfg, request=request)
    if not _main_process():  # a launcher's other processes trained the same run: the main process reports it
        return 0
    stop = result.stop_reason
    if result.resumed_from_step == result.total_steps or (stop and result.resumed_from_step == stop.get("step")):
        ended = f"stopped early at step {stop['step']} ({stop.get('message')})" if stop else f"{result.total_steps} steps"
        print(f"already complete: {ended}; final checkpoint {result.final_checkpoint}")
    elif stop:
        print(f"stopped early at step {stop['step']} of {result.total_steps}: {stop.get('message')}")
        print(f"done: loss {result.first_loss:.4f} -> {result.final_loss:.4f}; final checkpoint {result.final_checkpoint}")
    else:
        print(
            f"done: {result.total_steps} steps, loss {result.first_loss:.4f} -> {result.final_loss:.4f}; final checkpoint {result.final_checkpoint}"
        )
    if result.best:
        print(f"best: step {result.best['step']}, {result.best['metric']} {result.best['value']:.6g} ({result.best['checkpoint']})")
    return 3 if result.not_uploaded else 0


def _sync(args: argparse.Namespace) -> int:
    from .schema import ConfigError
    from .storage import describe_error
    from .sync import sync

    if looks_like_url(args.dst):  # Path() would make it a local folder named after the URL, credentials and all
        raise ConfigError(f"{redact(args.dst)}: DST is a URL; sync mirrors into a local folder (SRC may be remote)")
    if Path(args.dst).exists() and not Path(args.dst).is_dir():
        raise ConfigError(f"{args.dst}: DST is a file; give the local folder to mirror the run into")
    try:
        sync(args.src, Path(args.dst), watch_seconds=args.watch)
    except (ValueError, ImportError, OSError) as e:  # bad source, missing backend, network: one line, no traceback
        raise ConfigError(describe_error(e, args.src)) from None
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .schema import ConfigError

    target = Path(args.run_dir)
    if target.suffix in (".yaml", ".yml") and not target.is_dir():
        # `finetrack eval CONFIG.yaml --steps 0`: the base model, into the run directory training will use
        ignored = [f for f, v in (("--watch", args.watch), ("--config", args.config), ("--output", args.output)) if v is not None]
        if ignored or args.steps not in (None, "0"):
            raise ConfigError(
                f"{' and '.join(ignored) or '--steps ' + str(args.steps)}: a config is evaluated before training at step 0 only "
                f"(the base model, into its output.dir); give --steps 0 or nothing"
            )
        from .evaluate.runner import evaluate_baseline

        _share_cores()
        evaluate_baseline(str(target), list(args.overrides), args.suite)
        return 0
    model_folder = (target / "config.json").is_file() or (target / "adapter_config.json").is_file()
    is_run = (target / "config.resolved.yaml").is_file()
    if not is_run and args.watch is None and not target.exists():
        raise ConfigError(f"{target}: no such run directory, model or adapter folder, or config file; check the path")
    from .evaluate.runner import evaluate_model, evaluate_run

    _share_cores()

    # a watch follows a run that may not exist yet (it is started together with training): only a model folder is not one
    if not is_run and target.is_dir() and (args.watch is None or model_folder):
        ignored = [flag for flag, value in (("--steps", args.steps), ("--watch", args.watch)) if value is not None]
        if ignored:  # a model folder is step 0, an adapter steps 0 and 1: there is nothing to pick or follow
            raise ConfigError(f"{' and '.join(ignored)}: only for a run directory; {target} is a model or adapter folder")
        evaluate_model(
            target, args.output and Path(args.output), args.config and Path(args.config), list(args.overrides), suite_names=args.suite
        )
        return 0
    ignored = [flag for flag, value in (("--config", args.config), ("--output", args.output)) if value is not None]
    if ignored:  # a run is evaluated with its own config, into RUN_DIR/eval
        raise ConfigError(
            f"{' and '.join(ignored)}: only for a model or adapter folder; a run uses its config.resolved.yaml "
            "(change suites with eval.* overrides) and writes RUN_DIR/eval"
        )
    evaluate_run(target, steps=args.steps or "all", suite_names=args.suite, overrides=list(args.overrides), watch_seconds=args.watch)
    return 0


def _gate(args: argparse.Namespace) -> int:
    from . import gate

    return gate.main(args)


def _export(args: argparse.Namespace) -> int:
    from . import export

    _share_cores()
    return export.main(args)


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report([Path(d) for d in args.run_dirs], args.output)  # text: `-o out/` keeps its slash (a folder)
    print(f"report: {path.resolve()}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from .config import load_config
    from .plan import make_plan, render, target_for

    config, overrides = flags.config_and_overrides(args)
    cfg = load_config(config, overrides)
    if args.measure or args.measure_steps is not None:  # only a measurement computes: a plain plan reads and counts
        _share_cores()
    plan = make_plan(
        cfg,
        target_for(args.gpu, args.device_memory, args.num_processes),
        args.price_per_hour,
        5 if args.measure and args.measure_steps is None else args.measure_steps,
    )
    print(render(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(plan), indent=2) + "\n")
        print(f"plan written to {args.json}")
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from .smoke import main as smoke

    # no _share_cores(): this process only waits while its `finetrack train` children compute (they share the cores)
    return smoke(args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo

    _share_cores()
    demo(list(args.overrides))
    return 0


_VERBS = {
    "train": _train,
    "sync": _sync,
    "eval": _eval,
    "gate": _gate,
    "export": _export,
    "report": _report,
    "plan": _plan,
    "smoke": _smoke,
    "demo": _demo,
}
