"""`finetrack smoke CONFIG` through the CLI on the tiny model: the environment checks, a short copy of the run killed
with SIGKILL and resumed, its checkpoints synced and verified, eval, memory, loss and throughput, the checklist and the
exit code; the scratch deleted (or kept with --keep) and the real run directory and remote prefix never touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from conftest import SECRET

from finetrack import storage
from finetrack.smoke_env import checkpoints_on_disk

STEPS = "8"  # checkpoints every 2 steps: killed after step 4, resumed to 8


def write_config(path: Path, model_dir: Path, data: Path, out: Path, remote: str | None = None) -> Path:
    """The config of a "real" run (24 steps, checkpoints every 6, the newest 2 kept), as a user writes it."""
    path.write_text(
        f"""model:
  name: {model_dir}
data:
  path: {data}
  max_length: 512
  eval_split: 0.25
train:
  micro_batch_size: 4
  max_steps: 24
  lr: 1.0e-2
  warmup_steps: 0
checkpoint:
  every_steps: 6
  num_keep_last: 2
{f"  remote: {remote}" if remote else ""}
eval:
  suites: [{{name: heldout, kind: loss}}]
output:
  dir: {out}
"""
    )
    return path


def smoke(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetrack", "smoke", *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


def checklist(stdout: str) -> dict[str, tuple[str, str]]:
    """{item: (status, evidence)} of the checklist lines (`PASS resume: ...`)."""
    out = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL", "INFO", "SKIP"):
            name, _, evidence = rest.strip().partition(": ")
            out[name] = (status, evidence)
    return out


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: (size, mtime in ns), to show it was not touched."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_smoke_passes_end_to_end_and_leaves_nothing_behind(tmp_path, tiny_model_dir, chat_file):
    real, remote = tmp_path / "runs" / "real", tmp_path / "bucket" / "real"
    for folder, name in ((real, "notes.txt"), (remote, "keep.txt")):  # the real run's folders hold something already
        folder.mkdir(parents=True)
        (folder / name).write_text("the real run's\n")
    before = files(real), files(remote)
    write_config(tmp_path / "cfg.yaml", tiny_model_dir, chat_file, real, remote=str(remote))

    r = smoke(tmp_path, "cfg.yaml", "--steps", STEPS, "--price-per-hour", "2.5")

    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "smoke: PASS"
    items = checklist(r.stdout)
    assert {name: status for name, (status, _) in items.items()} == {
        "versions": "INFO",
        "device": "INFO",
        "kernels": "INFO",
        "disk": "PASS",
        "remote": "PASS",
        "resume": "PASS",
        "sync": "PASS",
        "eval": "PASS",
        "memory": "INFO",
        "loss": "PASS",
        "throughput": "INFO",
    }
    assert items["resume"][1].startswith("killed (SIGKILL) after step 4 (checkpoint step-000004), resumed by the same command from step 4")
    assert "ended at step 8" in items["resume"][1]
    assert "steps 2, 4, 6, 8, all the run wrote" in items["sync"][1] and "verified (sha256)" in items["sync"][1]
    assert "heldout.loss" in items["eval"][1] and "step 0 -> step 8" in items["eval"][1]
    # the real run: 24 steps, checkpoints every 6 with the newest 2 kept -> at most 3 on disk at once
    assert "at most 3 checkpoint(s)" in items["disk"][1] and "(num_keep_last=2)" in items["disk"][1]
    assert (
        "the full run: " in items["throughput"][1]
        and "in 24 steps" in items["throughput"][1]
        and "at 2.5 per hour" in items["throughput"][1]
    )
    assert "predicted by plan" in items["memory"][1] and "ratio" in items["memory"][1]
    assert "torch " in items["versions"][1] and "capability " in items["device"][1]
    # nothing of the smoke is left, and the real run's folders are as they were
    assert not (tmp_path / "runs" / "real-smoke").exists()
    assert (files(real), files(remote)) == before and sorted(p.name for p in remote.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["real"]


@pytest.mark.slow  # 45 s; the suite's 45 minutes (README "Tests"): run with -m slow
def test_smoke_launches_the_short_run_as_the_real_run_is_launched(tmp_path, tiny_model_dir, chat_file):
    """--accelerate-config with --num-processes: the copy trains sharded (FSDP2 on gloo here), is killed and resumed."""
    fsdp = Path(__file__).resolve().parents[1] / "examples/accelerate/fsdp2.yaml"
    write_config(tmp_path / "cfg.yaml", tiny_model_dir, chat_file, tmp_path / "runs" / "real", remote=str(tmp_path / "bucket" / "real"))
    args = ("--steps", STEPS, "--num-processes", "2", "--accelerate-config", str(fsdp), "--keep")
    r = smoke(tmp_path, "cfg.yaml", *args)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "smoke: PASS", r.stdout + r.stderr
    items = checklist(r.stdout)
    # every process of the job SIGKILLed (torch elastic starts the workers in sessions of their own): the resume starts
    # from the checkpoint at the kill, not from one the workers wrote on their way out
    assert items["resume"][0] == "PASS" and "resumed by the same command from step 4" in items["resume"][1]
    for attempt in (1, 2):
        log = (tmp_path / "runs" / "real-smoke" / "logs" / f"train-{attempt}.log").read_text()
        assert "FSDP2: parameters, gradients and optimizer state sharded over 2 processes" in log


def test_a_loss_that_does_not_go_down_fails_and_keep_keeps_the_scratch_on_s3(tmp_path, tiny_model_dir, chat_file, s3):
    """lr 1e-9 learns nothing: the loss item fails (exit 1) while the rest passes through a real S3 server; --keep keeps
    the scratch folder and the remote scratch prefix, which lies under the real prefix and is the only thing there."""
    real = tmp_path / "runs" / "real"
    write_config(tmp_path / "cfg.yaml", tiny_model_dir, chat_file, real)
    scratch = tmp_path / "scratch"
    r = smoke(
        tmp_path,
        "cfg.yaml",
        "--steps",
        STEPS,
        "--keep",
        "--scratch",
        str(scratch),
        f"checkpoint.remote={s3}",  # overrides after CONFIG, as for train
        "train.lr=1e-9",
        "train.lr_schedule=constant",
        "eval.suites=[]",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "smoke: FAIL (1 item: loss)"
    items = checklist(r.stdout)
    assert items["loss"][0] == "FAIL" and "rule: the mean loss of the last quarter" in items["loss"][1]
    assert items["remote"][0] == items["resume"][0] == items["sync"][0] == "PASS"
    assert items["eval"] == ("SKIP", "the config has no eval.suites: nothing for `finetrack eval` to run")
    assert SECRET not in r.stdout + r.stderr
    # kept: the scratch run, its mirror and the logs of every command; the remote scratch prefix with its checkpoints
    assert [s for s, _ in sorted((int(p.name[5:]), p) for p in (scratch / "run" / "checkpoints").glob("step-*"))] == [2, 4, 6, 8]
    assert (scratch / "mirror" / "checkpoints" / "step-000008" / "MANIFEST.json").is_file()
    assert sorted(p.name for p in (scratch / "logs").iterdir()) == ["sync.log", "train-1.log", "train-2.log"]
    fs, root = fsspec.core.url_to_fs(s3)
    fs.invalidate_cache()
    kept = [p.rsplit("/", 1)[-1] for p in fs.ls(root)]
    assert len(kept) == 1 and kept[0].startswith("smoke-"), kept  # nothing written to the real prefix itself
    assert storage.remote_steps(f"{s3}/{kept[0]}") == [2, 4, 6, 8]
    assert not real.exists()


def test_a_remote_that_cannot_be_written_fails_before_training(tmp_path, tiny_model_dir, chat_file, s3):
    """A local remote below a file and an S3 bucket that does not exist: the remote item fails (exit 1), naming the
    URL without credentials, and nothing is trained. (A read-only folder does not stop root, so a file stands in.)"""
    (tmp_path / "a-file").write_text("not a folder\n")
    write_config(tmp_path / "cfg.yaml", tiny_model_dir, chat_file, tmp_path / "runs" / "real")
    for remote in (str(tmp_path / "a-file" / "run"), "s3://no-such-bucket-finetrack/run"):
        r = smoke(tmp_path, "cfg.yaml", f"checkpoint.remote={remote}")
        assert r.returncode == 1, r.stdout + r.stderr
        items = checklist(r.stdout)
        assert items["remote"][0] == "FAIL" and items["remote"][1].startswith(f"{remote}/smoke-") and "write failed" in items["remote"][1]
        assert items["resume"] == ("SKIP", "not run: the remote check failed")
        assert r.stdout.splitlines()[-1] == "smoke: FAIL (1 item: remote)"
        assert SECRET not in r.stdout + r.stderr
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.yaml"], "error: config file not found: missing.yaml"),
        (["cfg.yaml", "--steps", "3"], "error: --steps: 3 is out of range; give the optimizer steps of the short run from 4"),
        (["cfg.yaml", "--steps", "30"], "error: --steps 30: the run itself has 24 optimizer steps; give at most 24"),
        (["cfg.yaml", "--scratch", "used"], "error: --scratch used: already exists (a smoke kept with --keep?)"),
        (["cfg.yaml", "--scratch", "runs/real/inside"], "error: --scratch runs/real/inside: overlaps output.dir=runs/real"),
        (["cfg.yaml", "--scratch", "s3://bucket/scratch"], "error: --scratch s3://bucket/scratch: is a URL"),
        (["cfg.yaml", "train.lr=fast"], "error: override 'train.lr=fast'"),
        (["cfg.yaml", "--accelerate-config", "nope.yaml"], "error: --accelerate-config: nope.yaml: no such file"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, tiny_model_dir, chat_file, args, message):
    write_config(tmp_path / "cfg.yaml", tiny_model_dir, chat_file, Path("runs/real"))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    r = smoke(tmp_path, *args)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith(message), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_checkpoints_on_disk_follows_retention():
    """The most checkpoints a run holds at once (the disk check): retention runs after each save."""
    every_6 = {6: "every_steps", 12: "every_steps", 18: "every_steps", 24: "every_steps+last"}
    assert checkpoints_on_disk(every_6, None, True) == 4
    assert checkpoints_on_disk(every_6, 2, True) == 3  # the newest 2 kept, and the one just written
    assert checkpoints_on_disk(every_6, 1, True) == 2
    schedule = {"2": "first_epoch", "4": "first_epoch", "6": "every_steps", "12": "every_steps", "18": "every_steps+last"}
    assert checkpoints_on_disk(schedule, 1, True) == 4  # the schedule's checkpoints stay
    assert checkpoints_on_disk(schedule, 1, False) == 2


def test_a_failed_item_keeps_the_log_its_line_names(tmp_path, tiny_model_dir, chat_file):
    """Without --keep the scratch run is deleted, but not the logs: the FAIL line points at one (it pointed at a
    deleted file)."""
    (tmp_path / "stop.py").write_text(
        "class Boom:\n    def on_step_end(self, view):\n        raise RuntimeError('boom at step ' + str(view.step))\n"
    )
    write_config(tmp_path / "cfg.yaml", tiny_model_dir, chat_file, tmp_path / "runs" / "real")
    scratch = tmp_path / "scratch"
    r = smoke(tmp_path, "cfg.yaml", "--steps", STEPS, "--scratch", str(scratch), "train.callbacks=[{function: stop.py:Boom}]")
    assert r.returncode == 1, r.stdout + r.stderr
    status, evidence = checklist(r.stdout)["train"]
    assert status == "FAIL" and "boom at step 1" in evidence, r.stdout
    log_file = Path(evidence.rsplit("(log: ", 1)[1].rstrip(")"))
    assert log_file.is_file() and "boom at step 1" in log_file.read_text()
    assert sorted(p.name for p in scratch.iterdir()) == ["logs"]  # the scratch run itself is gone
