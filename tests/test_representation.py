"""The representation and direction suites: their math against hand-computed values, then through `finetrack eval` on
tiny LoRA and full fine-tune runs (step 0 equals the base exactly; a checkpoint's values recomputed apart from the
suite, with the model's own output_hidden_states; results cached; bad input as one error line)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_run
from test_bad_input_eval import assert_one_error, eval_with, run_cli, untrained_run  # noqa: F401 (a fixture)

from finetrack.evaluate.direction import mean_difference, separation_of
from finetrack.evaluate.representation import cosine_similarity, linear_cka, relative_change, token_kl
from finetrack.evaluate.runner import evaluate_run


# ------------------------------------------------------------------------------------------------- the math
def test_linear_cka_is_one_for_the_same_geometry_and_lower_with_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))  # a random rotation
    assert linear_cka(x, x) == 1.0
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-12)  # scale and offset: the same geometry
    a = linear_cka(x, x + 0.5 * torch.randn(40, 16, generator=gen, dtype=torch.float64))
    b = linear_cka(x, x + 2.0 * torch.randn(40, 16, generator=gen, dtype=torch.float64))
    assert 1.0 > a > b > 0.0
    assert linear_cka(x, torch.ones(40, 16, dtype=torch.float64)) is None  # no variance: undefined
    # against the feature-space formula ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), computed apart
    y = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = float((yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-12)


def test_shift_cosine_and_kl_by_hand():
    h, h0 = torch.tensor([[3.0, 4.0]], dtype=torch.float64), torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    assert relative_change(h, h0).item() == pytest.approx(4 / 3)
    assert cosine_similarity(h, h0).item() == pytest.approx(3 / 5)
    assert relative_change(h0, h0).item() == 0.0 and cosine_similarity(h0, h0).item() == 1.0
    logits, logits0 = (
        torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64),
        torch.zeros(1, 1, 2, dtype=torch.float64),
    )  # p = (1/4, 3/4), q = (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert token_kl(logits, logits0).item() == pytest.approx(expected, rel=1e-12)
    assert token_kl(logits, logits).item() == 0.0


def test_a_planted_direction_is_recovered():
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(32, generator=gen, dtype=torch.float64)
    u /= u.norm()
    noise = 0.1 * torch.randn(2, 60, 32, generator=gen, dtype=torch.float64)  # 2 layers, 60 texts
    positive = torch.arange(60) < 30
    vectors = noise + torch.where(positive[None, :, None], 1.0, -1.0) * u  # layer 0: +-u along the planted direction
    vectors[1] = noise[1]  # layer 1: nothing planted
    directions = mean_difference(vectors, positive, normalize=True)
    assert float(directions[0] @ u) > 0.99
    assert directions.norm(dim=-1).tolist() == pytest.approx([1.0, 1.0])
    assert separation_of(vectors[0], positive, directions[0]) > 5 > abs(separation_of(vectors[1], positive, directions[1]))
    raw = mean_difference(vectors, positive, normalize=False)
    assert float(raw[0].norm()) == pytest.approx(2.0, rel=0.1)  # +u minus -u


# ------------------------------------------------------------------------------------ through finetrack eval
def _texts(tmp: Path) -> dict[str, Path]:
    prompts = tmp / "probes.txt"
    prompts.write_text("alpha beta\ngamma delta echo\nfox\nhotel india juliet kilo\nlima\n")
    positive, negative = tmp / "pos.jsonl", tmp / "neg.jsonl"
    positive.write_text("".join(json.dumps({"prompt": "say", "answer": a}) + "\n" for a in ["alpha alpha", "alpha beta alpha"]))
    positive.write_text(positive.read_text() + json.dumps({"text": "alpha beta alpha gamma"}) + "\n")
    negative.write_text("".join(json.dumps({"prompt": "say", "answer": a}) + "\n" for a in ["kilo lima", "lima kilo kilo", "juliet"]))
    return {"prompts": prompts, "positive": positive, "negative": negative}


def _suites(files: dict[str, Path]) -> list[dict]:
    return [
        {"name": "rep", "kind": "representation", "prompts": str(files["prompts"]), "micro_batch_size": 2},
        {
            "name": "dir",
            "kind": "direction",
            "positive": str(files["positive"]),
            "negative": str(files["negative"]),
            "prompts": str(files["prompts"]),
        },
    ]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, chat_file) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("repr")
    result, _ = tiny_run(tmp, tiny_model_dir, chat_file, "checkpoint.every_steps=2")
    return result.run_dir, _texts(tmp)


def _hidden(model, tokenizer, texts: list[str], layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per text (one at a time, no padding): the output of decoder block `layer` from output_hidden_states (index
    layer + 1) and the logits, as a check apart from the suite's forward hooks."""
    states, logits = [], []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model(input_ids=ids, output_hidden_states=True)
            states.append(out.hidden_states[layer + 1][0].double())
            logits.append(out.logits[0].double())
    return states, logits


