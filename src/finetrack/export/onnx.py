"""ONNX export for onnxruntime, transformers.js and optimum: a merged decoder-only model as one graph with a KV cache.

`write_onnx` writes the layout transformers.js loads for a decoder-only model (checked against its sources:
`session_config.js` loads `onnx/model{suffix}.onnx` as its one session, `dtypes.js` maps q8 to `_quantized`,
`modeling_utils.js` `addPastKeyValues` starts generation with zero-length past tensors shaped from the session's input
metadata, `tokenization_utils.js` reads only tokenizer.json and tokenizer_config.json) and that optimum's
`text-generation-with-past` export uses (its input, output and axis names):

    OUT/config.json  generation_config.json  tokenizer.json  tokenizer_config.json (with the chat template)
        special_tokens_map.json  [chat_template.jinja]
    OUT/onnx/model.onnx                 float32; [model.onnx_data: the weights, only past the 2 GB protobuf limit]
    OUT/onnx/model_quantized.onnx       --quantize int8 (transformers.js dtype "q8", its default on wasm; its ops:
                                        MatMulInteger, DynamicQuantizeLinear, the MLP down projections in float32)

Graph: inputs input_ids, attention_mask, position_ids (batch_size, sequence_length) and past_key_values.{i}.key /
.value (batch_size, num_kv_heads, past_sequence_length, head_dim); outputs logits (batch_size, sequence_length, vocab)
and present.{i}.key / .value. One graph serves the first step too (past_sequence_length 0): no `use_cache_branch`,
no separate decoder_with_past. The batch axis must be named `batch_size` and the head axes must be fixed numbers:
transformers.js builds the empty past from those names (any other symbol becomes 0).

`OnnxRunner` runs the written graph with onnxruntime (CPU) for verification, through its KV cache; `tokenizer_facts`
reads back what the written files say about the tokenizer.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..schema import ConfigError

log = logging.getLogger("finetrack")

# Decoder-only families whose transformers implementation keeps a plain DynamicCache (full attention, one key and one
# value tensor per layer); each is exported and checked against transformers in the tests.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
QUANTIZE_TYPES = ("int8",)
OPSET = 18  # the torch.onnx dynamo exporter's native opset (others pass through a version converter)
ONNX_DIR = "onnx"
MODEL_FILE = "model.onnx"
QUANTIZED_FILE = "model_quantized.onnx"  # transformers.js: dtype "q8" -> suffix "_quantized"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
EXTERNAL_DATA_BYTES = 1_800_000_000  # weights above this go to <file>_data (protobuf stops at 2 GiB)
# sample shapes traced by the exporter: none may be 0 or 1, which torch.export would specialize to a constant
_SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST = 2, 3, 4


def write_onnx(merged_dir: Path, out_dir: Path, quantize: str | None = None, *, exporter: str = "auto") -> dict[str, Any]:
    """Export the merged causal LM in `merged_dir` (a transformers folder) to `out_dir` in the transformers.js layout
    (module docstring), float32, plus `onnx/model_quantized.onnx` when `quantize="int8"` (onnxruntime dynamic
    quantization: int8 weights of every MatMul and Gather but the MLP down projections, activations quantized at run
    time; see _quantize_int8).

    `exporter`: "dynamo" (torch.onnx's torch.export-based exporter), "torchscript" (its legacy tracer), or "auto":
    dynamo, and the tracer only if dynamo fails (logged, and recorded in the result). Returns what was written, for the
    export certificate: files and sizes, exporter, opset, quantization, versions, seconds."""

    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if quantize not in (None, *QUANTIZE_TYPES):
        raise ConfigError(f"ONNX --quantize {quantize}: choose one of {', '.join(QUANTIZE_TYPES)} (or none for float32)")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter={exporter!r}: 'auto', 'dynamo' or 'torchscript'")
    config = _supported_config(merged_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (merged_dir / name).is_file():
            raise ConfigError(f"{merged_dir} has no {name}: transformers.js needs tokenizer.json and tokenizer_config.json")
    if (out_dir / ONNX_DIR).exists():
        raise ConfigError(f"{out_dir / ONNX_DIR} already exists: export into a new folder")
    (out_dir / ONNX_DIR).mkdir(parents=True)
    started = time.monotonic()

    from transformers import AutoModelForCausalLM

    # float32 whatever the merged dtype: the CPU / wasm runtimes compute in float32 (quantization is a separate file)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    wrapper = _Decoder(model).eval()
    model_path = out_dir / ONNX_DIR / MODEL_FILE
    record: dict[str, Any] = {}
    if exporter in ("auto", "dynamo"):
        try:
            onnx_model = _export_dynamo(wrapper, config)
            record["exporter"] = f"torch.onnx (dynamo) {torch.__version__}"
        except Exception as error:  # any exporter failure: fall back, said and recorded
            if exporter == "dynamo":
                raise
            log.warning("torch.onnx's dynamo exporter failed (%s: %s); exporting with its TorchScript tracer", type(error).__name__, error)
            record["dynamo_failed"] = f"{type(error).__name__}: {str(error)[:500]}"
            onnx_model = None
    if exporter == "torchscript" or "dynamo_failed" in record:
        onnx_model = _export_torchscript(wrapper, config)
        record["exporter"] = f"torch.onnx (TorchScript) {torch.__version__}"
    export_seconds = time.monotonic() - started
    external = _save(onnx_model, model_path)
    del onnx_model, wrapper, model

    quantized_external = False
    if quantize:
        quantized_external, kept = _quantize_int8(model_path, out_dir / ONNX_DIR / QUANTIZED_FILE)
        record["quantization"] = {
            "type": "int8",
            "tool": f"onnxruntime.quantization.quantize_dynamic {metadata.version('onnxruntime')}",
            "weights": "int8 per tensor (QInt8) for MatMul with constant weights and Gather (embeddings)",
            "activations": "uint8, quantized at run time (dynamic)",
            "kept_float32": f"{kept} MLP down projections (massive activations at their inputs)",
            "transformers_js_dtype": "q8",
        }
    _write_metadata(merged_dir, out_dir, {MODEL_FILE: external, QUANTIZED_FILE: quantized_external})
    files = {str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(out_dir.rglob("*")) if p.is_file()}
    return {
        **record,
        "layout": "transformers.js / optimum decoder with KV cache (onnx/model.onnx, past_key_values.{i}.key|value -> present.{i}.key|value)",
        "model_file": f"{ONNX_DIR}/{MODEL_FILE}",
        "quantized_file": f"{ONNX_DIR}/{QUANTIZED_FILE}" if quantize else None,
        "quantize": quantize,
        "dtype": "float32",
        "opset": OPSET,
        "external_data": external or quantized_external,
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "files": files,
        "versions": {name: metadata.version(name) for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")},
        "export_seconds": round(export_seconds, 1),
        "seconds": round(time.monotonic() - started, 1),
    }


def _supported_config(merged_dir: Path):
    """The folder's config when its architecture exports here, else a ConfigError saying what to use instead."""
    from transformers import AutoConfig, DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not (merged_dir / "config.json").is_file():
        raise ConfigError(f"{merged_dir} has no config.json: ONNX export starts from a merged transformers folder")
    config = AutoConfig.from_pretrained(merged_dir)
    other = "export it as --format merged (or gguf for a Llama)"
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(config.architectures or []) or "no architectures listed"
        raise ConfigError(
            f"ONNX export supports decoder-only {', '.join(SUPPORTED_MODEL_TYPES)} models; {merged_dir / 'config.json'} "
            f"has model_type {config.model_type!r} ({archs}): {other}"
        )
    # The graph's cache is one full-length key and value per layer; sliding-window or hybrid layers keep other state.
    kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers}
    if kinds - {DynamicLayer.__name__}:
        raise ConfigError(
            f"ONNX export supports full-attention layers only; {merged_dir / 'config.json'} gives {', '.join(sorted(kinds))} "
            f"(sliding window or hybrid attention): {other}"
        )
    return config


