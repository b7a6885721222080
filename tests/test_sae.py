"""The sae suite: a small SAE trained here on the tiny Llama's layer-1 activations, read back as a sae-lens folder and
as a bare safetensors file; the encode rules (ReLU, JumpReLU, TopK, sae-lens' normalizations) by hand; a change planted
along one decoder row found with its sign; step 0 changes nothing; bad SAE files as one error line."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_model
from safetensors.torch import save_file
from test_bad_input_eval import assert_one_error, run_cli

from finetrack.config import Config
from finetrack.evaluate.activations import Reference, Text, decoder_layers, read
from finetrack.evaluate.sae import encode, encode_decode, load_sae, run
from finetrack.evaluate.spec import EvalError, SaeSuite

LAYER = 1
D_SAE = 128
WORDS = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike"]


def _texts(tokenizer, n: int, seed: int) -> list[Text]:
    """Chat prompts of random words, rendered as the suite renders its probes (special tokens included)."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(n)]
    return [
        Text(tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)) for t in lines
    ]


def _activations(model, tokenizer, texts: list[Text]) -> torch.Tensor:
    """(tokens, 64): layer LAYER's output at every token of `texts`."""
    return torch.cat([b.hidden[LAYER][b.span] for b in read(model, tokenizer, texts, [LAYER], 16)])


def _train_sae(x: torch.Tensor, steps: int = 400, l1: float = 0.05, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ReLU SAE, f = relu(x @ W_enc + b_enc), x_hat = f @ W_dec + b_dec, fit with Adam on MSE + L1 of x in units
    of its mean token norm, decoder rows kept at unit norm."""
    gen = torch.Generator().manual_seed(seed)
    scale = float(x.norm(dim=-1).mean())
    x = x / scale
    w_dec = torch.randn(D_SAE, x.shape[1], generator=gen)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    params = {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(D_SAE), "b_dec": x.mean(0)}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=3e-3)
    for _ in range(steps):
        batch = x[torch.randint(0, x.shape[0], (512,), generator=gen)]
        f = (batch @ params["W_enc"] + params["b_enc"]).relu()
        recon = f @ params["W_dec"] + params["b_dec"]
        loss = (batch - recon).pow(2).sum(-1).mean() + l1 * f.sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True)
    # back to x's units: f scales with x, the weights do not
    out = {name: p.detach().clone() for name, p in params.items()}
    return {**out, "b_enc": out["b_enc"] * scale, "b_dec": out["b_dec"] * scale}


def _save_folder(folder: Path, tensors: dict[str, torch.Tensor], **cfg) -> Path:
    """A sae-lens 6 folder as SAE.save_model writes it (cfg.json + sae_weights.safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, folder / "sae_weights.safetensors")  # apart, packed
    d_in, d_sae = tensors["W_enc"].shape
    settings = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": f"blocks.{LAYER}.hook_resid_post", "sae_lens_version": "6.12.0"},
        "architecture": "standard",
    }
    (folder / "cfg.json").write_text(json.dumps({**settings, **cfg}))
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer) -> dict:
    """The tiny Llama, an SAE trained on its layer-1 activations, and held-out activations (other prompts)."""
    model = build_tiny_model(tiny_tokenizer).eval()
    tensors = _train_sae(_activations(model, tiny_tokenizer, _texts(tiny_tokenizer, 300, seed=0)))
    held_out = _activations(model, tiny_tokenizer, _texts(tiny_tokenizer, 60, seed=1))
    return {"model": model, "tensors": tensors, "held_out": held_out}


