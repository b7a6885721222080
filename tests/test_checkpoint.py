"""Checkpoint format, integrity, retention and the no-pickle rule, on the tiny model."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint, tiny_run
from safetensors.torch import load_file

from finetrack import checkpoint
from finetrack.config import ConfigError
from finetrack.resume import Request
from finetrack.train_state import DataPosition, TrainState

V1_CHECKPOINT = Path(__file__).parent / "data/checkpoint_v1/step-000009"  # written by the code before TrainState

LORA_FILES = [
    "MANIFEST.json",
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "meta.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "trainer_state.json",
    "trainer_state.safetensors",
]
FULL_FILES = [
    "MANIFEST.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "meta.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "trainer_state.json",
    "trainer_state.safetensors",
]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, chat_file) -> Path:
    """A 4-step LoRA run with checkpoints at steps 2 and 4 (dropout on, so RNG state matters)."""
    tmp = tmp_path_factory.mktemp("lora-run")
    result, _ = tiny_run(tmp, tiny_model_dir, chat_file, "checkpoint.every_steps=2", "model.lora.dropout=0.1")
    return result.run_dir


def test_lora_checkpoint_folder_is_self_describing(lora_run, tiny_model_dir):
    folder = lora_run / "checkpoints/step-000004"
    assert sorted(p.name for p in folder.iterdir()) == LORA_FILES
    assert sorted(p.name for p in (lora_run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]  # no temp folders left

    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["step"] == 4 and sorted(manifest["files"]) == [f for f in LORA_FILES if f != "MANIFEST.json"]
    for name, entry in manifest["files"].items():
        assert entry["size"] == (folder / name).stat().st_size and entry["sha256"] == checkpoint.sha256_file(folder / name)

    meta = json.loads((folder / "meta.json").read_text())
    assert meta["step"] == 4 and meta["epoch"] == pytest.approx(4 / 12) and meta["rules"] == ["every_steps", "last"]
    assert {"loss", "eval_loss", "lr", "grad_norm"} <= set(meta["metrics"]) and meta["tokens_seen"] > 0
    assert len(meta["config_hash"]) == 16 and meta["config"]["model"]["method"] == "lora" and len(meta["data_fingerprint"]) == 16
    assert {"torch", "transformers", "peft", "finetrack"} <= set(meta["versions"]) and "git_sha" in meta

    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["epoch"] == 0 and state["step_in_epoch"] == 4
    assert state["data"] == {"seed": 42, "shuffle": True, "num_rows": 48, "rows_per_step": 4}
    assert set(state["rng"]) == {"python", "numpy", "torch_cpu", "cuda"} and state["lr_schedule"]["kind"] == "cosine"
    tensors = load_file(folder / "trainer_state.safetensors")
    assert "rng/torch_cpu" in tensors and any(k.endswith("exp_avg_sq") for k in tensors)

    # usable with PEFT alone
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    saved = load_file(folder / "adapter_model.safetensors")
    lora_b = next(k for k in saved if "lora_B" in k)
    assert saved[lora_b].abs().sum() > 0  # trained, not the zero init
    live = dict(model.named_parameters())
    assert torch.equal(live[lora_b.replace(".weight", ".default.weight")], saved[lora_b])


def test_full_checkpoint_loads_with_transformers_and_back_into_finetrack(tmp_path, tiny_model_dir, chat_file):
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=full", "train.max_steps=2")
    folder = result.final_checkpoint
    assert {"config.json", "model.safetensors", "trainer_state.safetensors", "MANIFEST.json"} <= {p.name for p in folder.iterdir()}
    from transformers import AutoModelForCausalLM

    from finetrack.config import Environment, load_config, resolve
    from finetrack.models import build_model, load_weights

    plain = AutoModelForCausalLM.from_pretrained(folder)
    cfg, _ = resolve(load_config(None, [f"model.name={tiny_model_dir}", "model.method=full"]), Environment("cpu", False, 1, 100))
    ours = build_model(cfg.model, torch.device("cpu"))
    load_weights(ours, folder)
    for (n, a), (_, b) in zip(plain.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_optimizer_and_rng_state_round_trip_exactly(tmp_path, name):
    """capture -> safetensors/JSON -> restore gives the same next steps (8-bit state has tensors shared across params)."""
    from finetrack.config import TrainConfig
    from finetrack.optim import build_optimizer

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.Dropout(0.2), torch.nn.Linear(96, 96))
        return net, build_optimizer(net, TrainConfig(optimizer=name, weight_decay=0.01), 1e-2)

    def step(net, opt):
        loss = net(torch.randn(8, 96)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss)

    net, opt = make()
    for _ in range(3):
        step(net, opt)
    weights_at_3 = {k: v.clone() for k, v in net.state_dict().items()}  # in a run these come from the weights files
    checkpoint.save(tmp_path, 3, lambda d: (d / "w.json").write_text("{}"), checkpoint.capture_state(opt.state_dict(), {"step": 3}), {})
    expected = [step(net, opt) for _ in range(3)]

    net2, opt2 = make()
    net2.load_state_dict(weights_at_3)
    torch.manual_seed(123)  # scramble the RNG: restore_state must put it back (dropout and inputs depend on it)
    assert checkpoint.restore_state(checkpoint.checkpoint_dir(tmp_path, 3), opt2.load_state_dict)["step"] == 3
    assert [step(net2, opt2) for _ in range(3)] == expected
    assert all(torch.equal(a, b) for a, b in zip(net2.parameters(), net.parameters()))


def test_trainer_state_json_keeps_schema_1_layout():
    """TrainState reads and writes trainer_state.json exactly as the code before it did (a checkpoint it wrote, kept)."""
    tree = json.loads((V1_CHECKPOINT / "trainer_state.json").read_text())
    assert tree["format"] == checkpoint.STATE_FORMAT == "finetrack-trainer-state/1"
    progress = {k: v for k, v in tree.items() if k not in ("format", "rng", "optimizer")}
    state = TrainState.from_json(tree)
    assert (state.step, state.tokens_seen, state.epoch, state.step_in_epoch) == (9, 4585, 0, 9)
    assert state.data == DataPosition(seed=42, shuffle=True, num_rows=48, rows_per_step=4) and state.lr_schedule.kind == "cosine"
    assert json.dumps(state.to_json()) == json.dumps(progress)  # same keys, same order, same values


def test_another_trainer_state_schema_is_refused_naming_both_versions(tmp_path):
    folder = make_checkpoint(tmp_path, 3)
    tree = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps({**tree, "format": "finetrack-trainer-state/2"}))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read_state_tree(folder)  # what check_resumable and a resume read it with
    assert "finetrack-trainer-state/2" in str(e.value) and "reads finetrack-trainer-state/1" in str(e.value)
    (folder / "trainer_state.json").write_text(json.dumps({**tree, "format": "something-else/1"}))
    with pytest.raises(checkpoint.CheckpointError, match="not a finetrack trainer state"):
        checkpoint.read_state_tree(folder)  # what check_resumable and a resume read it with


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # flip one byte in the middle
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, chat_file) -> Path:
    """A 4-step full fine-tune with checkpoints at steps 2 and 4."""
    result, _ = tiny_run(tmp_path_factory.mktemp("full-run"), tiny_model_dir, chat_file, "model.method=full", "checkpoint.every_steps=2")
    return result.run_dir


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("method, name", [*(("lora", f) for f in LORA_FILES), *(("full", f) for f in FULL_FILES)])
def test_damaged_newest_checkpoint_is_skipped_and_named(tmp_path, request, method, name, how):
    source = request.getfixturevalue(f"{method}_run")
    files = sorted(p.name for p in (source / "checkpoints/step-000004").iterdir())
    assert files == (LORA_FILES if method == "lora" else FULL_FILES)  # the matrix covers every file a checkpoint has
    run = tmp_path / "run"
    shutil.copytree(source, run)
    _damage(run / "checkpoints/step-000004" / name, how)
    warnings: list[str] = []
    found = checkpoint.newest_resumable(run, warn=warnings.append)
    assert found is not None and found.step == 2
    assert len(warnings) == 1 and "step-000004" in warnings[0] and name in warnings[0], warnings


def test_incomplete_and_weights_only_checkpoints_are_not_resumed(tmp_path, lora_run):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    # a crash during a write leaves only a hidden temp folder: ignored without a word
    shutil.copytree(run / "checkpoints/step-000004", run / "checkpoints/.tmp-step-000006-123")
    checkpoint.drop_resume_state(run / "checkpoints/step-000004")
    warnings: list[str] = []
    assert checkpoint.newest_resumable(run, warn=warnings.append).step == 2
    assert warnings == [
        "skipping checkpoint step-000004: weights only (its resume state was removed by checkpoint.keep_optimizer_state=last)"
    ]
    checkpoint.verify(run / "checkpoints/step-000004")  # still a valid (weights-only) checkpoint


def test_resume_uses_previous_checkpoint_when_newest_is_corrupt(tmp_path, tiny_model_dir, chat_file, lora_run, caplog):
    """Damage step 4 of a finished 4-step run, extend it to 6 steps: it continues from step 2 and the result
    equals a 6-step run that was never interrupted."""
    ref, ref_metrics = tiny_run(
        tmp_path, tiny_model_dir, chat_file, "checkpoint.every_steps=2", "model.lora.dropout=0.1", "train.max_steps=6", name="ref"
    )
    run = tmp_path / "run"
    shutil.copytree(ref.run_dir, run)
    for step in (4, 6):
        _damage(run / f"checkpoints/step-{step:06d}/adapter_model.safetensors", "flip")
    with caplog.at_level("WARNING", logger="finetrack"):
        result, metrics = tiny_run(
            tmp_path, tiny_model_dir, chat_file, "checkpoint.every_steps=2", "model.lora.dropout=0.1", "train.max_steps=6", name="run"
        )
    assert result.resumed_from_step == 2
    assert "skipping checkpoint step-000006" in caplog.text and "adapter_model.safetensors: sha256 does not match" in caplog.text
    assert [m["loss"] for m in metrics] == [m["loss"] for m in ref_metrics]
    a, b = load_file(ref.final_checkpoint / "adapter_model.safetensors"), load_file(result.final_checkpoint / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_never_executed(tmp_path, tiny_model_dir, chat_file, lora_run):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(marker))
    newest = run / "checkpoints/step-000004"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "pytorch_model.bin", "trainer_state.pkl"):
        (newest / name).write_bytes(payload)  # what other trainers would load; not in our manifest
    result, _ = tiny_run(
        tmp_path, tiny_model_dir, chat_file, "checkpoint.every_steps=2", "model.lora.dropout=0.1", "train.max_steps=6", name="run"
    )
    assert result.resumed_from_step == 4 and not marker.exists()

    # a payload in place of our own state file, with the manifest forged to match: skipped (named, before any model
    # loads) in favour of the previous checkpoint, refused when asked for by name, never executed
    forged = tmp_path / "forged"
    shutil.copytree(lora_run, forged)
    newest = forged / "checkpoints/step-000004"
    (newest / "trainer_state.safetensors").write_bytes(payload)
    manifest = json.loads((newest / "MANIFEST.json").read_text())
    manifest["files"]["trainer_state.safetensors"] = {
        "size": len(payload),
        "sha256": checkpoint.sha256_file(newest / "trainer_state.safetensors"),
    }
    (newest / "MANIFEST.json").write_text(json.dumps(manifest))
    warnings: list[str] = []
    assert checkpoint.newest_resumable(forged, warn=warnings.append).step == 2
    assert warnings and "step-000004" in warnings[0] and "trainer_state.safetensors: not a readable safetensors file" in warnings[0]
    with pytest.raises(ConfigError, match="trainer_state.safetensors: not a readable safetensors file"):
        tiny_run(
            tmp_path,
            tiny_model_dir,
            chat_file,
            "checkpoint.every_steps=2",
            "model.lora.dropout=0.1",
            "train.max_steps=6",
            name="forged-run",
            request=Request(resume_from=str(newest)),
        )
    assert not marker.exists()


def _is_pickle_or_torch_save(path: Path) -> bool:
    head = path.read_bytes()[:4]
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04")


def test_nothing_finetrack_writes_is_a_pickle(tmp_path, tiny_model_dir, chat_file):
    for method in ("lora", "full"):
        result, _ = tiny_run(
            tmp_path,
            tiny_model_dir,
            chat_file,
            f"model.method={method}",
            "checkpoint.every_steps=1",
            "train.max_steps=2",
            "train.optimizer=adamw_8bit",
            "data.eval_split=0.1",
            name=method,
        )
        files = [p for p in result.run_dir.rglob("*") if p.is_file()]
        assert len(files) > 20
        offenders = [p for p in files if _is_pickle_or_torch_save(p) or p.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle")]
        assert offenders == []
        for p in files:  # every file is JSON, YAML, text or safetensors
            if p.suffix == ".safetensors":
                load_file(p)
            elif p.suffix in (".json",):
                json.loads(p.read_text())
            else:
                p.read_text()


def _steps(run: Path) -> list[int]:
    return [int(p.name[5:]) for p in sorted((run / "checkpoints").glob("step-*"))]


def test_retention_keeps_schedule_rolls_the_rest_and_drops_old_optimizer_state(tmp_path, tiny_model_dir, chat_file):
    # 48 rows / 4 per step = 12 steps per epoch; num_first_epoch=2 -> steps 6 and 12; every step otherwise
    common = ["checkpoint.every_steps=1", "checkpoint.num_first_epoch=2", "train.max_steps=9"]
    r, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, "checkpoint.num_keep_last=2", name="keep")
    assert _steps(r.run_dir) == [6, 8, 9]
    r, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, "checkpoint.num_keep_last=20", name="many")
    assert _steps(r.run_dir) == list(range(1, 10))  # fewer than num_keep_last: nothing deleted
    r, _ = tiny_run(
        tmp_path, tiny_model_dir, chat_file, *common, "checkpoint.num_keep_last=1", "checkpoint.keep_schedule=false", name="roll"
    )
    assert _steps(r.run_dir) == [9]
    r, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *common, "checkpoint.keep_optimizer_state=last", name="light")
    assert _steps(r.run_dir) == list(range(1, 10))
    with_state = [s for s in _steps(r.run_dir) if (checkpoint.checkpoint_dir(r.run_dir, s) / "trainer_state.safetensors").exists()]
    assert with_state == [9]
    for s in _steps(r.run_dir):  # every one still verifies: its manifest was rewritten before the files went
        checkpoint.verify(checkpoint.checkpoint_dir(r.run_dir, s))


# ------------------------------------------------------------------------ retention, rule by rule
RULES = {
    1: ["every_steps"],
    2: ["every_steps", "per_epoch"],
    3: ["every_steps"],
    4: ["steps"],
    5: ["log_spaced"],
    6: ["first_epoch"],
    7: ["signal"],
    8: ["every_steps"],
}


@pytest.fixture
def fake_run(tmp_path) -> Path:
    for step, rules in RULES.items():
        make_checkpoint(tmp_path / "run", step, rules=rules)
    return tmp_path / "run"


def test_retain_keeps_scheduled_checkpoints_and_rolls_the_others(fake_run):
    done = checkpoint.retain(fake_run, num_keep_last=2, keep_schedule=True, keep_optimizer_state="all")
    # rolling: 1, 3, 7 and the newest (8), which counts as one of the last 2; per_epoch/steps/log_spaced/first_epoch stay
    assert _steps(fake_run) == [2, 4, 5, 6, 7, 8]
    assert done == ["deleted step-000001 (checkpoint.num_keep_last=2)", "deleted step-000003 (checkpoint.num_keep_last=2)"]
    assert checkpoint.retain(fake_run, num_keep_last=2, keep_schedule=True, keep_optimizer_state="all") == []  # idempotent


def test_retain_without_keep_schedule_rolls_every_checkpoint(fake_run):
    checkpoint.retain(fake_run, num_keep_last=2, keep_schedule=False, keep_optimizer_state="all")
    assert _steps(fake_run) == [7, 8]


def test_retain_keeps_a_checkpoint_still_uploading_until_it_is_done(fake_run):
    busy = {checkpoint.checkpoint_dir(fake_run, 3)}
    checkpoint.retain(fake_run, num_keep_last=1, keep_schedule=False, keep_optimizer_state="last", busy=busy)
    assert _steps(fake_run) == [3, 8]
    assert (checkpoint.checkpoint_dir(fake_run, 3) / checkpoint.STATE_TENSORS).exists()  # not even its resume state is touched
    assert checkpoint.retain(fake_run, num_keep_last=1, keep_schedule=False, keep_optimizer_state="last") == [
        "deleted step-000003 (checkpoint.num_keep_last=1)"
    ]
    assert _steps(fake_run) == [8]


def test_retain_never_touches_the_newest_complete_checkpoint(fake_run):
    (checkpoint.checkpoint_dir(fake_run, 8) / checkpoint.MANIFEST).unlink()  # a newer folder that is incomplete does not count
    done = checkpoint.retain(fake_run, num_keep_last=1, keep_schedule=False, keep_optimizer_state="last")
    assert _steps(fake_run) == [7, 8]
    newest = checkpoint.checkpoint_dir(fake_run, 7)
    assert checkpoint.is_resumable(checkpoint.verify(newest)) and not any("step-000007" in line for line in done)
    # scheduled ones kept (keep_schedule=True) lose their resume state with keep_optimizer_state=last, the newest keeps it
    fresh = fake_run.parent / "again"
    for step, rules in RULES.items():
        make_checkpoint(fresh, step, rules=rules)
    checkpoint.retain(fresh, num_keep_last=1, keep_schedule=True, keep_optimizer_state="last")
    assert _steps(fresh) == [2, 4, 5, 6, 8]
    assert [s for s in _steps(fresh) if checkpoint.is_resumable(checkpoint.verify(checkpoint.checkpoint_dir(fresh, s)))] == [8]


def _adapter_tensors_match(model, adapter: Path) -> bool:
    from peft import get_peft_model_state_dict

    saved, loaded = load_file(adapter / "adapter_model.safetensors"), get_peft_model_state_dict(model)
    return saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_an_adapter_of_a_local_base_names_its_absolute_path_and_loads_after_the_base_moves(tmp_path, tiny_model_dir, chat_file):
    """A local folder has no other name than its path (PEFT writes the same): absolute, so it does not depend on the
    directory training ran from; PEFT loads the adapter onto the base wherever that has moved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    result, _ = tiny_run(tmp_path, base, chat_file, "train.max_steps=2")
    adapter = result.final_checkpoint
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    base.rename(tmp_path / "moved")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "moved"), adapter)
    assert _adapter_tensors_match(model, adapter)


