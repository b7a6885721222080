"""Evaluating a run's LoRA checkpoints: `finetrack eval` vs loading base + adapter from scratch per checkpoint.

Same run (the embedded SmolLM2-135M-Instruct, LoRA r=16 all-linear, 6 checkpoints), same judge suite
(the questions of examples/questions/pirate.yaml, one greedy answer of up to 24 tokens each, a
pattern judge), same generation code, same base model (step 0) and checkpoints, one process each:

- finetrack: `evaluate_run(RUN_DIR)`: the base weights are loaded once, adapters are swapped in and out;
- from scratch: for each step, `AutoModelForCausalLM.from_pretrained(base)` (+ `PeftModel.from_pretrained`
  for a checkpoint), then the same generation and judge: what a hand-written loop over checkpoints does.

Prints both wall times, the ratio, and checks that both produced the same answers.

    .venv/bin/python benchmarks/eval_checkpoints.py [--checkpoints 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = {
    "name": "pirate",
    "kind": "judge",
    "questions": str(ROOT / "examples/questions/pirate.yaml"),
    "generation": {"samples": 1, "temperature": 0.0, "max_new_tokens": 24, "batch_size": 8},
    "judges": [{"kind": "pattern", "metric": "pirate", "pattern": r"\b(arr+|matey|ye|aye)\b"}],
}


def train(run_dir: Path, checkpoints: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "finetrack",
        "train",
        str(ROOT / "src/finetrack/assets/demo.yaml"),
        f"output.dir={run_dir}",
        f"train.max_steps={checkpoints}",
        "checkpoint.every_steps=1",
        "train.micro_batch_size=2",
        "data.max_length=128",
        "eval.loss_every_steps=null",
        "train.log_every_steps=1",
        f"eval.suites={json.dumps([SUITE])}",
    ]
    subprocess.run(cmd, check=True, capture_output=True)


def from_scratch(run_dir: Path) -> tuple[float, dict]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetrack import checkpoint
    from finetrack.evaluate.freeform import conversations
    from finetrack.evaluate.generate import generate
    from finetrack.evaluate.judges import PatternJudge
    from finetrack.evaluate.questions import load_questions
    from finetrack.evaluate.spec import GenerationConfig
    from finetrack.models import embedded_model_dir

    gen = GenerationConfig(**SUITE["generation"])
    items = conversations(load_questions(Path(SUITE["questions"])), gen.samples)
    judge = PatternJudge(SUITE["judges"][0]["pattern"])
    answers = {}
    started = time.perf_counter()
    for folder in [None, *(f.path for f in checkpoint.complete_checkpoints(run_dir))]:
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
        model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
        if folder is not None:
            model = PeftModel.from_pretrained(model, folder)
        out = generate(model, tokenizer, [it["messages"] for it in items], gen)
        judge.score([(it["question"], a) for it, a in zip(items, out)])
        answers[0 if folder is None else checkpoint.parse_step(folder.name)] = out
    return time.perf_counter() - started, answers


def with_finetrack(run_dir: Path) -> tuple[float, dict]:
    from finetrack.evaluate.runner import evaluate_run

    started = time.perf_counter()
    evaluate_run(run_dir, out=lambda s: None)
    seconds = time.perf_counter() - started
    answers = {}
    for f in sorted((run_dir / "eval/responses").glob("step-*.jsonl")):
        answers[int(f.stem[5:])] = [json.loads(x)["answer"] for x in f.read_text().splitlines()]
    return seconds, answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=int, default=6)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        print(f"training {args.checkpoints} LoRA checkpoints of the embedded model ...", file=sys.stderr)
        train(run_dir, args.checkpoints)
        shutil.rmtree(run_dir / "eval", ignore_errors=True)
        # imports (peft alone takes ~5 s here) are paid before either engine is timed
        import accelerate  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401

        from finetrack.evaluate import freeform, generate, judges, questions, runner  # noqa: F401

        ours_s, our_answers = with_finetrack(run_dir)
        scratch_s, scratch_answers = from_scratch(run_dir)
    same = scratch_answers == our_answers
    print(
        f"steps evaluated: {len(our_answers)} (base model + {len(our_answers) - 1} checkpoints), "
        f"{len(next(iter(our_answers.values())))} answers each; identical answers: {same}"
    )
    print(f"| engine | seconds |\n| --- | --- |\n| finetrack eval | {ours_s:.1f} |\n| from scratch per checkpoint | {scratch_s:.1f} |")
    print(f"finetrack / from scratch: {ours_s / scratch_s:.2f}x time ({scratch_s / ours_s:.2f}x faster)")


if __name__ == "__main__":
    main()
