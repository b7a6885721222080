"""The adapter suite: LoRA updates read from adapter files, checked against dense products computed directly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from safetensors.torch import save_file

from finetrack.evaluate.adapter_view import run
from finetrack.evaluate.spec import AdapterSuite, EvalError

SUITE = AdapterSuite(name="adapter", kind="adapter", num_singular_values=8)


def write_adapter(folder: Path, updates: dict[str, tuple[torch.Tensor, torch.Tensor]], **config) -> Path:
    """An adapter folder as PEFT writes it: {module: (A (r, in), B (out, r))} under PEFT's tensor names, and an
    adapter_config.json with `config` over r=4, lora_alpha=4 (float64 tensors: the tests' angles are exact)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in updates.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous().clone()  # safetensors refuses shared storage
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous().clone()
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4, **config}))
    return folder


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """(rows, cols) with orthonormal columns, float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def known_svd(u: torch.Tensor, s: list[float], v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) whose product B @ A is u diag(s) v^T (scale 1 with r = lora_alpha = 4)."""
    return v.T.clone(), u * torch.tensor(s, dtype=torch.float64)


def random_pair(out_dim: int, in_dim: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, in_dim, generator=g, dtype=torch.float64), torch.randn(out_dim, r, generator=g, dtype=torch.float64)


Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"


def test_norm_and_singular_values_equal_the_dense_product(tmp_path):
    pairs = {Q: random_pair(48, 32, 4, seed=1), DOWN: random_pair(32, 64, 4, seed=2)}
    result = run(SUITE, write_adapter(tmp_path / "a", pairs, lora_alpha=6), None)
    scale = 6 / 4
    modules = result["modules"]
    assert modules["module"] == [Q, DOWN] and modules["layer"] == [0, 1] and result["counts"] == {"modules": 2}
    dense = {m: scale * b @ a for m, (a, b) in pairs.items()}
    for i, name in enumerate(modules["module"]):
        assert modules["norm"][i] == pytest.approx(float(torch.linalg.matrix_norm(dense[name])), rel=1e-9)
        expected = torch.linalg.svdvals(dense[name])[:4].tolist()
        assert modules["singular_values"][i] == pytest.approx(expected, rel=1e-9)
        assert modules["rotation_deg"][i] is None
    total = math.sqrt(sum(float(torch.linalg.matrix_norm(d)) ** 2 for d in dense.values()))
    assert result["metrics"]["norm"] == pytest.approx(total, rel=1e-9)
    assert result["metrics"]["max_norm"] == max(modules["norm"])
    assert result["metrics"]["rotation_deg"] is None and result["previous"] is None


def test_effective_rank(tmp_path):
    g = torch.Generator().manual_seed(3)
    b_rank1 = torch.zeros(40, 4, dtype=torch.float64)
    b_rank1[:, 2] = torch.randn(40, generator=g, dtype=torch.float64)  # one used column of four
    outer = torch.outer(torch.randn(40, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64))
    flat = known_svd(orthonormal(40, 4, seed=4), [2.0, 2.0, 2.0, 2.0], orthonormal(24, 4, seed=5))
    pairs = {
        "model.layers.0.a": (torch.randn(4, 24, generator=g, dtype=torch.float64), b_rank1),
        "model.layers.0.b": (torch.randn(4, 24, generator=g, dtype=torch.float64), outer),  # rank 1 up to rounding
        "model.layers.0.c": flat,
        "model.layers.0.d": known_svd(orthonormal(40, 4, seed=6), [4.0, 2.0, 1.0, 0.0], orthonormal(24, 4, seed=7)),
    }
    result = run(SUITE, write_adapter(tmp_path / "a", pairs), None)
    ranks = result["modules"]["effective_rank"]
    assert ranks[0] == pytest.approx(1.0, abs=1e-9)
    assert ranks[1] == pytest.approx(1.0, abs=1e-9)
    assert ranks[2] == pytest.approx(4.0, rel=1e-9)
    p = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64) / 7
    assert ranks[3] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)
    assert result["metrics"]["effective_rank"] == pytest.approx(sum(ranks) / 4, rel=1e-12)


