"""The loop on a tiny random Llama: golden losses, accumulation invariance, what trains and what does not."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetrack.config import ConfigError, load_config
from finetrack.optim import lr_at
from finetrack.train import run
from conftest import tiny_run

GOLDEN = Path(__file__).parent / "golden" / "tiny_first_losses.json"


def test_golden_first_losses(tmp_path, tiny_model_dir, chat_file):
    """Same seed, same data, same code -> the same losses. A refactor must reproduce them.
    Regenerate deliberately with FINETRACK_UPDATE_GOLDEN=1 (and say why in the commit)."""
    got = {}
    for method in ("full", "lora"):
        _, metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, f"model.method={method}", name=method)
        got[method] = [m["loss"] for m in metrics]
    if os.environ.get("FINETRACK_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"torch": torch.__version__, **got}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for method in ("full", "lora"):
        assert got[method] == pytest.approx(golden[method], abs=1e-4), method
    # full fine-tuning at lr 1e-2 must actually move the loss
    assert got["full"][-1] < got["full"][0] - 0.1


@pytest.mark.parametrize("pack", [True, False])
def test_batch_times_accumulation_equivalence(tmp_path, tiny_model_dir, chat_file, pack):
    """4 rows x 1 micro-batch == 1 row x 4 accumulated: gradients are normalized by the target tokens of the
    whole step, not averaged per micro-batch (rows here have very different numbers of target tokens)."""
    common = ["model.method=full", f"data.pack={str(pack).lower()}", "train.max_steps=3"]
    a, ma = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, "train.micro_batch_size=4", "train.grad_accum_steps=1", name="a")
    b, mb = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, "train.micro_batch_size=1", "train.grad_accum_steps=4", name="b")
    assert [m["loss"] for m in ma] == pytest.approx([m["loss"] for m in mb], abs=1e-5)
    assert [m["grad_norm"] for m in ma] == pytest.approx([m["grad_norm"] for m in mb], rel=1e-4)
    wa = load_file(a.final_checkpoint / "model.safetensors")
    wb = load_file(b.final_checkpoint / "model.safetensors")
    for k in wa:
        # Adam divides by sqrt(v): float summation-order noise in near-zero gradients shows up as ~1e-5 weight noise
        torch.testing.assert_close(wa[k], wb[k], atol=2e-4, rtol=1e-4)


def _base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_lora_trains_adapters_only(tmp_path, tiny_model_dir, chat_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=lora", "model.lora.r=4")
    ckpt = result.final_checkpoint
    assert {"adapter_config.json", "adapter_model.safetensors", "meta.json", "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    # every adapter matrix moved away from its initialization (B starts at zero; A is seeded)
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)
    # loadable by PEFT alone; the frozen base is exactly the original
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = PeftModel.from_pretrained(base, ckpt).base_model.model
    original = _base_weights(tiny_model_dir)
    for name, p in merged.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_layer.", "")
            torch.testing.assert_close(p.detach(), original[key], atol=0, rtol=0)


def test_full_trains_every_tensor(tmp_path, tiny_model_dir, chat_file):
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=full")
    after = load_file(result.final_checkpoint / "model.safetensors")
    before = _base_weights(tiny_model_dir)
    assert set(after) == set(before)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged


def test_qlora_on_cpu(tmp_path, tiny_model_dir, chat_file):
    """4-bit NF4 base via bitsandbytes on the CPU; only the adapter trains and is saved."""
    result, metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=qlora", "model.lora.r=4", "model.qlora.double_quant=true")
    adapter = load_file(result.final_checkpoint / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)
    assert all(m["loss"] == m["loss"] for m in metrics)  # no NaN
    resolved = (result.run_dir / "config.resolved.yaml").read_text()
    assert "compute_dtype: float32" in resolved


def test_gradient_checkpointing_same_losses(tmp_path, tiny_model_dir, chat_file):
    _, plain = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=lora", name="plain")
    _, ckpt = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=lora", "model.gradient_checkpointing=true", name="gc")
    assert [m["loss"] for m in plain] == pytest.approx([m["loss"] for m in ckpt], abs=1e-5)


def test_run_directory_and_metrics(tmp_path, tiny_model_dir, chat_file):
    result, metrics = tiny_run(
        tmp_path, tiny_model_dir, chat_file, "train.max_steps=5", "train.log_every_steps=2", "checkpoint.every_steps=2",
        "data.eval_split=0.2", "eval.loss_every_steps=2",
    )
    run_dir = result.run_dir
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.resolved.yaml", "data_report.json", "metrics.jsonl"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000005"]
    assert [m["step"] for m in metrics] == [2, 4, 5]
    for m in metrics:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_mb", "eval_loss", "eval_ppl"} <= set(m)
    assert metrics[0]["tokens"] < metrics[1]["tokens"] < metrics[2]["tokens"]
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["train"]["rows_kept"] + report["eval"]["rows_kept"] == 48
    assert report["train"]["held_out_for_eval"] == report["eval"]["rows_kept"] > 0
    meta = json.loads((run_dir / "checkpoints/step-000005/meta.json").read_text())
    assert meta["step"] == 5 and meta["tokens_seen"] == metrics[-1]["tokens"] and "transformers" in meta["versions"]
    # another config into the same run directory is not a silent restart: the differences are named
    with pytest.raises(ConfigError, match=r"cannot resume from .*step-000005.*\n  data.eval_split: 0.2 -> None"):
        tiny_run(tmp_path, tiny_model_dir, chat_file)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),
        ("cosine", [0.5, 1.0, 1.0, 0.75, 0.25]),
    ],
)
def test_lr_schedule(schedule, expected):
    """2 warmup steps reach the peak; the first decay step uses the peak; no step runs at lr 0."""
    assert [lr_at(s, 1.0, 2, 5, schedule) for s in range(1, 6)] == pytest.approx(expected)


def test_adamw_8bit_on_cpu(tmp_path, tiny_model_dir, chat_file):
    result, metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=full", "train.optimizer=adamw_8bit")
    after = load_file(result.final_checkpoint / "model.safetensors")
    before = _base_weights(tiny_model_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_paged_optimizer_needs_cuda(tmp_path, tiny_model_dir, chat_file):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: paged optimizers are allowed")
    with pytest.raises(Exception, match="paged_adamw_8bit pages optimizer state to CPU memory and needs a CUDA GPU"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, "train.optimizer=paged_adamw_8bit")


def test_custom_objective_plugs_in(tmp_path, tiny_model_dir, chat_file):
    """An objective is a function (model, batch) -> (summed loss, metrics); its metrics reach metrics.jsonl."""
    from finetrack.train import causal_lm_objective

    calls = []

    def doubled(model, batch):
        loss_sum, _ = causal_lm_objective(model, batch)
        calls.append(batch.num_target_tokens)
        return 2 * loss_sum, {"half_loss_sum": loss_sum.item()}

    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.path={chat_file}", f"output.dir={tmp_path / 'o'}",
                             "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.max_steps=2", "model.method=full"])
    result = run(cfg, objective=doubled)
    metrics = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(calls) == 4  # 2 steps x 2 micro-batches
    assert all("half_loss_sum" in m for m in metrics)
    # the logged loss is the objective's value per target token: twice the plain cross-entropy
    _, plain = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=full", "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.max_steps=1", name="plain")
    assert metrics[0]["loss"] == pytest.approx(2 * plain[0]["loss"], rel=1e-5)


def test_trainable_report_counts_4bit_weights_as_parameters(tiny_model_dir):
    """QLoRA packs two 4-bit weights per byte; the report still counts logical parameters, like LoRA's."""
    from finetrack.config import Environment, resolve
    from finetrack.models import build_model, trainable_report

    env = Environment(device_type="cpu", bf16_supported=False, num_processes=1, num_train_rows=100)
    reports = []
    for method in ("lora", "qlora"):
        cfg, _ = resolve(load_config(None, [f"model.name={tiny_model_dir}", f"model.method={method}", "model.lora.r=4"]), env)
        reports.append(trainable_report(build_model(cfg.model, torch.device("cpu"))))
    assert reports[0] == reports[1] and reports[0].startswith("trainable parameters: 8,192 of ")
