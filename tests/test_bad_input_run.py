"""Malformed run directories and training-start inputs through the real command line (cli.main): each ends in
exit 2, exactly one `error:` line naming the path or key, and no traceback.

The model the cases train has garbage weights (its config and tokenizer are fine): every case whose error must
come before the model is loaded would otherwise fail with the weights error instead, so each passing case also
proves its check ran before any weight was read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetrack import checkpoint, cli

COMMON = ("data.max_length=512", "train.micro_batch_size=4", "train.max_steps=2", "checkpoint.every_steps=1", "model.lora.r=4")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, chat_file) -> dict:
    """A finished 2-step run trained on a copy of the tiny model, whose weights are then made garbage."""
    root = tmp_path_factory.mktemp("bad-input")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    args = [f"model.name={model}", f"data.path={chat_file}", *COMMON]
    assert cli.main(["train", *args, f"output.dir={root / 'done'}"]) == 0
    (model / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 100)
    return {"root": root, "model": model, "args": args, "done": root / "done"}


def train(capsys, setup, out: Path, *extra: str) -> tuple[int, str, str, list[str]]:
    """(exit code, stdout, stderr, the `error:` lines) of `finetrack train` on the fixture's model."""
    code = cli.main(["train", *setup["args"], f"output.dir={out}", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, [line for line in (captured.out + captured.err).splitlines() if line.startswith("error:")]


def copy_run(setup, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(setup["done"], run)
    return run


def rewrite(folder: Path, name: str, text: str) -> None:
    """Change one checkpoint file and its manifest entry: a checkpoint that verifies but holds this content."""
    (folder / name).write_text(text)
    manifest = checkpoint.read_manifest(folder)
    manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": checkpoint.sha256_file(folder / name)}
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def _output_dir_is_a_file(setup, tmp):
    (tmp / "file").write_text("x")
    return [f"output.dir={tmp / 'file'}"], "is a file, not a folder", f"{tmp / 'file'}"


def _output_dir_below_a_file(setup, tmp):
    (tmp / "file").write_text("x")
    return [f"output.dir={tmp / 'file' / 'run'}"], "is a file, not a folder", f"{tmp / 'file'}"


def _missing_model_folder(setup, tmp):
    return [f"model.name={tmp / 'no-such-model'}"], "no such local folder", "model.name="


def _model_folder_without_config(setup, tmp):
    (tmp / "empty-model").mkdir()
    (tmp / "empty-model" / "weights.bin").write_bytes(b"")
    return [f"model.name={tmp / 'empty-model'}"], "no config.json", f"{tmp / 'empty-model'}"


def _adapter_folder_as_model(setup, tmp):
    adapter = setup["done"] / "checkpoints/step-000002"
    return [f"model.name={adapter}"], "holds a LoRA adapter", str(adapter)


def _gguf_file_as_model(setup, tmp):
    (tmp / "model.gguf").write_bytes(b"GGUF")
    return [f"model.name={tmp / 'model.gguf'}"], "a GGUF file, not a model folder", "model.gguf"


def _garbage_weights(setup, tmp):  # the only case that reads weights: the fixture's model
    return [], "loading the model failed", f"model.name={setup['model']}"


def _flash_attention_without_its_package(setup, tmp):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    return ["model.attn_implementation=flash_attention_2"], "needs the flash-attn package", "model.attn_implementation"


def _paged_optimizer_on_cpu(setup, tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return ["train.optimizer=paged_adamw_8bit"], "needs a CUDA GPU", "train.optimizer"


def _resume_with_another_lr(setup, tmp):
    run = copy_run(setup, tmp)
    shutil.rmtree(run / "checkpoints/step-000002")  # resume from step 1: not "already complete"
    return [f"output.dir={run}", "train.lr=0.5"], "cannot resume from", "train.lr"


def _checkpoint_after_the_end(setup, tmp):
    run = copy_run(setup, tmp)
    return [f"output.dir={run}", "train.max_steps=1"], "after the last step of this config", "step-000002"


def _meta_json_not_json(setup, tmp):
    run = copy_run(setup, tmp)
    for _, folder in checkpoint.step_folders(run):
        rewrite(folder, "meta.json", "{not json")
    return [f"output.dir={run}"], "none can be resumed", f"{run}/checkpoints"


def _meta_json_without_step(setup, tmp):
    run = copy_run(setup, tmp)
    folder = run / "checkpoints/step-000001"
    meta = json.loads((folder / "meta.json").read_text())
    rewrite(folder, "meta.json", json.dumps({k: v for k, v in meta.items() if k != "step"}))
    return [f"output.dir={tmp / 'new'}", f"--resume-from={folder}"], "no valid 'step'", f"{folder}/meta.json"


def _trainer_state_without_optimizer(setup, tmp):
    run = copy_run(setup, tmp)
    folder = run / "checkpoints/step-000001"
    state = json.loads((folder / "trainer_state.json").read_text())
    rewrite(folder, "trainer_state.json", json.dumps({k: v for k, v in state.items() if k != "optimizer"}))
    return [f"output.dir={tmp / 'new'}", f"--resume-from={folder}"], "missing or malformed optimizer", f"{folder}/trainer_state.json"


def _trainer_state_tensors_not_safetensors(setup, tmp):
    run = copy_run(setup, tmp)
    folder = run / "checkpoints/step-000001"
    rewrite(folder, "trainer_state.safetensors", "not a safetensors file")
    return [f"output.dir={tmp / 'new'}", f"--resume-from={folder}"], "not a readable safetensors file", "trainer_state.safetensors"


def _resume_from_a_folder_that_is_not_a_checkpoint(setup, tmp):
    (tmp / "folder").mkdir()
    return [f"output.dir={tmp / 'new'}", f"--resume-from={tmp / 'folder'}"], "MANIFEST.json: missing", f"{tmp / 'folder'}"


def _resume_from_nothing(setup, tmp):
    return [f"output.dir={tmp / 'new'}", f"--resume-from={tmp / 'nope'}"], "no such checkpoint folder or run directory", f"{tmp / 'nope'}"


def _manifest_lists_a_missing_file(setup, tmp):
    run = copy_run(setup, tmp)
    folder = run / "checkpoints/step-000001"
    (folder / "adapter_model.safetensors").unlink()
    return [f"output.dir={tmp / 'new'}", f"--resume-from={folder}"], "missing (listed in MANIFEST.json)", "adapter_model.safetensors"


def _manifest_not_json(setup, tmp):
    run = copy_run(setup, tmp)
    folder = run / "checkpoints/step-000001"
    (folder / checkpoint.MANIFEST).write_bytes(b"\xff\xfe not json")
    return [f"output.dir={tmp / 'new'}", f"--resume-from={folder}"], "MANIFEST.json: unreadable", f"{folder}"


def _every_checkpoint_damaged(setup, tmp):
    run = copy_run(setup, tmp)
    for _, folder in checkpoint.step_folders(run):
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    return [f"output.dir={run}"], "none can be resumed", f"{run}/checkpoints"


def _resume_from_a_weights_only_checkpoint(setup, tmp):
    run = copy_run(setup, tmp)
    folder = run / "checkpoints/step-000001"
    checkpoint.drop_resume_state(folder)
    return [f"output.dir={tmp / 'new'}", f"--resume-from={folder}"], "weights only", f"{folder}"


def _fresh_and_resume_from(setup, tmp):
    return [f"output.dir={tmp / 'new'}", "--fresh", f"--resume-from={setup['done']}"], "contradict each other", "--resume-from"


CASES = [
    _output_dir_is_a_file,
    _output_dir_below_a_file,
    _missing_model_folder,
    _model_folder_without_config,
    _adapter_folder_as_model,
    _gguf_file_as_model,
    _garbage_weights,
    _flash_attention_without_its_package,
    _paged_optimizer_on_cpu,
    _resume_with_another_lr,
    _checkpoint_after_the_end,
    _meta_json_not_json,
    _meta_json_without_step,
    _trainer_state_without_optimizer,
    _trainer_state_tensors_not_safetensors,
    _resume_from_a_folder_that_is_not_a_checkpoint,
    _resume_from_nothing,
    _manifest_lists_a_missing_file,
    _manifest_not_json,
    _every_checkpoint_damaged,
    _resume_from_a_weights_only_checkpoint,
    _fresh_and_resume_from,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_run_input_is_one_error_line(case, setup, tmp_path, capsys):
    extra, says, names = case(setup, tmp_path)
    code, _, err, errors = train(capsys, setup, tmp_path / "out", *extra)
    assert code == 2, err[-3000:]
    assert len(errors) == 1, errors
    assert says in errors[0] and names in errors[0], errors[0]
    assert "Traceback" not in err


def test_an_unknown_hub_model_is_one_error_line(setup, tmp_path):
    """Through a real process with HF_HUB_OFFLINE=1 (on a machine without network the Hub client retries for about
    50 s before it gives up; the message is the same): the id is in neither the cache nor reachable on the Hub."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "finetrack",
        "train",
        *setup["args"],
        f"output.dir={tmp_path / 'out'}",
        "model.name=finetrack-tests/no-such-model",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "model.name=finetrack-tests/no-such-model" in errors[0] and "Hub" in errors[0] and "hf download" in errors[0]
    assert "Traceback" not in r.stderr


def test_a_finished_run_says_so_without_loading_the_model(setup, tmp_path, capsys):
    """The model's weights are garbage: `already complete` proves they were never read. A garbage
    config.resolved.yaml is not read either (train writes it)."""
    run = copy_run(setup, tmp_path)
    (run / "config.resolved.yaml").write_text(": : not yaml [")
    code, out, err, errors = train(capsys, setup, run)
    assert code == 0 and not errors, err[-3000:]
    assert out.startswith("already complete: 2 steps"), out
    assert (run / "config.resolved.yaml").read_text().startswith("model:")
