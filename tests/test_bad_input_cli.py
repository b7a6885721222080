"""Malformed command lines and run directories through the real CLI (`finetrack.cli.main`, in-process, and a few
as subprocesses): each ends in exit 2, exactly one `error:` line naming the flag / file, and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_checkpoint

from finetrack import cli


@pytest.fixture
def workdir(tmp_path, tiny_model_dir, chat_file, monkeypatch):
    """A folder holding a valid tiny config (cfg.yaml), a run with an eval file, and things that are not runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETRACK_RUNTIME_DIR", str(tmp_path / "registry"))
    cfg = {"model": {"name": str(tiny_model_dir)}, "data": {"path": str(chat_file), "max_length": 128}, "output": {"dir": "out"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "notes.txt").write_text("hello\n")
    run = tmp_path / "run"
    make_checkpoint(run, 2)
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({**cfg, "eval": {"suites": [{"name": "heldout", "kind": "loss"}]}}))
    (run / "eval").mkdir()
    (run / "eval" / "step-000000.json").write_text(json.dumps({"step": 0, "metrics": {"heldout": {"loss": 2.0}}}))
    (tmp_path / "a-folder").mkdir()
    return tmp_path


# (command line, text the one error line must contain); {tmp} is the work folder
CASES = [
    (["sync", "not-a-run", "dst"], "not-a-run has no checkpoints/ folder"),
    (["sync", "gone", "dst"], "gone does not exist"),
    (["sync", "run", "cfg.yaml"], "cfg.yaml: DST is a file"),
    (["sync", "run", "dst", "--watch", "0"], "--watch: '0' is out of range"),
    (["sync", "run", "dst", "--watch", "-5"], "--watch: '-5' is out of range"),
    (["sync", "run", "dst", "--watch", "inf"], "--watch: 'inf' is not a finite number"),
    (["sync", "run", "dst", "--watch", "1e9"], "--watch: '1e9' is out of range"),
    (["eval", "gone"], "gone: no such run directory, model or adapter folder, or config file"),
    (["eval", "not-a-run"], "not-a-run: not a run directory (config.resolved.yaml), a model (config.json) or an adapter"),
    (["eval", "run", "--steps", "abc"], "--steps: 'abc': use all, latest, or a comma-separated list"),
    (["eval", "run", "--steps", "0,x"], "--steps: '0,x'"),
    (["eval", "run", "--steps", "7"], "--steps: no complete checkpoint for step(s) [7]"),
    (["eval", "run", "--watch", "nan"], "--watch: 'nan' is not a finite number"),
    (["eval", "run", "train.lr=1"], "finetrack eval takes eval.* overrides only"),
    (["eval", "cfg.yaml", "--steps", "2"], "--steps 2: a config is evaluated before training at step 0 only"),
    (["plan", "cfg.yaml", "--gpu", "NOPE"], "--gpu NOPE: known GPUs are"),
    (["plan", "cfg.yaml", "--device-memory", "24XB"], "--device-memory: '24XB' is not a size"),
    (["plan", "cfg.yaml", "--device-memory", "0GB"], "--device-memory: '0GB' is out of range"),
    # an empty text is no path: `sync RUN ''` mirrored into the current directory; `--output ''` was "not given"
    (["sync", "runs/x", ""], "DST is empty: give a value (see"),
    (["report", "runs/x", "-o", ""], "--output is empty: give a value, or leave it out"),
    (["plan", "cfg.yaml", "--json", ""], "--json is empty"),
    (["plan", "cfg.yaml", "--gpu", " "], "--gpu is empty"),
    (["export", "runs/x", "--format", "merged", "--output", ""], "--output is empty"),
    (["train", "cfg.yaml", ""], "OVERRIDES is empty"),
    (["export", "runs/x", "--step", "-1"], "--step: '-1' is not 'latest' or a step number"),
    (["gate", "runs/x", "--metric", "a.b", "--baseline", "-1"], "--baseline: -1 is out of range"),
    (["eval", "runs/x", "--steps", "\uff11"], "--steps: '\uff11': use all, latest"),  # a full-width 1 (int() reads it)
    (["plan", "cfg.yaml", "--device-memory", "24"], "--device-memory: '24' is not a size; write it with its unit"),
    (["plan", "cfg.yaml", "--device-memory", "99999999TB"], "--device-memory: '99999999TB' is out of range"),
    (["plan", "cfg.yaml", "--num-processes", "0"], "--num-processes: 0 is out of range"),
    (["plan", "cfg.yaml", "--num-processes", "-3"], "--num-processes: -3 is out of range"),
    (["plan", "cfg.yaml", "--num-processes", "1000000000"], "--num-processes: 1000000000 is out of range"),
    (["plan", "cfg.yaml", "--num-processes", "2.5"], "--num-processes: '2.5' is not a whole number"),
    (["plan", "cfg.yaml", "--price-per-hour", "-1"], "--price-per-hour: '-1' is out of range"),
    (["plan", "cfg.yaml", "--price-per-hour", "0"], "--price-per-hour: '0' is out of range"),
    (["plan", "cfg.yaml", "--price-per-hour", "nan"], "--price-per-hour: 'nan' is not a finite number"),
    (["plan", "cfg.yaml", "--price-per-hour", "inf"], "--price-per-hour: 'inf' is not a finite number"),
    (["plan", "cfg.yaml", "--price-per-hour", "3,80"], "--price-per-hour: '3,80' is not a number"),
    (["plan", "cfg.yaml", "--measure-steps", "0"], "--measure-steps: 0 is out of range"),
    (["plan", "cfg.yaml", "--measure-steps", "1e9"], "--measure-steps: '1e9' is not a whole number"),
    (["plan", "cfg.yaml", "--json", "a-folder"], "a-folder: Is a directory; it is a folder: give a file path"),
    (["plan", "cfg.yaml", "--json", "no/such/dir/plan.json"], "no/such/dir/plan.json: No such file or directory"),
    (["plan", "cfg.yaml", "--num-proc", "2"], "unrecognized arguments: --num-proc 2; did you mean --num-processes?"),
    (["train", "nonexistent.yaml"], "config file not found: nonexistent.yaml"),
    (["train", "cfg.yaml", "--frsh"], "unrecognized arguments: --frsh; did you mean --fresh?"),
    (["train", "cfg.yaml", "--resume-from", "gone"], "--resume-from gone: no such checkpoint folder or run directory"),
    (["trian", "cfg.yaml"], "invalid choice: 'trian'"),
    (["gate", "gone", "--metric", "heldout.loss"], "run directory gone does not exist"),
    (["gate", "run"], "the following arguments are required: --metric"),
    (["gate", "run", "--metric", "heldout.loss", "--step", "x"], "--step: 'x' is not 'latest' or a step number"),
    (["report", "-o"], "--output: expected one argument"),
    ([], "the following arguments are required: VERB"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a) or "(nothing)" for a, _ in CASES])
