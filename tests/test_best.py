"""The read side of checkpoints/best.json and of a checkpoint's stop_reason: `eval --steps best`, `gate --step best`,
`--resume-from RUN/best` refused, `sync` and the background uploader carrying best.json after its checkpoint, and the
report marking the best step and showing why a run stopped. Run directories are built by hand (best.json, eval
records, metrics.jsonl, checkpoint meta) where training's own writer is not needed to check the reader."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from html import unescape
from pathlib import Path

import browser
import fsspec
import pytest
import yaml
from conftest import make_checkpoint, tiny_run

from finetrack import checkpoint, cli, flags, rundir, storage
from finetrack.resume import Request
from finetrack.schema import ConfigError


def write_best(run_dir: Path, step: int, metric: str = "eval_loss", value: float = 0.51, mode: str = "min") -> Path:
    """best.json as training writes it (rundir.BEST_FORMAT, the checkpoint it names), atomically."""
    path = rundir.best_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    best = {
        "format": rundir.BEST_FORMAT,
        "step": step,
        "metric": metric,
        "mode": mode,
        "value": value,
        "checkpoint": f"checkpoints/{rundir.step_name(step)}",
    }
    rundir.write_atomic(path, json.dumps(best, indent=2) + "\n")
    return path


def write_eval(run_dir: Path, step: int, metrics: dict) -> None:
    path = rundir.eval_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"step": step, "checkpoint": None if step == 0 else f"checkpoints/{rundir.step_name(step)}", "metrics": metrics})
    )


def cli_run(capsys, *argv: str) -> tuple[int, str, str]:
    """`finetrack ARGV` through the real entry point: (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # a flag refused while parsing: argparse exits after its one error line
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> str:
    """The single `error:` line a user error ends in (no traceback; progress lines of a model load may precede it)."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_flags_take_best_wherever_a_step_is_taken():
    assert flags.step_list("best") == "best" and flags.step_list("0,best") == "0,best" and flags.step_list("best, 4") == "best, 4"
    p = flags.parser()
    assert p.parse_args(["gate", "run", "--metric", "m", "--step", "best"]).step == "best"
    for bad in ("bets", "0,best4", "best,"):
        with pytest.raises(Exception, match="best"):
            flags.step_list(bad)


def test_bad_steps_text_is_one_error_line_naming_best(tmp_path, capsys):
    code, _, err = cli_run(capsys, "eval", tmp_path, "--steps", "0,bets")
    assert code == 2 and "best (alone or in the list, e.g. 0,best)" in one_error(err)
    code, _, err = cli_run(capsys, "gate", tmp_path, "--metric", "x.loss", "--step", "bets")
    assert code == 2 and "'bets' is not 'latest' or a step number" in one_error(err) and "'best'" in err


# ------------------------------------------------------------------------------- rundir.parse_steps
def test_parse_steps_resolves_best_and_checks_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        make_checkpoint(run, step)
    with pytest.raises(rundir.CheckpointError, match=r"has no checkpoints/best.json: set checkpoint.best in the config"):
        rundir.parse_steps(run, "best")
    write_best(run, 2)
    assert rundir.parse_steps(run, "best") == [2]
    assert rundir.parse_steps(run, "4,best,0,2") == [0, 2, 4]
    assert rundir.resolve_step(run, "best") == 2 and rundir.resolve_step(run, "4") == 4
    (rundir.checkpoint_dir(run, 2) / "model.safetensors").write_bytes(b"cut")  # truncated: incomplete
    with pytest.raises(rundir.CheckpointError, match=r"best.json names step 2, whose checkpoint is gone or incomplete .*model.safetensors"):
        rundir.parse_steps(run, "0,best")
    rundir.best_path(run).write_text('{"format": "finetrack-best/1", "step": "two"}')
    with pytest.raises(rundir.CheckpointError, match="not a finetrack-best/1 record; delete it"):
        rundir.parse_steps(run, "best")


# --------------------------------------------------------------------------------- eval --steps best
def test_eval_steps_best_through_the_cli(tmp_path, tiny_model_dir, chat_file, capsys):
    """A real run (checkpoints at 2 and 4), best.json naming step 2: `--steps best` evaluates exactly that checkpoint,
    `--steps 0,best` the base model too; no best.json, or one naming a checkpoint that is gone, is one error line."""
    suites = json.dumps([{"name": "heldout", "kind": "loss"}])
    result, _ = tiny_run(tmp_path, tiny_model_dir, chat_file, "checkpoint.every_steps=2", "data.eval_split=0.25", f"eval.suites={suites}")
    run = result.run_dir
    assert sorted(s for s, _ in checkpoint.step_folders(run)) == [2, 4]
    capsys.readouterr()  # training's own output

    code, _, err = cli_run(capsys, "eval", run, "--steps", "best")
    assert code == 2 and f"{run} has no checkpoints/best.json: set checkpoint.best in the config" in one_error(err)
    assert not rundir.eval_files(run)

    write_best(run, 2)
    code, out, err = cli_run(capsys, "eval", run, "--steps", "best")
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["2"], out  # the printed table: step 2 only
    assert list(rundir.eval_files(run)) == [2]  # the best step only: not the newest, not the base model
    assert rundir.read_eval(rundir.eval_path(run, 2))["checkpoint"] == "checkpoints/step-000002"
    code, _, err = cli_run(capsys, "eval", run, "--steps", "0,best")
    assert code == 0, err
    assert list(rundir.eval_files(run)) == [0, 2]

    checkpoint.discard(rundir.checkpoint_dir(run, 2))  # deleted by hand: best.json names a checkpoint that is gone
    code, _, err = cli_run(capsys, "eval", run, "--steps", "0,best")
    line = one_error(err)
    assert code == 2 and f"{rundir.best_path(run)} names step 2, whose checkpoint is gone or incomplete" in line
    assert "restore step-000002" in line


# ---------------------------------------------------------------------------------- gate --step best
def test_gate_step_best_judges_the_best_steps_record(tmp_path, capsys):
    run = tmp_path / "run"
    write_eval(run, 0, {"heldout.loss": 2.0})
    write_eval(run, 20, {"heldout.loss": 1.5})  # the best: 25% better than the base model
    write_eval(run, 40, {"heldout.loss": 1.95})  # the latest: 2.5%, short of 5%

    code, out, err = cli_run(capsys, "gate", run, "--metric", "heldout.loss", "--step", "best")
    assert code == 2 and "has no checkpoints/best.json" in one_error(err) and out == ""

    write_best(run, 20, "eval_loss", 0.75)
    code, out, err = cli_run(capsys, "gate", run, "--metric", "heldout.loss", "--step", "best")
    assert code == 0, err
    assert "evaluated: step 20 (best: eval_loss 0.75 (min)): 1.5" in out and out.splitlines()[-1].startswith("GO: ")
    code, out, _ = cli_run(capsys, "gate", run, "--metric", "heldout.loss")  # latest is still the default
    assert code == 1 and "evaluated: step 40: 1.95" in out

    write_best(run, 30)  # a best step nobody evaluated yet
    code, out, err = cli_run(capsys, "gate", run, "--metric", "heldout.loss", "--step", "best")
    assert code == 2 and "no eval file for the best step 30 (checkpoints/best.json)" in one_error(err)
    assert f"finetrack eval {run} --steps best" in err
    rundir.best_path(run).write_text("{not json")
    code, _, err = cli_run(capsys, "gate", run, "--metric", "heldout.loss", "--step", "best")
    assert code == 2 and "best.json: unreadable" in one_error(err)


# ------------------------------------------------------------------------------ --resume-from refused
@pytest.mark.parametrize("suffix", ["best", "checkpoints/best.json", "checkpoints/best", "checkpoints/best.json/"])
def test_resume_from_the_best_is_refused_with_a_hint(tmp_path, capsys, suffix):
    run = tmp_path / "run"
    make_checkpoint(run, 2)
    make_checkpoint(run, 4)
    write_best(run, 2)
    code, _, err = cli_run(capsys, "train", "--resume-from", f"{run}/{suffix}", f"output.dir={tmp_path / 'new'}")
    line = one_error(err)
    assert code == 2 and f"--resume-from {run}/{suffix}: resume continues the newest checkpoint of a run: --resume-from {run} " in line
    assert f"({run}/checkpoints/step-000002, named by checkpoints/best.json)" in line  # the real best folder, from best.json
    assert f"finetrack eval {run} --steps best" in line
    assert not (tmp_path / "new").exists()  # refused before anything was read or written


def test_resume_refusal_only_for_best(tmp_path):
    with pytest.raises(ConfigError, match=r"s3://b/run/checkpoints/step-NNNNNN"):
        Request(resume_from="s3://b/run/checkpoints/best.json")
    with pytest.raises(ConfigError, match=r"--resume-from RUN \(or its checkpoints/step-NNNNNN\)"):
        Request(resume_from="best")
    make_checkpoint(tmp_path / "best", 2)  # a run directory that happens to be called best is a run directory
    assert Request(resume_from=str(tmp_path / "best")).resume_from == str(tmp_path / "best")
    assert Request(resume_from=str(tmp_path / "best" / "checkpoints" / "step-000002")).resume_from


# ------------------------------------------------------------------------------------------- sync
def test_sync_mirrors_best_json_only_after_the_checkpoint_it_names(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_checkpoint(src, 2)
    step4 = make_checkpoint(src, 4)
    best = write_best(src, 4, value=0.25)
    manifest = (step4 / checkpoint.MANIFEST).read_bytes()
    (step4 / checkpoint.MANIFEST).unlink()  # step 4 not complete on the source yet (an upload in progress)
    (dst / "checkpoints").mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    stale = dst / "checkpoints" / f".tmp-best.json-{dead}"  # left by a sync that was killed mid-write
    stale.write_text("{")

    code, out, err = cli_run(capsys, "sync", src, dst)
    assert code == 0, err
    assert "fetched step-000002" in out and not rundir.best_path(dst).exists()  # DST never names a checkpoint it lacks
    assert "skipped checkpoints/best.json: it names step-000004, which" in out and "does not hold yet" in out
    assert not stale.exists() and f"removed {stale}" in out

    (step4 / checkpoint.MANIFEST).write_bytes(manifest)  # step 4 completes
    code, out, err = cli_run(capsys, "sync", src, dst)
    assert code == 0, err
    assert out.index("fetched step-000004") < out.index("fetched checkpoints/best.json (best: step 4, eval_loss 0.25 (min))")
    assert rundir.best_path(dst).read_bytes() == best.read_bytes()
    code, out, _ = cli_run(capsys, "sync", src, dst)  # nothing changed: nothing said about it
    assert code == 0 and "best.json" not in out

    best.write_text('{"format": "other"}')
    code, out, _ = cli_run(capsys, "sync", src, dst)
    assert code == 0 and "skipped checkpoints/best.json: " in out and "not a finetrack-best/1 record" in out
    assert rundir.read_best(dst)["step"] == 4  # DST keeps the last good one


# --------------------------------------------------------------------------------- remote uploads
def _remote_best(fs, root: str) -> dict | None:
    storage.forget_listings(fs, root)  # this test's filesystem object is the uploader's: its listings may be stale
    try:
        return json.loads(fs.cat_file(f"{root}/checkpoints/best.json"))
    except FileNotFoundError:
        return None


def test_uploader_uploads_best_json_after_the_checkpoint_it_names(tmp_path, s3, proxy, capsys):
    """Training writes best.json naming step 4 while the uploader is still busy with step 3 (step 4 queued): the remote
    best.json keeps naming step 2, a checkpoint it holds, through step 3's and step 4's uploads; once step 4's
    manifest is there, best.json follows. `sync` from the remote then mirrors it."""
    run = tmp_path / "run"
    fs, root = fsspec.core.url_to_fs(s3)
    uploader = storage.Uploader(s3, run, retries=1, backoff_s=0)
    folder = make_checkpoint(run, 2)
    write_best(run, 2, value=0.9)  # as training does: after the checkpoint is complete, before it is submitted
    uploader.submit(folder)
    deadline = time.monotonic() + 60
    while _remote_best(fs, root) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _remote_best(fs, root)["step"] == 2 and storage.remote_steps(s3) == [2]

    proxy.slow_puts(r"/checkpoints/step-00000[34]/", 0.25)
    uploader.submit(make_checkpoint(run, 3))
    folder = make_checkpoint(run, 4)
    write_best(run, 4, value=0.5)  # the best now, while step 3 is still uploading
    uploader.submit(folder)
    seen, polls = set(), 0
    while 4 not in storage.remote_steps(s3) and time.monotonic() < deadline:
        remote = _remote_best(fs, root)
        on_remote = storage.remote_steps(s3)
        assert remote["step"] in on_remote, (remote, on_remote)  # never a checkpoint the remote lacks
        seen.add(remote["step"])
        polls += 1
        time.sleep(0.05)
    assert 3 in storage.remote_steps(s3) and polls > 10 and 2 in seen and seen <= {2, 4}  # watched through both uploads
    assert uploader.wait() == []
    assert fs.cat_file(f"{root}/checkpoints/best.json") == rundir.best_path(run).read_bytes()

    code, out, err = cli_run(capsys, "sync", s3, tmp_path / "mirror")
    assert code == 0, err
    assert "fetched checkpoints/best.json (best: step 4, eval_loss 0.5 (min))" in out, out
    assert rundir.read_best(tmp_path / "mirror") == rundir.read_best(run)

    storage.delete_remote_checkpoints(s3)  # --fresh --delete-remote: best.json goes too
    assert _remote_best(fs, root) is None and storage.remote_steps(s3) == []


def test_a_watching_sync_sees_what_finished_uploading_after_it_listed(tmp_path, s3, capsys):
    """`sync --watch` polls in one process while training uploads from another: a pass that listed step 4 mid-upload
    (no MANIFEST.json yet) and checkpoints/ without best.json must not hide them from later passes (s3fs keeps the
    listings of subfolders, and only the uploading process's own writes would refresh them)."""
    run, dst = tmp_path / "run", tmp_path / "dst"
    make_checkpoint(run, 2)
    make_checkpoint(run, 4)

    def training_process(code: str) -> None:  # the uploads, from another process (the s3 fixture's environment)
        prelude = f"from pathlib import Path; from finetrack import storage; url, run = {s3!r}, Path({str(run)!r}); "
        subprocess.run([sys.executable, "-c", prelude + code], check=True, timeout=120)

    training_process(
        "storage.push_checkpoint(run / 'checkpoints/step-000002', url); fs, root = storage.open_url(url); "
        "fs.put_file(str(run / 'checkpoints/step-000004/config.json'), root + '/checkpoints/step-000004/config.json')"
    )
    code, out, err = cli_run(capsys, "sync", s3, dst)  # lists step-000004/ without its manifest, checkpoints/ without best.json
    assert code == 0 and "fetched step-000002" in out and "fetched step-000004" not in out, out + err

    write_best(run, 4, value=0.3)
    training_process("storage.push_checkpoint(run / 'checkpoints/step-000004', url); storage.push_best(run, url, {2, 4})")
    code, out, err = cli_run(capsys, "sync", s3, dst)  # the same process: a watch's next pass
    assert code == 0 and "fetched step-000004" in out and "fetched checkpoints/best.json (best: step 4, eval_loss 0.3 (min))" in out, out
    assert rundir.best_path(dst).read_bytes() == rundir.best_path(run).read_bytes()


def test_uploader_never_uploads_a_garbled_best_json(tmp_path, s3, caplog):
    run = tmp_path / "run"
    fs, root = fsspec.core.url_to_fs(s3)
    rundir.best_path(run).parent.mkdir(parents=True)
    rundir.best_path(run).write_text("{garbled")
    uploader = storage.Uploader(s3, run, retries=1, backoff_s=0)
    uploader.submit(make_checkpoint(run, 2))
    assert uploader.wait() == []
    assert storage.remote_steps(s3) == [2] and _remote_best(fs, root) is None
    assert "not uploading best.json" in caplog.text and "unreadable" in caplog.text


# ------------------------------------------------------------------------------------------ report
def synthetic_run(root: Path, best_step: int | None = 4) -> Path:
    """A run that validated every 2 steps and stopped early at step 6: metrics.jsonl with `val/reg.mse`, checkpoints
    2, 4, 6 (6 holding the stop_reason), eval records of 0, 4 and 6, and best.json naming `best_step`."""
    run = root
    run.mkdir(parents=True)
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny", "method": "lora"}, "eval": {"suites": []}}))
    mse = {2: 0.61, 4: 0.4321, 6: 0.55}
    lines = [
        {"step": s, "loss": 2.0 - s / 10, **({"eval_loss": 1.9 - s / 20, "val/reg.mse": mse[s]} if s in mse else {})} for s in range(1, 7)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    history = [[2, 0.61], [4, 0.4321], [6, 0.55]]
    stop = {
        "kind": "early_stopping",
        "step": 6,
        "message": "val/reg.mse did not improve by more than 0 for 1 validation(s)",
        "metric": "val/reg.mse",
        "mode": "min",
        "patience": 1,
        "min_delta": 0.0,
        "best_step": 4,
        "best_value": 0.4321,
        "history": history,
    }
    for step in (2, 4, 6):
        meta = {"rules": ["best"] if step < 6 else ["early_stop", "last"], "epoch": step / 6, "validation": {"val/reg.mse": mse[step]}}
        checkpoint.save(
            run, step, lambda d: (d / "w.json").write_text("{}"), None, {**meta, **({"stop_reason": stop} if step == 6 else {})}
        )
    write_eval(run, 0, {"reg.mse": 0.9})
    write_eval(run, 4, {"reg.mse": 0.4444})
    write_eval(run, 6, {"reg.mse": 0.5555})
    if best_step is not None:
        write_best(run, best_step, "val/reg.mse", mse[best_step])
    return run


def chart(html: str, title: str) -> str:
    found = re.findall(rf'<svg class="chart"[^>]*aria-label="{re.escape(title)}".*?</svg>', html, re.DOTALL)
    assert len(found) == 1, (title, len(found))
    return found[0]


def diamonds(svg: str) -> list[str]:
    """Hover texts of the diamond markers of a chart."""
    return [unescape(t) for t in re.findall(r'<path d="M[^"]*l6,6 l-6,6 l-6,-6 z"[^>]*><title>(.*?)</title>', svg)]


def test_report_marks_the_best_step_and_shows_why_the_run_stopped(tmp_path):
    from finetrack.report import write_report

    run = synthetic_run(tmp_path / "run")
    best = json.loads(rundir.best_path(run).read_text())
    html = write_report([run], tmp_path / "r.html").read_text()

    # the validation chart: one series of the run, and the best marker at best.json's own step and value
    val = chart(html, "val/reg.mse")
    assert diamonds(val) == [f"best (best.json): step {best['step']}, {best['value']} (best: step 4, val/reg.mse 0.4321 (min))"]
    assert 'id="validation"' in html and 'href="#validation"' in html
    assert html.count('aria-label="val/reg.mse"') == 1  # not also drawn as an objective term in the training curves
    # the trajectory chart of reg.mse: the best checkpoint at its evaluated value (eval/step-000004.json)
    assert diamonds(chart(html, "reg.mse")) == [
        "best checkpoint (best.json): step 4, 0.4444 (the best checkpoint: step 4, val/reg.mse 0.4321 (min))"
    ]
    # the loss chart marks checkpoints, the best one saying so; eval_loss is not best.json's metric: no best marker there
    loss = chart(html, "Loss per target token (checkpoints ◆)")
    assert any("checkpoint 4 (best; on disk" in t and "the best: checkpoints/best.json" in t for t in diamonds(loss))
    assert not any("best (best.json)" in t for t in diamonds(loss))
    # header and facts: the best and why the run stopped, with the history that triggered it
    header = html[: html.index("</header>")]
    assert "best: step 4, val/reg.mse 0.4321 (min) · checkpoints/step-000004" in unescape(header)
    assert "stopped early at step 6: val/reg.mse did not improve by more than 0 for 1 validation(s)" in unescape(header)
    facts = unescape(html[html.index('id="facts-0"') :])
    assert "best checkpoint</td><td>step 4, val/reg.mse 0.4321 (min) · checkpoints/step-000004" in facts
    assert "val/reg.mse (min), patience 1, min_delta 0.0 · best 0.4321 at step 4 · history: 2: 0.61, 4: 0.4321, 6: 0.55" in facts
    assert '<td>step-000004 <b class="best">(best)</b></td>' in facts and "step-000006 <b" not in facts

    # the marker follows best.json: name step 2 instead and it moves there, everywhere
    write_best(run, 2, "val/reg.mse", 0.61)
    html = write_report([run], tmp_path / "r2.html").read_text()
    assert diamonds(chart(html, "val/reg.mse")) == ["best (best.json): step 2, 0.61 (best: step 2, val/reg.mse 0.61 (min))"]
    assert diamonds(chart(html, "reg.mse")) == []  # step 2 was never evaluated: nothing to mark on the trajectory
    assert '<td>step-000002 <b class="best">(best)</b></td>' in html and "step-000004 <b" not in html


def test_report_without_or_with_a_garbled_best_json(tmp_path):
    from finetrack.report import write_report

    run = synthetic_run(tmp_path / "run", best_step=None)
    html = write_report([run], tmp_path / "r.html").read_text()
    assert diamonds(chart(html, "val/reg.mse")) == [] and '<b class="best">' not in html
    assert "none (no checkpoints/best.json: checkpoint.best not set)" in html

    rundir.best_path(run).write_text("{garbled")
    html = write_report([run], tmp_path / "r2.html").read_text()
    problems = unescape(html[html.index('class="problems"') : html.index("</section>", html.index('class="problems"'))])
    assert "checkpoints/best.json: unreadable (" in problems and "no step marked best" in problems
    assert diamonds(chart(html, "val/reg.mse")) == []

    write_best(run, 4, "val/reg.mse", 0.4321)
    checkpoint.discard(rundir.checkpoint_dir(run, 4))
    html = write_report([run], tmp_path / "r3.html").read_text()
    assert "checkpoints/best.json: names step 4, whose checkpoint is gone or incomplete" in html


def test_report_of_two_runs_marks_each_runs_own_best(tmp_path):
    from finetrack.report import write_report

    a, b = synthetic_run(tmp_path / "a"), synthetic_run(tmp_path / "b", best_step=6)
    html = write_report([a, b], tmp_path / "r.html").read_text()
    marks = diamonds(chart(html, "val/reg.mse"))
    assert marks == [
        "a best: step 4, 0.4321 (best: step 4, val/reg.mse 0.4321 (min))",
        "b best: step 6, 0.55 (best: step 6, val/reg.mse 0.55 (min))",
    ]
    svg = chart(html, "val/reg.mse")
    assert svg.count('class="lg">a</text>') == 1 and svg.count('class="lg">b</text>') == 1  # one series per run


def test_stop_reason_of_a_callback(tmp_path):
    from finetrack.report.collect import load_run
    from finetrack.report.validation import stop_details, stop_text

    run = synthetic_run(tmp_path / "run")
    reason = {"kind": "callback", "step": 6, "message": "MyStop: target reached"}
    checkpoint.save(run, 8, lambda d: (d / "w.json").write_text("{}"), None, {"rules": ["callback_stop", "last"], "stop_reason": reason})
    data = load_run(run)
    assert data.stop_reason == reason
    assert stop_text(data.stop_reason) == "stopped by a callback at step 6: MyStop: target reached" and stop_details(reason) == ""
    checkpoint.save(run, 10, lambda d: (d / "w.json").write_text("{}"), None, {"rules": ["last"]})  # resumed past the stop
    assert load_run(run).stop_reason is None


needs_chromium = pytest.mark.skipif(
    browser.chromium() is None and not os.environ.get("CI"),  # on CI a missing browser fails the test instead
    reason="chromium not installed (scripts/test.sh installs Debian's chromium package when run as root)",
)


@needs_chromium
def test_report_with_validation_in_headless_chromium(tmp_path):
    from finetrack.report import write_report

    path = write_report([synthetic_run(tmp_path / "a"), synthetic_run(tmp_path / "b", best_step=6)], tmp_path / "r.html")
    page = browser.render(path)
    assert page.requests == [path.resolve().as_uri()]  # nothing fetched
    lay = page.layout
    assert lay["scroll_width"] <= lay["inner_width"]  # the header's best / stop lines do not widen the page
    # training: loss, lr, grad norm, throughput, memory; validation: val/reg.mse; trajectory: reg.mse
    assert lay["num_charts"] == 5 + 1 + 1 and lay["min_chart_width"] >= 500
