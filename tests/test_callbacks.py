"""Callbacks during training (`train.callbacks` in the config, `train.run(cfg, callbacks=[...])` from Python): the hooks
in order with their views, metrics they log, a stop they request, a callback that raises, on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import operator
from pathlib import Path

import pytest
from conftest import read_jsonl

from finetrack import checkpoint, cli, rundir
from finetrack.callbacks import CallbackError
from finetrack.config import load_config
from finetrack.errors import UserError
from finetrack.train import run

# a file of callbacks, named in configs as '<file>.py:Name'
CALLBACKS_PY = '''
import json
from pathlib import Path


class Recorder:
    """Writes one JSON line per hook call; logs a metric of its own every `log_every` steps."""

    def __init__(self, out, tag="config", log_every=0):
        self.out, self.tag, self.log_every = Path(out), tag, log_every

    def _write(self, **entry):
        with self.out.open("a") as f:
            f.write(json.dumps({"tag": self.tag, **entry}) + "\\n")

    def on_validation(self, view):
        self._write(hook="on_validation", step=view.step, validation=dict(view.validation))

    def on_step_end(self, view):
        self._write(hook="on_step_end", step=view.step, metrics=dict(view.metrics))
        if self.log_every and view.step % self.log_every == 0:
            view.log({"twice_the_step": 2.0 * view.step, "lora_weights": float(sum(
                p.detach().abs().sum() for n, p in view.model.named_parameters() if "lora_B" in n))})

    def on_checkpoint(self, view):
        self._write(hook="on_checkpoint", step=view.step, checkpoint=str(view.checkpoint),
                    manifest=(view.checkpoint / "MANIFEST.json").is_file())

    def on_stop(self, view):
        self._write(hook="on_stop", step=view.step, stop_reason=dict(view.stop_reason), checkpoint=str(view.checkpoint))


class Stopper:
    def __init__(self, at_step, reason):
        self.at_step, self.reason = at_step, reason

    def on_step_end(self, view):
        if view.step == self.at_step:
            view.request_stop(self.reason)


class Raiser:
    """Raises in on_step_end at `at_step` while the file `armed` exists."""

    def __init__(self, at_step, armed):
        self.at_step, self.armed = at_step, Path(armed)

    def on_step_end(self, view):
        if view.step == self.at_step and self.armed.exists():
            raise ValueError("boom at the step")


class NoHooks:
    def on_epoch_end(self, view):
        pass
'''

BASE = ("data.max_length=512", "train.micro_batch_size=4", "train.lr=1e-2", "train.warmup_steps=0")


@pytest.fixture
def callbacks_file(tmp_path) -> Path:
    path = tmp_path / "my_callbacks.py"
    path.write_text(CALLBACKS_PY)
    return path


def train(tmp_path: Path, model_dir: Path, data: Path, *overrides: str, callbacks=(), name: str = "run"):
    """train.run on the tiny model with Python callbacks: (RunResult, metrics.jsonl records)."""
    cfg = load_config(None, [f"model.name={model_dir}", f"data.path={data}", f"output.dir={tmp_path / name}", *BASE, *overrides])
    result = run(cfg, callbacks=callbacks)
    return result, read_jsonl(result.run_dir / "metrics.jsonl")


def one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


class PythonRecorder:
    """A callback given from Python: appends to the same file as the config's Recorder, and checks the view is read-only."""

    def __init__(self, out: Path):
        self.out, self.refused = out, []

    def _write(self, **entry):
        with self.out.open("a") as f:
            f.write(json.dumps({"tag": "python", **entry}) + "\n")

    def on_validation(self, view):
        self._write(hook="on_validation", step=view.step)
        for change in (lambda: operator.setitem(view.validation, "eval_loss", 0.0), lambda: setattr(view, "step", 99)):
            try:
                change()
            except (TypeError, dataclasses.FrozenInstanceError) as e:
                self.refused.append(type(e).__name__)

    def on_step_end(self, view):
        self._write(hook="on_step_end", step=view.step)

    def on_checkpoint(self, view):
        self._write(hook="on_checkpoint", step=view.step)

    def on_stop(self, view):
        self._write(hook="on_stop", step=view.step)