class _Decoder(nn.Module):
    """The causal LM with flat cache tensors: (input_ids, attention_mask, position_ids, [(key, value)] * layers) ->
    (logits, key_0, value_0, key_1, ...), each layer's cache with the new positions appended. The cache is rebuilt as
    the DynamicCache transformers decodes with, so the graph holds transformers' own cache update and masking."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(key, value) for key, value in past], config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
        flat = []
        for layer in out.cache.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def _names(num_layers: int) -> tuple[list[str], list[str]]:
    cache = [f"{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{c}" for c in cache)], [
        "logits",
        *(f"present.{c}" for c in cache),
    ]


def _sample(config):
    """Example inputs for tracing: (input_ids, attention_mask, position_ids, past)."""

    batch, seq, past_len = _SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = [
        (
            torch.randn(batch, kv_heads, past_len, head_dim, generator=generator),
            torch.randn(batch, kv_heads, past_len, head_dim, generator=generator),
        )
        for _ in range(config.num_hidden_layers)
    ]
    return ids, mask, positions, past


def _export_dynamo(wrapper, config):
    """torch.onnx's torch.export-based exporter -> an onnx_ir.Model, tidied (constants folded, duplicates removed)."""
    from torch.export import Dim

    inputs, outputs = _names(config.num_hidden_layers)
    batch, seq = Dim("batch_size"), Dim("sequence_length")
    past_len, total = Dim("past_sequence_length"), Dim("total_sequence_length")
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": [({0: batch, 2: past_len}, {0: batch, 2: past_len}) for _ in range(config.num_hidden_layers)],
    }
    with _quiet_tools(), warnings.catch_warnings():
        # "The axis name: batch_size will not be used, since it shares the same shape constraints with another axis"
        warnings.filterwarnings("ignore", message=".*axis name")
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)  # torch.export internals
        program = torch.onnx.export(
            wrapper,
            _sample(config),
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            # onnxscript's full optimizer runs a pattern rewriter that costs ~40 s of CPU on a 30-layer model (it grows
            # faster than the layer count) for fusions onnxruntime makes itself at load; _tidy does the rest of it
            optimize=False,
            verbose=False,
        )
    with _quiet_tools():
        _tidy(program.model)
    return program.model


