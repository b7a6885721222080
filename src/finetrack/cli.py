"""Command line: verbs -> functions. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, help_config, load_config
from .data import DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetrack", description="Fine-tune causal LMs and study the trajectory of a run.")
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="train one run from a YAML config", description="Train one run: finetrack train CONFIG.yaml [section.key=value ...]")
    t.add_argument("config", nargs="?", help="YAML config file (omit to use defaults)")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 model.lora.r=8")
    t.add_argument("--help-config", action="store_true", help="list every config key with its type, default and meaning")
    d = sub.add_parser("demo", help="fine-tune the embedded model on the demo chat set and show what changed")
    d.add_argument("overrides", nargs="*", help="section.key=value applied to the demo config, e.g. train.max_steps=20")
    return p


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
            config, overrides = args.config, list(args.overrides)
            if config and "=" in config and not config.endswith((".yaml", ".yml")):
                config, overrides = None, [config, *overrides]
            from .train import run

            result = run(load_config(config, overrides))
            print(f"done: {result.total_steps} steps, loss {result.first_loss:.4f} -> {result.final_loss:.4f}; final checkpoint {result.final_checkpoint}")
        elif args.verb == "demo":
            from .demo import demo

            demo(list(args.overrides))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