def test_bad_command_line_is_one_error_line_and_exit_2(workdir, capsys, argv, message):
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        status = e.code
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2, err[-2000:]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out


def test_an_override_without_equals_names_it(workdir, capsys):
    status = cli.main(["train", "cfg.yaml", "train.max_steps"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and "train.max_steps" in errors[0] and "Traceback" not in err, err


def test_usage_errors_through_a_real_process_are_one_line(workdir):
    """argparse's own errors (usage text + `prog: error:`) are replaced by one line the user can act on."""
    for argv, message in [
        (["plan", "cfg.yaml", "--num-processes", "0"], "error: --num-processes: 0 is out of range"),
        (["sync", "run", "dst", "--watch", "0"], "error: --watch: '0' is out of range"),
    ]:
        r = subprocess.run([sys.executable, "-m", "finetrack", *argv], cwd=workdir, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.splitlines() == [r.stderr.splitlines()[0]], r.stderr
        assert r.stderr.startswith(message) and "(see `finetrack " in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of permissions")
def test_permission_denied_names_the_path(workdir, capsys):
    locked = Path(workdir / "locked")
    locked.mkdir(mode=0o500)
    status = cli.main(["plan", "cfg.yaml", "--json", str(locked / "plan.json")])
    err = capsys.readouterr().err
    assert status == 2 and f"error: {locked / 'plan.json'}: Permission denied; check its permissions" in err and "Traceback" not in err
