"""Weighted mixtures (data.sources) in real runs on the tiny model: exact shares in every step, per-source loss from the
same forward (summing to the total, packing-safe), data.on_source_end=stop, and an exact resume after kill -9."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import chat_rows, read_jsonl, write_chat_jsonl
from safetensors.torch import load_file

from finetrack.batches import collate
from finetrack.config import load_config
from finetrack.data import prepare
from finetrack.loop import _accumulate
from finetrack.objectives import causal_lm
from finetrack.resume import Request
from finetrack.train import run

SIZES = {"big": 40, "small": 10, "mid": 24}
WEIGHTS = {"big": 0.5, "small": 0.25, "mid": 0.25}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixture")
    return {name: write_chat_jsonl(root / f"{name}.jsonl", chat_rows(n, seed=i + 1)) for i, (name, n) in enumerate(SIZES.items())}


def write_config(path: Path, model_dir: Path, sources: dict[str, Path], out: Path, **sections) -> Path:
    """A mixture config as a user writes it: three sources by name, path and weight."""
    cfg = {
        "model": {"name": str(model_dir), "method": "full"},
        "data": {
            "sources": [{"name": n, "path": str(p), "weight": WEIGHTS[n]} for n, p in sources.items()],
            "max_length": 512,
            **sections.pop("data", {}),
        },
        "train": {"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 6, "lr": 1e-2, "warmup_steps": 0, **sections.pop("train", {})},
        "output": {"dir": str(out)},
        **sections,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


class Recorder:
    """Trains exactly like objectives.causal_lm and records, per call, each row's source and the per-source loss sums."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []

    def __call__(self, model, batch):
        self.rows.append(batch.channels["rows"].tolist() if batch.channels is not None else [])
        return causal_lm(model, batch)


def test_every_step_takes_each_source_share_exactly(tmp_path, tiny_model_dir, sources):
    """0.5 / 0.25 / 0.25 of 8 rows per step: 4 / 2 / 2 rows of the sources in every one of 12 steps (the small source
    repeats reshuffled from step 6 on), through train.run on a config file; the data report says the same."""
    recorder = Recorder()
    cfg = load_config(write_config(tmp_path / "mix.yaml", tiny_model_dir, sources, tmp_path / "run", train={"max_steps": 12}))
    result = run(cfg, request=Request(), objective=recorder)
    per_step = [Counter(a + b) for a, b in zip(recorder.rows[0::2], recorder.rows[1::2])]  # 2 micro-batches a step
    assert len(per_step) == 12
    assert all(c == Counter({0: 4, 1: 2, 2: 2}) for c in per_step), per_step
    report = yaml.safe_load((result.run_dir / "data_report.json").read_text())
    used = {s["name"]: s["over_the_run"] for s in report["sources"]}
    assert {n: u["rows_drawn"] for n, u in used.items()} == {"big": 48, "small": 24, "mid": 24}
    assert {n: u["realized_share"] for n, u in used.items()} == WEIGHTS
    assert used["small"]["epochs"] == pytest.approx(24 / 10)
    metrics = read_jsonl(result.run_dir / "metrics.jsonl")
    assert all(f"source/{n}.loss" in metrics[-1] for n in SIZES)


