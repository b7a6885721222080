"""The command line's grammar: every verb's flags, their checked values, and overrides in any position.

`finetrack plan my.yaml --device-memory 24GB train.micro_batch_size=16`: overrides may follow flags, on every
verb (each verb's parser reads positionals and flags intermixed). A flag value out of range (zero, negative,
not finite, absurdly large) is refused while parsing, with one `error:` line naming the flag. The flags of
every verb are snapshot-tested (tests/snapshots/cli_flags.txt): a new flag is a deliberate change.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections.abc import Callable

# Upper bounds that catch a typo (an extra zero, seconds given in milliseconds), not real machines.
MAX_PROCESSES = 65_536
MAX_MEASURE_STEPS = 10_000
MAX_PRICE_PER_HOUR = 100_000.0
MAX_WATCH_SECONDS = 86_400.0  # a day
MAX_DEVICE_MEMORY_BYTES = 2**50  # 1 PiB


class Parser(argparse.ArgumentParser):
    """argparse with one `error: ...` line (and where to look) instead of usage text plus `prog: error:`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # "argument --num-processes: ..." -> "--num-processes: ..."; "-o/--output" -> "--output"
        message = re.sub(r"^argument (?:-\w/)?([^:]+): ", r"\1: ", message)
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


class VerbParser(Parser):
    """A verb's parser: positionals (config, overrides) and flags in any order."""

    _intermixed = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if self._intermixed:  # parse_known_intermixed_args calls back into this method for its two passes
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False
        if extras:  # here, not in the top-level parser: the message names this verb's flags
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._closest(extras)}")
        self._refuse_empty(namespace)
        return namespace, extras

    def _refuse_empty(self, namespace: argparse.Namespace) -> None:
        """An empty text is no path or name: `sync RUN ''` mirrored into the current directory, and `--output ''`
        or `--json ''` acted as if the flag were not given."""
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, str) and not v.strip() for v in values):
                name = max(action.option_strings, key=len) if action.option_strings else (action.metavar or action.dest).upper()
                optional = bool(action.option_strings) or action.nargs in ("?", "*")
                self.error(f"{name} is empty: give a value" + (", or leave it out" if optional else ""))

    def _closest(self, unknown: list[str]) -> str:
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
        for arg in unknown:
            if close := difflib.get_close_matches(arg.split("=", 1)[0], known, n=1):
                return f"; did you mean {close[0]}?"
        return f"; {self.prog} takes {', '.join(known)}"


# ------------------------------------------------------------------------------- checked values
def whole_number(low: int, high: int, what: str) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {what} from {low} to {high:,}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range; give {what} from {low} to {high:,}")
        return value

    parse.__name__ = "whole_number"
    return parse


def positive_number(high: float, what: str, example: str) -> Callable[[str], float]:
    """argparse type: a finite number > 0 and <= high."""

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {what}, e.g. {example}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give {what}, e.g. {example}")
        if not 0 < value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; give {what} above 0 and at most {high:,g}, e.g. {example}")
        return value

    parse.__name__ = "positive_number"
    return parse


def memory_size(text: str) -> str:
    """argparse type for --device-memory: a size plan.parse_bytes reads, above 0 and below 1 PiB; kept as text."""
    from .plan import parse_bytes  # the one reader of sizes; plan is the only verb with this flag
    from .schema import ConfigError

    try:
        size = parse_bytes(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; write it with its unit, e.g. 24GB (read as GiB), 80GiB or 16000MB"
        ) from None
    if not 0 < size <= MAX_DEVICE_MEMORY_BYTES:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; give the device's memory, e.g. 24GB or 80GiB")
    return text


def one_step(text: str) -> str:
    """argparse type for one step (gate --step, export --step): a step number, best or latest; ASCII digits only
    (Python's int() reads '１' as 1)."""
    if text not in ("latest", "best") and not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 'latest' or a step number such as 47 (or 'best': the step checkpoints/best.json names)"
        )
    return text


def step_list(text: str) -> str:
    """argparse type for eval --steps: all, latest, best, or comma-separated step numbers (0 = the base model) and best."""
    value = text.strip()
    parts = [p.strip() for p in value.split(",")]
    if value in ("all", "latest") or (value and all((p.isascii() and p.isdigit()) or p == "best" for p in parts)):
        return value
    raise argparse.ArgumentTypeError(
        f"{text!r}: use all, latest, or a comma-separated list of step numbers such as 0,47,94; "
        "best (alone or in the list, e.g. 0,best) is the step checkpoints/best.json names"
    )


WATCH_SECONDS = positive_number(MAX_WATCH_SECONDS, "the seconds between polls", "30")