def test_rotation_against_previous_checkpoint(tmp_path):
    u, v = orthonormal(40, 6, seed=8), orthonormal(24, 5, seed=9)
    s = [3.0, 2.0, 1.0, 0.5]
    base = known_svd(u[:, :4], s, v[:, :4])
    deg = math.radians(30)
    u_rotated = u[:, :4].clone()
    u_rotated[:, 0] = math.cos(deg) * u[:, 0] + math.sin(deg) * u[:, 5]  # in the plane of u1 and a direction unused
    v_rotated = v[:, :4].clone()
    v_rotated[:, 0] = math.cos(deg) * v[:, 0] + math.sin(deg) * v[:, 4]
    u_swapped = u[:, :4].clone()
    u_swapped[:, 0] = u[:, 4]  # orthogonal to every column of the first update
    before = write_adapter(tmp_path / "checkpoints" / "step-000002", {"m.0": base, "m.1": base, "m.2": base, "m.3": base})
    now = {
        "m.0": base,
        "m.1": known_svd(u_rotated, s, v[:, :4]),
        "m.2": known_svd(u[:, :4], s, v_rotated),
        "m.3": known_svd(u_swapped, s, v[:, :4]),
        "m.4": base,  # not in the previous checkpoint
    }
    result = run(SUITE, write_adapter(tmp_path / "checkpoints" / "step-000004", now), before)
    rotations = result["modules"]["rotation_deg"]
    assert rotations[0] == pytest.approx(0.0, abs=1e-6)
    assert rotations[1] == pytest.approx(30.0, abs=1e-6)
    assert rotations[2] == pytest.approx(30.0, abs=1e-6)
    assert rotations[3] == pytest.approx(90.0, abs=1e-6)
    assert rotations[4] is None
    assert result["metrics"]["rotation_deg"] == pytest.approx(150 / 4, abs=1e-6)
    assert result["metrics"]["max_rotation_deg"] == pytest.approx(90.0, abs=1e-6)
    assert result["previous"] == "checkpoints/step-000002"
    assert result["modules"]["layer"] == [0, 1, 2, 3, 4]


def test_same_random_adapter_twice_has_no_rotation(tmp_path):
    pairs = {Q: random_pair(48, 32, 4, seed=10)}
    a = write_adapter(tmp_path / "a", pairs)
    b = write_adapter(tmp_path / "b", pairs)
    assert run(SUITE, a, b)["modules"]["rotation_deg"] == [pytest.approx(0.0, abs=1e-6)]


def test_rslora_rank_and_alpha_patterns(tmp_path):
    pairs = {Q: random_pair(48, 32, 4, seed=11), DOWN: random_pair(32, 64, 2, seed=12), "lm_head": random_pair(50, 32, 4, seed=13)}
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"layers.0.self_attn.q_proj": 3}}
    plain = run(SUITE, write_adapter(tmp_path / "plain", pairs, **config), None)["modules"]
    rslora = run(SUITE, write_adapter(tmp_path / "rslora", pairs, use_rslora=True, **config), None)["modules"]
    assert plain["module"] == [Q, DOWN, "lm_head"] and plain["layer"] == [0, 1, None]
    norms = {m: float(torch.linalg.matrix_norm(b @ a)) for m, (a, b) in pairs.items()}
    for modules, scales in ((plain, [3 / 4, 8 / 2, 8 / 4]), (rslora, [3 / 2, 8 / math.sqrt(2), 8 / 2])):
        for i, name in enumerate(modules["module"]):
            assert modules["norm"][i] == pytest.approx(scales[i] * norms[name], rel=1e-9)


def test_rank_mismatch_with_the_config_is_an_error(tmp_path):
    folder = write_adapter(tmp_path / "a", {Q: random_pair(48, 32, 2, seed=14)})  # rank 2, config r=4
    with pytest.raises(EvalError, match="q_proj has rank 2"):
        run(SUITE, folder, None)