@pytest.mark.parametrize("objective", ["causal_lm", "regression"])
def test_per_source_losses_sum_to_the_total_and_do_not_depend_on_packing(tiny_tokenizer, tiny_model_dir, sources, tmp_path, objective):
    """One forward per micro-batch gives the step's loss and each source's: the per-source sums add up to the total
    (weighted by their units: tokens or targets), packed or padded alike, and equal each source's loss on its own rows."""
    from accelerate import Accelerator

    from finetrack import heads, objectives
    from finetrack.models import build_model

    from conftest import regression_rows

    accelerator = Accelerator(cpu=True)
    paths = sources
    if objective == "regression":
        paths = {n: write_chat_jsonl(tmp_path / f"{n}.jsonl", regression_rows(12, seed=i)) for i, n in enumerate(SIZES)}
    cfg = load_config(write_config(tmp_path / "mix.yaml", tiny_model_dir, paths, tmp_path / "run"), [f"objective.kind={objective}"])
    data = prepare(cfg.data, tiny_tokenizer, 0, cfg.objective)
    model = heads.attach(
        build_model(cfg.model.model_copy(update={"dtype": "float32", "attn_implementation": "sdpa"}), torch.device("cpu")),
        cfg.objective,
        [v for e in data.train for v in e.values],
        0,
    )
    objective_fn = objectives.build(cfg.objective)
    rows = [data.train[i] for i in data.mixture.step(8, 0, 1)]
    found = {}
    for pack in (True, False):
        batches = [collate(rows[j : j + 4], tiny_tokenizer.pad_token_id, pack, None, num_channels=3) for j in (0, 4)]
        result = _accumulate(model, batches, objective_fn, accelerator)
        model.zero_grad(set_to_none=True)
        assert set(result.by_source) == {0, 1, 2}
        assert sum(s for s, _ in result.by_source.values()) == pytest.approx(result.loss_sum, rel=1e-5)
        assert sum(u for _, u in result.by_source.values()) == result.loss_units
        assert result.loss_sum / result.loss_units == pytest.approx(result.loss, rel=1e-5)
        found[pack] = {c: s / u for c, (s, u) in result.by_source.items()}
        # each source's loss is the objective on that source's rows alone (one source, no split)
        for c in range(3):
            alone = [collate([r for r in rows if r.channel == c], tiny_tokenizer.pad_token_id, pack, None)]
            by_itself = _accumulate(model, alone, objective_fn, accelerator)
            model.zero_grad(set_to_none=True)
            assert found[pack][c] == pytest.approx(by_itself.loss, rel=1e-4), (pack, c)
    assert found[True] == pytest.approx(found[False], rel=1e-4)


def test_on_source_end_stop_ends_the_run_before_any_source_repeats(tmp_path, tiny_model_dir, sources):
    """The small source (10 rows, 2 a step) would repeat in step 6: data.on_source_end=stop makes the run 5 steps, and no
    source gives a row twice; with repeat (the default) the same config trains its 12 steps."""
    recorder = Recorder()
    path = write_config(tmp_path / "mix.yaml", tiny_model_dir, sources, tmp_path / "run", train={"max_steps": 12})
    cfg = load_config(path, ["data.on_source_end=stop"])
    result = run(cfg, request=Request(), objective=recorder)
    assert result.total_steps == 5
    resolved = yaml.safe_load((result.run_dir / "config.resolved.yaml").read_text())["resolved"]["total_steps"]
    assert "data.on_source_end=stop" in resolved["reason"]
    report = yaml.safe_load((result.run_dir / "data_report.json").read_text())
    assert [s["over_the_run"]["rows_drawn"] for s in report["sources"]] == [20, 10, 10]
    assert all(s["over_the_run"]["epochs"] <= 1 for s in report["sources"])


