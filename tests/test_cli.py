"""End to end through the command line, on the embedded SmolLM2-135M-Instruct (a few steps each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_checkpoint, tiny_run, write_chat_jsonl

ROOT = Path(__file__).resolve().parents[1]


def finetrack(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "finetrack", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.e2e
def test_train_cli_embedded_model_run_directory(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text((ROOT / "examples/lora_chat.yaml").read_text())
    settings = ("train.micro_batch_size=2", "train.grad_accum_steps=1", "eval.loss_every_steps=1", "data.max_length=256")
    settings += ("train.log_every_steps=1", f"output.dir={tmp_path / 'out'}")
    r = finetrack("train", str(cfg), "train.max_steps=2", *settings, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    assert tree(out) == [
        "checkpoints",
        "checkpoints/step-000002",
        "checkpoints/step-000002/MANIFEST.json",
        "checkpoints/step-000002/README.md",
        "checkpoints/step-000002/adapter_config.json",
        "checkpoints/step-000002/adapter_model.safetensors",
        "checkpoints/step-000002/chat_template.jinja",
        "checkpoints/step-000002/meta.json",
        "checkpoints/step-000002/tokenizer.json",
        "checkpoints/step-000002/tokenizer_config.json",
        "checkpoints/step-000002/trainer_state.json",
        "checkpoints/step-000002/trainer_state.safetensors",
        "config.resolved.yaml",
        "data_report.json",
        "metrics.jsonl",
        "train.lock",
    ]
    # what a user sees: resolved values with reasons, the trainable-parameter report, the data report
    assert "resolved model.dtype = float32 (auto: CPU training" in r.stderr
    assert "trainable parameters: 4,884,480 of 139,399,488" in r.stderr
    assert "320 rows read, 304 to train on (dropped: none; truncated: 0)" in r.stderr and "16 more rows held out for eval loss" in r.stderr
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all("eval_loss" in m for m in metrics)

    # the checkpoint loads with PEFT alone (no finetrack code) and generates
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetrack.models import embedded_model_dir

    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir())
    model = PeftModel.from_pretrained(base, out / "checkpoints/step-000002")
    tok = AutoTokenizer.from_pretrained(out / "checkpoints/step-000002")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3

    # the schedule is printed and saved; the same command with a longer run continues from step 2
    assert "resolved checkpoint_steps = [2] (1 checkpoint: the last step, 2)" in r.stderr
    assert "checkpoint_steps:\n    value:\n      2: last" in (out / "config.resolved.yaml").read_text()
    r = finetrack("train", str(cfg), "train.max_steps=3", *settings, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "config change accepted on resume: train.max_steps: 2 -> 3" in r.stderr and "step 2 of 3" in r.stderr
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]

    # evaluate step 0 (the base model) and both checkpoints, then gate on the result
    r = finetrack("eval", str(out), 'eval.suites=[{"name": "heldout", "kind": "loss"}]', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout.splitlines()
    assert table[0].split() == ["step", "phase", "heldout.loss", "heldout.ppl"] and [x.split()[0] for x in table[2:]] == ["0", "2", "3"]
    r = finetrack("gate", str(out), "--metric", "heldout.loss", "--min-improvement=-100%", cwd=tmp_path)
    assert r.returncode == 0 and "GO" in r.stdout, r.stdout + r.stderr
    r = finetrack("gate", str(out), "--metric", "heldout.loss", "--min-improvement", "1000%", cwd=tmp_path)
    assert r.returncode == 1 and "NO-GO" in r.stdout


@pytest.mark.e2e
def test_demo_cli(tmp_path):
    r = finetrack("demo", "train.max_steps=3", "eval.loss_every_steps=3", "checkpoint.steps=[2]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints/step-000003/adapter_model.safetensors").is_file()
    lines = r.stdout.splitlines()
    assert any(x.startswith("loss: ") and "over 3 steps" in x for x in lines)
    answers = [x.split(":", 1)[1].strip() for x in lines if x.strip().startswith(("before:", "after:"))]
    assert len(answers) == 2 and all(answers)
    # the trajectory is evaluated (base model + the checkpoints) and the report written, its path printed last
    assert sorted(p.name for p in (runs[0] / "eval").glob("step-*.json")) == ["step-000000.json", "step-000002.json", "step-000003.json"]
    assert lines[-1] == f"report: {(runs[0] / 'report.html').resolve()}"
    html = (runs[0] / "report.html").read_text()
    assert "pirate.pirate_rate" in html and "heldout.loss" in html and "samples during training" in html
    # the representation shift beside the rate: step 0 is the base itself, the checkpoints moved
    records = [json.loads(p.read_text()) for p in sorted((runs[0] / "eval").glob("step-*.json"))]
    assert records[0]["metrics"]["inside.shift"] == 0.0 and records[-1]["metrics"]["inside.shift"] > 0
    assert 'id="representations"' in html


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "-", "train.lr_rate=1"], "unknown key 'train.lr_rate'"),
        (["train", "train.max_stepz=3"], "did you mean 'train.max_steps'"),
        (["train", "model.method=full", "model.lora.r=4"], "model.lora has no effect with model.method=full"),
        (["train", "nope.yaml"], "config file not found: nope.yaml"),
    ],
)
def test_cli_config_errors_exit_2(tmp_path, args, message):
    if args[1] == "-":
        (tmp_path / "c.yaml").write_text("train:\n  max_steps: 3\n")
        args = [args[0], "c.yaml", *args[2:]]
    r = finetrack(*args, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_cli_data_error_names_file_and_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    write_chat_jsonl(bad, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with bad.open("a") as fh:
        fh.write('{"messages": [{"role": "human", "content": "q"}]}\n')
    r = finetrack("train", f"model.name={tiny_model_dir}", f"data.path={bad}", "output.dir=out", cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert f"{bad}:2: field 'messages[0].role' is 'human'" in r.stderr


def test_help_config_cli(tmp_path):
    r = finetrack("train", "--help-config", cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and "model.lora.use_dora" in r.stdout and "data.on_overflow" in r.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_questions", "eval suite 'qa': questions file not found: "),
        ("bad_questions", "bad.jsonl:1"),
        ("bad_items", "items.jsonl:1"),
        ("run_with_output", "--output: only for a model or adapter folder"),
        ("model_with_steps", "--steps and --watch: only for a run directory"),
        ("watch_with_step_list", "--watch with --steps 0,2: a watch ends when the run's last checkpoint is evaluated"),
    ],
)
def test_cli_eval_errors_exit_2_with_one_line(tmp_path, tiny_model_dir, chat_file, case, message):
    """Errors of the eval stage (suite files, question and item files, flags that do not apply) exit 2, not 1 (NO-GO for a
    pipeline), with one `error:` line and no traceback."""
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "q", "samples": 2}) + "\n")  # no question
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "i", "prompt": "Rate it.", "options": ["1", "2"]}) + "\n")  # no target
    suite = {
        "missing_questions": {"name": "qa", "kind": "judge", "questions": str(tmp_path / "gone.yaml")},
        "bad_questions": {"name": "qa", "kind": "judge", "questions": str(tmp_path / "bad.jsonl")},
        "bad_items": {"name": "survey", "kind": "distribution", "items": str(tmp_path / "items.jsonl")},
    }.get(case, {"name": "heldout", "kind": "loss"})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.resolved.yaml").write_text(
        json.dumps({"model": {"name": str(tiny_model_dir)}, "data": {"path": str(chat_file)}, "eval": {"suites": [suite]}})
    )
    args = {
        "run_with_output": [str(run), "--output", "elsewhere"],
        "model_with_steps": [str(tiny_model_dir), "--steps", "0", "--watch", "1"],
        "watch_with_step_list": [str(run), "--steps", "0,2", "--watch", "1"],
    }.get(case, [str(run)])
    r = finetrack("eval", *args, cwd=tmp_path, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------------- overrides anywhere, watches, noise, Ctrl+C
def tiny_config(tmp_path: Path, model_dir: Path, data: Path, **sections) -> Path:
    cfg = {
        "model": {"name": str(model_dir)},
        "data": {"path": str(data), "max_length": 128, "eval_split": 0.25},
        "train": {"micro_batch_size": 2, "max_steps": 2, "warmup_steps": 0},
        "output": {"dir": str(tmp_path / "out")},
        **sections,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "argv, config, overrides",
    [
        (["train", "c.yaml", "--fresh", "train.lr=1e-3"], "c.yaml", ["train.lr=1e-3"]),
        (["train", "--fresh", "train.lr=1e-3", "--allow-config-change", "data.pack=true"], "train.lr=1e-3", ["data.pack=true"]),
        (["plan", "c.yaml", "--device-memory", "24GB", "train.micro_batch_size=16"], "c.yaml", ["train.micro_batch_size=16"]),
        (["plan", "--gpu", "H100", "c.yaml", "--json", "p.json", "a.b=1", "c.d=2"], "c.yaml", ["a.b=1", "c.d=2"]),
        (["eval", "RUN", "--steps", "0", "eval.k=v"], None, ["eval.k=v"]),
        (["eval", "--suite", "s", "RUN", "eval.a=1", "--steps", "latest", "eval.b=2"], None, ["eval.a=1", "eval.b=2"]),
        (["demo", "--verbose", "train.max_steps=3"], None, ["train.max_steps=3"]),
        (["--verbose", "train", "train.max_steps=3", "--fresh"], "train.max_steps=3", []),
    ],
)
def test_overrides_parse_before_or_after_flags_on_every_verb(argv, config, overrides):
    from finetrack import flags

    args = flags.parser().parse_args(argv)
    assert getattr(args, "config", None) == config and args.overrides == overrides
    assert args.verbose == ("--verbose" in argv)


def test_overrides_after_flags_reach_the_run(tmp_path, tiny_model_dir, chat_file, monkeypatch, capsys):
    """The README's own example, `train CFG --fresh k=v` and `eval RUN --steps 0 eval.k=v`, through cli.main."""
    from finetrack import cli

    monkeypatch.setenv("FINETRACK_RUNTIME_DIR", str(tmp_path / "registry"))
    cfg = tiny_config(tmp_path, tiny_model_dir, chat_file)
    assert cli.main(["plan", str(cfg), "--device-memory", "24GB", "train.micro_batch_size=3", "--json", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["schedule"]["global_batch_size"] == 3

    assert cli.main(["train", str(cfg), "--fresh", "train.max_steps=1"]) == 0
    assert [json.loads(x)["step"] for x in (tmp_path / "out/metrics.jsonl").read_text().splitlines()] == [1]

    suites = 'eval.suites=[{"name": "heldout", "kind": "loss"}]'
    assert cli.main(["eval", str(tmp_path / "out"), "--steps", "0", suites]) == 0
    assert sorted(p.name for p in (tmp_path / "out/eval").glob("step-*.json")) == ["step-000000.json"]
    capsys.readouterr()


def _read_until(stream, text: str, timeout_s: float = 120) -> list[str]:
    """Lines of a child's stdout up to the first holding `text` (the child runs with PYTHONUNBUFFERED)."""
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if text in line:
            return lines
    raise AssertionError(f"{text!r} not seen in {lines}")


def test_sync_watch_waits_for_the_run_to_appear(tmp_path):
    """A monitor started together with the launch: the source does not exist yet; sync --watch says it waits, then mirrors."""
    src, dst = tmp_path / "run", tmp_path / "mirror"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "finetrack", "sync", str(src), str(dst), "--watch", "0.2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert _read_until(proc.stdout, "waiting for")[-1] == f"waiting for {src} to appear (Ctrl+C to stop)"
        make_checkpoint(src, 3)  # the run appears (its first checkpoint)
        lines = _read_until(proc.stdout, "fetched step-000003")
        assert f"{src} appeared" in lines and any(x.startswith("watching ") for x in lines)
        proc.send_signal(signal.SIGINT)  # Ctrl+C
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert (dst / "checkpoints/step-000003/MANIFEST.json").is_file()


def test_eval_watch_waits_for_the_run_then_follows_it_to_its_last_checkpoint(tmp_path, tiny_model_dir, chat_file):
    """`finetrack eval RUN --watch S` started before training: it waits, then evaluates each checkpoint and ends."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FINETRACK_RUNTIME_DIR": str(tmp_path / "registry")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetrack", "eval", str(run), "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert _read_until(proc.stdout, "waiting for")[-1] == f"waiting for {run} to appear (Ctrl+C to stop)"
        tiny_run(
            tmp_path,
            tiny_model_dir,
            chat_file,
            "checkpoint.every_steps=2",
            "data.eval_split=0.25",
            'eval.suites=[{"name": "heldout", "kind": "loss"}]',
        )
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "the run's last checkpoint (step 4) is evaluated: done watching" in out
    assert sorted(p.name for p in (run / "eval").glob("step-*.json")) == ["step-000000.json", "step-000002.json", "step-000004.json"]


def test_ctrl_c_while_importing_is_one_line_not_a_traceback(tmp_path, tiny_model_dir, chat_file):
    """SIGINT lands while torch / transformers are being imported, before the run's own handlers exist."""
    cfg = tiny_config(tmp_path, tiny_model_dir, chat_file)
    script = (
        "import sys; sys.argv[0] = 'finetrack'; from finetrack.cli import main; print('started', flush=True); "
        "import time; time.sleep(0.3); sys.exit(main())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "train", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.5)  # inside main(): importing torch and transformers takes seconds here
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and [x for x in err.splitlines() if x.startswith("stopped:")] == [err.strip().splitlines()[-1]], err


def test_third_party_noise_only_with_verbose(tmp_path):
    """Libraries' warnings stay out of the output unless --verbose; finetrack's own warnings always show."""
    script = (
        "import logging, sys, warnings; from finetrack.cli import _setup_output; _setup_output(sys.argv[1] == 'verbose'); "
        "warnings.warn_explicit('lib deprecation', FutureWarning, 'lib.py', 1, module='transformers.modeling_utils'); "
        "warnings.warn_explicit('lib user warning', UserWarning, 'lib.py', 2, module='peft.tuners'); "
        "logging.getLogger('transformers').warning('lib log line'); "
        "logging.getLogger('finetrack').warning('our own warning')"
    )
    for mode in ("quiet", "verbose"):
        r = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=60)
        assert "our own warning" in r.stderr, r.stderr
        for noise in ("lib deprecation", "lib user warning", "lib log line"):
            assert (noise in r.stderr) == (mode == "verbose"), (mode, r.stderr)


def test_a_training_run_prints_no_library_noise(tmp_path, tiny_model_dir, chat_file):
    cfg = tiny_config(tmp_path, tiny_model_dir, chat_file)
    env = {**os.environ, "FINETRACK_RUNTIME_DIR": str(tmp_path / "registry")}
    r = subprocess.run(
        [sys.executable, "-m", "finetrack", "train", str(cfg)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for noise in ("Warning:", "warnings.warn", "Loading weights", "it/s]"):
        assert noise not in r.stderr, r.stderr


def test_a_message_of_several_lines_is_shown_as_one_readable_line():
    from finetrack.errors import one_line

    assert one_line("a.yaml: 2 problems in the config:\n  a.yaml:2: x\n  a.yaml:3:  y  z\n") == (
        "a.yaml: 2 problems in the config: a.yaml:2: x; a.yaml:3: y z"
    )
