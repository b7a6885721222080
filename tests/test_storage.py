"""Remote checkpoint storage against a real S3 server (moto, in this process, on 127.0.0.1).

Failed uploads come from a small reverse proxy in front of moto that answers HTTP 500 to chosen PUTs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

import fsspec
import pytest
from conftest import BUCKET, SECRET, make_checkpoint
from conftest import use_endpoint as _use_endpoint

from finetrack import checkpoint, storage
from finetrack.checkpoint import MANIFEST, CheckpointError
from finetrack.sync import sync


# ------------------------------------------------------------------------------- checkpoints
def write_run_files(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.resolved.yaml").write_text("model: tiny\n")
    (run_dir / "data_report.json").write_text('{"rows": 3}\n')
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # the loop is mid-line


def remote_fs(url: str):
    return fsspec.core.url_to_fs(url)


def local_steps(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def same_files(a: Path, b: Path) -> bool:
    return tree_bytes(a) == tree_bytes(b)


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------- tests
def test_redact_removes_credentials():
    assert storage.redact("s3://AKIA123:topsecret@bucket/run") == "s3://bucket/run"
    assert storage.redact("see https://user:pw@host:8080/p and ftp://u@h/x") == "see https://host:8080/p and ftp://h/x"
    assert storage.redact("s3://bucket/run") == "s3://bucket/run"
    assert storage.redact("/abs/path/run") == "/abs/path/run"


def test_push_pull_round_trip(s3, tmp_path):
    src = tmp_path / "a"
    folder = make_checkpoint(src, 5)
    write_run_files(src)
    assert storage.push_checkpoint(folder, s3) is True
    storage.push_run_files(src, s3)
    assert storage.remote_steps(s3) == [5]
    fs, root = remote_fs(s3)
    assert fs.cat_file(f"{root}/metrics.jsonl") == b'{"step": 1, "loss": 2.0}\n'  # whole lines only

    pulled = storage.pull_checkpoint(s3, 5, tmp_path / "b")
    assert pulled == checkpoint.checkpoint_dir(tmp_path / "b", 5)
    assert same_files(folder, pulled)
    assert checkpoint.is_resumable(checkpoint.verify(pulled, full=True))
    assert local_steps(tmp_path / "b") == ["step-000005"]  # no temporary folder left

    assert storage.push_checkpoint(folder, s3) is False  # identical manifest already there


def test_push_replaces_a_different_remote_checkpoint(s3, tmp_path):
    storage.push_checkpoint(make_checkpoint(tmp_path / "a", 3), s3)
    again = make_checkpoint(tmp_path / "b", 3, resumable=False)  # the same step written again, different content
    assert storage.push_checkpoint(again, s3) is True
    assert same_files(again, storage.pull_checkpoint(s3, 3, tmp_path / "c"))


def test_remote_steps_ignores_folders_without_manifest(s3, tmp_path):
    for step in (1, 2, 10):
        storage.push_checkpoint(make_checkpoint(tmp_path, step), s3)
    fs, root = remote_fs(s3)
    fs.rm_file(f"{root}/checkpoints/step-000002/{MANIFEST}")  # an interrupted upload
    fs.pipe_file(f"{root}/checkpoints/.tmp-step-000011-7/{MANIFEST}", b"{}")
    assert fs.exists(f"{root}/checkpoints/step-000002/model.safetensors")
    assert storage.remote_steps(s3) == [1, 10]
    assert storage.remote_steps(f"s3://{BUCKET}/no-such-run") == []


def test_pull_of_corrupted_checkpoint_names_the_file_and_leaves_nothing(s3, tmp_path):
    folder = make_checkpoint(tmp_path / "a", 4)
    storage.push_checkpoint(folder, s3)
    fs, root = remote_fs(s3)
    key = f"{root}/checkpoints/step-000004/model.safetensors"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF  # same size, different content: only the sha256 can tell
    fs.pipe_file(key, bytes(data))
    with pytest.raises(CheckpointError, match=rf"s3://{BUCKET}/.*/checkpoints/step-000004/model.safetensors: sha256"):
        storage.pull_checkpoint(s3, 4, tmp_path / "b")
    assert local_steps(tmp_path / "b") == []

    fs.rm_file(f"{root}/checkpoints/step-000004/config.json")
    with pytest.raises(CheckpointError, match=r"step-000004/config.json: missing on the remote"):
        storage.pull_checkpoint(s3, 4, tmp_path / "b")
    assert local_steps(tmp_path / "b") == []


def test_pull_replaces_a_broken_local_copy_and_keeps_a_good_one(s3, tmp_path):
    storage.push_checkpoint(make_checkpoint(tmp_path / "a", 6), s3)
    local = make_checkpoint(tmp_path / "b", 6)
    (local / "config.json").write_text("{}")  # broken: size differs from the manifest
    pulled = storage.pull_checkpoint(s3, 6, tmp_path / "b")
    assert same_files(pulled, tmp_path / "a" / "checkpoints" / "step-000006")
    mtime = (pulled / "model.safetensors").stat().st_mtime_ns
    assert storage.pull_checkpoint(s3, 6, tmp_path / "b") == pulled
    assert (pulled / "model.safetensors").stat().st_mtime_ns == mtime


def test_pull_newest_resumable_falls_back(s3, tmp_path):
    src = tmp_path / "a"
    for step, resumable in ((1, True), (2, True), (3, False), (4, True), (5, True)):
        storage.push_checkpoint(make_checkpoint(src, step, resumable), s3)
    fs, root = remote_fs(s3)
    key = f"{root}/checkpoints/step-000004/{checkpoint.STATE_TENSORS}"
    fs.pipe_file(key, fs.cat_file(key)[:-10])  # truncated
    fs.rm_file(f"{root}/checkpoints/step-000005/{MANIFEST}")  # incomplete: not a checkpoint at all
    warnings = []
    got = storage.pull_newest_resumable(s3, tmp_path / "b", warnings.append)
    assert got == checkpoint.checkpoint_dir(tmp_path / "b", 2)
    assert same_files(got, src / "checkpoints" / "step-000002")
    assert len(warnings) == 2
    assert "step-000004" in warnings[0] and "trainer_state.safetensors" in warnings[0]
    assert "step-000003" in warnings[1] and "weights only" in warnings[1]
    assert local_steps(tmp_path / "b") == ["step-000002"]
    assert storage.pull_newest_resumable(f"s3://{BUCKET}/empty-run", tmp_path / "c", warnings.append) is None


def test_uploader_retries_failed_puts(proxy, s3, tmp_path):
    folder = make_checkpoint(tmp_path, 1)
    write_run_files(tmp_path)
    proxy.fail_puts(r"/checkpoints/step-000001/model\.safetensors$", 2)
    up = storage.Uploader(s3, tmp_path, retries=3, backoff_s=0.01)
    up.submit(folder)
    assert up.wait() == []
    assert proxy.served == 2  # two failed attempts, the third went through
    assert storage.remote_steps(s3) == [1]
    fs, root = remote_fs(s3)
    assert fs.exists(f"{root}/config.resolved.yaml") and fs.exists(f"{root}/metrics.jsonl")


def test_upload_that_keeps_failing_is_never_used_then_retried(proxy, s3, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetrack")
    c1, c2 = make_checkpoint(tmp_path / "run", 1), make_checkpoint(tmp_path / "run", 2)
    proxy.fail_puts(r"/checkpoints/step-000002/model\.safetensors$", 10**6)
    up = storage.Uploader(s3, tmp_path / "run", retries=2, backoff_s=0.01)
    up.submit(c1)
    up.submit(c2)
    wait_until(lambda: "failed after 2 attempt(s)" in caplog.text)
    assert up.busy() == {c2}  # the caller must keep it
    assert proxy.served == 2
    record = tmp_path / "run" / storage.REMOTE_RECORD  # what the report shows
    wait_until(lambda: record.is_file() and json.loads(record.read_text())["failed_steps"] == [2])
    assert json.loads(record.read_text()) == {"url": s3, "uploaded_steps": [1], "failed_steps": [2]}

    # the other files of step 2 are there, its manifest is not: nothing reads it as a checkpoint
    fs, root = remote_fs(s3)
    assert fs.exists(f"{root}/checkpoints/step-000002/config.json")
    assert not fs.exists(f"{root}/checkpoints/step-000002/{MANIFEST}")
    assert storage.remote_steps(s3) == [1]
    assert storage.pull_newest_resumable(s3, tmp_path / "resume", lambda m: None).name == "step-000001"
    assert sync(s3, tmp_path / "mirror", out=lambda _: None) == [1]

    proxy.fail_puts(r"$^", 0)  # the network is back
    c3 = make_checkpoint(tmp_path / "run", 3)
    up.submit(c3)  # re-queues step 2 first
    assert up.wait() == []
    assert storage.remote_steps(s3) == [1, 2, 3]
    assert json.loads(record.read_text()) == {"url": s3, "uploaded_steps": [1, 2, 3], "failed_steps": []}
    warning = next(r.getMessage() for r in caplog.records if "failed after" in r.getMessage())
    assert f"s3://{BUCKET}/" in warning and "step-000002" in warning and "injected by the test proxy" in warning
    assert SECRET not in caplog.text


def test_wait_returns_what_was_not_uploaded(proxy, s3, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetrack")
    folder = make_checkpoint(tmp_path, 7)
    proxy.fail_puts(r"/checkpoints/step-000007/", 10**6)
    up = storage.Uploader(s3, tmp_path, retries=1, backoff_s=0.0)
    up.submit(folder)
    wait_until(lambda: "failed after 1 attempt(s)" in caplog.text)
    assert up.wait() == [folder]
    assert "waiting for 1 checkpoint upload(s) to s3://" in caplog.text
    assert proxy.served == 2  # the first try, then one more by wait()
    assert storage.remote_steps(s3) == []
    with pytest.raises(RuntimeError, match="after wait"):
        up.submit(folder)


def test_credentials_are_never_shown(s3, tmp_path, caplog, capsys, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="finetrack")
    # a URL is saved in config.resolved.yaml and meta.json: credentials in it are refused before any request
    for url in (f"s3://AKIAUSER:hunter2pass@{BUCKET}/creds", "ftp://AKIAUSER:hunter2pass@127.0.0.1:21/run"):
        for call in (lambda u: storage.Uploader(u, tmp_path), storage.remote_steps, lambda u: storage.pull_checkpoint(u, 1, tmp_path)):
            with pytest.raises(ValueError, match="put no credentials in the URL") as e:
                call(url)
            assert "hunter2pass" not in str(e.value) and "AKIAUSER" not in str(e.value)

    # credentials from the environment: a failing upload names the server, never the secret
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    _use_endpoint(monkeypatch, f"http://127.0.0.1:{port}")
    up = storage.Uploader(s3, tmp_path, retries=2, backoff_s=0.0)
    up.submit(make_checkpoint(tmp_path, 1))
    assert len(up.wait()) == 1
    assert f"to {s3} failed after 2 attempt(s)" in caplog.text
    text = caplog.text + "".join(capsys.readouterr())
    for secret in ("hunter2pass", "AKIAUSER", SECRET):
        assert secret not in text


def test_sync_from_s3(s3, tmp_path):
    src = tmp_path / "run"
    for step in (1, 2, 3, 4):
        storage.push_checkpoint(make_checkpoint(src, step), s3)
    write_run_files(src)
    storage.push_run_files(src, s3)
    fs, root = remote_fs(s3)
    fs.rm_file(f"{root}/checkpoints/step-000003/{MANIFEST}")  # still uploading
    fs.pipe_file(f"{root}/checkpoints/step-000004/config.json", b"{}")  # corrupted
    lines = []
    dst = tmp_path / "mirror"
    assert sync(s3, dst, out=lines.append) == [1, 2]
    assert any(re.fullmatch(r"fetched step-000001 \(\d+\.\d kB\)", line) for line in lines), lines
    assert any(line.startswith("skipped step-000004: ") and "config.json" in line for line in lines), lines
    summary = rf"{s3} -> {dst}: fetched 2 checkpoint\(s\) \(\d+\.\d kB\), 0 already present, 1 not fetched \(see above\)"
    assert re.fullmatch(summary, lines[-1])
    assert local_steps(dst) == ["step-000001", "step-000002"]
    assert same_files(dst / "checkpoints" / "step-000002", src / "checkpoints" / "step-000002")
    assert (dst / "config.resolved.yaml").read_text() == "model: tiny\n"
    assert (dst / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    assert not [p for p in dst.iterdir() if p.name.startswith(".tmp")]

    lines.clear()
    assert sync(s3, dst, out=lines.append) == []
    assert not [line for line in lines if line.startswith("fetched")]
    assert lines[-1] == f"{s3} -> {dst}: fetched 0 checkpoint(s) (0 B), 2 already present, 1 not fetched (see above)"


def test_sync_from_local_run_dir_and_bad_sources(tmp_path):
    src = tmp_path / "run"
    make_checkpoint(src, 1)
    make_checkpoint(src, 2, resumable=False)
    write_run_files(src)
    dst = tmp_path / "mirror"
    assert sync(str(src), dst, out=lambda _: None) == [1, 2]
    assert same_files(dst / "checkpoints", src / "checkpoints")
    assert (dst / "metrics.jsonl").read_text() == (src / "metrics.jsonl").read_text()
    assert sync(f"file://{src}", dst, out=lambda _: None) == []

    with pytest.raises(ValueError, match="does not exist; expected a finetrack run directory"):
        sync(str(tmp_path / "nope"), dst)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no checkpoints/ folder"):
        sync(str(tmp_path / "empty"), dst)


def test_local_mirror_round_trip(tmp_path):
    folder = make_checkpoint(tmp_path / "run", 8)
    write_run_files(tmp_path / "run")
    mirror = str(tmp_path / "mirror" / "deep")
    assert storage.push_checkpoint(folder, mirror) is True
    storage.push_run_files(tmp_path / "run", mirror)
    assert storage.push_checkpoint(folder, mirror) is False
    assert storage.remote_steps(f"file://{mirror}") == [8]
    assert same_files(storage.pull_checkpoint(mirror, 8, tmp_path / "back"), folder)
    assert not list(Path(mirror).rglob(".tmp-*"))


def test_sync_watch_picks_up_new_checkpoints(s3, tmp_path):
    src, dst = tmp_path / "run", tmp_path / "mirror"
    storage.push_checkpoint(make_checkpoint(src, 1), s3)
    stop, fetched, lines = threading.Event(), [], []
    watcher = threading.Thread(target=lambda: fetched.extend(sync(s3, dst, watch_seconds=0.05, out=lines.append, stop=stop)))
    watcher.start()
    try:
        wait_until(lambda: (dst / "checkpoints" / "step-000001").is_dir())
        storage.push_checkpoint(make_checkpoint(src, 2), s3)
        wait_until(lambda: (dst / "checkpoints" / "step-000002").is_dir())
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert not watcher.is_alive()
    assert fetched == [1, 2]
    assert any(line.startswith("watching s3://") for line in lines)


def test_delete_remote_checkpoints(s3, tmp_path):
    for step in (1, 2):
        storage.push_checkpoint(make_checkpoint(tmp_path, step), s3)
    write_run_files(tmp_path)
    storage.push_run_files(tmp_path, s3)
    fs, root = remote_fs(s3)
    fs.pipe_file(f"{root}/checkpoints/step-000003/model.safetensors", b"partial")
    assert storage.delete_remote_checkpoints(s3) == 3
    assert storage.remote_steps(s3) == []
    assert fs.find(f"{root}/checkpoints") == []
    assert fs.exists(f"{root}/config.resolved.yaml")  # the run's record stays
    assert storage.delete_remote_checkpoints(s3) == 0


def test_sync_sweeps_the_temporary_downloads_of_a_killed_sync(tmp_path):
    """A sync killed mid-download leaves `.tmp-step-*-PID` (and `.tmp-<run file>-PID`): the next sync removes those of
    processes that are gone, and leaves those of a live process (a sync still running) alone."""
    import subprocess
    import sys

    src, dst = tmp_path / "run", tmp_path / "mirror"
    make_checkpoint(src, 1)
    write_run_files(src)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead, alive = int(gone.stdout), os.getppid()
    for pid in (dead, alive):
        (dst / "checkpoints" / f".tmp-step-000001-{pid}").mkdir(parents=True)
        (dst / "checkpoints" / f".tmp-step-000001-{pid}" / "model.safetensors").write_bytes(b"half")
        (dst / f".tmp-metrics.jsonl-{pid}").write_text('{"step": 1')
    lines: list[str] = []
    assert sync(str(src), dst, out=lines.append) == [1]
    left = sorted(p.name for p in [*dst.glob(".tmp-*"), *(dst / "checkpoints").glob(".tmp-*")])
    assert left == [f".tmp-metrics.jsonl-{alive}", f".tmp-step-000001-{alive}"]
    assert sum(line.startswith("removed ") and str(dead) in line for line in lines) == 2, lines
    checkpoint.verify(dst / "checkpoints" / "step-000001")


# A password holding '@' and '/' (pasted unescaped): a pattern such as "up to the first @" leaks its second half.
TRICKY_USER, TRICKY_PASSWORD = "AKIAFRAGUSER", "Hunt3rPass@Kx7Word/Zq9Lm2Tail"
TRICKY_FRAGMENTS = (TRICKY_USER, "Hunt3rPass", "Kx7Word", "Zq9Lm2Tail")


def test_credentials_with_at_and_slash_are_found_by_parsing_the_url(tmp_path):
    url = f"s3://{TRICKY_USER}:{TRICKY_PASSWORD}@{BUCKET}/run"
    assert storage.redact(url) == f"s3://{BUCKET}/run"
    assert storage.redact(f"cannot read {url}/checkpoints: denied") == f"cannot read s3://{BUCKET}/run/checkpoints: denied"
    assert storage.redact("hf://datasets/org/repo@main/train.jsonl") == "hf://datasets/org/repo@main/train.jsonl"  # a revision, not a user
    with pytest.raises(ValueError, match="put no credentials in the URL") as e:
        storage.check_url(url)
    # a backend echoing the password alone, or percent-decoded, in its own words
    echoed = storage.describe_error(OSError(f"bad password {TRICKY_PASSWORD} for {url} (Hunt3rPass%40Kx7Word)"), url)
    for text in (str(e.value), echoed):
        assert not any(fragment in text for fragment in TRICKY_FRAGMENTS), text


def test_sync_source_with_a_password_holding_at_and_slash_never_shows_it(tmp_path):
    import subprocess
    import sys

    url = f"s3://{TRICKY_USER}:{TRICKY_PASSWORD}@{BUCKET}/run"
    for extra in ([], ["--watch", "0.1"]):
        r = subprocess.run(
            [sys.executable, "-m", "finetrack", "sync", url, str(tmp_path / "dst"), *extra], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 2 and "put no credentials in the URL" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not any(fragment in r.stdout + r.stderr for fragment in TRICKY_FRAGMENTS), r.stderr
