"""The worked recipes of examples/recipes/ (see its README), end to end through the real command line on the embedded
SmolLM2-135M-Instruct: data generator -> finetrack train -> finetrack eval -> the figure the recipe promises.

Each e2e test runs the shipped config unchanged but for output.dir (and phase2.yaml's model.init_from, pointed at the
phase 1 run the test made, and the SFT job's remote pointed at a local S3 server), about 2-3 minutes each on a 2-core CPU
(the two verifier phases together: about 4; the SFT job with its exports: about 4)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples/recipes"


def run(*cmd: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """A command from the repository root, as the recipe README runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def finetrack(*args: str) -> subprocess.CompletedProcess:
    r = run(sys.executable, "-m", "finetrack", *args)
    assert r.returncode == 0, f"finetrack {' '.join(args)}\n{r.stderr[-3000:]}"
    return r


def eval_records(run_dir: Path) -> dict[int, dict]:
    """{step: the step's eval record} of every evaluated step."""
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in (run_dir / "eval").glob("step-*.json")}


@pytest.mark.parametrize("recipe", ["verifier", "contrastive", "survey"])
def test_generator_writes_the_committed_data(tmp_path, recipe):
    """The data the configs read is what the recipe's generator writes: stdlib only, seeded, byte for byte."""
    r = run(sys.executable, str(RECIPES / recipe / "make_data.py"), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    committed = RECIPES / recipe / "data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in committed.iterdir())
    for path in tmp_path.iterdir():
        assert path.read_bytes() == (committed / path.name).read_bytes(), path.name


@pytest.mark.parametrize("config", sorted(RECIPES.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_configs_load(config):
    from finetrack.config import load_config

    cfg = load_config(config)
    assert cfg.output.dir.startswith("runs/recipes/")
    for source in cfg.data.locations():  # relative to the repository root, where the README runs them
        assert source.startswith("builtin:") or (ROOT / source).is_file(), source


@pytest.mark.e2e
@pytest.mark.parametrize("config", ["full.yaml", "prm.yaml"])
def test_verifier_recipe_reaches_r2_on_heldout_rows(tmp_path, config):
    """A regression head (LoRA or full fine-tune; per solution, or per step for prm.yaml) scores held-out rows with
    R^2 > 0.5, through the regression eval suite; the base model (step 0) has no trained head, so its record says the
    suite was skipped."""
    out = tmp_path / "run"
    finetrack("train", f"examples/recipes/verifier/{config}", f"output.dir={out}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["eval_loss"] < metrics[0]["loss"]  # held-out MSE of normalized targets, logged at the last step
    r = finetrack("eval", str(out))
    assert "verifier.r2" in r.stdout
    records = eval_records(out)
    last = max(records)
    assert sorted(records) == [0, last] and last == metrics[-1]["step"]
    found = records[last]["metrics"]
    assert found["verifier.r2"] > 0.5, found
    assert found["verifier.pearson"] > 0.7 and found["verifier.spearman"] > 0.7, found
    assert records[last]["counts"]["verifier.rows"] == 64
    assert records[0]["metrics"] == {} and "no trained head at step 0" in records[0]["suites"]["verifier"]["skipped"]


@pytest.mark.e2e
def test_verifier_recipe_validates_keeps_the_best_and_the_last_3(tmp_path):
    """lora.yaml validates every 4 steps (val/verifier.* in metrics.jsonl), keeps the best checkpoint by held-out loss
    with the last 3, and may stop early on R^2; `finetrack eval` then reuses what training computed, and the best
    checkpoint scores R^2 > 0.5 on the held-out rows."""
    out = tmp_path / "run"
    trained = finetrack("train", "examples/recipes/verifier/lora.yaml", f"output.dir={out}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]["step"]
    validated = [m["step"] for m in metrics if "val/verifier.r2" in m]
    assert validated == [s for s in (4, 8, 12, 16) if s <= last], validated  # step 0: the suite needs a trained head
    final = json.loads((out / f"checkpoints/step-{last:06d}/meta.json").read_text())
    if last < 16:  # stopped early: by the rule, from the history it records
        history = final["stop_reason"]["history"]
        assert "stopped early at step" in trained.stdout and "early_stop" in final["rules"]
        assert [h[0] for h in history] == validated and all(h[1] <= max(v for _, v in history[:-2]) + 0.01 for h in history[-2:])
    losses = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
    best = json.loads((out / "checkpoints/best.json").read_text())
    assert best["metric"] == "eval_loss" and best["step"] == min(losses, key=losses.get) and best["value"] == losses[best["step"]]
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert kept == sorted({best["step"], *[s for s in (4, 8, 12, 16) if s <= last][-3:]}), kept
    r = finetrack("eval", str(out))
    assert f"cached: {len(kept) + 1}" in r.stdout  # every kept checkpoint and step 0 were validated during training
    records = eval_records(out)
    assert records[0]["suites"]["verifier"]["skipped"]
    assert records[best["step"]]["metrics"]["verifier.r2"] > 0.5, records[best["step"]]["metrics"]
    finetrack("eval", str(out), "--steps", "best")


@pytest.mark.e2e
def test_verifier_phases_warm_start_a_weighted_mixture_from_phase_1s_best(tmp_path):
    """phase1.yaml trains on the math source alone and keeps its best checkpoint by held-out loss; phase2.yaml begins
    a new run from it (model.init_from=RUN:best: steps from 1, a fresh schedule) on three sources weighted 0.5 / 0.25 /
    0.25, one of them read through a column mapping. Every step takes exactly 4 / 2 / 2 rows; metrics.jsonl carries each
    source's training and held-out loss, data_report.json each source's share; the source new to the model is learned."""
    one, two = tmp_path / "phase1", tmp_path / "phase2"
    finetrack("train", "examples/recipes/verifier/phase1.yaml", f"output.dir={one}")
    first = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    best = json.loads((one / "checkpoints/best.json").read_text())
    losses = {m["step"]: m["eval_loss"] for m in first if "eval_loss" in m}
    assert sorted(losses) == [5, 10] and best["metric"] == "eval_loss" and best["step"] == min(losses, key=losses.get)
    assert not any(k.startswith("source/") for m in first for k in m)  # one data.path: no per-source lines
    assert "sources" not in json.loads((one / "data_report.json").read_text())

    spec = f"{one}:best"
    trained = finetrack("train", "examples/recipes/verifier/phase2.yaml", f"output.dir={two}", f"model.init_from={spec}")
    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    record = yaml.safe_load((two / "config.resolved.yaml").read_text())["resolved"]["init_from"]["value"]
    assert record["from"] == spec and record["step"] == best["step"]
    assert Path(record["folder"]) == (one / best["checkpoint"]).resolve()
    for meta in (two / "checkpoints").glob("step-*/meta.json"):
        assert json.loads(meta.read_text())["init_from"] == record, meta
    # a new run: its own 12 steps from 1, its learning rate schedule from the top (phase 1 ended at ~0)
    training = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in training] == list(range(1, 13)) and "done: 12 steps" in trained.stdout
    assert training[0]["lr"] == pytest.approx(1e-3) and first[-1]["lr"] < 1e-4
    # phase 1's adapter and head came along: the math rows of step 1 score as phase 1 ended, not as an untrained head
    assert training[0]["source/math.loss"] < first[0]["loss"] / 4, (training[0], first[0])

    names = ("math", "evidence", "science")
    for m in training:  # a regression loss is per target: every step's 4 / 2 / 2 rows weigh the sources' losses so
        assert m["loss"] == pytest.approx((4 * m["source/math.loss"] + 2 * m["source/evidence.loss"] + 2 * m["source/science.loss"]) / 8)
    held = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in held] == [6, 12] and all(f"source/{n}.eval_loss" in m for m in held for n in names)
    sources = json.loads((two / "data_report.json").read_text())["sources"]
    assert [(s["name"], s["target_share"], s["over_the_run"]["realized_share"]) for s in sources] == [
        ("math", 0.5, 0.5),
        ("evidence", 0.25, 0.25),
        ("science", 0.25, 0.25),
    ]
    assert [s["over_the_run"]["rows_drawn"] for s in sources] == [48, 24, 24]
    # science's rows name their fields question / solution / score: all read through the mapping, held-out file too
    assert [(s["rows_kept"], s["eval_rows"], s["eval_rows_from"]) for s in sources] == [
        (128, 32, "file"),
        (48, 16, "file"),
        (48, 16, "file"),
    ]
    # learning: the held-out loss ends below the first training loss, and the source phase 1 never saw (its own wording,
    # no system turn) ends far below where it began
    assert held[-1]["eval_loss"] < training[0]["loss"], (held[-1], training[0])
    assert held[-1]["source/science.eval_loss"] < training[0]["source/science.loss"] / 2, (held[-1], training[0])


@pytest.mark.e2e
def test_contrastive_recipe_raises_discrimination_over_the_base_model(tmp_path):
    """QLoRA with gradient checkpointing on triplets: on held-out triplets (injections worded as in no training row),
    discrimination = mean cos(anchor, positive) - mean cos(anchor, negative) rises from the base model's (step 0)."""
    out = tmp_path / "run"
    finetrack("train", "examples/recipes/contrastive/qlora.yaml", f"output.dir={out}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [m["eval_discrimination"] for m in metrics if "eval_discrimination" in m]
    assert len(logged) >= 2 and logged[-1] > logged[0], logged
    stability = {m["step"]: m["val/injection.stability"] for m in metrics if "val/injection.stability" in m}
    assert sorted(stability) == [0, 5, 10], stability  # the suite during training, from the base model on
    best = json.loads((out / "checkpoints/best.json").read_text())
    trained_steps = {s: v for s, v in stability.items() if s > 0}  # the best is a checkpoint: step 0 has none
    assert (
        best["metric"] == "val/injection.stability" and best["mode"] == "max" and best["step"] == max(trained_steps, key=trained_steps.get)
    )
    finetrack("eval", str(out))
    records = eval_records(out)
    base, trained = records[0]["metrics"], records[max(records)]["metrics"]
    assert trained["injection.discrimination"] > base["injection.discrimination"] + 0.02, (base, trained)
    assert trained["injection.separation"] > base["injection.separation"], (base, trained)
    # the suite and training's held-out metric are one formula on the same rows and weights
    assert trained["injection.discrimination"] == pytest.approx(logged[-1], abs=1e-3)


@pytest.mark.e2e
def test_contrastive_recipe_plan_fits_a_6gb_gpu(tmp_path):
    """`finetrack plan` on the recipe for a 6 GB GPU: no weights loaded, the memory verdict says it fits."""
    plan_json = tmp_path / "plan.json"
    r = finetrack("plan", "examples/recipes/contrastive/qlora.yaml", "--gpu", "L4", "--device-memory", "6GB", "--json", str(plan_json))
    assert "fits" in r.stdout
    plan = json.loads(plan_json.read_text())
    assert plan["memory"]["fits"] is True and plan["memory"]["device_bytes"] == 6 * 2**30


@pytest.mark.e2e
@pytest.mark.slow
def test_sft_recipe_survives_a_cut_off_job_resumes_from_remote_and_ends_with_verified_exports(tmp_path, s3):
    """Seed 003 as one user path: the shipped QLoRA SFT config is cut off mid-run (SIGTERM, as a job's time limit
    sends), its local run directory lost (a new machine); the same command resumes from the newest checkpoint on the
    remote and finishes with samples at steps 4 and 8; `--fresh` refuses to start over while the remote holds that
    run; the representation and direction suites show the probes moving along the base model's pirate-persona
    direction; the final checkpoint exports as merged, ONNX and GGUF (f16, for llama.cpp), each with a verified
    certificate."""
    out, remote = tmp_path / "run", f"{s3}/sft-qlora"
    cmd = [
        sys.executable,
        "-m",
        "finetrack",
        "train",
        "examples/recipes/sft/qlora.yaml",
        f"output.dir={out}",
        f"checkpoint.remote={remote}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "checkpoints/step-000004/MANIFEST.json").is_file() and (out / "metrics.jsonl").read_text().count('"step": 5'):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be cut off"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    shutil.rmtree(out)  # a new machine: nothing local
    r = run(*cmd, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from the remote copy" in r.stderr and "done: 8 steps" in r.stdout + r.stderr
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} >= {4, 8}
    fresh = run(*cmd, "--fresh")
    assert fresh.returncode == 2 and "--delete-remote" in fresh.stderr
    # what moved inside: hidden states vs the base, and the probes along the base model's pirate-persona direction
    finetrack("eval", str(out))
    records = eval_records(out)  # step 0, the checkpoint the cut-off left (step 5 or 6: the newest was pulled) and 8
    steps = [records[s]["metrics"] for s in sorted(records)]
    assert len(steps) == 3 and max(records) == 8
    assert steps[0]["inside.shift"] == 0.0 and steps[0]["persona.shift"] == 0.0 and steps[0]["persona.separation"] > 2
    assert 0 < steps[1]["inside.shift"] and 0 < steps[1]["inside.kl"] < steps[2]["inside.kl"]
    assert 0 < steps[1]["persona.shift"] < steps[2]["persona.shift"]  # fine-tuning moves the probes toward the persona
    finetrack("report", str(out))
    assert "direction suite 'persona'" in (out / "report.html").read_text()
    for fmt, folder in (("merged", "merged"), ("onnx", "onnx"), ("gguf", "gguf-f16")):
        finetrack("export", str(out), "--format", fmt)
        certificate = json.loads((out / f"exports/step-000008-{folder}/EXPORT.json").read_text())
        assert certificate["verified"] and certificate["source"]["step"] == 8, certificate["verification"]
        assert certificate["merge"].startswith("QLoRA adapter merged into the base dequantized")


@pytest.mark.e2e
@pytest.mark.slow
def test_survey_recipe_baseline_smoke_train_with_a_monitor_then_gate_and_plan(tmp_path):
    """Seed 001 as one user path: the base model evaluated before training (kept by the run), the smoke test, training
    with a remote and `sync --watch` started at launch (the users' download monitor), the trajectory evaluated (the
    baseline from the cache), the GO / NO-GO gate on the relative Wasserstein improvement, and plan's cost on 4 GPUs."""
    config = "examples/recipes/survey/lora.yaml"
    out, remote, mirror = tmp_path / "run", tmp_path / "remote", tmp_path / "mirror"
    where = [f"output.dir={out}", f"checkpoint.remote={remote}"]
    finetrack("eval", config, "--steps", "0", *where)
    base = json.loads((out / "eval/step-000000.json").read_text())["metrics"]["survey.wasserstein"]
    smoke = run(sys.executable, "-m", "finetrack", "smoke", config, *where, "--steps", "8", timeout=1200)
    assert smoke.returncode == 0 and "smoke: PASS" in smoke.stdout, (smoke.stdout + smoke.stderr)[-3000:]
    assert not (out / "checkpoints").exists() and not (remote / "checkpoints").exists(), "the smoke test touched the real run"

    monitor = subprocess.Popen(
        [sys.executable, "-m", "finetrack", "sync", str(remote), str(mirror), "--watch", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        finetrack("train", config, *where)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (mirror / "checkpoints/step-000024/MANIFEST.json").is_file():
            time.sleep(0.5)
    finally:
        monitor.send_signal(signal.SIGINT)  # Ctrl+C
        monitor_out, _ = monitor.communicate(timeout=120)
    assert all(f"fetched step-{s:06d}" in monitor_out for s in (8, 16, 24)), monitor_out[-2000:]
    from finetrack import checkpoint

    for step in (8, 16, 24):
        checkpoint.verify(checkpoint.checkpoint_dir(mirror, step))

    evaluated = finetrack("eval", str(out))
    assert "cached: 1 (step, suite)" in evaluated.stdout + evaluated.stderr  # the baseline, evaluated before training
    trained = json.loads((out / "eval/step-000024.json").read_text())["metrics"]["survey.wasserstein"]
    gate = run(sys.executable, "-m", "finetrack", "gate", str(out), "--metric", "survey.wasserstein", "--min-improvement", "5%")
    assert gate.returncode == 0 and "GO" in gate.stdout and trained < 0.9 * base, (gate.stdout, base, trained)

    plan_json = tmp_path / "plan.json"
    finetrack("plan", config, "--gpu", "A100-80GB", "--num-processes", "4", "--price-per-hour", "7.16", "--json", str(plan_json))
    plan = json.loads(plan_json.read_text())
    assert plan["memory"]["fits"] is True and plan["time"]["cost"] > 0 and plan["target"]["num_processes"] == 4, plan["time"]