# ------------------------------------------------------------------------------------- grammar
def parser() -> Parser:
    """The `finetrack` parser with every verb."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `finetrack --verbose train` must not be reset to False by the verb's own default
    common.add_argument(
        "--verbose", action="store_true", default=argparse.SUPPRESS, help="also show libraries' warnings, debug lines and progress bars"
    )
    # no abbreviations: `--num-proc` working today would break the day a `--num-procs-per-node` appears
    p = Parser(prog="finetrack", allow_abbrev=False, description="Fine-tune causal LMs and study the trajectory of a run.")
    p.add_argument("--verbose", action="store_true", help="also show libraries' warnings, debug lines and progress bars")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=VerbParser)

    def verb(name: str, **kw) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        return sub.add_parser(name, parents=[common], allow_abbrev=False, **kw)

    t = verb(
        "train", help="train one run from a YAML config", description="Train one run: finetrack train CONFIG.yaml [section.key=value ...]"
    )
    t.add_argument("config", nargs="?", help="YAML config file (omit to use defaults)")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 model.lora.r=8 (before or after flags)")
    t.add_argument("--help-config", action="store_true", help="list every config key with its type, default and meaning")
    t.add_argument(
        "--fresh", action="store_true", help="start over: move this run's files to RUN_DIR/superseded/ (also: env FINETRACK_FRESH=1)"
    )
    t.add_argument("--delete-remote", action="store_true", help="with --fresh: also delete the checkpoints under checkpoint.remote")
    t.add_argument(
        "--resume-from", metavar="PATH", help="resume from this checkpoint folder, run directory or remote .../checkpoints/step-N URL"
    )
    t.add_argument("--allow-config-change", action="store_true", help="resume even if model, data, lr, batch or method changed")

    s = verb(
        "sync",
        help="mirror complete checkpoints of a run (remote URL or local path) into a local run directory",
        description="Copy every complete checkpoint (manifest verified after download) from SRC to DST, skipping those already there.",
    )
    s.add_argument("src", help="run directory: fsspec URL (s3://bucket/run, gs://, hf://, file://) or local path")
    s.add_argument("dst", help="local run directory to mirror into")
    s.add_argument(
        "--watch", type=WATCH_SECONDS, metavar="SECONDS", help="wait for the run to appear, then keep polling every SECONDS until Ctrl+C"
    )

    e = verb(
        "eval",
        help="evaluate the base model (step 0) and every checkpoint of a run with its eval suites",
        description="finetrack eval RUN_DIR [--steps all|latest|best|0,47,94,best] [--suite NAME ...] [eval.key=value ...]; "
        "finetrack eval CONFIG.yaml --steps 0: the base model, before training, into the run directory training will use",
    )
    e.add_argument(
        "run_dir", help="run directory (holding config.resolved.yaml and checkpoints/), a model or adapter folder, or a CONFIG.yaml"
    )
    e.add_argument("overrides", nargs="*", help="eval.key=value applied to the run's eval section (before or after flags)")
    e.add_argument(
        "--steps",
        type=step_list,
        help="a run: all (default), latest, best (the step checkpoints/best.json names), or a comma-separated list such as "
        "0,47,94 or 0,best (0 = the base model)",
    )
    e.add_argument("--suite", action="append", metavar="NAME", help="only these suites (repeatable); default: all of eval.suites")
    e.add_argument("--config", help="a model or adapter folder: the config whose eval.suites (and model settings) to use")
    e.add_argument("--output", help="a model or adapter folder: where results go (default ./eval-<folder name>)")
    e.add_argument(
        "--watch",
        type=WATCH_SECONDS,
        metavar="SECONDS",
        help="a run: wait for it to appear, then follow training, evaluating each checkpoint as it completes, until its last one",
    )

    g = verb("gate", help="GO / NO-GO on an eval metric vs the base model: exit 0 GO, 1 NO-GO, 2 missing data")
    from . import gate

    gate.add_arguments(g)

    x = verb(
        "export",
        help="export a checkpoint (merged safetensors, ONNX, GGUF), verified against the trained model: exit 0, 1 not verified",
        description="finetrack export SOURCE --format merged|onnx|gguf [--step N|best|latest] [--quantize TYPE] [--output DIR|URL]",
    )
    from . import export

    export.add_arguments(x)

    r = verb(
        "report",
        help="write a self-contained HTML report (curves, trajectory, sample answers, run facts) of one or more runs",
        description="finetrack report RUN_DIR [RUN_DIR ...] [-o report.html]: several runs are overlaid, one colour per run.",
    )
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (holding config.resolved.yaml)")
    r.add_argument(
        "-o",
        "--output",
        help="HTML file to write, or a folder to write report.html in (an existing one, or a path ending in /); "
        "default: RUN_DIR/report.html for one run, ./report.html for several",
    )

    pl = verb(
        "plan",
        help="before training: data report, schedule, memory fit, time and cost (nothing is trained without --measure)",
        description="finetrack plan CONFIG.yaml [section.key=value ...] [--device-memory 24GB] [--gpu H100] [--price-per-hour 3.80] [--measure [--measure-steps N]]",
    )
    pl.add_argument("config", nargs="?", help="YAML config file (omit to use defaults)")
    pl.add_argument("overrides", nargs="*", help="section.key=value, as for train (before or after flags)")
    pl.add_argument(
        "--device-memory", type=memory_size, metavar="SIZE", help="memory of the target device, e.g. 24GB (read as GiB), 80GiB, 16000MB"
    )
    pl.add_argument(
        "--gpu",
        metavar="NAME",
        help="plan for this GPU (its peak FLOP/s and memory), e.g. H100, A100-80GB, L4; an unknown name lists the known ones",
    )
    pl.add_argument(
        "--num-processes",
        type=whole_number(1, MAX_PROCESSES, "the number of data-parallel processes"),
        default=1,
        metavar="N",
        help="data-parallel processes (accelerate launch)",
    )
    pl.add_argument(
        "--price-per-hour",
        type=positive_number(MAX_PRICE_PER_HOUR, "the machine's price per hour", "3.80"),
        metavar="PRICE",
        help="machine price per hour: prints the cost",
    )
    pl.add_argument(
        "--measure",
        action="store_true",
        help="run a few real optimizer steps on this machine for tokens/s and peak memory "
        "(they time the run only when the plan is for this machine: not with another --gpu)",
    )
    pl.add_argument(
        "--measure-steps",
        type=whole_number(1, MAX_MEASURE_STEPS, "the number of optimizer steps to measure"),
        metavar="N",
        help="how many optimizer steps --measure runs (default 5; implies --measure)",
    )
    pl.add_argument("--json", metavar="PATH", help="also write the plan as JSON")

    sm = verb(
        "smoke",
        help="before a long run: check the environment, train a short copy (killed and resumed), sync, eval: PASS / FAIL, exit 0 / 1",
        description="finetrack smoke CONFIG.yaml [section.key=value ...] [--steps N] [--price-per-hour PRICE] [--num-processes N] "
        "[--accelerate-config FILE] [--scratch DIR] [--keep]: the infrastructure test of a run, as one command",
    )
    sm.add_argument("config", nargs="?", help="YAML config file of the real run (omit to use defaults)")
    sm.add_argument("overrides", nargs="*", help="section.key=value, as for train (before or after flags)")
    sm.add_argument(
        "--steps",
        type=whole_number(4, MAX_MEASURE_STEPS, "the optimizer steps of the short run"),
        metavar="N",
        help="optimizer steps of the short run (default 20, never more than the run's); checkpoints every N/4",
    )
    sm.add_argument(
        "--price-per-hour",
        type=positive_number(MAX_PRICE_PER_HOUR, "the machine's price per hour", "3.80"),
        metavar="PRICE",
        help="machine price per hour: the projected cost of the full run",
    )
    sm.add_argument(
        "--num-processes",
        type=whole_number(1, MAX_PROCESSES, "the number of data-parallel processes"),
        default=1,
        metavar="N",
        help="train the short run on N processes as the real run will (torchrun on CPU, accelerate launch on GPUs)",
    )
    sm.add_argument(
        "--accelerate-config",
        metavar="FILE",
        help="train the short run under `accelerate launch --config_file FILE` as the real run will (FSDP: "
        "examples/accelerate/fsdp2.yaml), on --num-processes processes",
    )
    sm.add_argument("--scratch", metavar="DIR", help="scratch folder for the short run, its mirror and logs (default <output.dir>-smoke)")
    sm.add_argument("--keep", action="store_true", help="keep the scratch folder and the remote scratch prefix (deleted by default)")

    d = verb("demo", help="fine-tune the embedded model on the demo chat set and show what changed")
    d.add_argument("overrides", nargs="*", help="section.key=value applied to the demo config, e.g. train.max_steps=20")
    return p


def config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(config file, overrides): `train k=v` without a config file puts the first override in the config slot."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, overrides


def snapshot(top: argparse.ArgumentParser | None = None) -> str:
    """Every verb's flags and positionals (of `top`, default the real parser), one per line: the CLI surface tests compare."""
    lines = []
    top = top or parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, verb_parser in [("finetrack", top), *sorted(subs.choices.items())]:
        for action in verb_parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            kind = (
                getattr(action.type, "__name__", "str") if action.type else type(action).__name__.strip("_").replace("Action", "").lower()
            )
            spelled = "/".join(action.option_strings) or action.dest
            default = "-" if action.default in (None, argparse.SUPPRESS) else repr(action.default)
            choices = f" choices={list(action.choices)}" if action.choices else ""
            lines.append(f"{name} {spelled} type={kind} nargs={action.nargs} default={default} required={action.required}{choices}")
    return "\n".join(lines) + "\n"
