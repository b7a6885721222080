"""The loop on a tiny random Llama: golden losses, accumulation invariance, what trains and what does not."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, tiny_run
from safetensors.torch import load_file

from finetrack.config import ConfigError, load_config
from finetrack.optim import lr_at
from finetrack.objectives import causal_lm
from finetrack.train import run

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


class Capture:
    """An objective that trains exactly like objectives.causal_lm and keeps the model the run trains (not a copy loaded
    from disk), with its parameters as they were before the first optimizer step."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.initial: dict[str, torch.Tensor] = {}

    def __call__(self, model, batch):
        if self.model is None:
            self.model = model
            self.initial = {n: p.data.detach().clone() for n, p in model.named_parameters()}
        return causal_lm(model, batch)


def test_lora_trains_adapters_only(tmp_path, tiny_model_dir, chat_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen = Capture()
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=lora", "model.lora.r=4", objective=seen)
    ckpt = result.final_checkpoint
    assert {"adapter_config.json", "adapter_model.safetensors", "meta.json", "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    # the trained model itself: only adapter matrices train, and every one of them (A and B) moved
    params = dict(seen.model.named_parameters())
    lora = {n for n in params if "lora_" in n}
    assert {n for n, p in params.items() if p.requires_grad} == lora
    assert {n.split("lora_")[1][0] for n in lora} == {"A", "B"}
    unchanged = [n for n in lora if torch.equal(params[n].detach(), seen.initial[n])]
    assert not unchanged, unchanged
    # ... and its frozen base is exactly the original, tensor for tensor
    original = _base_weights(tiny_model_dir)
    base_names = [n for n in params if n not in lora]
    assert len(base_names) == len(original)
    for name in base_names:
        key = name.removeprefix("base_model.model.").replace("base_layer.", "")
        torch.testing.assert_close(params[name].detach(), original[key], atol=0, rtol=0)
    # loadable by PEFT alone: the checkpoint holds the trained adapter values
    loaded = dict(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ckpt).named_parameters())
    for name in lora:
        torch.testing.assert_close(loaded[name].detach(), params[name].detach(), atol=0, rtol=0)


def test_full_trains_every_tensor(tmp_path, tiny_model_dir, chat_file):
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=full")
    after = load_file(result.final_checkpoint / "model.safetensors")
    before = _base_weights(tiny_model_dir)
    assert set(after) == set(before)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_qlora_on_cpu(tmp_path, tiny_model_dir, chat_file, quant_type, double_quant):
    """A 4-bit base via bitsandbytes on the CPU, quantized as configured and frozen; only the adapter trains and is saved."""
    import bitsandbytes as bnb

    seen = Capture()
    result, metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "model.method=qlora",
        "model.lora.r=4",
        f"model.qlora.quant_type={quant_type}",
        f"model.qlora.double_quant={str(double_quant).lower()}",
        objective=seen,
    )
    adapter = load_file(result.final_checkpoint / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)
    assert all(m["loss"] == m["loss"] for m in metrics)  # no NaN
    resolved = (result.run_dir / "config.resolved.yaml").read_text()
    assert "compute_dtype: float32" in resolved
    quantized = {n: m for n, m in seen.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 2 * 7  # q k v o gate up down in each of 2 decoder layers; the output head stays unquantized
    original = _base_weights(tiny_model_dir)
    for name, module in quantized.items():
        w = module.weight
        assert w.dtype == torch.uint8 and not w.requires_grad  # two 4-bit values per byte, frozen
        assert w.quant_type == quant_type and w.quant_state.nested is double_quant, name
        assert torch.equal(w.data, seen.initial[f"{name}.weight"]), f"{name}: the frozen 4-bit weight changed"
        # it is the original weight, quantized (4-bit error only)
        key = name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"
        err = bnb.functional.dequantize_4bit(w.data, w.quant_state).float() - original[key]
        assert err.norm() < 0.2 * original[key].norm(), name


def _built(tiny_model_dir, *overrides: str) -> torch.nn.Module:
    from finetrack.config import Environment, resolve
    from finetrack.models import build_model

    env = Environment(device_type="cpu", bf16_supported=False, num_processes=1, num_train_rows=100)
    cfg, _ = resolve(load_config(None, [f"model.name={tiny_model_dir}", *overrides]), env)
    return build_model(cfg.model, torch.device("cpu"))


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_gradient_checkpointing_switch_reaches_the_model(tiny_model_dir, method):
    for on in (False, True):
        model = _built(tiny_model_dir, f"model.method={method}", f"model.gradient_checkpointing={str(on).lower()}")
        assert model.is_gradient_checkpointing is on, (method, on)


def _adapted(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """'layers.0.self_attn.q_proj' -> the LoRA layer there, for every module that carries an adapter."""
    return {
        n.removeprefix("base_model.model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def test_lora_options_shape_the_adapters(tiny_model_dir):
    layers = [
        f"layers.{i}.{kind}_proj"
        for i in (0, 1)
        for kind in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "mlp.gate", "mlp.up", "mlp.down")
    ]
    every = _adapted(_built(tiny_model_dir, "model.lora.r=4", "model.lora.alpha=8"))
    assert sorted(every) == sorted(layers)  # all-linear: every linear layer but the output head
    assert all(m.scaling["default"] == pytest.approx(8 / 4) and m.lora_A["default"].weight.shape[0] == 4 for m in every.values())
    named = _adapted(_built(tiny_model_dir, "model.lora.target_modules=[q_proj, v_proj]"))
    assert sorted(named) == sorted(n for n in layers if n.endswith(("q_proj", "v_proj")))
    one_layer = _adapted(_built(tiny_model_dir, "model.lora.layers_to_transform=[1]"))
    assert sorted(one_layer) == sorted(n for n in layers if n.startswith("layers.1."))
    rs = _adapted(_built(tiny_model_dir, "model.lora.r=4", "model.lora.alpha=8", "model.lora.use_rslora=true"))
    assert all(m.scaling["default"] == pytest.approx(8 / 4**0.5) for m in rs.values())  # alpha / sqrt(r)
    dora = _adapted(_built(tiny_model_dir, "model.lora.use_dora=true"))
    assert sorted(dora) == sorted(layers) and all("default" in m.lora_magnitude_vector for m in dora.values())
    assert not any(len(m.lora_magnitude_vector) for m in every.values())  # plain LoRA has no magnitude vector


def test_gradient_checkpointing_same_losses(tmp_path, tiny_model_dir, chat_file):
    _, plain = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=lora", name="plain")
    seen = Capture()
    _, ckpt = tiny_run(
        tmp_path, tiny_model_dir, chat_file, "model.method=lora", "model.gradient_checkpointing=true", name="gc", objective=seen
    )
    assert seen.model.is_gradient_checkpointing and seen.model.training  # the run really recomputed activations
    assert [m["loss"] for m in plain] == pytest.approx([m["loss"] for m in ckpt], abs=1e-5)


def test_gradient_clipping_bounds_the_update_and_logs_the_norm_before_clipping(tmp_path, tiny_model_dir, chat_file):
    """One step of AdamW with eps=1 (so the step is ~lr x gradient, not lr x sign): with the gradient clipped to
    norm c the weights move at most lr x c / eps in norm; the logged grad_norm is the norm before clipping."""
    lr, c = 1e-2, 1e-2
    common = ["model.method=full", "train.max_steps=1", f"train.lr={lr}", "train.adam_eps=1.0"]
    clipped, m_clipped = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, f"train.max_grad_norm={c}", name="clipped")
    free, m_free = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, "train.max_grad_norm=null", name="free")
    before = _base_weights(tiny_model_dir)

    def update_norm(result) -> float:
        after = load_file(result.final_checkpoint / "model.safetensors")
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(after[k] - before[k]) for k in before])))

    # same weights, same batch: the logged norms agree, and they are far above the clip value
    assert m_clipped[0]["grad_norm"] == pytest.approx(m_free[0]["grad_norm"], rel=1e-5)
    assert m_clipped[0]["grad_norm"] > 10 * c
    assert 0 < update_norm(clipped) <= 1.05 * lr * c  # elementwise |step| = lr |g| / (|g| + eps) <= lr |g|
    assert update_norm(free) > 10 * lr * c  # without clipping the same step moves much further