def test_representation_and_direction_through_eval(tmp_path, lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, files = lora_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    override = f"eval.suites={json.dumps(_suites(files))}"
    lines: list[str] = []
    records = {r["step"]: r for r in evaluate_run(run, overrides=[override], out=lines.append)}
    assert sorted(records) == [0, 2, 4]
    base = records[0]["metrics"]
    # step 0 is the base model: no change at all
    assert base["rep.shift"] == 0.0 and base["rep.shift_last"] == 0.0 and base["rep.kl"] == 0.0
    assert base["rep.cosine"] == 1.0 and base["rep.cka"] == 1.0 and base["dir.shift"] == 0.0
    assert records[0]["suites"]["rep"]["layers"]["shift"] == [0.0, 0.0]
    for step in (2, 4):
        m = records[step]["metrics"]
        assert m["rep.shift"] > 0 and m["rep.kl"] > 0 and m["rep.cosine"] < 1
        layers = records[step]["suites"]["rep"]["layers"]
        assert (
            layers["layer"] == [0, 1]
            and m["rep.shift"] == max(layers["shift"])
            and m["rep.shift_layer"] == layers["shift"].index(m["rep.shift"])
        )
        assert m["dir.shift"] == pytest.approx(m["dir.projection"] - base["dir.projection"], abs=1e-12)
    assert records[4]["counts"]["rep.prompts"] == 5 and records[4]["counts"]["dir.positive"] == 3
    assert records[4]["counts"]["dir.negative"] == 3

    # step 4 recomputed apart: base and adapter loaded with plain transformers / PEFT, block 0's output and the KL
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    probes = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in files["prompts"].read_text().split("\n")
        if p
    ]
    h0, logits0 = _hidden(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, probes, 0)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "checkpoints/step-000004").eval()
    h, logits = _hidden(model, tokenizer, probes, 0)
    diffs = torch.cat([(a - b).norm(dim=-1) / b.norm(dim=-1) for a, b in zip(h, h0)])
    assert records[4]["suites"]["rep"]["layers"]["shift"][0] == pytest.approx(float(diffs.mean()), rel=1e-4)
    last = torch.stack([(a[-1] - b[-1]).norm() / b[-1].norm() for a, b in zip(h, h0)])
    assert records[4]["suites"]["rep"]["layers"]["shift_last"][0] == pytest.approx(float(last.mean()), rel=1e-4)
    kl = torch.cat([token_kl(a[None], b[None])[0] for a, b in zip(logits, logits0)])
    assert records[4]["metrics"]["rep.kl"] == pytest.approx(float(kl.mean()), rel=1e-4)

    # cached: a second eval computes nothing; an edited probe file is evaluated again
    lines.clear()
    evaluate_run(run, overrides=[override], out=lines.append)
    assert any("cached: 6 (step, suite)" in line for line in lines), lines
    files["prompts"].write_text(files["prompts"].read_text() + "mike november\n")
    lines.clear()
    again = {r["step"]: r for r in evaluate_run(run, overrides=[override], out=lines.append)}
    assert again[4]["counts"]["rep.prompts"] == 6
    assert any("cached: 0" in line for line in lines) or not any("cached" in line for line in lines)
    summary = (run / "eval/summary.csv").read_text().splitlines()[0]
    assert "rep.shift" in summary and "dir.projection" in summary


def test_full_fine_tune_compares_with_the_base_it_keeps_loaded(tmp_path, tiny_model_dir, chat_file):
    files = _texts(tmp_path)
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=full", "train.lr=1e-3", "checkpoint.every_steps=4")
    records = evaluate_run(result.run_dir, overrides=[f"eval.suites={json.dumps(_suites(files)[:1])}"], out=lambda s: None)
    assert [r["step"] for r in records] == [0, 4]
    assert records[0]["metrics"]["rep.shift"] == 0.0 and records[0]["metrics"]["rep.kl"] == 0.0
    assert records[1]["metrics"]["rep.shift"] > 0 and records[1]["metrics"]["rep.kl"] > 0


# ---------------------------------------------------------------------------------------------- bad input
def test_representation_layer_the_model_does_not_have(capsys, lora_run):
    run, files = lora_run
    suite = {"name": "rep", "kind": "representation", "prompts": str(files["prompts"]), "layers": [0, 7]}
    code, out, err = run_cli(capsys, "eval", run, "--steps", "0", f"eval.suites={json.dumps([suite])}")
    assert_one_error(code, out, err, "eval suite 'rep'", "layers [7]", "0..1")
    assert not (run / "eval/step-000000.json").exists() or "rep" not in (run / "eval/step-000000.json").read_text()


def test_direction_texts_missing_or_bad(capsys, lora_run, tmp_path):
    run, files = lora_run
    gone = {"name": "d", "kind": "direction", "positive": str(tmp_path / "gone.jsonl"), "negative": str(files["negative"])}
    assert_one_error(*eval_with(capsys, run, [gone]), "gone.jsonl", "eval suite 'd'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    suite = {"name": "d", "kind": "direction", "positive": str(bad), "negative": str(files["negative"]), "prompts": str(files["prompts"])}
    assert_one_error(*eval_with(capsys, run, [suite]), "bad.jsonl:2", "prompt and answer")
    labelled = tmp_path / "labelled.yaml"
    labelled.write_text("- text: alpha\n  label: positive\n- text: kilo\n  label: maybe\n")
    suite = {"name": "d", "kind": "direction", "texts": str(labelled), "prompts": str(files["prompts"])}
    assert_one_error(*eval_with(capsys, run, [suite]), "labelled.yaml:3", "label must be 'positive' or 'negative'")


@pytest.mark.parametrize(
    "suite, said",
    [
        ({"name": "d", "kind": "direction", "positive": "p.jsonl"}, "positive and negative go together"),
        ({"name": "d", "kind": "direction", "positive": "p.jsonl", "negative": "n.jsonl", "texts": "t.jsonl"}, "not both"),
        ({"name": "r", "kind": "representation", "every_steps": 2}, "every_steps"),
    ],
)
def test_representation_suite_settings_refused(capsys, untrained_run, suite, said):  # noqa: F811
    code, out, err = run_cli(capsys, "eval", untrained_run, "--steps", "0", f"eval.suites={json.dumps([suite])}")
    assert_one_error(code, out, err, said)