def _tidy(model) -> None:
    """onnxscript's optimize_ir without its rewrite rules: inline, fold constants (weight transposes become
    initializers, which int8 quantization needs), drop unused nodes, deduplicate initializers and subexpressions."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants

    common.InlinePass()(model)
    fold_constants(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _export_torchscript(wrapper, config):
    """torch.onnx's legacy TorchScript tracer (the fallback) -> an onnx_ir.Model."""
    import onnx_ir as ir

    inputs, outputs = _names(config.num_hidden_layers)
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in ("input_ids", "position_ids", "logits")}
    axes["attention_mask"] = {0: "batch_size", 1: "total_sequence_length"}
    axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in inputs[3:]})
    axes.update({name: {0: "batch_size", 2: "total_sequence_length"} for name in outputs[1:]})
    with tempfile.TemporaryDirectory(prefix="finetrack-onnx-") as tmp, _quiet_tools(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice and tracer warnings; the result is verified
        path = Path(tmp) / MODEL_FILE
        torch.onnx.export(
            wrapper,
            _sample(config),
            str(path),
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
        )
        model = ir.load(str(path))
        for value in model.graph.initializers.values():  # read the weights before the folder goes
            value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    return model


def _initializer_bytes(model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None)


def _save(model, path: Path) -> bool:
    """Write the graph; its weights beside it as `<file>_data` (transformers.js's name) past the protobuf limit.
    Returns whether they went there."""
    import onnx_ir as ir

    external = _initializer_bytes(model) > EXTERNAL_DATA_BYTES
    ir.save(model, str(path), external_data=f"{path.name}_data" if external else None)
    return external


def _quantize_int8(model_path: Path, out_path: Path) -> tuple[bool, int]:
    """int8 dynamic quantization as transformers.js's scripts/quantize.py makes its q8 files (QInt8 weights per tensor,
    MatMul with constant weights and Gather, uint8 activations quantized at run time), except the MLP down
    projections, kept in float32: their inputs carry the "massive activations" of LLMs (Sun et al. 2024,
    arXiv:2402.17762; up to ~3000 against a typical 14 in SmolLM2's layer 11), which one per-tensor uint8 scale
    flattens to zero. Measured on SmolLM2-135M: mean KL 1.5 nats with them, 0.18 without.
    Returns (whether the weights are in an external data file, how many MatMuls were kept in float)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(model_path), load_external_data=False).graph
    kept = [node.name for node in graph.node if node.op_type == "MatMul" and _is_down_projection(node)]
    big = model_path.with_name(f"{model_path.name}_data").exists()  # then the quantized weights go beside it too
    with _quiet_tools():
        quantize_dynamic(
            model_path,
            out_path,
            weight_type=QuantType.QInt8,
            per_channel=False,
            reduce_range=False,
            nodes_to_exclude=kept,
            use_external_data_format=big,
            extra_options={"MatMulConstBOnly": True},
        )
    if big:  # onnxruntime names the data file <file>.data; transformers.js looks for <file>_data
        proto = onnx.load(str(out_path), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = f"{out_path.name}_data"
        out_path.with_name(f"{out_path.name}.data").rename(out_path.with_name(f"{out_path.name}_data"))
        onnx.save(proto, str(out_path))
    return big, len(kept)


def _is_down_projection(node) -> bool:
    """Is this MatMul an MLP's down_proj? The dynamo exporter records the module path in the node's metadata, the
    TorchScript one in its name."""
    scopes = " ".join(p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes")
    return any(key in f"{node.name} {scopes}" for key in ("mlp.down_proj", "mlp/down_proj"))


@contextmanager
def _quiet_tools() -> Iterator[None]:
    """The exporter and quantizer log what they do per node ("Replaced initializer ...", "torchvision is not
    installed", onnxruntime's "consider pre-processing" on the root logger): nothing a user can act on here. Errors
    still show."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    root = logging.getLogger()
    root.addFilter(keep)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeFilter(keep)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _write_metadata(merged_dir: Path, out_dir: Path, external: dict[str, bool]) -> None:
    """config.json, generation_config.json and the tokenizer files beside onnx/, as transformers.js reads them."""
    config = json.loads((merged_dir / "config.json").read_text())
    if any(external.values()):
        # transformers.js fetches external data only when config.json says so, per file
        config.setdefault("transformers.js_config", {})["use_external_data_format"] = {name: 1 for name, on in external.items() if on}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (merged_dir / "generation_config.json").is_file():
        shutil.copyfile(merged_dir / "generation_config.json", out_dir / "generation_config.json")
    for name in TOKENIZER_FILES:
        if (merged_dir / name).is_file():
            shutil.copyfile(merged_dir / name, out_dir / name)
    tokenizer_config = json.loads((merged_dir / "tokenizer_config.json").read_text())
    # transformers 5 keeps the template in chat_template.jinja; transformers.js reads it from tokenizer_config.json only
    if "chat_template" not in tokenizer_config and (merged_dir / "chat_template.jinja").is_file():
        tokenizer_config["chat_template"] = (merged_dir / "chat_template.jinja").read_text()
    # transformers 5's generic class name is unknown to transformers 4 (optimum); PreTrainedTokenizerFast is the same
    # tokenizer.json-backed class to transformers 4, 5 and transformers.js
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    if not (out_dir / "special_tokens_map.json").is_file():  # transformers 5 no longer writes it; older readers look for it
        special = {key: tokenizer_config[key] for key in SPECIAL_TOKEN_KEYS if tokenizer_config.get(key)}
        extra = tokenizer_config.get("additional_special_tokens") or tokenizer_config.get("extra_special_tokens")
        if isinstance(extra, list) and extra:
            special["additional_special_tokens"] = extra
        (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------- reading back
class OnnxRunner:
    """The written graph in onnxruntime (CPU), as verification runs it (the Runner protocol of verify.py)."""

    def __init__(self, out_dir: Path, quantize: str | None = None) -> None:
        import onnxruntime as ort

        file = QUANTIZED_FILE if quantize else MODEL_FILE
        path = Path(out_dir) / ONNX_DIR / file
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: write it with write_onnx(..., quantize={quantize!r})")
        self.name = f"onnxruntime {ort.__version__} ({ONNX_DIR}/{file})"
        self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self._past_names = [i.name for i in self._session.get_inputs() if i.name.startswith("past_key_values.")]
        shape = self._session.get_inputs()[3].shape  # (batch_size, kv_heads, past_sequence_length, head_dim)
        self._kv_heads, self._head_dim = int(shape[1]), int(shape[3])

    def _run(self, ids: list[int], start: int, past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward of `ids` at positions start.. after `past` (None: empty): (logits (T, V), presents)."""
        if past is None:
            past = [np.zeros((1, self._kv_heads, 0, self._head_dim), np.float32)] * len(self._past_names)
        feed = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, start + len(ids)), np.int64),
            "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None],
            **dict(zip(self._past_names, past)),
        }
        logits, *presents = self._session.run(None, feed)
        return logits[0], presents

    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 (len(ids), vocab): one forward of the whole sequence from an empty cache."""
        return self._run(list(ids), 0, None)[0].astype(np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
        """Greedy new tokens through the graph's KV cache: the prompt in one step, then one token per step with the
        previous step's presents as past. The EOS token is included when reached (as transformers' generate)."""
        out: list[int] = []
        logits, past = self._run(list(ids), 0, None)
        position = len(ids)
        while len(out) < max_new_tokens:
            token = int(np.argmax(logits[-1]))
            out.append(token)
            if token == eos_id or len(out) == max_new_tokens:
                break
            logits, past = self._run([token], position, past)
            position += 1
        return out

    def close(self) -> None:
        """Let go of the session (and its memory)."""
        self._session = None


def tokenizer_facts(out_dir: Path) -> dict[str, Any]:
    """What the written files say about the tokenizer, as transformers.js reads them: the chat template from
    tokenizer_config.json, the EOS / BOS tokens named there resolved to ids through tokenizer.json, and the number of
    token ids tokenizer.json defines (vocabulary and added tokens)."""
    out_dir = Path(out_dir)
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer = json.loads((out_dir / "tokenizer.json").read_text())
    vocab = tokenizer.get("model", {}).get("vocab") or {}
    ids = dict(vocab) if isinstance(vocab, dict) else {entry[0]: i for i, entry in enumerate(vocab)}  # BPE | Unigram
    ids.update({token["content"]: token["id"] for token in tokenizer.get("added_tokens", [])})

    def token_id(key: str) -> int | None:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        return ids.get(token) if token else None

    template = config.get("chat_template")
    if isinstance(template, list):  # named templates, as transformers holds them
        template = {entry["name"]: entry["template"] for entry in template}
    return {
        "chat_template": template,
        "eos_token_id": token_id("eos_token"),
        "bos_token_id": token_id("bos_token"),
        "vocab_size": len(set(ids.values())),
    }
