"""Training with checkpoint.remote on a real S3 server (moto on 127.0.0.1): background push, resume on
an empty machine, a killed uploader, --fresh and remote checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import fsspec
import pytest
import torch
import yaml
from conftest import tiny_run
from safetensors.torch import load_file

from finetrack import checkpoint, storage
from finetrack.config import ConfigError
from finetrack.resume import Request
from finetrack.sync import sync

CONSTANT = ("train.lr_schedule=constant", "checkpoint.every_steps=3", "model.lora.dropout=0.1")  # lr independent of max_steps


def same_weights(a, b) -> bool:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return all(torch.equal(x[k], y[k]) for k in x)


def test_push_in_background_then_resume_on_an_empty_machine(tmp_path, tiny_model_dir, chat_file, s3, caplog):
    ref, ref_metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, *CONSTANT, "train.max_steps=9", name="ref")
    first, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *CONSTANT, "train.max_steps=6", f"checkpoint.remote={s3}", name="first")
    assert first.not_uploaded == [] and storage.remote_steps(s3) == [3, 6]
    fs, root = fsspec.core.url_to_fs(s3)
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(root)} == {"checkpoints", "config.resolved.yaml", "data_report.json", "metrics.jsonl"}

    # the job is resubmitted on a machine where the local run directory is gone
    with caplog.at_level("INFO", logger="finetrack"):
        again, metrics = tiny_run(
            tmp_path, tiny_model_dir, chat_file, *CONSTANT, "train.max_steps=9", f"checkpoint.remote={s3}", name="elsewhere"
        )
    assert again.resumed_from_step == 6 and "resuming from the remote copy" in caplog.text and "testing" not in caplog.text
    assert same_weights(ref.final_checkpoint, again.final_checkpoint)
    # this machine logged steps 7-9 after the history it fetched: the whole run, each step once, here and on the remote
    assert [(m["step"], m["loss"]) for m in metrics] == [(m["step"], m["loss"]) for m in ref_metrics]
    remote_metrics = [json.loads(x) for x in fs.cat_file(f"{root}/metrics.jsonl").decode().splitlines()]
    assert [m["step"] for m in remote_metrics] == list(range(1, 10)) and remote_metrics == metrics
    assert storage.remote_steps(s3) == [3, 6, 9]
    # the record the report reads: where the checkpoints went and which are there (step 3 and 6 found by catch_up)
    assert json.loads((again.run_dir / "remote.json").read_text()) == {"url": s3, "uploaded_steps": [3, 6, 9], "failed_steps": []}
    assert not fs.exists(f"{root}/remote.json")  # local knowledge only: never uploaded


def test_fresh_never_touches_remote_checkpoints_without_delete_remote(tmp_path, tiny_model_dir, chat_file, s3):
    tiny_run(tmp_path, tiny_model_dir, chat_file, *CONSTANT, "train.max_steps=3", f"checkpoint.remote={s3}", name="run")
    with pytest.raises(ConfigError, match="still holds the previous run's checkpoints.*--delete-remote"):
        tiny_run(
            tmp_path,
            tiny_model_dir,
            chat_file,
            *CONSTANT,
            "train.max_steps=3",
            f"checkpoint.remote={s3}",
            name="run",
            request=Request(fresh=True),
        )
    assert storage.remote_steps(s3) == [3] and (tmp_path / "run/checkpoints/step-000003").is_dir()
    result, _ = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        *CONSTANT,
        "train.max_steps=3",
        f"checkpoint.remote={s3}",
        name="run",
        request=Request(fresh=True, delete_remote=True),
    )
    assert result.resumed_from_step == 0 and storage.remote_steps(s3) == [3]  # deleted, then the new run's own step 3
    (aside,) = (tmp_path / "run/superseded").iterdir()
    assert json.loads((aside / "remote.json").read_text())["uploaded_steps"] == [3]  # moved aside with the other run files
    assert json.loads((result.run_dir / "remote.json").read_text()) == {"url": s3, "uploaded_steps": [3], "failed_steps": []}


def test_killed_uploader_leaves_nothing_that_resume_or_sync_would_use(tmp_path, tiny_model_dir, chat_file, s3, proxy):
    """kill -9 while step 6 is being uploaded (the proxy holds each of its PUTs): its files are partly on the
    remote, its manifest is not, so sync and remote resume use step 3."""
    cfg = {
        "model": {"name": str(tiny_model_dir), "lora": {"dropout": 0.1}},
        "data": {"path": str(chat_file), "max_length": 512},
        "train": {"micro_batch_size": 4, "max_steps": 6, "lr": 1e-2, "warmup_steps": 0},
        "checkpoint": {"every_steps": 3, "remote": s3},
        "output": {"dir": str(tmp_path / "job")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    proxy.slow_puts(r"/step-000006/", 1.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetrack", "train", str(tmp_path / "job.yaml")],
        env={**os.environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while proxy.slow_forwarded < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.kill()
    proc.wait()
    proxy.slow_puts(r"^$", 0)

    fs, root = fsspec.core.url_to_fs(s3)
    fs.invalidate_cache()
    partial = [p for p in fs.find(f"{root}/checkpoints/step-000006")]
    assert partial and not any(p.endswith("MANIFEST.json") for p in partial)  # half an upload is there, unlisted
    assert storage.remote_steps(s3) == [3]

    lines: list[str] = []
    assert sync(s3, tmp_path / "mirror", out=lines.append) == [3]
    assert sorted(p.name for p in (tmp_path / "mirror/checkpoints").iterdir()) == ["step-000003"]

    shutil.rmtree(tmp_path / "job")  # a new machine: resume comes from the remote, from step 3
    result, _ = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "model.lora.dropout=0.1",
        "train.max_steps=6",
        "checkpoint.every_steps=3",
        f"checkpoint.remote={s3}",
        name="job",
    )
    assert result.resumed_from_step == 3 and storage.remote_steps(s3) == [3, 6]
    checkpoint.verify(result.final_checkpoint)


def test_missing_backend_fails_before_any_work(tmp_path, tiny_model_dir, chat_file):
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="checkpoint.remote: .*gcsfs"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, "checkpoint.remote=gs://bucket/run", name="gs")
    assert not (tmp_path / "gs").exists()


def test_sync_command_mirrors_once_and_watches_until_ctrl_c(tmp_path, tiny_model_dir, chat_file):
    src, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, "checkpoint.every_steps=2", name="src")
    cmd = [sys.executable, "-m", "finetrack", "sync", str(src.run_dir), str(tmp_path / "dst")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "fetched step-000002" in r.stdout and "fetched step-000004" in r.stdout and "fetched 2 checkpoint(s)" in r.stdout
    for step in (2, 4):
        checkpoint.verify(checkpoint.checkpoint_dir(tmp_path / "dst", step))
    assert (tmp_path / "dst/metrics.jsonl").read_text() == (src.run_dir / "metrics.jsonl").read_text()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "fetched 0 checkpoint(s)" in r.stdout and "2 already present" in r.stdout, r.stdout

    proc = subprocess.Popen([*cmd, "--watch", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    checkpoint.save(src.run_dir, 6, lambda d: (d / "w.json").write_text("{}"), None, {"rules": ["every_steps"]})  # a new one appears
    deadline = time.monotonic() + 60
    while not (tmp_path / "dst/checkpoints/step-000006").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(2)  # Ctrl+C
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "dst/checkpoints/step-000006").is_dir() and "fetched step-000006" in out


def test_remote_that_cannot_be_used_is_an_error_not_a_restart(tmp_path, tiny_model_dir, chat_file, s3, monkeypatch):
    tiny_run(tmp_path, tiny_model_dir, chat_file, *CONSTANT, "train.max_steps=3", f"checkpoint.remote={s3}", name="run")
    fs, root = fsspec.core.url_to_fs(s3)
    fs.pipe_file(f"{root}/checkpoints/step-000003/adapter_model.safetensors", b"garbage")  # corrupted at rest
    with pytest.raises(ConfigError, match="holds 1 checkpoint\\(s\\) but none could be downloaded and verified"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, *CONSTANT, "train.max_steps=6", f"checkpoint.remote={s3}", name="empty")
    assert storage.remote_steps(s3) == [3]  # untouched

    import socket

    from conftest import use_endpoint

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there
    use_endpoint(monkeypatch, f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="checkpoint.remote: cannot read s3://.*run the same command again"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, *CONSTANT, "train.max_steps=6", f"checkpoint.remote={s3}", name="empty2")


def test_sync_errors_are_messages_not_tracebacks(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "finetrack", "sync", str(tmp_path / "nope"), str(tmp_path / "dst")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: sync: ") and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_training_goes_on_while_a_checkpoint_uploads(tmp_path, tiny_model_dir, chat_file, s3, proxy):
    """The proxy holds every PUT of step 3's files: training reaches step 6 and writes its checkpoint while step 3
    is still uploading (its manifest, the last PUT, not yet through); the run waits for both uploads at its end."""
    proxy.slow_puts(r"/checkpoints/step-000003/", 1.0)
    step6, seen, stop = tmp_path / "run/checkpoints/step-000006/MANIFEST.json", {}, threading.Event()

    def watch() -> None:
        while not stop.is_set() and "forwarded" not in seen:
            if step6.exists():
                seen["forwarded"] = proxy.slow_forwarded  # step 3's PUTs through the proxy when step 6 was complete here
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *CONSTANT, "train.max_steps=6", f"checkpoint.remote={s3}", name="run")
    finally:
        stop.set()
        watcher.join()
    puts_of_step_3 = len(checkpoint.read_manifest(checkpoint.checkpoint_dir(result.run_dir, 3))["files"]) + 1  # + its manifest
    assert "forwarded" in seen and seen["forwarded"] < puts_of_step_3, (seen, puts_of_step_3)
    assert proxy.slow_forwarded == puts_of_step_3 and result.not_uploaded == [] and storage.remote_steps(s3) == [3, 6]


def test_resume_from_a_remote_checkpoint_url(tmp_path, tiny_model_dir, chat_file, s3):
    first, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, *CONSTANT, "train.max_steps=6", f"checkpoint.remote={s3}", name="first")
    branch, metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        *CONSTANT,
        "train.max_steps=6",
        name="branch",
        request=Request(resume_from=f"{s3}/checkpoints/step-000003"),
    )
    assert branch.resumed_from_step == 3 and [m["step"] for m in metrics] == [4, 5, 6]
    assert same_weights(first.final_checkpoint, branch.final_checkpoint)  # continued exactly
    checkpoint.verify(checkpoint.checkpoint_dir(branch.run_dir, 3))  # the verified download it started from

    with pytest.raises(ConfigError, match="a remote path must end in /checkpoints/step-NNNNNN"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, *CONSTANT, name="bad", request=Request(resume_from=f"{s3}/step-000003"))
    with pytest.raises(ConfigError, match=r"--resume-from s3://.*/checkpoints/step-000009: .*MANIFEST.json: missing"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, *CONSTANT, name="bad", request=Request(resume_from=f"{s3}/checkpoints/step-000009"))
    assert not list((tmp_path / "bad").rglob("step-*"))  # never a silent restart, nothing half-downloaded


def test_failed_uploads_exit_3_then_the_same_command_uploads_them(tmp_path, tiny_model_dir, chat_file, s3, proxy):
    """README: exit code 3 when checkpoints could not be uploaded (complete locally); the same command run again
    uploads them (Uploader.catch_up), and remote.json says which are where."""
    cfg = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(chat_file), "max_length": 512},
        "train": {"micro_batch_size": 4, "max_steps": 3, "lr": 1e-2, "warmup_steps": 0},
        "checkpoint": {"every_steps": 3, "remote": s3},
        "output": {"dir": str(tmp_path / "job")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "finetrack", "train", str(tmp_path / "job.yaml")]
    proxy.fail_puts(r"/checkpoints/step-000003/", 10**6)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"1 checkpoint(s) are NOT on {s3}: step-000003" in r.stderr and "re-run the same command" in r.stderr
    checkpoint.verify(tmp_path / "job/checkpoints/step-000003")
    assert storage.remote_steps(s3) == []
    record = tmp_path / "job/remote.json"
    assert json.loads(record.read_text()) == {"url": s3, "uploaded_steps": [], "failed_steps": [3]}

    proxy.fail_puts(r"^$", 0)  # the network is back
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already complete" in r.stdout and "uploading checkpoints an earlier attempt did not finish uploading" in r.stderr
    assert storage.remote_steps(s3) == [3]
    assert json.loads(record.read_text()) == {"url": s3, "uploaded_steps": [3], "failed_steps": []}


def test_a_password_with_at_and_slash_never_reaches_output_or_the_run_directory(tmp_path, tiny_model_dir, chat_file):
    """checkpoint.remote, --resume-from and data.path with credentials whose password holds '@' and '/': refused before any
    work, and no fragment of the secret is printed or written (messages, logs, config.resolved.yaml, meta.json)."""
    from test_storage import TRICKY_FRAGMENTS, TRICKY_PASSWORD, TRICKY_USER

    url = f"s3://{TRICKY_USER}:{TRICKY_PASSWORD}@finetrack-test/run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(tiny_model_dir)},
                "data": {"path": str(chat_file), "max_length": 128},
                "train": {"micro_batch_size": 2, "max_steps": 2, "warmup_steps": 0},
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    env = {**os.environ, "FINETRACK_RUNTIME_DIR": str(tmp_path / "registry")}
    data_url = f"https://{TRICKY_USER}:{TRICKY_PASSWORD}@example.com/chat.jsonl"
    for extra in ([f"checkpoint.remote={url}"], ["--resume-from", f"{url}/checkpoints/step-000002"], [f"data.path={data_url}"]):
        r = subprocess.run(
            [sys.executable, "-m", "finetrack", "train", str(cfg), *extra],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env=env,
        )
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert [x for x in r.stderr.splitlines() if x.startswith("error:")], r.stderr[-3000:]
        written = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl")]
        shown = r.stdout + r.stderr + "".join(written)
        assert not any(fragment in shown for fragment in TRICKY_FRAGMENTS), (extra, r.stderr[-3000:])