# ------------------------------------------------------------------------------------------------ kill -9
def _start(config: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "finetrack", "train", str(config), f"output.dir={out}"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics_by_step(run_dir: Path) -> dict[int, dict]:
    return {
        m["step"]: {k: v for k, v in m.items() if k not in ("time", "tokens_per_s", "peak_mem_mib")}
        for m in read_jsonl(run_dir / "metrics.jsonl")
    }


def test_a_mixture_killed_with_kill_9_resumes_exactly(tmp_path, tiny_model_dir, sources):
    """A 3-source mixture with held-out rows per source, killed with SIGKILL twice after checkpoints and resumed by the
    same command: every logged figure (loss, each source's loss and held-out loss) and the final weights equal an
    uninterrupted run's bit for bit. The data order is a function of (seed, step): no data state in the checkpoint."""
    config = write_config(
        tmp_path / "mix.yaml",
        tiny_model_dir,
        sources,
        tmp_path / "unused",
        data={"eval_split": 0.2},
        train={"max_steps": 14, "log_every_steps": 1},
        checkpoint={"every_steps": 3, "best": {"metric": "source/mid.eval_loss"}},  # a source's held-out loss picks the best
        eval={"loss_every_steps": 4},
    )
    reference = tmp_path / "reference"
    proc = _start(config, reference)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]

    out = tmp_path / "killed"
    kills = []
    for kill_after in (4, 8):  # a step past the checkpoint of step 3, then of step 6
        proc = _start(config, out)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [m["step"] for m in read_jsonl(out / "metrics.jsonl")] if (out / "metrics.jsonl").is_file() else []
            if steps and max(steps) >= kill_after:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.wait()
        kills.append(max(m["step"] for m in read_jsonl(out / "metrics.jsonl")))
    proc = _start(config, out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming from" in err

    assert _metrics_by_step(out) == _metrics_by_step(reference), kills
    line = _metrics_by_step(out)[12]
    assert {f"source/{n}.loss" for n in SIZES} <= set(line) and {f"source/{n}.eval_loss" for n in SIZES} <= set(line)
    assert (out / "checkpoints/best.json").read_text() == (reference / "checkpoints/best.json").read_text()
    a = load_file(out / "checkpoints/step-000014/model.safetensors")
    b = load_file(reference / "checkpoints/step-000014/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_python_objective_gets_per_source_loss_when_it_builds_terms_with_term(tmp_path, tiny_model_dir, sources):
    """`finetrack.objectives.term(values, unit, batch)` splits a custom loss by source (the same numbers as causal_lm
    here); a Term built by hand has no split, so the run logs no per-source loss rather than a wrong one."""
    (tmp_path / "losses.py").write_text(
        "from finetrack.objectives import Term, next_token_sum, term\n"
        "def split(model, batch):\n    return {'lm': term(next_token_sum(model, batch, 'none'), 'tokens', batch)}\n"
        "def whole(model, batch):\n    return {'lm': Term(next_token_sum(model, batch), 'tokens')}\n"
    )
    lines = {}
    for name in ("split", "whole"):
        path = write_config(
            tmp_path / f"{name}.yaml", tiny_model_dir, sources, tmp_path / name, train={"max_steps": 2, "log_every_steps": 1}
        )
        cfg = load_config(path, ["objective.kind=python", f"objective.python.function={tmp_path / 'losses.py'}:{name}"])
        lines[name] = read_jsonl(run(cfg, request=Request()).run_dir / "metrics.jsonl")
    assert all({f"source/{n}.loss" for n in SIZES} <= set(m) for m in lines["split"])
    assert not any(k.startswith("source/") for m in lines["whole"] for k in m)
    assert [m["loss"] for m in lines["split"]] == pytest.approx([m["loss"] for m in lines["whole"]], rel=1e-5)


def test_per_source_losses_reach_the_trackers(tmp_path, tiny_model_dir, sources):
    """The per-source lines go where every metric goes: TensorBoard holds source/<name>.loss and .eval_loss at the
    steps metrics.jsonl has them, with the same values."""
    pytest.importorskip("tensorboard")
    from test_tracking import float32, tensorboard_values

    path = write_config(
        tmp_path / "mix.yaml",
        tiny_model_dir,
        sources,
        tmp_path / "run",
        data={"eval_split": 0.2},
        train={"max_steps": 4, "log_every_steps": 2, "report_to": ["tensorboard"]},
        eval={"loss_every_steps": 2},
    )
    result = run(load_config(path), request=Request())
    metrics = read_jsonl(result.run_dir / "metrics.jsonl")
    for key in [f"source/{n}.{kind}" for n in SIZES for kind in ("loss", "eval_loss")]:
        assert tensorboard_values(result.run_dir, key) == [(m["step"], float32(m[key])) for m in metrics if key in m] != [], key
