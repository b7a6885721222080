"""GGUF export for llama.cpp: a merged Llama folder written as one .gguf file, and a runner that loads it back.

`write_gguf` converts the merged transformers folder itself (gguf-py writes the file): f16 and q8_0 directly,
4-bit types by llama.cpp's own quantizer (through llama-cpp-python's C binding) from the f16 file.
`GgufRunner` runs the file with llama.cpp for verification, and `tokenizer_facts` reads back what the file says
about its tokenizer. The facts this converter needs about llama.cpp's `llama` architecture (metadata keys, the Q/K
row order its rope expects, the `tokenizer.ggml.*` vocabulary keys and pre-tokenizer names) were taken from
llama.cpp's convert_hf_to_gguf.py and llama-vocab.cpp; the code here is our own.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import struct
import sys
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..schema import ConfigError

log = logging.getLogger("finetrack")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# written by gguf-py from the merged weights | produced by llama.cpp's quantizer from the f16 file
DIRECT_TYPES = ("f16", "q8_0")
LLAMA_CPP_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
QUANT_TYPES = DIRECT_TYPES + tuple(LLAMA_CPP_TYPES)

# llama.cpp names the pre-tokenizer (the regex split before BPE) in `tokenizer.ggml.pre`; these are the names of the
# splits we recognise in a tokenizer.json. Llama 3's split regex, as its tokenizer.json spells it:
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    "gpt-2": "ByteLevel with its GPT-2 regex (GPT-2, the embedded SmolLM2 folder)",
    "smollm": "Digits(individual_digits) then ByteLevel (SmolLM, StarCoder)",
    "llama-bpe": "Split(Llama 3 regex) then ByteLevel without regex (Llama 3)",
}


# ----------------------------------------------------------------------------------------------------------- writing
def write_gguf(merged_dir: Path, out_path: Path, quant: str = "f16") -> dict:
    """Convert the merged Llama folder `merged_dir` to the GGUF file `out_path` of type `quant` (f16, q8_0, q4_0,
    q4_k_m), written under a temporary name and renamed when complete. Returns what was written, for the export
    certificate: file, type, size, tensor types (llama.cpp's quantizer falls back to other types for rows it cannot
    split into blocks), pre-tokenizer, tool versions and timings."""
    merged_dir, out_path = Path(merged_dir), Path(out_path)
    if quant not in QUANT_TYPES:
        raise ConfigError(f"GGUF type {quant!r} is not supported: choose one of {', '.join(QUANT_TYPES)}")
    config = _load_config(merged_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    seconds: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        if quant in DIRECT_TYPES:
            pre = _convert(merged_dir, config, tmp, quant)
            seconds["convert"] = round(time.perf_counter() - t0, 2)
        else:
            f16 = out_path.with_name(f".{out_path.name}.f16.tmp")
            try:
                pre = _convert(merged_dir, config, f16, "f16")
                seconds["convert"] = round(time.perf_counter() - t0, 2)
                t1 = time.perf_counter()
                _quantize(f16, tmp, quant)
                seconds["quantize"] = round(time.perf_counter() - t1, 2)
            finally:
                f16.unlink(missing_ok=True)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    llama_cpp_version = importlib.metadata.version("llama_cpp_python")
    return {
        "file": str(out_path),
        "format": "gguf",
        "type": quant,
        "size_bytes": out_path.stat().st_size,
        "tensor_types": dict(sorted(Counter(read_header(out_path)[1]).items())),
        "pre_tokenizer": pre,
        "writer": f"gguf {importlib.metadata.version('gguf')}",
        "quantizer": f"llama.cpp via llama-cpp-python {llama_cpp_version}" if quant in LLAMA_CPP_TYPES else None,
        "llama_cpp_python": llama_cpp_version,
        "seconds": seconds,
    }


def _load_config(merged_dir: Path):
    """The folder's transformers config (it normalises old `rope_scaling` into `rope_parameters`); the architecture
    must be one this converter writes."""
    from transformers import AutoConfig

    if not (merged_dir / "config.json").is_file():
        raise ConfigError(f"{merged_dir} has no config.json: GGUF export needs a merged transformers model folder")
    architectures = json.loads((merged_dir / "config.json").read_text()).get("architectures") or []
    if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise ConfigError(
            f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)} (Llama family: Llama, SmolLM, TinyLlama, ...); "
            f"{merged_dir / 'config.json'} has architectures {architectures or 'unset'}"
        )
    config = AutoConfig.from_pretrained(merged_dir)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConfigError("GGUF export supports Llama models without attention / MLP biases")
    return config


def _convert(merged_dir: Path, config, path: Path, quant: str) -> str:
    """Write `path` as an f16 or q8_0 GGUF (1-D tensors stay f32, as llama.cpp keeps them); returns the pre-tokenizer."""
    import gguf

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    file_type = gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    _write_hparams(writer, config, merged_dir.name, file_type)
    pre = _write_vocab(writer, merged_dir, config)
    plan = _tensor_plan(merged_dir, config, quant)
    for name, _, shape, qtype in plan:
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        else:
            dtype = np.dtype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32)
            writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # one tensor in memory at a time: a 7B model converts in the memory of its largest tensor, not of the model
        for _, load, _, qtype in plan:
            data = load()
            if qtype == gguf.GGMLQuantizationType.Q8_0:
                data = gguf.quants.quantize(data, qtype)
            elif qtype == gguf.GGMLQuantizationType.F16:
                data = data.astype(np.float16)
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return pre


def _write_hparams(writer, config, name: str, file_type: int) -> None:
    """The `llama.*` and `general.*` keys llama.cpp reads for this architecture."""
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = config.rope_parameters or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", "llama3"):  # llama3: per-frequency factors, written as a tensor
        raise ConfigError(f"GGUF export supports rope_type default, linear and llama3; this model has {rope_type!r}")


# ---------------------------------------------------------------------------------------------------------- tokenizer
def _write_vocab(writer, merged_dir: Path, config) -> str:
    """tokenizer.ggml.* keys for a byte-level BPE tokenizer (the `gpt2` model in llama.cpp's terms): tokens in id order
    with their types, merges, special token ids, add-BOS/EOS behaviour and the chat template. Returns the
    pre-tokenizer name."""
    import gguf
    from transformers import AutoTokenizer

    path = merged_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{merged_dir} has no tokenizer.json: GGUF export needs the fast (tokenizers) tokenizer file")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _uses_byte_level(spec.get("decoder")):
        raise ConfigError(
            f"{path}: GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3); this one is "
            f"{model.get('type')} with decoder {(spec.get('decoder') or {}).get('type')}"
        )
    if not model.get("merges"):
        # gguf-py cannot write an empty array, and llama.cpp refuses a BPE vocabulary without tokenizer.ggml.merges
        raise ConfigError(f"{path}: the BPE tokenizer has no merges; llama.cpp needs at least one (tokenizer.ggml.merges)")
    if spec.get("normalizer"):
        raise ConfigError(f"{path}: tokenizers with a normalizer ({spec['normalizer'].get('type')}) are not supported")
    pre = _pre_tokenizer_name(spec, path)

    text_of = {i: t for t, i in model["vocab"].items()}
    kind_of = {i: gguf.TokenType.NORMAL for i in text_of}
    for added in spec.get("added_tokens", []):
        text_of[added["id"]] = added["content"]
        # special tokens (and the <|...|> ones some tokenizers forget to mark) are control tokens: matched whole in
        # text only when asked, never split into bytes
        looks_special = added["content"].startswith("<|") and added["content"].endswith("|>")
        kind_of[added["id"]] = gguf.TokenType.CONTROL if added.get("special") or looks_special else gguf.TokenType.USER_DEFINED
    if max(text_of) >= config.vocab_size:
        raise ConfigError(f"{path}: token id {max(text_of)} is outside the model's vocab_size {config.vocab_size}")
    tokens = [text_of.get(i, f"[PAD{i}]") for i in range(config.vocab_size)]  # rows no token uses (padded vocab)
    types = [kind_of.get(i, gguf.TokenType.UNUSED) for i in range(config.vocab_size)]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    byte_level = _byte_level_step(spec.get("pre_tokenizer"))
    writer.add_add_space_prefix(bool(byte_level.get("add_prefix_space", False)))
    special = gguf.SpecialVocab(merged_dir, load_merges=True, n_vocab=config.vocab_size)
    # Whether BOS / EOS are added is what the source tokenizer does when it encodes, measured, rather than
    # SpecialVocab's reading of the post-processor template: that is what the trained model saw.
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    with_special, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and with_special[:1] == [tokenizer.bos_token_id] != plain[:1],
        "eos": tokenizer.eos_token_id is not None and with_special[-1:] == [tokenizer.eos_token_id] != plain[-1:],
    }
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return pre


def _uses_byte_level(decoder: dict | None) -> bool:
    steps = (decoder or {}).get("decoders", [decoder or {}])
    return any(step.get("type") == "ByteLevel" for step in steps)


def _pre_steps(pre: dict | None) -> list[dict]:
    pre = pre or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def _byte_level_step(pre: dict | None) -> dict:
    return next((step for step in _pre_steps(pre) if step.get("type") == "ByteLevel"), {})


def _pre_tokenizer_name(spec: dict, path: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, recognised from its structure in tokenizer.json (llama.cpp's
    own converter recognises known tokenizers by hashing their output on a probe text, which knows no fine-tuned or
    rebuilt tokenizer: the embedded SmolLM2 folder's tokenizer, rebuilt by transformers from a GGUF, lost the digit
    split the original has)."""
    steps = _pre_steps(spec.get("pre_tokenizer"))
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    split = steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT and steps[0].get("behavior") == "Isolated"
    if kinds == ["Split", "ByteLevel"] and split and not steps[1].get("use_regex", True):
        return "llama-bpe"
    known = "; ".join(f"{name}: {what}" for name, what in PRE_TOKENIZERS.items())
    raise ConfigError(f"{path}: pre-tokenizer {kinds} is not one llama.cpp is known to reproduce here ({known})")


# ------------------------------------------------------------------------------------------------------------ tensors
def _tensor_plan(merged_dir: Path, config, quant: str) -> list[tuple]:
    """(gguf name, loader of its float32 numpy data, shape, GGML type) for every tensor, in writing order."""
    import gguf
    import torch
    from safetensors import safe_open

    files = _weight_files(merged_dir)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    plan = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
        for hf_name in names:
            if hf_name.endswith("rotary_emb.inv_freq"):  # recomputed by llama.cpp from the rope keys
                continue
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:  # llama.cpp reuses token_embd
                continue
            name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ConfigError(f"{file}: tensor {hf_name!r} has no place in llama.cpp's llama architecture")
            heads = n_head if ".q_proj." in hf_name else n_kv if ".k_proj." in hf_name else None

            def load(file=file, hf_name=hf_name, heads=heads) -> np.ndarray:
                with safe_open(file, framework="pt") as f:
                    data = f.get_tensor(hf_name).to(torch.float32).numpy()
                return _rope_pairs_adjacent(data, heads) if heads else data

            shape = shapes[hf_name]
            plan.append((name, load, shape, _ggml_type(shape, quant)))
    names = {p[0] for p in plan}
    if "token_embd.weight" not in names or ("output.weight" not in names and not config.tie_word_embeddings):
        raise ConfigError(f"{merged_dir}: the weights lack the token embedding or the untied lm_head.weight")
    rope = config.rope_parameters or {}
    if rope.get("rope_type") == "llama3":
        factors = _llama3_rope_factors(config)
        plan.append(("rope_freqs.weight", lambda: factors, factors.shape, gguf.GGMLQuantizationType.F32))
    return plan


def _weight_files(merged_dir: Path) -> list[Path]:
    index = merged_dir / "model.safetensors.index.json"
    if index.is_file():
        return [merged_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (merged_dir / "model.safetensors").is_file():
        return [merged_dir / "model.safetensors"]
    raise ConfigError(f"{merged_dir} has no model.safetensors (or model.safetensors.index.json)")


def _ggml_type(shape: tuple, quant: str):
    """Norms (1-D) stay f32; matrices f16, or q8_0 when each row splits into whole 32-value blocks."""
    import gguf

    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _rope_pairs_adjacent(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a Q or K projection for llama.cpp's rope.

    transformers rotates dimension i of a head with dimension i + head_dim/2 (`rotate_half`); llama.cpp's `llama`
    architecture rotates adjacent pairs (2i, 2i + 1). So within each head, row i of the first half moves to 2i and
    row i of the second half to 2i + 1. K is reordered with the key-value head count.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    by_head = weight.reshape(n_heads, 2, half, *weight.shape[1:])  # (head, which half, i, ...)
    return np.ascontiguousarray(by_head.swapaxes(1, 2).reshape(weight.shape))  # (head, i, which half, ...)


def _llama3_rope_factors(config) -> np.ndarray:
    """Llama 3 rope scaling as llama.cpp takes it: one divisor per frequency (`rope_freqs.weight`), the ratio of the
    plain rope frequencies to the scaled ones, computed by transformers' own llama3 rope (what the model trained with)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = float(config.rope_parameters["rope_theta"])
    plain = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaled, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    if attention_factor != 1.0:
        raise ConfigError(f"llama3 rope with attention factor {attention_factor} has no GGUF form here")
    return (plain / scaled.double().numpy()).astype(np.float32)


# --------------------------------------------------------------------------------------------------------- quantizing
def _quantize(f16: Path, out: Path, quant: str) -> None:
    """llama.cpp's quantizer (llama_model_quantize with its default parameters) from the f16 file: the maintained
    path, with its per-tensor type choices (e.g. q4_k_m keeps some tensors at q6_k, and falls back to q5_0 / q8_0 for
    rows that do not split into 256-value blocks)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[quant])
    with tempfile.TemporaryFile() as notes:
        with _c_stderr_to(notes):
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
        notes.seek(0)
        lines = notes.read().decode("utf-8", "replace").splitlines()
    if rc != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed ({quant}, code {rc}) on {f16}: " + " | ".join(lines[-5:]))
    for line in lines:
        if "fallback" in line and "tensor(s)" in line:  # its one-line summary of the per-tensor warnings
            log.info("llama.cpp quantizer (%s): %s", quant, line.rsplit(":", 1)[-1].strip())


@contextmanager
def _c_stderr_to(file) -> Iterator[None]:
    """Send stderr to `file` for the duration, at both levels llama.cpp's quantizer prints a line per tensor to: the C
    stderr (file descriptor 2), and sys.stderr (llama-cpp-python's log callback, which never filters some of them)."""
    sys.stderr.flush()
    saved_fd, saved_stream = os.dup(2), sys.stderr
    os.dup2(file.fileno(), 2)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 (restored below)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = saved_stream
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


# ------------------------------------------------------------------------------------------------------- reading back
def tokenizer_facts(path: Path) -> dict:
    """What the GGUF file itself says about its tokenizer: chat template, EOS / BOS ids and vocabulary size."""
    kv, _ = read_header(path)
    return {
        "chat_template": kv.get("tokenizer.chat_template"),
        "eos_token_id": kv.get("tokenizer.ggml.eos_token_id"),
        "bos_token_id": kv.get("tokenizer.ggml.bos_token_id"),
        "vocab_size": kv.get("tokenizer.ggml.tokens", 0),
    }


def read_header(path: Path) -> tuple[dict, list[str]]:
    """The metadata of a GGUF file (key -> value; an array as its length) and its tensors' type names, in order.

    gguf.GGUFReader parses every element of every array into numpy views (seconds for a 49k-token vocabulary and its
    merges); this reads the header only, skipping array elements, in a fraction of that.
    """
    import gguf

    scalar = {
        gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
        gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
        gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
        gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
    }  # fmt: skip
    with open(path, "rb") as f:

        def read(fmt: str):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8")

        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF" or not 2 <= version <= 3:
            raise ValueError(f"{path} is not a little-endian GGUF v2/v3 file")
        kv: dict = {}
        for _ in range(n_kv):
            key, vtype = string(), gguf.GGUFValueType(read("<I"))
            if vtype == gguf.GGUFValueType.STRING:
                kv[key] = string()
            elif vtype in scalar:
                kv[key] = read(scalar[vtype])
            else:  # an array: its length; the elements are skipped
                etype, count = gguf.GGUFValueType(read("<I")), read("<Q")
                if etype == gguf.GGUFValueType.STRING:
                    for _ in range(count):
                        f.seek(read("<Q"), os.SEEK_CUR)
                elif etype in scalar:
                    f.seek(count * struct.calcsize(scalar[etype]), os.SEEK_CUR)
                else:
                    raise ValueError(f"{path}: nested array in {key}: not read here")
                kv[key] = count
        types = []
        for _ in range(n_tensors):
            string()
            f.seek(8 * read("<I"), os.SEEK_CUR)  # dimensions
            types.append(gguf.GGMLQuantizationType(read("<I")).name)
            read("<Q")  # offset
    return kv, types


class GgufRunner:
    """The verification Runner for a GGUF file: llama.cpp (llama-cpp-python) on the CPU. `close()` frees llama.cpp's
    model and context at once (otherwise when the runner is collected, or at exit)."""

    def __init__(self, path: Path, n_ctx: int = 1024, n_threads: int = 2):
        import llama_cpp

        self.path = Path(path)
        self.name = f"llama-cpp-python {llama_cpp.__version__} ({self.path.name})"
        self._llm = llama_cpp.Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            logits_all=True,  # logits at every position of one forward, for the KL over a whole prompt
            verbose=False,
        )
        # freed when the runner goes, or at exit before module teardown (llama-cpp-python's own finaliser fails then)
        self.close = weakref.finalize(self, self._llm.close)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits at every position of `ids` (one sequence, from an empty cache): float32 (len(ids), V)."""
        self._llm.reset()
        self._llm.eval(ids)
        return np.array(self._llm.scores[: len(ids)], dtype=np.float32)  # copy: `scores` is reused by the next call

    def greedy(self, ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
        """Greedy decoding through llama.cpp's own loop (prompt, then one token at a time on its KV cache); new tokens
        only, the last one `eos_id` when it stopped there."""
        self._llm.reset()  # no prompt-cache reuse from an earlier call: every call decodes its prompt
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        for token in self._llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            out.append(int(token))
            if token == eos_id or len(out) >= max_new_tokens:
                break
        return out