@pytest.mark.e2e
def test_an_adapter_of_the_embedded_model_names_it_portably_and_loads_after_the_cache_moves(tmp_path, chat_file, monkeypatch):
    """The embedded model lives in a per-user cache: its adapters name it `smollm2-135m-instruct`, never the cache
    path. After the cache moves, finetrack's loader (what `finetrack eval ADAPTER` uses) finds the base from that id,
    and PEFT loads the adapter onto it."""
    from peft import PeftModel

    from finetrack.config import ModelConfig
    from finetrack.models import embedded_model_dir, load_base_model
    from finetrack.schema import EMBEDDED_NAME

    first = tmp_path / "cache-a"
    shutil.copytree(embedded_model_dir(), first / "models" / EMBEDDED_NAME)  # a converted copy: no 20 s conversion
    monkeypatch.setenv("FINETRACK_CACHE", str(first))
    result, _ = tiny_run(tmp_path, EMBEDDED_NAME, chat_file, "train.max_steps=1", "model.lora.r=2", "train.micro_batch_size=2")
    adapter = result.final_checkpoint
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_NAME
    assert str(first) not in "".join(p.read_text() for p in adapter.glob("*.json")) + (adapter / "README.md").read_text()

    second = tmp_path / "cache-b"
    first.rename(second)
    monkeypatch.setenv("FINETRACK_CACHE", str(second))
    name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = load_base_model(ModelConfig(name=name, dtype="float32", attn_implementation="sdpa"), torch.device("cpu"))
    model = PeftModel.from_pretrained(base, adapter)
    assert _adapter_tensors_match(model, adapter)
    assert not first.exists() and (second / "models" / EMBEDDED_NAME / "config.json").is_file()  # nothing was converted again


def test_retention_keeps_the_union_of_best_last_n_and_schedule(tmp_path):
    """num_keep_last counts the best when it is among the newest (a union, not best + N more); a best kept only while
    it is the best; a checkpoint written only as the best goes once another is better."""
    run = tmp_path / "run"
    for step, rules in ((2, ["steps"]), (4, ["every_steps"]), (6, ["best"]), (8, ["every_steps"]), (12, ["every_steps", "best"])):
        make_checkpoint(run, step, rules=rules)
    make_checkpoint(run, 16, rules=["every_steps", "last"])
    done = checkpoint.retain(run, num_keep_last=3, keep_schedule=True, keep_optimizer_state="all", best_step=12)
    assert _steps(run) == [2, 8, 12, 16], done  # schedule 2; last 3 = 8, 12 (also the best), 16; 6 only ever was the best
    assert any("step-000006" in line and "step 12 is better" in line for line in done)
    checkpoint.retain(run, num_keep_last=1, keep_schedule=True, keep_optimizer_state="all", best_step=8)
    assert _steps(run) == [2, 8, 16]  # the best outlives num_keep_last=1
