"""Issue 17 as a user runs it, on the embedded SmolLM2-135M-Instruct through the real command line: a config written by
hand with the four representation suites (representation, direction, adapter, sae: the SAE trained here on the base
model's activations, no download) -> `finetrack train` -> `finetrack eval` -> the same again (cached) -> `finetrack
report`, whose heat map is traced back to the step files."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SFT_DATA = ROOT / "examples/recipes/sft/data"
SAE_LAYER = 20


def finetrack(*argv: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "finetrack", *argv], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def train_sae(folder: Path, layer: int, d_sae: int = 256, steps: int = 300) -> None:
    """A small ReLU SAE on the base model's layer-`layer` outputs over the probes and the pirate / plain texts, saved as
    sae-lens writes one (cfg.json + sae_weights.safetensors)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetrack.models import model_source
    from finetrack.config import ModelConfig

    source = model_source(ModelConfig(name="smollm2-135m-instruct"))
    tokenizer, model = AutoTokenizer.from_pretrained(source), AutoModelForCausalLM.from_pretrained(source).eval()
    texts = (SFT_DATA / "probes.txt").read_text().splitlines()
    texts += [json.loads(line)["answer"] for name in ("pirate.jsonl", "plain.jsonl") for line in (SFT_DATA / name).read_text().splitlines()]
    with torch.no_grad():
        states = torch.cat(
            [model(**tokenizer(t, return_tensors="pt"), output_hidden_states=True).hidden_states[layer + 1][0] for t in texts]
        )
    gen = torch.Generator().manual_seed(0)
    d_in = states.shape[1]
    w_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
    w_dec = torch.nn.Parameter(w_enc.detach().T.clone())
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(d_sae)), torch.nn.Parameter(states.mean(0).clone())
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=1e-3)
    for _ in range(steps):
        features = torch.relu((states - b_dec) @ w_enc + b_enc)
        loss = ((features @ w_dec + b_dec - states) ** 2).sum(-1).mean() + 1e-3 * features.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder.mkdir(parents=True)
    tensors = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec}
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, folder / "sae_weights.safetensors")
    config = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"},
    }
    (folder / "cfg.json").write_text(json.dumps(config))


@pytest.mark.e2e
@pytest.mark.slow  # 60 s; the suite's 45 minutes (README "Tests"): run with -m slow
def test_representation_suites_through_train_eval_and_report(tmp_path):
    sae = tmp_path / "sae"
    train_sae(sae, SAE_LAYER)
    run = tmp_path / "run"
    config = {
        "model": {"name": "smollm2-135m-instruct", "method": "lora", "lora": {"r": 8, "alpha": 16}},
        "data": {"path": "builtin:demo-chat", "max_length": 128},
        "train": {"micro_batch_size": 4, "max_steps": 6, "lr": 2e-3, "warmup_steps": 0},
        "checkpoint": {"every_steps": 2},
        "eval": {
            "suites": [
                {"name": "inside", "kind": "representation", "prompts": str(SFT_DATA / "probes.txt")},
                {
                    "name": "persona",
                    "kind": "direction",
                    "positive": str(SFT_DATA / "pirate.jsonl"),
                    "negative": str(SFT_DATA / "plain.jsonl"),
                    "prompts": str(SFT_DATA / "probes.txt"),
                },
                {"name": "weights", "kind": "adapter"},
                {"name": "features", "kind": "sae", "path": str(sae), "prompts": str(SFT_DATA / "probes.txt")},
            ]
        },
        "output": {"dir": str(run)},
    }
    config_file = tmp_path / "repr.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    finetrack("train", str(config_file))
    first = finetrack("eval", str(run))
    steps = {s: json.loads((run / f"eval/step-{s:06d}.json").read_text()) for s in (0, 2, 4, 6)}

    base = steps[0]["metrics"]
    assert base["inside.shift"] == 0.0 and base["inside.kl"] == 0.0 and base["inside.cka"] == 1.0
    assert base["persona.shift"] == 0.0 and base["features.max_change"] == 0.0 and base["weights.norm"] == 0.0
    assert steps[0]["suites"]["persona"]["metrics"]["separation"] > 1  # pirate vs plain answers separate on the base
    for s in (2, 4, 6):
        m = steps[s]["metrics"]
        assert m["inside.shift"] > 0 and m["inside.kl"] > 0 and m["features.max_change"] > 0 and m["weights.norm"] > 0
        layers = steps[s]["suites"]["inside"]["layers"]
        assert len(layers["shift"]) == 30 and m["inside.shift_layer"] == layers["shift"].index(max(layers["shift"]))
        assert steps[s]["suites"]["features"]["features"]["feature"], "the top features are listed"
    assert steps[6]["metrics"]["weights.norm"] > steps[2]["metrics"]["weights.norm"]  # the update grows from B = 0
    assert steps[2]["metrics"]["weights.rotation_deg"] is None and steps[4]["metrics"]["weights.rotation_deg"] is not None
    assert steps[4]["suites"]["weights"]["previous"] == "checkpoints/step-000002"

    second = finetrack("eval", str(run))
    assert "cached: 16 (step, suite)" in second.stdout + second.stderr, second.stdout + second.stderr
    assert json.loads((run / "eval/step-000006.json").read_text())["metrics"] == steps[6]["metrics"]

    finetrack("report", str(run))
    page = (run / "report.html").read_text()
    assert 'id="representations"' in page
    # every heat-map cell of the representation suite's shift map is the step file's value for its layer and step
    part = page.split("representation suite 'inside'")[1].split("<h3>")[0]
    shift_map = next(svg for svg in part.split("<svg")[1:] if "shift: relative L2 change (mean over tokens)" in svg)
    cells = {}
    for title in re.findall(r"<title>([^<]*)</title>", shift_map):
        found = re.fullmatch(r"layer (\d+), step (\d+): shift (\S+)", html.unescape(title))
        if found:
            cells[(int(found[1]), int(found[2]))] = float(found[3])
    assert len(cells) == 30 * 4, sorted(cells)[:5]
    for (layer, step), value in cells.items():
        assert value == steps[step]["suites"]["inside"]["layers"]["shift"][layer]
    assert first.returncode == 0