@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "use_dora": True}], ids=["lora-patterns", "rslora-dora"])
def test_real_peft_save_of_the_tiny_llama(tmp_path, tiny_tokenizer, options):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(
        build_tiny_model(tiny_tokenizer),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 3},
            task_type="CAUSAL_LM",
            **options,
        ),
    )
    g = torch.Generator().manual_seed(15)
    expected = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                b = module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g))  # PEFT starts B at zero
                a = module.lora_A["default"].weight.double()
                delta = module.scaling["default"] * b.double() @ a
                expected[name.removeprefix("base_model.model.")] = (float(torch.linalg.matrix_norm(delta)), delta)
    model.save_pretrained(tmp_path / "adapter")
    result = run(SUITE, tmp_path / "adapter", None)
    modules = result["modules"]
    assert sorted(modules["module"]) == sorted(expected) and len(expected) == 7  # 3 kinds x 2 layers + lm_head
    assert modules["module"][-1] == "lm_head"  # layer-less modules last
    for i, name in enumerate(modules["module"]):
        norm, delta = expected[name]
        rank = 2 if name.endswith("v_proj") else 4
        assert modules["norm"][i] == pytest.approx(norm, rel=1e-9)
        assert modules["singular_values"][i] == pytest.approx(torch.linalg.svdvals(delta)[:rank].tolist(), rel=1e-9)
        assert modules["layer"][i] == (None if name == "lm_head" else int(name.split(".")[2]))
    assert result["metrics"]["norm"] == pytest.approx(math.sqrt(sum(n * n for n, _ in expected.values())), rel=1e-9)


def test_step_zero_is_the_base_model(tmp_path):
    previous = write_adapter(tmp_path / "a", {Q: random_pair(48, 32, 4, seed=16)})
    result = run(SUITE, None, previous)
    assert result["metrics"] == {"norm": 0.0, "max_norm": 0.0, "effective_rank": None, "rotation_deg": None, "max_rotation_deg": None}
    assert result["counts"] == {"modules": 0} and result["previous"] is None
    assert all(values == [] for values in result["modules"].values())


def test_zero_update_has_no_rank_or_direction(tmp_path):
    a, b = random_pair(48, 32, 4, seed=17)
    folder = write_adapter(tmp_path / "a", {Q: (a, torch.zeros_like(b))})
    result = run(SUITE, folder, folder)
    assert result["modules"]["norm"] == [0.0] and result["modules"]["effective_rank"] == [None]
    assert result["modules"]["rotation_deg"] == [None] and result["metrics"]["effective_rank"] is None


def test_bad_folders(tmp_path):
    with pytest.raises(EvalError, match="no adapter_model.safetensors"):
        run(SUITE, tmp_path / "missing", None)
    nested = write_adapter(tmp_path / "outer" / "mine", {Q: random_pair(48, 32, 4, seed=18)})
    with pytest.raises(EvalError, match=f"point at {nested}"):
        run(SUITE, tmp_path / "outer", None)
    broken = write_adapter(tmp_path / "broken", {Q: random_pair(48, 32, 4, seed=19)})
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EvalError, match="unreadable"):
        run(SUITE, broken, None)
    (broken / "adapter_model.safetensors").unlink()
    write_adapter(broken, {Q: random_pair(48, 32, 4, seed=19)})
    (broken / "adapter_config.json").write_text("{")
    with pytest.raises(EvalError, match="cannot read the adapter config"):
        run(SUITE, broken, None)
    diverged = write_adapter(tmp_path / "nan", {Q: (torch.full((4, 32), math.nan, dtype=torch.float64), torch.ones(48, 4))})
    with pytest.raises(EvalError, match="NaN"):
        run(SUITE, diverged, None)
    other = write_adapter(tmp_path / "other", {Q: random_pair(40, 32, 4, seed=20)})
    with pytest.raises(EvalError, match="not checkpoints of one run"):
        run(SUITE, other, write_adapter(tmp_path / "first", {Q: random_pair(48, 32, 4, seed=21)}))