def test_a_sae_lens_folder_and_a_bare_file_encode_alike_and_reconstruct(tiny, tmp_path):
    folder = _save_folder(tmp_path / "sae", tiny["tensors"])
    bare = tmp_path / "sae.safetensors"
    save_file(tiny["tensors"], bare)
    from_folder, from_file = load_sae(folder, None), load_sae(bare, LAYER)
    assert from_folder.layer == from_file.layer == LAYER and from_folder.d_sae == D_SAE and from_folder.d_in == 64
    assert load_sae(folder / "sae_weights.safetensors", None).apply_b_dec_to_input is False  # its cfg.json beside it is read
    x = tiny["held_out"]
    features = encode(from_folder, x)
    assert torch.equal(features, encode(from_file, x))
    t = tiny["tensors"]
    assert torch.allclose(features, (x @ t["W_enc"] + t["b_enc"]).relu())  # the rule, written apart
    _, x_hat = encode_decode(from_folder, x)
    assert torch.allclose(x_hat, features @ t["W_dec"] + t["b_dec"])
    error = float((x - x_hat).norm() / x.norm())
    assert error < 0.3, error
    active = float((features > 0).float().sum(-1).mean())
    assert active < D_SAE / 4, active  # sparse: the L1 penalty worked
    # an untrained SAE of the same shapes does not reconstruct: the bound above is the training's doing
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, D_SAE, generator=gen) / 8
    untrained = load_sae(
        _save_folder(tmp_path / "random", {"W_enc": w, "W_dec": w.T, "b_enc": torch.zeros(D_SAE), "b_dec": x.mean(0)}), None
    )
    assert float((x - encode_decode(untrained, x)[1]).norm() / x.norm()) > 0.5


def test_apply_b_dec_to_input_and_pre_6_keys(tiny, tmp_path):
    t = tiny["tensors"]
    # sae-lens < 6: hook_point, activation_fn_str, normalize_activations as a bool, apply_b_dec_to_input by default
    old = {"d_in": 64, "d_sae": D_SAE, "hook_point": "blocks.1.hook_resid_pre", "activation_fn_str": "relu", "normalize_activations": False}
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(t, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(old))
    sae = load_sae(folder, None)
    assert sae.layer == 0 and sae.apply_b_dec_to_input is True  # block 1's input is block 0's output
    x = tiny["held_out"]
    # subtracting b_dec from the input is the plain rule with b_enc - b_dec @ W_enc
    folded = tmp_path / "folded.safetensors"
    save_file({**t, "b_enc": t["b_enc"] - t["b_dec"] @ t["W_enc"]}, folded)
    assert torch.allclose(encode(sae, x), encode(load_sae(folded, LAYER), x), atol=1e-6)
    save_file(t, tmp_path / "plain.safetensors")  # the same tensors, b_dec not subtracted: other features
    assert not torch.allclose(encode(sae, x), encode(load_sae(tmp_path / "plain.safetensors", LAYER), x), atol=1e-3)


