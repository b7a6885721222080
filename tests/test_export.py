"""`finetrack export --format merged` through the real CLI on runs of the tiny model: merged weights equal the trained
model (LoRA, DoRA, QLoRA, a full fine-tune with a regression head), EXPORT.json records source and verification, a
broken export fails with the check that caught it, outputs are never half-written (local or S3)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import mix_adapter_files, tiny_run
from safetensors.torch import load_file, save_file

from finetrack.cli import main


def export(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["export", *argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def certificate(folder: Path) -> dict:
    return json.loads((folder / "EXPORT.json").read_text())


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, chat_file) -> Path:
    out = tmp_path_factory.mktemp("lora")
    result, _ = tiny_run(out, tiny_model_dir, chat_file, "model.method=lora", "model.lora.r=4", "train.max_steps=3")
    return result.run_dir


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_merged_export_equals_the_adapter_it_merges(tmp_path, tiny_model_dir, chat_file, capsys, method):
    """The merged folder, loaded with plain transformers, gives the trained model's logits (base + adapter in PEFT,
    4-bit for QLoRA); EXPORT.json names the source step, manifest and the verification."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetrack.config import ModelConfig
    from finetrack.models import load_base_model

    overrides = {"lora": ["model.method=lora"], "dora": ["model.method=lora", "model.lora.use_dora=true"], "qlora": ["model.method=qlora"]}
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *overrides[method], "model.lora.r=4", "train.max_steps=3")
    code, out, err = export(capsys, str(result.run_dir), "--format", "merged")
    assert code == 0, err
    folder = result.run_dir / "exports/step-000003-merged"
    assert f"export: {folder} verified" in out
    cert = certificate(folder)
    assert cert["verified"] and cert["source"]["step"] == 3 and len(cert["source"]["manifest_sha256"]) == 64
    assert cert["verification"]["greedy_answers_identical"] == cert["verification"]["greedy_answers"] == 4
    assert ("dequantized" in cert["merge"]) == (method == "qlora")
    assert not (folder / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(folder)
    base = load_base_model(
        ModelConfig(
            name=str(tiny_model_dir),
            method=method if method == "qlora" else "lora",
            dtype="float32",
            attn_implementation="sdpa",
            qlora={"compute_dtype": "float32"},
        ),
        torch.device("cpu"),
    )
    trained = PeftModel.from_pretrained(base, result.final_checkpoint).eval()
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    limit = 5e-2 if method == "qlora" else 1e-4  # 4-bit: the kernel dequantizes per block in its own order
    torch.testing.assert_close(logits_of(merged, ids), logits_of(trained, ids), atol=limit, rtol=0)
    ends = merged.generation_config.eos_token_id  # generation stops at the chat template's end-of-turn token
    assert AutoTokenizer.from_pretrained(folder).eos_token_id in (ends if isinstance(ends, list) else [ends])


def test_full_fine_tune_with_a_regression_head_exports_the_head_beside_it(tmp_path, tiny_model_dir, regression_file, capsys):
    from transformers import AutoModelForCausalLM

    from finetrack.heads import WithHead, read_head

    result, _ = tiny_run(tmp_path, tiny_model_dir, regression_file, "model.method=full", "objective.kind=regression", "train.max_steps=2")
    out = tmp_path / "exported"
    code, _, err = export(capsys, str(result.final_checkpoint), "--format", "merged", "--output", str(out))
    assert code == 0, err
    assert (out / "head.safetensors").is_file() and certificate(out)["source"]["head"] is True
    head, layer = read_head(out)
    exported = WithHead(AutoModelForCausalLM.from_pretrained(out), head, layer).eval()
    trained_head, _ = read_head(result.final_checkpoint)
    trained = WithHead(AutoModelForCausalLM.from_pretrained(result.final_checkpoint), trained_head, layer).eval()
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    pool = torch.zeros(1, 12)
    pool[0, 4:10] = 1 / 6
    with torch.no_grad():
        assert torch.equal(exported(pool, input_ids=ids)[1], trained(pool, input_ids=ids)[1])


def _tamper(monkeypatch, how):
    """Break the merged folder after the exporter wrote it, before verification (a fault injected into the writer)."""
    from finetrack.export import merged

    real = merged.write

    def write(model, tokenizer, source, out_dir):
        files = real(model, tokenizer, source, out_dir)
        how(out_dir)
        return files

    monkeypatch.setattr(merged, "write", write)


def _drop_template(folder: Path) -> None:
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def _scale_a_tensor(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "layers.1.mlp.down_proj" in k)
    weights[name] = weights[name] * 1.5
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("how, check", [(_drop_template, "chat_template"), (_scale_a_tensor, "max_abs_logit_diff")])
def test_a_broken_export_fails_verification_naming_the_check(lora_run, tmp_path, capsys, monkeypatch, how, check):
    """Exit 1, one error line naming the first failing check; nothing at --output; the files kept as .rejected."""
    _tamper(monkeypatch, how)
    out = tmp_path / "out"
    code, _, err = export(capsys, str(lora_run), "--format", "merged", "--output", str(out))
    assert code == 1
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"verification failed at {check}" in line, line
    assert not out.exists()
    rejected = json.loads((tmp_path / "out.rejected/REJECTED.json").read_text())
    assert rejected["verification"]["first_failure"] == check and not rejected["verified"]


def test_no_verify_is_recorded(lora_run, tmp_path, capsys):
    out = tmp_path / "unchecked"
    code, stdout, _ = export(capsys, str(lora_run), "--step", "3", "--format", "merged", "--no-verify", "--output", str(out))
    assert code == 0 and "not verified" in stdout
    cert = certificate(out)
    assert cert["verified"] is False and "--no-verify" in cert["verification"]["skipped"]


def test_export_to_s3_uploads_every_file_then_the_certificate(lora_run, s3, capsys):
    url = f"{s3}/exports/merged"
    code, stdout, err = export(capsys, str(lora_run), "--format", "merged", "--output", url)
    assert code == 0, err
    fs, root = fsspec.core.url_to_fs(url)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(root))
    assert "EXPORT.json" in names and "model.safetensors" in names
    cert = json.loads(fs.cat_file(f"{root}/EXPORT.json"))
    assert cert["verified"] and sorted(cert["artifact"]["files"]) == sorted(n for n in names if n != "EXPORT.json")
    assert "testing" not in stdout + err  # no credential printed
    code, _, err = export(capsys, str(lora_run), "--format", "merged", "--output", url)  # never written over
    assert code == 2 and "not empty" in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["{run}", "--format", "merged", "--quantize", "int8"], "--quantize int8: not a type of --format merged"),
        (["{run}", "--format", "gguf", "--quantize", "q3"], "--quantize q3: not a type of --format gguf"),
        (["{run}", "--format", "merged", "--step", "7"], "has no checkpoint of step 7"),
        (["{run}/checkpoints/step-000003", "--format", "merged", "--step", "3"], "is not a run directory"),
        (["{tmp}/nothing", "--format", "merged"], "SOURCE={tmp}/nothing: no such run directory"),
        (["{run}", "--format", "merged", "--output", "{run}"], "already exists"),
    ],
)
def test_bad_export_input_is_one_error_line(lora_run, tmp_path, capsys, argv, expected):
    argv = [a.format(run=lora_run, tmp=tmp_path) for a in argv]
    code, _, err = export(capsys, *argv)
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert expected.format(run=lora_run, tmp=tmp_path) in line, line


