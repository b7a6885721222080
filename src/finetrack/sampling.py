"""Answers to fixed prompts while a run trains (`train.sample_every_steps`): RUN_DIR/samples.jsonl, a line
above the progress bar per answer, and a table in the trackers.

Sampling must not change training: it runs on the main process inside `torch.random.fork_rng`
(generation reseeds the global generators), and `generate` puts the model back in training mode. A model sharded
over processes (sharding.py) is answered by every process in step; the main process writes.
Samples of step N are written before the checkpoint of step N, so a checkpoint implies its samples.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import sharding
from .config import ConfigError, TrainConfig
from .evaluate.generate import generate
from .heads import language_model
from .metrics import MetricsLog
from .tracking import Trackers

SAMPLES_FILE = "samples.jsonl"
_SHOWN_CHARS = 100  # of a prompt / an answer in the line printed above the progress bar


@dataclass(frozen=True)
class Prompt:
    """One sample prompt: `text` is what samples.jsonl records; `messages` is the conversation sent to the model."""

    text: str
    messages: list[dict[str, str]]


def load_prompts(train: TrainConfig) -> list[Prompt]:
    """train.sample_prompts then the prompts of train.sample_prompts_file; [] when sampling is off.

    Raises ConfigError for a missing or bad file, and for a prompt listed twice (samples.jsonl is keyed
    by prompt and step)."""
    if train.sample_every_steps is None:
        return []
    prompts = [Prompt(p, [{"role": "user", "content": p}]) for p in train.sample_prompts]
    if train.sample_prompts_file is not None:
        prompts += read_prompts_file(Path(train.sample_prompts_file))
    seen: set[str] = set()
    for p in prompts:
        if p.text in seen:
            raise ConfigError(f"train.sample_prompts: {p.text[:80]!r} is listed twice (samples are keyed by prompt and step); remove one")
        seen.add(p.text)
    return prompts


def read_prompts_file(path: Path, field: str = "train.sample_prompts_file") -> list[Prompt]:
    """.txt: one prompt per line; .yaml/.yml/.jsonl: a question file (every paraphrase, with its system prompt). Errors
    are ConfigErrors starting with `field` (the config key that names the file)."""
    from .evaluate.questions import QuestionError, load_questions

    where = f"{field}: {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    if path.suffix.lower() == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [Prompt(line, [{"role": "user", "content": line}]) for line in lines if line]
        if not prompts:
            raise ConfigError(f"{where}: holds no prompt; write one prompt per line")
        return prompts
    try:
        questions = load_questions(path)
    except QuestionError as e:
        raise ConfigError(f"{field}: {e}") from None
    out = []
    for q in questions:
        system = [{"role": "system", "content": q.system}] if q.system else []
        out += [Prompt(text, [*system, {"role": "user", "content": text}]) for text in q.paraphrases]
    return out


class Sampler:
    """Answers the prompts at step 0 and every `sample_every_steps` (and the last step), on the main process (on every
    process when the model is sharded: `answers`; the main process writes: `writes`)."""

    def __init__(
        self,
        prompts: list[Prompt],
        train: TrainConfig,
        tokenizer,
        run_dir: Path,
        total_steps: int,
        steps_per_epoch: int,
        out: MetricsLog,
        trackers: Trackers,
        answers: bool,
        writes: bool,
        precision: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.prompts, self.gen, self.every_steps = prompts, train.sample_generation, train.sample_every_steps
        self.tokenizer, self.path = tokenizer, run_dir / SAMPLES_FILE
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.out, self.trackers = out, trackers
        self.enabled = answers and bool(prompts)
        self.writes = writes
        self.precision = precision  # the context of the run's forwards (model.mixed_precision)

    def due(self, step: int) -> bool:
        """Step 0 (the starting weights), every sample_every_steps, and the last step."""
        return self.enabled and (step == 0 or step % self.every_steps == 0 or step == self.total_steps)

    def sample_if_due(self, step: int, model: nn.Module) -> None:
        """Answer every prompt with `model` (the unwrapped one; its language model generates) after optimizer step
        `step`, and record the answers."""
        if not self.due(step):
            return
        with untouched_rng(), sharding.gathered(model), self.precision():
            answers = generate(language_model(model), self.tokenizer, [p.messages for p in self.prompts], self.gen)
        if not self.writes:
            return
        epoch = round(step / self.steps_per_epoch, 4)
        rows = [{"step": step, "epoch": epoch, "prompt": p.text, "answer": a} for p, a in zip(self.prompts, answers)]
        with open(self.path, "a", encoding="utf-8") as f:  # one flush per step: readers see whole steps
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        for r in rows:
            self.out.say(f"sample @ step {step}: {_short(r['prompt'])} -> {_short(r['answer'])}")
        self.trackers.log_samples(step, rows)


@contextmanager
def untouched_rng() -> Iterator[None]:
    """Save and restore every random generator training draws from: Python's, NumPy's, the CPU generator and every
    generator of this machine's accelerator (CUDA, MPS, ...). generate() reseeds the torch ones (torch.manual_seed
    does, even for a model on the CPU), and training must draw the same dropout masks whether or not it sampled or
    validated."""
    import random

    import numpy as np

    acc = torch.accelerator.current_accelerator()
    devices = [] if acc is None else range(torch.get_device_module(acc.type).device_count())
    kwargs = {} if acc is None else {"device_type": acc.type}
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices, **kwargs):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "...")