def test_jumprelu_topk_and_normalizations_by_hand(tmp_path):
    tensors = {"W_enc": torch.eye(3), "W_dec": torch.eye(3), "b_enc": torch.zeros(3), "b_dec": torch.zeros(3)}
    x = torch.tensor([[0.5, -1.0, 2.0], [0.05, 0.3, 0.2]])
    jump = load_sae(_save_folder(tmp_path / "j", {**tensors, "threshold": torch.tensor([0.1, 0.1, 0.25])}, architecture="jumprelu"), None)
    assert encode(jump, x).tolist() == [[0.5, 0.0, 2.0], [0.0, pytest.approx(0.3), 0.0]]  # pre > threshold, else 0
    bare_jump = tmp_path / "gemma-scope-like.safetensors"
    save_file({**tensors, "threshold": torch.tensor([0.1, 0.1, 0.25])}, bare_jump)
    assert load_sae(bare_jump, 0).activation == "jumprelu"
    topk = load_sae(_save_folder(tmp_path / "t", tensors, architecture="topk", k=2), None)
    assert encode(topk, x).tolist() == [[0.5, 0.0, 2.0], [0.0, pytest.approx(0.3), pytest.approx(0.2)]]  # the 2 largest
    old_topk = _save_folder(tmp_path / "t6", tensors, architecture="standard", activation_fn="topk", activation_fn_kwargs={"k": 1})
    assert encode(load_sae(old_topk, None), x).tolist() == [[0.0, 0.0, 2.0], [0.0, pytest.approx(0.3), 0.0]]
    # constant_norm_rescale: every token at norm sqrt(d_in) before encoding, the reconstruction scaled back
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=gen)
    random_sae = {"W_enc": w, "W_dec": w.T.clone(), "b_enc": torch.randn(5, generator=gen), "b_dec": torch.randn(3, generator=gen)}
    rescale = load_sae(_save_folder(tmp_path / "r", random_sae, normalize_activations="constant_norm_rescale"), None)
    assert torch.allclose(encode(rescale, 7.0 * x), encode(rescale, x), atol=1e-6)
    assert torch.allclose(encode_decode(rescale, 7.0 * x)[1], 7.0 * encode_decode(rescale, x)[1], atol=1e-5)
    unit = x * (3**0.5 / x.norm(dim=-1, keepdim=True))
    assert torch.allclose(encode(rescale, x), (unit @ w + random_sae["b_enc"]).relu(), atol=1e-6)
    layer_norm = load_sae(_save_folder(tmp_path / "l", random_sae, normalize_activations="layer_norm"), None)
    assert torch.allclose(encode(layer_norm, 4.0 * x + 2.0), encode(layer_norm, x), atol=1e-3)  # eps: 1e-5 of the std
    assert torch.allclose(encode_decode(layer_norm, 4.0 * x + 2.0)[1], 4.0 * encode_decode(layer_norm, x)[1] + 2.0, atol=1e-3)


# ---------------------------------------------------------------------------------------------- the suite
def _suite(tmp_path: Path, path: Path, **settings) -> SaeSuite:
    prompts = tmp_path / "probes.txt"
    prompts.write_text("alpha beta gamma\ndelta echo\nfox golf hotel india\njuliet\nkilo lima mike alpha\n")
    return SaeSuite(name="sae", kind="sae", path=str(path), prompts=str(prompts), **settings)