def test_gate_requires_a_verified_export_of_the_judged_step(lora_run, tmp_path, capsys):
    """`gate --require-export merged`: NO-GO (exit 1) without an export of the step, or with an unverified one; GO once
    RUN_DIR/exports holds a verified one."""
    import shutil

    from conftest import read_jsonl

    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("exports"))
    first_loss = read_jsonl(run / "metrics.jsonl")[0]["loss"]
    for step, loss in ((0, first_loss), (3, first_loss * 0.5)):  # eval files as `finetrack eval` writes them
        path = run / "eval" / f"step-{step:06d}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            json.dumps({"step": step, "checkpoint": None if step == 0 else "checkpoints/step-000003", "metrics": {"heldout.loss": loss}})
        )
    gate = ["gate", str(run), "--metric", "heldout.loss", "--require-export", "merged"]
    assert main(gate) == 1
    assert "no verified merged export of step 3" in capsys.readouterr().out
    unverified = run / "exports/step-000003-merged"
    assert export(capsys, str(run), "--format", "merged", "--no-verify", "--output", str(unverified))[0] == 0
    assert main(gate) == 1
    assert "step-000003-merged (not verified)" in capsys.readouterr().out
    shutil.rmtree(unverified)
    assert export(capsys, str(run), "--format", "merged")[0] == 0
    assert main(gate) == 0
    assert "verified exports: merged" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ checkpoint.export
