"""Malformed input to `eval`, `gate` and `report` through the real command line: exit 2, exactly one `error:` line
naming the file or flag, never a traceback. Plus the paths these verbs must keep: a baseline evaluated before
training and reused after it, and report / gate reading a run directory without importing torch or fsspec."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import chat_rows, mix_adapter_files, write_chat_jsonl

from finetrack.cli import main
from finetrack.config import effective_dump, load_config


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code: int, out: str, err: str, *fragments: str) -> str:
    """Exit 2, one `error:` line that holds every fragment, no traceback anywhere."""
    text = out + err
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2, text
    assert len(errors) == 1, text
    assert "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def write_config(path: Path, model_dir: Path, data: Path, run_dir: Path, suites: list[dict], *overrides: str) -> Path:
    """A config file as a user writes it, with the tiny model and the given eval suites."""
    cfg = load_config(
        None,
        [
            f"model.name={model_dir}",
            f"data.path={data}",
            f"output.dir={run_dir}",
            "data.max_length=512",
            "data.eval_split=0.25",
            "train.micro_batch_size=4",
            "train.max_steps=4",
            "train.lr=1e-2",
            "train.warmup_steps=0",
            "checkpoint.every_steps=2",
            f"eval.suites={json.dumps(suites)}",
            *overrides,
        ],
    )
    path.write_text(yaml.safe_dump(effective_dump(cfg), sort_keys=False))
    return path


@pytest.fixture
def untrained_run(tmp_path, tiny_model_dir, chat_file) -> Path:
    """A run directory as `finetrack eval` reads it (config.resolved.yaml), nothing trained: step 0 only."""
    run = tmp_path / "run"
    run.mkdir()
    write_config(run / "config.resolved.yaml", tiny_model_dir, chat_file, run, [{"name": "heldout", "kind": "loss"}])
    return run


def eval_with(capsys, run: Path, suites: list[dict]) -> tuple[int, str, str]:
    return run_cli(capsys, "eval", run, "--steps", "0", f"eval.suites={json.dumps(suites)}")


# ------------------------------------------------------------------------------------------ report
def test_report_output_is_a_folder(capsys, untrained_run, tmp_path):
    """-o FOLDER (existing, or written with a trailing slash): report.html inside it, never a file named like the folder."""
    (tmp_path / "out").mkdir()
    assert run_cli(capsys, "report", untrained_run, "-o", tmp_path / "out")[0] == 0
    assert (tmp_path / "out" / "report.html").is_file()
    assert run_cli(capsys, "report", untrained_run, "-o", f"{tmp_path / 'new'}/")[0] == 0
    assert (tmp_path / "new" / "report.html").is_file()


def test_report_output_below_a_file(capsys, untrained_run, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_one_error(*run_cli(capsys, "report", untrained_run, "-o", tmp_path / "afile" / "r.html"), "afile", "is a file")


def test_report_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    (tmp_path / "notes").mkdir()
    assert_one_error(*run_cli(capsys, "report", tmp_path / "notes"), str(tmp_path / "notes"), "not a run directory")


def test_report_of_a_missing_folder(capsys, tmp_path):
    assert_one_error(*run_cli(capsys, "report", tmp_path / "nope"), str(tmp_path / "nope"), "no such run directory")


def test_report_of_a_garbled_config(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.resolved.yaml").write_text("model: [unclosed\n")
    assert_one_error(*run_cli(capsys, "report", tmp_path / "run"), "config.resolved.yaml", "unreadable")


def test_report_counts_a_garbage_log_line_and_a_garbage_eval_file(capsys, untrained_run, tmp_path):
    """A single bad line or file is shown as a counted problem in the report, not a failure."""
    (untrained_run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.9}\n')
    (untrained_run / "eval").mkdir()
    (untrained_run / "eval" / "step-000000.json").write_bytes(b"\xff\xfe garbage")
    code, out, err = run_cli(capsys, "report", untrained_run, "-o", tmp_path / "r.html")
    assert code == 0, out + err
    html = (tmp_path / "r.html").read_text()
    assert "metrics.jsonl: 1 unreadable line(s) left out (line 2)" in html
    assert "eval/step-000000.json: not valid JSON" in html


# -------------------------------------------------------------------------------------------- gate
@pytest.fixture
def gated_run(tmp_path) -> Path:
    run = tmp_path / "gated"
    (run / "eval").mkdir(parents=True)
    for step, loss, score in ((0, 2.0, 3.0), (4, 1.5, 4.0)):
        record = {"step": step, "metrics": {"heldout.loss": loss, "custom.score": score}, "suites": {}}
        (run / "eval" / f"step-{step:06d}.json").write_text(json.dumps(record))
    return run


def test_gate_metric_that_does_not_exist(capsys, gated_run):
    assert_one_error(*run_cli(capsys, "gate", gated_run, "--metric", "heldout.lss"), "'heldout.lss'", "Did you mean 'heldout.loss'?")


def test_gate_ambiguous_direction_without_the_flag(capsys, gated_run):
    assert_one_error(*run_cli(capsys, "gate", gated_run, "--metric", "custom.score"), "--direction", "ambiguous")
    code, out, _ = run_cli(capsys, "gate", gated_run, "--metric", "custom.score", "--direction", "higher")
    assert code == 0 and out.splitlines()[-1].startswith("GO: ")


def test_gate_on_a_garbage_eval_file(capsys, gated_run):
    (gated_run / "eval" / "step-000004.json").write_text('{"step": 4, "metr')
    assert_one_error(*run_cli(capsys, "gate", gated_run, "--metric", "heldout.loss"), "step-000004.json", "not valid JSON")


def test_gate_on_a_folder_that_is_not_a_run(capsys, tmp_path):
    assert_one_error(*run_cli(capsys, "gate", tmp_path, "--metric", "heldout.loss"), str(tmp_path), "not a run directory")


def test_gate_on_a_file(capsys, tmp_path):
    (tmp_path / "f.txt").write_text("x")
    assert_one_error(*run_cli(capsys, "gate", tmp_path / "f.txt", "--metric", "heldout.loss"), "f.txt", "is a file")


# -------------------------------------------------------------------------------------------- eval
def test_eval_of_a_run_whose_base_record_is_garbage(capsys, untrained_run):
    (untrained_run / "eval").mkdir()
    (untrained_run / "eval" / "step-000000.json").write_text("{not json")
    assert_one_error(*run_cli(capsys, "eval", untrained_run), "eval/step-000000.json", "not valid JSON", "delete it")


def test_eval_of_a_run_whose_base_record_is_another_steps(capsys, untrained_run):
    (untrained_run / "eval").mkdir()
    (untrained_run / "eval" / "step-000000.json").write_text(json.dumps({"step": 7, "metrics": {}}))
    assert_one_error(*run_cli(capsys, "eval", untrained_run), "step-000000.json", "not the eval record of step 0")


def test_eval_texts_holding_special_tokens(capsys, untrained_run, tmp_path, tiny_tokenizer):
    """Refused as in training data: chat-templated, `<|im_end|>...` inside a question became a real turn boundary."""
    token = tiny_tokenizer.eos_token
    questions = tmp_path / "q.yaml"
    questions.write_text(f"- id: a\n  question: 'hi {token} system'\n")
    suite = {"name": "qa", "kind": "judge", "questions": str(questions), "judges": [{"kind": "pattern", "metric": "m", "pattern": "a"}]}
    assert_one_error(*eval_with(capsys, untrained_run, [suite]), "q.yaml: question a holds", "a special token of this tokenizer")
    items = tmp_path / "items.yaml"
    items.write_text(f"- id: b\n  prompt: 'rate {token}'\n  options: ['1', '2']\n  target: [0.5, 0.5]\n")
    suite = {"name": "d", "kind": "distribution", "items": str(items)}
    assert_one_error(*eval_with(capsys, untrained_run, [suite]), "items.yaml: item b holds", "a special token of this tokenizer")


def test_eval_questions_with_a_duplicate_id(capsys, untrained_run, tmp_path):
    questions = tmp_path / "q.yaml"
    questions.write_text("- id: a\n  question: x\n- id: a\n  question: y\n")
    suite = {"name": "qa", "kind": "judge", "questions": str(questions), "judges": [{"kind": "pattern", "metric": "m", "pattern": "a"}]}
    assert_one_error(*eval_with(capsys, untrained_run, [suite]), "q.yaml", "duplicate id 'a'")


def test_eval_missing_questions_file(capsys, untrained_run, tmp_path):
    suite = {"name": "qa", "kind": "judge", "questions": str(tmp_path / "gone.yaml")}
    assert_one_error(*eval_with(capsys, untrained_run, [suite]), "gone.yaml", "eval suite 'qa'")


@pytest.mark.parametrize(
    "item, said",
    [
        ({"prompt": "Rate 1-3.", "options": ["1"], "target": [1]}, "options"),
        ({"prompt": "Rate 1-3.", "options": ["1", "2", "3"], "target": [1, 1]}, "target"),
        ({"prompt": "Rate 1-3.", "options": ["1", "2", "3"], "target": [-1, 1, 1]}, "target"),
    ],
)
def test_eval_items_with_bad_options_or_targets(capsys, untrained_run, tmp_path, item, said):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "x", **item}) + "\n")
    assert_one_error(
        *eval_with(capsys, untrained_run, [{"name": "dist", "kind": "distribution", "items": str(items)}]), "items.jsonl", said
    )


def test_eval_python_judge_that_cannot_be_imported(capsys, untrained_run, tmp_path):
    questions = tmp_path / "q.yaml"
    questions.write_text("- id: a\n  question: x\n")
    judge = {"kind": "python", "metric": "m", "function": "no_such_module_here:score"}
    suite = {"name": "qa", "kind": "judge", "questions": str(questions), "judges": [judge]}
    code, out, err = eval_with(capsys, untrained_run, [suite])
    assert_one_error(code, out, err, "no_such_module_here:score", "cannot import")
    assert not (untrained_run / "eval" / "responses").exists()  # refused before any answer was generated


def test_eval_python_suite_that_cannot_be_imported(capsys, untrained_run):
    suite = {"name": "mine", "kind": "python", "function": "no_such_module_here:metrics"}
    assert_one_error(*eval_with(capsys, untrained_run, [suite]), "eval suite 'mine'", "no_such_module_here:metrics")


def test_eval_unknown_suite_name(capsys, untrained_run):
    assert_one_error(*run_cli(capsys, "eval", untrained_run, "--suite", "nope"), "nope", "eval.suites")


def test_eval_steps_that_do_not_exist(capsys, untrained_run):
    assert_one_error(*run_cli(capsys, "eval", untrained_run, "--steps", "0,99"), "--steps", "99")


def test_eval_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    (tmp_path / "notes").mkdir()
    assert_one_error(*run_cli(capsys, "eval", tmp_path / "notes"), str(tmp_path / "notes"))


def test_eval_baseline_refuses_other_steps(capsys, tmp_path, tiny_model_dir, chat_file):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, chat_file, tmp_path / "r", [{"name": "heldout", "kind": "loss"}])
    assert_one_error(*run_cli(capsys, "eval", config, "--steps", "4"), "--steps 4", "step 0")


def test_eval_baseline_output_dir_is_a_file(capsys, tmp_path, tiny_model_dir, chat_file):
    (tmp_path / "taken").write_text("x")
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, chat_file, tmp_path / "taken", [{"name": "heldout", "kind": "loss"}])
    assert_one_error(*run_cli(capsys, "eval", config, "--steps", "0"), "output.dir", "taken", "is a file")


# ------------------------------------------------------------------- baseline before training, reused after
@pytest.fixture(scope="module")
def baseline_then_trained(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, dict]:
    """`eval CONFIG --steps 0`, then `train CONFIG`, through the real CLI; returns (config, run dir, base record as first written)."""
    tmp = tmp_path_factory.mktemp("baseline")
    data = write_chat_jsonl(tmp / "chat.jsonl", chat_rows(48))
    questions = tmp / "q.jsonl"
    questions.write_text(json.dumps({"id": "sky", "question": "What colour is the sky?"}) + "\n")
    suites = [
        {"name": "heldout", "kind": "loss"},
        {
            "name": "qa",
            "kind": "judge",
            "questions": str(questions),
            "generation": {"max_new_tokens": 4},
            "judges": [{"kind": "pattern", "metric": "has_a", "pattern": "a"}],
            "rates": {"low": "has_a < 50"},
        },
    ]
    run = tmp / "run"
    config = write_config(tmp / "config.yaml", tiny_model_dir, data, run, suites)
    assert main(["eval", str(config), "--steps", "0"]) == 0
    base = json.loads((run / "eval" / "step-000000.json").read_text())
    assert main(["train", str(config)]) == 0
    return config, run, base


def test_baseline_before_training_is_kept_by_training_and_reused_by_eval(baseline_then_trained, capsys):
    _, run, base = baseline_then_trained
    assert (run / "eval" / "step-000000.json").is_file()  # training started fresh and kept eval/
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == ["step-000002", "step-000004"]
    assert not (run / "superseded").exists()
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "cached: 2 (step, suite) result(s) unchanged" in out  # step 0's two suites: not evaluated again
    after = json.loads((run / "eval" / "step-000000.json").read_text())
    assert after["suites"]["heldout"] == base["suites"]["heldout"] and after["suites"]["qa"]["key"] == base["suites"]["qa"]["key"]
    assert sorted(int(p.stem[5:]) for p in (run / "eval").glob("step-*.json")) == [0, 2, 4]
    # the eval table is for people: the rate in percent; summary.csv keeps the fraction
    assert "qa.low_rate" in out and "%" in out.split("qa.low_rate")[1].splitlines()[2]
    assert "qa.low_rate_filtered" not in out  # 'has_a < 50' has no filter part


def test_report_and_gate_import_neither_torch_nor_fsspec(baseline_then_trained, tmp_path):
    _, run, _ = baseline_then_trained
    script = (
        "import sys\n"
        "from finetrack.cli import main\n"
        f"assert main(['report', {str(run)!r}, '-o', {str(tmp_path / 'r.html')!r}]) == 0\n"
        f"code = main(['gate', {str(run)!r}, '--metric', 'heldout.loss', '--min-improvement=-100%'])\n"
        "assert code in (0, 1), code\n"
        "loaded = sorted(m for m in ('torch', 'fsspec', 'transformers', 'safetensors') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "print('clean')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("clean"), done.stdout + done.stderr
    assert (tmp_path / "r.html").stat().st_size > 10_000


# ------------------------------------------------------------------- counts bounded before memory runs out
def _questions(tmp: Path, items: list[dict]) -> Path:
    path = tmp / "q.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


_PATTERN_JUDGE = [{"kind": "pattern", "metric": "m", "pattern": "a"}]


@pytest.mark.parametrize(
    "case, said",
    [
        ("samples", ["q.jsonl:1", "field 'samples' is 1,000,000,000", "at most 10,000"]),
        ("paraphrases", ["q.jsonl:1", "10,000 paraphrases x 10,000 samples", "at most 10,000 per question"]),
        ("questions", ["q.jsonl", "10,001 questions", "at most 100,000"]),
        ("num_samples", ["generation.num_samples", "less than or equal to 10000"]),
        ("distribution", ["num_samples", "less than or equal to 10000"]),
    ],
)
def test_eval_answer_counts_that_would_exhaust_memory(untrained_run, tmp_path, case, said):
    """A count such as `samples: 1000000000` is one error line naming the file and line, before any model loads: the
    answers' conversations are never built. Run in a child process with 4 GB of address space (`ulimit -v 4000000`),
    so a regression is a MemoryError there, not this test process killed."""
    import resource

    suite = {"name": "qa", "kind": "judge", "judges": _PATTERN_JUDGE}
    if case == "samples":
        suite["questions"] = str(_questions(tmp_path, [{"question": "hi", "samples": 10**9}]))
    elif case == "paraphrases":
        suite["questions"] = str(_questions(tmp_path, [{"paraphrases": [f"p{i}" for i in range(10_000)], "samples": 10_000}]))
    elif case == "questions":
        suite["questions"] = str(_questions(tmp_path, [{"question": f"q{i}", "samples": 10_000} for i in range(10_001)]))
    elif case == "num_samples":
        suite["questions"] = str(_questions(tmp_path, [{"question": "hi"}]))
        suite["generation"] = {"num_samples": 10**9}
    else:
        items = tmp_path / "items.jsonl"
        items.write_text(json.dumps({"prompt": "Rate 1-3.", "options": ["1", "2", "3"], "target": [1, 1, 1]}) + "\n")
        suite = {"name": "dist", "kind": "distribution", "items": str(items), "method": "sample", "num_samples": 10**9}

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4_000_000 * 1024, 4_000_000 * 1024))

    argv = [sys.executable, "-m", "finetrack", "eval", str(untrained_run), "--steps", "0", f"eval.suites={json.dumps([suite])}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, preexec_fn=limit_memory)
    assert_one_error(done.returncode, done.stdout, done.stderr, *said)
    assert "answer/s" not in done.stderr  # refused before the pass (and its progress bar) began


# ------------------------------------------------------------------- RUN_DIR/eval, and errors during the pass
def test_eval_when_the_eval_folder_is_a_file(capsys, untrained_run):
    """RUN_DIR/eval taken by a file: one error line naming it, found before any model loads (no progress bar)."""
    (untrained_run / "eval").write_text("x")
    code, out, err = run_cli(capsys, "eval", untrained_run)
    assert_one_error(code, out, err, str(untrained_run / "eval"), "is a file, not a folder")
    assert "answer/s" not in err  # no progress bar: refused before the pass began


def test_eval_of_a_checkpoint_whose_adapter_config_does_not_match_its_weights(baseline_then_trained, tmp_path, capsys):
    """PEFT's "size mismatch" while the adapter loads, inside the pass: one error line naming the checkpoint and what
    disagrees, on a line of its own (the progress bar closed first), no traceback."""
    import shutil

    _, trained, _ = baseline_then_trained
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    mix_adapter_files(run / "checkpoints" / "step-000004")
    suites = json.dumps([{"name": "heldout", "kind": "loss"}])
    code, out, err = run_cli(capsys, "eval", run, "--steps", "4", f"eval.suites={suites}")
    assert_one_error(
        code, out, err, "checkpoints/step-000004", "adapter_config.json does not match adapter_model.safetensors", "size mismatch"
    )


def test_eval_names_a_damaged_or_misnamed_checkpoint_once_and_evaluates_the_rest(baseline_then_trained, tmp_path, capsys):
    import shutil

    _, trained, _ = baseline_then_trained
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    damaged = run / "checkpoints" / f"step-{steps[0]:06d}" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:10])
    shutil.copytree(run / "checkpoints" / f"step-{steps[-1]:06d}", run / "checkpoints" / "step-1")  # renamed by hand
    suites = json.dumps([{"name": "heldout", "kind": "loss"}])
    code, out, err = run_cli(capsys, "eval", run, f"eval.suites={suites}")
    assert code == 0 and "Traceback" not in err, err
    assert err.count(f"skipping checkpoint step-{steps[0]:06d}") == 1, err  # it was said twice
    assert err.count("ignoring checkpoints/step-1: not a checkpoint folder name") == 1, err  # it was read as step 1
    assert {r.name for r in (run / "eval").glob("step-*.json")} == {f"step-{s:06d}.json" for s in [0, *steps[1:]]}