def test_hooks_from_config_and_python_run_in_order_with_their_views(tmp_path, tiny_model_dir, chat_file, callbacks_file):
    """Every hook at its moment, the config's callback before the Python one; on_validation sees the validation values,
    on_step_end the step's metrics line, on_checkpoint a complete checkpoint, on_stop the end; view.log lands in the
    step's metrics.jsonl line."""
    events = tmp_path / "events.jsonl"
    python = PythonRecorder(events)
    result, metrics = train(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "train.max_steps=4",
        "data.eval_split=0.25",
        "eval.loss_every_steps=2",
        "checkpoint.every_steps=2",
        f"train.callbacks=[{{function: '{callbacks_file}:Recorder', options: {{out: '{events}', log_every: 2}}}}]",
        callbacks=[python],
    )
    seen = read_jsonl(events)
    expected = []
    for step in range(1, 5):
        hooks = ["on_validation", "on_step_end", "on_checkpoint"] if step % 2 == 0 else ["on_step_end"]
        expected += [(tag, hook, step) for hook in hooks for tag in ("config", "python")]
    expected += [("config", "on_stop", 4), ("python", "on_stop", 4)]
    assert [(e["tag"], e["hook"], e["step"]) for e in seen] == expected
    mine = {(e["hook"], e["step"]): e for e in seen if e["tag"] == "config"}
    by_step = {m["step"]: m for m in metrics}
    for step in (2, 4):
        assert mine["on_validation", step]["validation"] == {k: by_step[step][k] for k in ("eval_loss", "eval_ppl")}
        assert mine["on_checkpoint", step]["checkpoint"] == str(result.run_dir / f"checkpoints/{rundir.step_name(step)}")
        assert mine["on_checkpoint", step]["manifest"] is True
    for step in range(1, 5):  # the line as written (the log adds the time), before the callback's own metrics were added
        written = {k: v for k, v in by_step[step].items() if k not in ("time", "twice_the_step", "lora_weights")}
        assert mine["on_step_end", step]["metrics"] == written and {"loss", "lr", "grad_norm"} <= written.keys()
    stop = mine["on_stop", 4]
    assert stop["stop_reason"]["kind"] == "end" and stop["stop_reason"]["step"] == 4
    assert stop["checkpoint"] == str(result.final_checkpoint) and result.stop_reason is None
    # view.log: into that step's line only
    assert {m["step"]: m["twice_the_step"] for m in metrics if "twice_the_step" in m} == {2: 4.0, 4: 8.0}
    lora = [by_step[s]["lora_weights"] for s in (2, 4)]
    assert 0 < lora[0] != lora[1]  # the live model: lora_B starts at zero and trains
    assert python.refused == ["TypeError", "FrozenInstanceError"] * 2


STOP_CONFIG = """\
model:
  name: {model}
data:
  path: {data}
  max_length: 512
train:
  micro_batch_size: 4
  max_steps: 8
  lr: 1.0e-2
  callbacks:
    - function: {file}:Stopper
      options: {{at_step: 3, reason: "the metric I watch is good enough"}}
checkpoint:
  every_steps: 2
output:
  dir: run
"""