def test_checkpoint_export_exports_every_checkpoint_and_a_kill_never_leaves_a_half_export(tmp_path, tiny_model_dir, chat_file):
    """checkpoint.export: [merged] exports each checkpoint in a background process while training goes on. The run and
    its export processes are killed with SIGKILL while an export is being written: what is in exports/ is either a
    complete verified export or a hidden .tmp-* folder; running the same command again finishes every export, removes
    the leftovers, and retention (num_keep_last 1) deletes the exported checkpoints it held back."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    cfg = {
        "model": {"name": str(tiny_model_dir), "method": "lora", "lora": {"r": 4}},
        "data": {"path": str(chat_file), "max_length": 512},
        "train": {"micro_batch_size": 4, "max_steps": 6, "lr": 1e-2, "warmup_steps": 0},
        "checkpoint": {"every_steps": 2, "num_keep_last": 1, "export": ["merged"]},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, "-m", "finetrack", "train", str(tmp_path / "run.yaml")]
    exports = tmp_path / "run/exports"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if exports.is_dir() and any(p.name.startswith(".tmp-") for p in exports.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before an export was seen in progress"
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its export child
    proc.wait()
    for folder in exports.iterdir():
        assert folder.name.startswith(".tmp-") or certificate(folder)["verified"], folder

    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in exports.iterdir())
    assert names == ["step-000002-merged", "step-000004-merged", "step-000006-merged"], names
    assert all(certificate(exports / n)["verified"] and certificate(exports / n)["source"]["step"] == int(n[5:11]) for n in names)
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir() if p.name.startswith("step-")) == ["step-000006"]


@pytest.mark.parametrize("argv", [["--format", "onnx"], ["--format", "onnx", "--quantize", "int8"]])
def test_onnx_export_through_the_cli_is_verified_in_onnxruntime(lora_run, tmp_path, capsys, argv):
    """The tiny LoRA run exported to ONNX (transformers.js layout) passes verification in onnxruntime: logits, KL,
    greedy answers through the KV cache (float32), chat template and EOS read back from the written files."""
    out = tmp_path / "onnx"
    code, stdout, err = export(capsys, str(lora_run), *argv, "--output", str(out))
    assert code == 0, err
    cert = certificate(out)
    assert cert["verified"] and cert["tool_versions"]["onnxruntime"]
    assert (out / ("onnx/model_quantized.onnx" if "int8" in argv else "onnx/model.onnx")).is_file()
    names = {c["name"] for c in cert["verification"]["checks"]}
    assert names >= {"chat_template", "eos_token_id", "mean_kl"} and ("greedy_answers" in names) == ("int8" not in argv)


# ------------------------------------------------------------------------------------------ bad input, one line
@pytest.mark.parametrize(
    "url, expected", [("nosuch://bucket/x", "Protocol not known: nosuch"), ("s3://AKIAFAKE:Secret@bucket/x", "put no credentials")]
)
def test_an_output_url_that_cannot_be_used_is_one_error_line(lora_run, capsys, url, expected):
    """An unknown scheme or credentials in --output: exit 2, one `error: --output ...` line, the credentials never
    printed, refused before the checkpoint is loaded (as checkpoint.remote and `sync` refuse the same URLs)."""
    code = main(["export", str(lora_run), "--format", "merged", "--output", url])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2 and "Traceback" not in text, text
    (line,) = [x for x in text.splitlines() if x.startswith("error:")]
    assert line.startswith("error: --output ") and expected in line, line
    assert "Secret" not in text and "AKIAFAKE" not in text, text
    assert "export: " not in text  # nothing was located or loaded


def test_a_checkpoint_whose_adapter_config_does_not_match_its_weights(lora_run, tmp_path, capsys):
    """adapter_config.json of another rank than adapter_model.safetensors (the manifest updated to match): one error
    line naming the checkpoint folder and what disagrees, not PEFT's "size mismatch" traceback; nothing at --output."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("exports"))
    folder = run / "checkpoints" / "step-000003"
    mix_adapter_files(folder)
    out = tmp_path / "out"
    code, stdout, err = export(capsys, str(run), "--format", "merged", "--output", str(out))
    assert code == 2, stdout + err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert str(folder) in line and "adapter_config.json does not match adapter_model.safetensors" in line, line
    assert "size mismatch" in line and not out.exists()
