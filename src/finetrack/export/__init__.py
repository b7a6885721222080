"""`finetrack export SOURCE --format merged|onnx|gguf`: a model ready to serve, proven equal to what was trained.

The spine: find the source (source.py) -> load it as it was trained -> merge the adapter (merged.py; every format
starts from the merged folder) -> write the format (onnx.py, gguf.py) -> verify the artifact against the trained
model in its own runtime (verify.py) -> EXPORT.json -> publish it whole (publish.py). A failed verification is an
error (exit 1) naming the first failing check, and nothing is published (a local export that failed is kept beside
the output as `<name>.rejected/` with REJECTED.json, for inspection).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..flags import one_step
from ..schema import ConfigError

log = logging.getLogger("finetrack")
FORMATS = ("merged", "onnx", "gguf")
QUANTIZE = {"merged": (), "onnx": ("int8",), "gguf": ("f16", "q8_0", "q4_k_m")}  # the first gguf type is its default
EXPORT_FORMAT = "finetrack-export/1"
EXIT_NOT_VERIFIED = 1


class VerificationFailed(UserError):
    """The export does not behave as the trained model (exit 1, not 2: the input was fine, the result is not)."""


@dataclass(frozen=True)
class ExportResult:
    output: str
    certificate: dict[str, Any]


def tolerance(fmt: str, quantize: str | None, dtype: str, qlora: bool):
    """The tolerance an export of this kind is held to (verify.Tolerance): float rounding and identical answers for
    unquantized float32 formats, KL bounds for half precision and quantized types."""
    from .verify import Tolerance

    if fmt == "gguf" or quantize:
        # measured on SmolLM2-135M (export tests): gguf f16 ~1e-5, q8_0 6e-3..9e-3, q4_k_m 0.06..0.10 (a model this
        # small is sensitive to requantizing; its hidden size 576 also makes llama.cpp keep most of q4_k_m at 5-8 bits)
        # onnx int8 (transformers.js's q8: dynamic int8 per tensor, the MLP down projections kept float32 for their
        # activation outliers): 0.16-0.21 on SmolLM2-135M
        kl = {"f16": 2e-3, "q8_0": 3e-2, "q4_k_m": 0.3, "int8": 0.3}[quantize or "f16"]
        return Tolerance(None, kl, False)
    if dtype != "float32":
        return Tolerance(None, 5e-3, False)
    # a QLoRA base computes from 4-bit weights dequantized on the fly; the merged base holds the same values in float
    return Tolerance(5e-2 if qlora else 2e-3, 1e-4 if qlora else 1e-5, True)


def export(
    spec: str,
    fmt: str,
    step: str | None = None,
    quantize: str | None = None,
    output: str | None = None,
    dtype: str = "float32",
    verify: bool = True,
) -> ExportResult:
    """Export SOURCE (`spec`, and `step` for a run directory) as `fmt`; verified unless verify=False. Raises
    VerificationFailed (nothing published) when the artifact does not match the trained model."""
    import torch

    from . import merged as merged_format
    from . import publish as out
    from .source import find, load_trained

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if quantize and quantize not in QUANTIZE[fmt]:
        choices = ", ".join(QUANTIZE[fmt]) or "none (merged weights are not quantized; use --dtype)"
        raise ConfigError(f"--quantize {quantize}: not a type of --format {fmt}; types: {choices}")
    quantize = quantize or (QUANTIZE["gguf"][0] if fmt == "gguf" else None)
    _check_installed(fmt)
    if output:
        out.check_url(output)  # a wrong URL fails before the checkpoint is found (perhaps downloaded) and loaded
    with tempfile.TemporaryDirectory(prefix="finetrack-export-") as tmp:
        scratch = Path(tmp)
        source = find(spec, step, scratch)
        target = output or str(default_output(source, fmt, quantize))
        out.check_free(target)
        started = time.monotonic()
        log.info("export: %s (step %s) as %s%s", source.folder, source.found.step, fmt, f" ({quantize})" if quantize else "")
        trained, tokenizer = load_trained(source, torch.device("cpu"))
        staged = out.staging_dir(target, scratch)
        try:
            merged_dir = staged if fmt == "merged" else scratch / "merged"
            merged_dir.mkdir(exist_ok=True)
            model, merge_info = merged_format.merge(trained, source, merged_format.DTYPES[dtype])
            files = merged_format.write(model, tokenizer, source, merged_dir)
            log.info("merged: %s", merge_info["merge"])
            runner, facts, artifact = _write_format(fmt, quantize, merged_dir, staged, model)
            if fmt == "merged":
                artifact = {"files": files}
            try:
                if verify:
                    record = _verify(
                        trained, tokenizer, runner, facts, tolerance(fmt, quantize, dtype, source.model.method == "qlora"), source
                    )
                else:
                    record = {"skipped": "--no-verify: this export was not compared with the trained model"}
            finally:
                getattr(runner, "close", lambda: None)()  # a runtime holding the artifact open (llama.cpp) lets go of it
            certificate = {
                "format": EXPORT_FORMAT,
                "export_format": fmt,
                "quantize": quantize,
                "dtype": dtype,
                "source": source.record(),
                **merge_info,
                "artifact": artifact,
                "tool_versions": _versions(fmt),
                "verified": bool(record.get("passed")),
                "verification": record,
                "seconds": round(time.monotonic() - started, 1),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            if verify and not record["passed"]:
                raise VerificationFailed(_rejected(staged, target, certificate))
            (staged / "EXPORT.json").write_text(json.dumps(certificate, indent=2) + "\n")
            where = out.publish(staged, target)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    return ExportResult(where, certificate)


def _write_format(fmt: str, quantize: str | None, merged_dir: Path, staged: Path, model):
    """(the runner of the written artifact, its tokenizer facts, what was written) of one format."""
    from .verify import TorchRunner, tokenizer_facts

    if fmt != "merged":
        log.info("writing %s (a minute or two for a small model on a CPU)", fmt)
    if fmt == "onnx":
        from . import onnx

        artifact = onnx.write_onnx(merged_dir, staged, quantize)
        return onnx.OnnxRunner(staged, quantize), onnx.tokenizer_facts(staged), artifact
    if fmt == "gguf":
        from . import gguf

        path = staged / f"model-{quantize}.gguf"
        artifact = {**gguf.write_gguf(merged_dir, path, quantize or "f16"), "file": path.name}  # relative: the folder moves
        return gguf.GgufRunner(path), gguf.tokenizer_facts(path), artifact
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # read back as a user would: plain transformers, from the folder just written
    loaded = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=model.dtype)
    return (
        TorchRunner(loaded, f"transformers {metadata.version('transformers')} (the merged folder, loaded back)"),
        tokenizer_facts(AutoTokenizer.from_pretrained(merged_dir)),
        {},
    )


def _check_installed(fmt: str) -> None:
    """A format's packages are there, or a ConfigError naming the install command (before any work)."""
    import importlib.util

    needed = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "gguf": ("gguf", "llama_cpp")}.get(fmt, ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--format {fmt} needs {', '.join(missing)}: pip install 'finetrack[export]'")


def _verify(trained, tokenizer, runner, facts: dict, tol, source) -> dict:
    from ..heads import language_model
    from .verify import TorchRunner, probe_ids, tokenizer_facts, verify

    reference = TorchRunner(language_model(trained), f"trained model (torch {metadata.version('torch')}, adapter applied)")
    probes = probe_ids(tokenizer, list(source.prompts) or None)
    log.info("verifying against the trained model on %d probe prompts", len(probes))
    record = verify(reference, runner, probes, tol, tokenizer_facts(tokenizer), facts)
    return {**record, "probe_prompts": "the run's train.sample_prompts" if source.prompts else "built-in (verify.BUILTIN_PROMPTS)"}


def _rejected(staged: Path, target: str, certificate: dict) -> str:
    """Keep a failed local export beside the output for inspection (never under the output's name); the message."""
    from .publish import is_url
    from .verify import failure_message

    message = failure_message(certificate["verification"])
    if is_url(target):
        return f"{message}; nothing uploaded"
    kept = Path(target).resolve().with_name(Path(target).name + ".rejected")
    shutil.rmtree(kept, ignore_errors=True)
    (staged / "REJECTED.json").write_text(json.dumps(certificate, indent=2) + "\n")
    staged.rename(kept)
    return f"{message}; not exported (the files are kept in {kept} with REJECTED.json)"


def default_output(source, fmt: str, quantize: str | None) -> Path:
    """RUN_DIR/exports/step-NNNNNN-<format>[-<type>] for a run's checkpoint, else <folder name>-<format>[-<type>] in the current directory."""
    name = f"{fmt}-{quantize}" if quantize else fmt
    folder = source.folder
    if folder.parent.name == "checkpoints" and source.found.step is not None:
        return folder.parent.parent / "exports" / f"{folder.name}-{name}"
    return Path.cwd() / f"{folder.name}-{name}"


def _versions(fmt: str) -> dict[str, str]:
    from ..checkpoint import package_versions

    extra = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "gguf": ("gguf", "llama_cpp_python")}.get(fmt, ())
    return package_versions(("finetrack", "torch", "transformers", "peft", "safetensors", *extra))


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `finetrack export` arguments (the CLI wires the verb to `main`)."""
    parser.add_argument(
        "source", metavar="SOURCE", help="a run directory (with --step), a checkpoint folder or URL, an adapter or model folder"
    )
    parser.add_argument(
        "--format", required=True, choices=FORMATS, help="merged (safetensors), onnx (transformers.js layout) or gguf (llama.cpp)"
    )
    parser.add_argument("--step", type=one_step, help="a run directory's checkpoint: N, best or latest (default latest)")
    parser.add_argument("--quantize", help="onnx: int8; gguf: f16 (default), q8_0, q4_k_m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="merged weights (default float32)")
    parser.add_argument("--output", help="folder or fsspec URL (default: RUN_DIR/exports/step-N-<format> for a run's checkpoint)")
    parser.add_argument("--no-verify", action="store_true", help="skip the comparison with the trained model (recorded in EXPORT.json)")


def main(args: argparse.Namespace) -> int:
    """Run an export from parsed arguments; 0 verified (or --no-verify), 1 verification failed."""
    try:
        result = export(args.source, args.format, args.step, args.quantize, args.output, args.dtype, not args.no_verify)
    except VerificationFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NOT_VERIFIED
    record = result.certificate["verification"]
    if "skipped" in record:
        print(f"export: {result.output} (not verified: --no-verify)")
    else:
        print(
            f"export: {result.output} verified: max |logit diff| {record['max_abs_logit_diff']:.2e}, mean KL {record['mean_kl']:.2e}, "
            f"greedy answers {record['greedy_answers_identical']}/{record['greedy_answers']} identical, chat template and EOS identical"
        )
    return 0