def _layer_outputs(model, tokenizer, suite: SaeSuite) -> torch.Tensor:
    """Block LAYER's output at every probe token but each probe's first (the suite leaves that attention-sink position
    out), one probe per forward (no padding), by a hook of this test's own."""
    seen = []
    handle = decoder_layers(model)[LAYER].register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            for line in Path(suite.prompts).read_text().split("\n")[:-1]:
                text = tokenizer.apply_chat_template([{"role": "user", "content": line}], tokenize=False, add_generation_prompt=True)
                model(input_ids=tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"])
    finally:
        handle.remove()
    return torch.cat([s[0, 1:] for s in seen])


def test_a_change_planted_along_one_decoder_row_is_the_top_feature(tiny, tiny_tokenizer, tmp_path):
    t = tiny["tensors"]
    suite = _suite(tmp_path, _save_folder(tmp_path / "sae", t), num_features=5, min_change=0.05, micro_batch_size=2)
    # the feature whose decoder row drives itself most clearly above every other feature (its encoder response)
    gain = t["W_dec"] @ t["W_enc"]  # (d_sae, d_sae): feature h's pre-activation per unit of decoder row g
    others = gain - torch.diag(torch.full((D_SAE,), float("inf")))
    feature = int(torch.argmax(gain.diagonal() - others.max(-1).values))
    size = 5.0 * float(tiny["held_out"].norm(dim=-1).mean())
    base = tiny["model"]
    checkpoint = build_tiny_model(tiny_tokenizer).eval()  # the same weights; the hook below is its fine-tuning

    def plant(_module, _args, output):
        if isinstance(output, tuple):
            return (output[0] + size * t["W_dec"][feature], *output[1:])
        return output + size * t["W_dec"][feature]

    handle = decoder_layers(checkpoint)[LAYER].register_forward_hook(plant)
    reference = Reference(folder=Path("x"), previous=None, base=lambda: contextlib.nullcontext(base))
    try:
        result = run(suite, checkpoint, tiny_tokenizer, Config(), reference)
    finally:
        handle.remove()
    top = result["features"]
    assert top["feature"][0] == feature and len(top["feature"]) == 5
    change = top["change"][0]
    assert 0.5 * size * float(gain[feature, feature]) < change <= size * float(gain[feature, feature]) + 1e-4
    assert result["metrics"]["max_change"] == pytest.approx(change)
    assert [abs(c) for c in top["change"]] == sorted((abs(c) for c in top["change"]), reverse=True)
    assert top["change"] == pytest.approx([c - b for c, b in zip(top["checkpoint"], top["base"])])
    assert 1 <= result["metrics"]["num_changed"] < D_SAE and result["metrics"]["mean_abs_change"] < change
    # the base side recomputed apart: unpadded forwards, this test's own hook and the rule written out
    x0 = _layer_outputs(base, tiny_tokenizer, suite)
    expected = (x0 @ t["W_enc"] + t["b_enc"]).relu().mean(0)
    assert top["base"] == pytest.approx(expected[top["feature"]].tolist(), abs=1e-5)
    assert result["counts"] == {"prompts": 5, "tokens": x0.shape[0], "features": D_SAE}
    x1 = x0 + size * t["W_dec"][feature]  # the planting hook adds to the very output the suite reads
    x1_hat = (x1 @ t["W_enc"] + t["b_enc"]).relu() @ t["W_dec"] + t["b_dec"]
    assert result["metrics"]["reconstruction"] == pytest.approx(float((x1 - x1_hat).norm() / x1.norm()), rel=1e-4)


def test_step_0_changes_nothing_and_the_base_is_read_once(tiny, tiny_tokenizer, tmp_path):
    suite = _suite(tmp_path, _save_folder(tmp_path / "sae", tiny["tensors"]), micro_batch_size=3)
    model = tiny["model"]
    at_0 = Reference(folder=None, previous=None, base=lambda: pytest.fail("step 0 is the base model: no second model"))
    result = run(suite, model, tiny_tokenizer, Config(), at_0)
    assert set(result["features"]["change"]) == {0.0} and len(result["features"]["feature"]) == suite.num_features
    assert result["metrics"]["max_change"] == 0.0 and result["metrics"]["mean_abs_change"] == 0.0
    assert result["metrics"]["num_changed"] == 0 and 0 < result["metrics"]["reconstruction"] < 0.5
    # a later step of the same session compares with the base computed at step 0
    later = Reference(folder=Path("x"), previous=None, base=lambda: pytest.fail("the base was read at step 0"), cache=at_0.cache)
    assert run(suite, model, tiny_tokenizer, Config(), later)["metrics"]["max_change"] == 0.0


# ---------------------------------------------------------------------------------------------- bad input
def _one_line_error(call, *fragments: str) -> str:
    with pytest.raises(EvalError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_bad_sae_inputs(tiny, tiny_tokenizer, tmp_path):
    t = tiny["tensors"]
    _one_line_error(lambda: load_sae(tmp_path / "gone", 1), "gone", "SAE not found")
    bare = tmp_path / "bare.safetensors"
    save_file(t, bare)
    _one_line_error(lambda: load_sae(bare, None), "bare.safetensors", "set the suite's layer")
    odd = _save_folder(tmp_path / "odd", t, activation_fn="tanh-relu")
    _one_line_error(lambda: load_sae(odd, None), "cfg.json", "activation_fn 'tanh-relu'", "relu")
    gated = _save_folder(tmp_path / "gated", t, architecture="gated")
    _one_line_error(lambda: load_sae(gated, None), "architecture 'gated'")
    scaled = _save_folder(tmp_path / "scaled", t, normalize_activations="expected_average_only_in")
    _one_line_error(lambda: load_sae(scaled, None), "expected_average_only_in", "fold")
    _one_line_error(
        lambda: load_sae(_save_folder(tmp_path / "mlp", t, metadata={"hook_name": "blocks.1.hook_mlp_out"}), None), "hook_mlp_out"
    )
    _one_line_error(lambda: load_sae(_save_folder(tmp_path / "l1", t), 0), "is layer 1 but the suite's layer is 0")
    _one_line_error(lambda: load_sae(_save_folder(tmp_path / "d", t, d_sae=256), None), "d_sae 256", "holds 128")
    no_threshold = _save_folder(tmp_path / "jump", t, architecture="jumprelu")
    _one_line_error(lambda: load_sae(no_threshold, None), "sae_weights.safetensors", "['threshold']")
    save_file({**t, "b_dec": torch.zeros(32)}, tmp_path / "shapes.safetensors")
    _one_line_error(lambda: load_sae(tmp_path / "shapes.safetensors", 1), "b_dec has shape (32,)", "needs (64,)")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    _one_line_error(lambda: load_sae(tmp_path / "junk.safetensors", 1), "junk.safetensors", "unreadable")
    # the model's side: a 32-dim SAE on the 64-dim tiny Llama, a layer it does not have
    small = {"W_enc": t["W_enc"][:32], "W_dec": t["W_dec"][:, :32], "b_enc": t["b_enc"], "b_dec": t["b_dec"][:32]}
    narrow = _suite(tmp_path, _save_folder(tmp_path / "narrow", small))
    base = Reference(folder=None, previous=None, base=contextlib.nullcontext)
    _one_line_error(lambda: run(narrow, tiny["model"], tiny_tokenizer, Config(), base), "eval suite 'sae'", "narrow", "32", "64")
    deep = _suite(tmp_path, _save_folder(tmp_path / "deep", t, metadata={"hook_name": "blocks.5.hook_resid_post"}))
    _one_line_error(lambda: run(deep, tiny["model"], tiny_tokenizer, Config(), base), "eval suite 'sae'", "[5]")


# ---------------------------------------------------------------------------------------------- finetrack eval
def _eval(capsys, run_dir: Path, suite: dict) -> tuple[int, str, str]:
    return run_cli(capsys, "eval", run_dir, "--steps", "0", f"eval.suites={json.dumps([suite])}")


def test_through_finetrack_eval(capsys, tiny, tmp_path, tiny_model_dir, chat_file):
    from finetrack.config import Environment, effective_dump, load_config, resolve

    run_dir = tmp_path / "run"  # a run directory as `finetrack eval` reads it, nothing trained: step 0 only
    run_dir.mkdir()
    settings = [f"model.name={tiny_model_dir}", f"data.path={chat_file}", f"output.dir={run_dir}"]
    cfg, _ = resolve(load_config(None, settings), Environment("cpu", False, 1, 100))
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(effective_dump(cfg), sort_keys=False))
    folder = _save_folder(tmp_path / "sae", tiny["tensors"])  # trained on this very model (build_tiny_model, seed 0)
    prompts = tmp_path / "probes.txt"
    prompts.write_text("alpha beta\ngamma delta echo\n")
    suite = {"name": "feat", "kind": "sae", "path": str(folder), "prompts": str(prompts), "num_features": 3}
    code, out, err = _eval(capsys, run_dir, suite)
    assert code == 0, out + err
    record = json.loads((run_dir / "eval/step-000000.json").read_text())
    result = record["suites"]["feat"]
    assert result["features"]["change"] == [0.0, 0.0, 0.0] and record["metrics"]["feat.max_change"] == 0.0
    assert result["counts"]["prompts"] == 2 and result["counts"]["features"] == D_SAE and record["metrics"]["feat.reconstruction"] < 0.5
    gone = {**suite, "path": str(tmp_path / "gone")}
    assert_one_error(*_eval(capsys, run_dir, gone), "eval suite 'feat'", "gone")
    save_file(tiny["tensors"], tmp_path / "bare.safetensors")
    bare = {**suite, "path": str(tmp_path / "bare.safetensors")}
    assert_one_error(*_eval(capsys, run_dir, bare), "eval suite 'feat'", "bare.safetensors", "layer")