def test_run_directory_and_metrics(tmp_path, tiny_model_dir, chat_file):
    result, metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "train.max_steps=5",
        "train.log_every_steps=2",
        "checkpoint.every_steps=2",
        "data.eval_split=0.2",
        "eval.loss_every_steps=2",
    )
    run_dir = result.run_dir
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints",
        "config.resolved.yaml",
        "data_report.json",
        "metrics.jsonl",
        "train.lock",
    ]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000005"]
    assert [m["step"] for m in metrics] == [2, 4, 5]
    for m in metrics:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_mib", "eval_loss", "eval_ppl"} <= set(m)
    assert metrics[0]["tokens"] < metrics[1]["tokens"] < metrics[2]["tokens"]
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["train"]["rows_kept"] + report["eval"]["rows_kept"] == 48
    assert report["train"]["held_out_for_eval"] == report["eval"]["rows_kept"] > 0
    meta = json.loads((run_dir / "checkpoints/step-000005/meta.json").read_text())
    assert meta["step"] == 5 and meta["tokens_seen"] == metrics[-1]["tokens"] and "transformers" in meta["versions"]
    # another config into the same run directory is not a silent restart: the differences are named
    with pytest.raises(ConfigError, match=r"cannot resume from .*step-000005.*\n  data.eval_split: 0.2 -> None"):
        tiny_run(tmp_path, tiny_model_dir, chat_file)