def test_a_callback_that_requests_a_stop_ends_the_run_with_a_final_checkpoint(
    tmp_path, tiny_model_dir, chat_file, callbacks_file, capsys, monkeypatch
):
    """request_stop in on_step_end at step 3 (from a config file through the command line): the run ends there with a
    checkpoint whose meta.json records the callback and its reason; the same command again trains nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(STOP_CONFIG.format(model=tiny_model_dir, data=chat_file, file=callbacks_file))
    assert cli.main(["train", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    function = f"{callbacks_file}:Stopper"
    assert f"stopped early at step 3 of 8: callback {function} asked to stop: the metric I watch is good enough" in out, out
    run_dir = tmp_path / "run"
    assert [s for s, _ in rundir.step_folders(run_dir)] == [2, 3]
    meta = rundir.read_meta(run_dir / "checkpoints/step-000003")
    assert {"callback_stop", "last"} <= set(meta["rules"])
    reason = meta["stop_reason"]
    assert (reason["kind"], reason["step"], reason["callback"], reason["reason"]) == (
        "callback",
        3,
        function,
        "the metric I watch is good enough",
    )
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert cli.main(["train", "cfg.yaml"]) == 0
    assert "already complete: stopped early at step 3" in capsys.readouterr().out
    assert [s for s, _ in rundir.step_folders(run_dir)] == [2, 3]


def test_a_python_callback_stops_in_on_validation_and_on_stop_says_why(tmp_path, tiny_model_dir, chat_file):
    class StopWhenLow:
        def __init__(self):
            self.stop_reason = None

        def on_validation(self, view):
            if view.validation["eval_loss"] < 100:
                view.request_stop(f"eval_loss {view.validation['eval_loss']:.3f} is low enough")

        def on_stop(self, view):
            self.stop_reason = dict(view.stop_reason)

    cb = StopWhenLow()
    result, metrics = train(
        tmp_path, tiny_model_dir, chat_file, "train.max_steps=8", "data.eval_split=0.25", "eval.loss_every_steps=2", callbacks=[cb]
    )
    assert result.stop_reason is not None and result.stop_reason == cb.stop_reason
    assert (result.stop_reason["kind"], result.stop_reason["step"], result.stop_reason["callback"]) == ("callback", 2, "StopWhenLow")
    assert result.stop_reason["reason"] == f"eval_loss {metrics[-1]['eval_loss']:.3f} is low enough"
    assert result.final_checkpoint == result.run_dir / "checkpoints/step-000002" and metrics[-1]["step"] == 2


def test_a_callback_that_raises_stops_with_one_error_line_after_a_checkpoint(tmp_path, tiny_model_dir, chat_file, callbacks_file, capsys):
    """A callback raising in on_step_end at step 3: exit 2, one error line naming the callback and the hook, no traceback,
    step 3's checkpoint written first (rule "error"); once fixed, the same command continues from it."""
    armed = tmp_path / "armed"
    armed.touch()
    argv = [
        "train",
        f"model.name={tiny_model_dir}",
        f"data.path={chat_file}",
        f"output.dir={tmp_path / 'run'}",
        *BASE,
        "train.max_steps=5",
        "checkpoint.every_steps=2",
        f"train.callbacks=[{{function: '{callbacks_file}:Raiser', options: {{at_step: 3, armed: '{armed}'}}}}]",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    line = one_error(err)
    assert f"callback {callbacks_file}:Raiser raised in on_step_end at step 3: ValueError: boom at the step" in line
    run_dir = tmp_path / "run"
    assert [f.step for f in checkpoint.complete_checkpoints(run_dir)] == [2, 3]
    assert "error" in rundir.read_meta(run_dir / "checkpoints/step-000003")["rules"]
    armed.unlink()
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.err and "step 3 of 5" in captured.err, captured.err[-2000:]
    assert "done: 5 steps" in captured.out
    assert [f.step for f in checkpoint.complete_checkpoints(run_dir)] == [2, 3, 4, 5]


def test_the_step_a_callback_raised_at_keeps_its_metrics_line(tmp_path, tiny_model_dir, chat_file):
    """The checkpoint written before the error holds the step's flushed metrics window: the step's line must be in
    metrics.jsonl already, or the resumed run (which starts after it) never writes it."""

    class RaiseAt2:
        def __init__(self):
            self.armed = True

        def on_step_end(self, view):
            if view.step == 2 and self.armed:
                raise ValueError("boom")

    cb = RaiseAt2()
    with pytest.raises(CallbackError):
        train(tmp_path, tiny_model_dir, chat_file, "train.max_steps=3", callbacks=[cb])
    cb.armed = False
    _, metrics = train(tmp_path, tiny_model_dir, chat_file, "train.max_steps=3", callbacks=[cb])
    assert [m["step"] for m in metrics] == [1, 2, 3]


def test_request_stop_in_on_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir, chat_file):
    class StopOnCheckpoint:
        def on_checkpoint(self, view):
            view.request_stop("too late")

    with pytest.raises(CallbackError) as e:
        train(tmp_path, tiny_model_dir, chat_file, "train.max_steps=4", "checkpoint.every_steps=2", callbacks=[StopOnCheckpoint()])
    assert str(e.value).startswith(
        "callback StopOnCheckpoint raised in on_checkpoint at step 2: "
        "RuntimeError: request_stop works in on_validation and on_step_end, not in on_checkpoint"
    )
    assert [f.step for f in checkpoint.complete_checkpoints(tmp_path / "run")] == [2]  # on_checkpoint: after it is complete


def test_log_outside_on_step_end_and_on_validation_is_refused(tmp_path, tiny_model_dir, chat_file):
    class LogOnStop:
        def on_stop(self, view):
            view.log({"x": 1.0})

    with pytest.raises(CallbackError, match=r"callback LogOnStop raised in on_stop at step 2: RuntimeError: log works in .*not in on_stop"):
        train(tmp_path, tiny_model_dir, chat_file, "train.max_steps=2", callbacks=[LogOnStop()])


def test_a_callback_without_hooks_is_one_error_line(tmp_path, tiny_model_dir, chat_file, callbacks_file, capsys):
    argv = ["train", f"model.name={tiny_model_dir}", f"data.path={chat_file}", f"output.dir={tmp_path / 'run'}"]
    assert cli.main([*argv, f"train.callbacks=['{callbacks_file}:NoHooks']"]) == 2
    line = one_error(capsys.readouterr().err)
    assert f"callback {callbacks_file}:NoHooks: NoHooks has none of the hooks on_validation, on_step_end, on_checkpoint, on_stop" in line
    assert not (tmp_path / "run").exists()  # refused before any work
    # options the class does not take
    assert cli.main([*argv, f"train.callbacks=[{{function: '{callbacks_file}:Stopper', options: {{at: 3}}}}]"]) == 2
    line = one_error(capsys.readouterr().err)
    assert f"callback {callbacks_file}:Stopper: creating it with options {{'at': 3}} raised TypeError" in line
    # from Python: the same refusal
    with pytest.raises(UserError, match="callback object: object has none of the hooks"):
        train(tmp_path, tiny_model_dir, chat_file, "train.max_steps=1", callbacks=[object()])
