"""`finetrack demo`: the main job on the embedded model, end to end, in a few minutes on a CPU.

Fine-tunes SmolLM2-135M-Instruct with LoRA on the shipped pirate chat set, evaluates the base model
and every checkpoint (held-out loss, and how often answers to unseen questions sound like a pirate),
then shows what changed: the loss curve in one line, the trajectory table, one answer before and
after, and the HTML report.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import load_config
from .evaluate.runner import evaluate_run
from .evaluate.spec import JudgeSuite
from .report import write_report
from .report.collect import load_run
from .train import RunResult, run

ASSETS = Path(__file__).parent / "assets"
DEMO_CONFIG = ASSETS / "demo.yaml"
_BARS = "▁▂▃▄▅▆▇█"


def demo(overrides: list[str] | None = None) -> RunResult:
    """Train the demo config, evaluate its trajectory, print the before/after comparison, write the report."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(DEMO_CONFIG, [f"output.dir=runs/demo-{stamp}", *(overrides or [])])
    for suite in cfg.eval.suites:  # the demo's question file ships inside the package, next to demo.yaml
        if isinstance(suite, JudgeSuite) and not Path(suite.questions).is_absolute():
            suite.questions = str(ASSETS / suite.questions)
    result = run(cfg)
    print()
    evaluate_run(result.run_dir)
    report = write_report([result.run_dir])
    files = load_run(result.run_dir)
    losses = [r["loss"] for r in files.metrics if "loss" in r]
    before, after = (files.responses.get(step, [None])[0] for step in (0, result.total_steps))
    print()
    print(f"run directory: {result.run_dir}")
    print(f"loss: {result.first_loss:.3f} -> {result.final_loss:.3f} over {result.total_steps} steps  {sparkline(losses)}")
    if result.eval_loss is not None:
        print(f"held-out loss at the end: {result.eval_loss:.3f}")
    if before and after:
        print(f"question (not in the training data): {before['question']}")
        print(f"  before: {before['answer']}")
        print(f"  after:  {after['answer']}")
    print(f"report: {report.resolve()}")
    return result


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int((v - lo) / span * len(_BARS)))] for v in values)