def test_progress_bar_shows_the_logged_figures(tmp_path):
    """The bar's postfix carries the headline figures of the metrics.jsonl line just written, epoch and tokens included."""
    from finetrack.metrics import MetricsLog

    out = MetricsLog(tmp_path / "metrics.jsonl", total_steps=16, done_steps=0, enabled=True)
    out.write(
        {
            "step": 3,
            "epoch": 0.375,
            "loss": 2.4817,
            "grad_norm": 0.7132,
            "target_tokens": 901,
            "tokens_per_s": 1234.5,
            "lr": 1e-3,
            "tokens": 40961,
            "peak_mem_mib": 512.3,
        }
    )
    shown = dict(item.split("=", 1) for item in out.bar.postfix.split(", "))
    out.close()
    written = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert list(shown) == ["epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_mib"]
    assert int(shown["tokens"]) == written["tokens"]  # tokens seen: exact, not rounded
    for key, text in shown.items():
        assert float(text) == pytest.approx(written[key], rel=5e-3), key  # 3 significant digits


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


def test_weight_decay_skips_biases_and_norms(tiny_tokenizer):
    """Decay on matrices only: biases and norm weights sit in a group with weight_decay 0."""
    from transformers import LlamaForCausalLM

    from finetrack.optim import build_optimizer

    config = build_tiny_model(tiny_tokenizer).config
    config.attention_bias = config.mlp_bias = True  # a tiny Llama with biases too
    model = LlamaForCausalLM(config)
    train_cfg = load_config(None, ["train.weight_decay=0.1", "train.adam_betas=[0.8, 0.95]", "train.adam_eps=1e-6"]).train
    optimizer = build_optimizer(model, train_cfg, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert sorted(by_decay) == [0.0, 0.1]
    no_decay, decay = by_decay[0.0], by_decay[0.1]
    assert no_decay == {n for n in names.values() if n.endswith(".bias") or "norm" in n}
    assert any(n.endswith(".bias") for n in no_decay) and any(n.endswith("norm.weight") for n in no_decay)
    assert decay == set(names.values()) - no_decay and "model.embed_tokens.weight" in decay and "lm_head.weight" in decay
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 and g["lr"] == 1e-3 for g in optimizer.param_groups)


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


def test_python_objective_from_a_file(tmp_path, tiny_model_dir, chat_file):
    """objective.kind=python: a function in a .py file, (model, batch) -> {name: Term}; the loss is the weighted sum of
    each term per unit, its terms reach metrics.jsonl, and its source's sha256 is in every checkpoint."""
    loss_file = tmp_path / "my_loss.py"
    loss_file.write_text(
        "from finetrack.objectives import Term, next_token_sum\n"
        "calls = []\n"
        "def doubled(model, batch):\n"
        "    calls.append(batch.num_target_tokens)\n"
        "    s = next_token_sum(model, batch)\n"
        "    return {'lm': Term(2 * s, 'tokens'), 'per_row': Term(s.detach(), 'rows', 0.0)}\n"
    )
    common = ["model.method=full", "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.max_steps=2"]
    result, metrics = tiny_run(
        tmp_path, tiny_model_dir, chat_file, *common, "objective.kind=python", f"objective.python.function={loss_file}:doubled"
    )
    assert all("per_row" in m for m in metrics)
    meta = json.loads((result.final_checkpoint / "meta.json").read_text())
    assert meta["resolved"]["objective_sha256"] == hashlib.sha256(loss_file.read_bytes()).hexdigest()
    # the logged loss is the objective's value per target token: twice the plain cross-entropy
    _, plain = tiny_run(tmp_path, tiny_model_dir, chat_file, *common[:3], "train.max_steps=1", name="plain")
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


@pytest.mark.parametrize("method, why", [("lora", "the loss is nan"), ("full", "some weights are not finite")])
def test_a_diverging_run_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, chat_file, capsys, method, why):
    """train.lr=1e30 is legal (finite, > 0) and blows up at step 2: exit 2, one error line with the step and the
    hint, never "done"; step 1's checkpoint stays and no checkpoint holds non-finite weights."""
    from finetrack import checkpoint, cli

    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            f"model.name={tiny_model_dir}",
            f"data.path={chat_file}",
            f"output.dir={out}",
            f"model.method={method}",
            "data.max_length=512",
            "train.micro_batch_size=4",
            "train.max_steps=6",
            "train.lr=1e30",
            "train.max_grad_norm=null",
            "checkpoint.every_steps=1",
        ]
    )
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, captured.err[-3000:]
    assert f"training diverged at step 2: {why}" in errors[0]
    assert (
        "lower train.lr" in errors[0].lower() and "train.max_grad_norm" in errors[0] and str(out / "checkpoints/step-000001") in errors[0]
    )
    assert "done:" not in captured.out and "Traceback" not in captured.err
    assert [s for s, _ in checkpoint.step_folders(out)] == [1]
    checkpoint.verify(out / "checkpoints/step-000001")
    weights = load_file(out / "checkpoints/step-000001" / ("model.safetensors" if method == "full" else "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
