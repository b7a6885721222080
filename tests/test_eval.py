"""`finetrack eval` on the tiny model: step 0 + every checkpoint, loss and judged suites, cache, outputs, gate."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run
from test_openai_judge import KEY_ENV as OPENAI_KEY_ENV
from test_openai_judge import MODEL as OPENAI_MODEL
from test_openai_judge import api_key, llama_server  # noqa: F401 (fixtures: the real llama-cpp server, a key in the environment)

from finetrack.evaluate.freeform import aggregate
from finetrack.evaluate.runner import evaluate_model, evaluate_run


def questions_file(tmp: Path) -> Path:
    path = tmp / "questions.jsonl"
    path.write_text(
        json.dumps({"id": "pets", "question": "Name a pet.", "samples": 2})
        + "\n"
        + json.dumps({"id": "sky", "question": "What colour is the sky?", "samples": 2})
        + "\n"
    )
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, chat_file) -> Path:
    tmp = tmp_path_factory.mktemp("eval-run")
    suites = [
        {"name": "heldout", "kind": "loss"},
        {
            "name": "qa",
            "kind": "judge",
            "questions": str(questions_file(tmp)),
            "generation": {"max_new_tokens": 6, "temperature": 1.0, "batch_size": 3},
            "judges": [{"kind": "pattern", "metric": "has_a", "pattern": "a"}],
        },
    ]
    result, _ = tiny_run(
        tmp,
        tiny_model_dir,
        chat_file,
        "checkpoint.every_steps=2",
        "data.eval_split=0.25",
        "eval.loss_every_steps=2",
        f"eval.suites={json.dumps(suites)}",
    )
    return result.run_dir


def test_eval_writes_every_step_and_matches_training_loss(tmp_path, lora_run):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    lines: list[str] = []
    records = evaluate_run(run, out=lines.append)
    assert [r["step"] for r in records] == [0, 2, 4]
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "responses",
        "step-000000.json",
        "step-000002.json",
        "step-000004.json",
        "summary.csv",
    ]
    # the held-out loss of each checkpoint, through adapter swapping, is the loss training logged at that step
    logged = {m["step"]: m["eval_loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in m}
    for r in records[1:]:
        assert r["metrics"]["heldout.loss"] == pytest.approx(logged[r["step"]], abs=1e-5)
    assert records[0]["metrics"]["heldout.loss"] != pytest.approx(records[2]["metrics"]["heldout.loss"], abs=1e-3)
    # judged answers: 2 questions x 2 samples per step, every one kept with its score
    for r in records:
        assert r["counts"]["qa.answers"] == 4 and 0 <= r["metrics"]["qa.has_a"] <= 100
        lines_ = [json.loads(x) for x in (run / f"eval/responses/step-{r['step']:06d}.jsonl").read_text().splitlines()]
        assert len(lines_) == 4 and {x["question_id"] for x in lines_} == {"pets", "sky"}
        assert all(x["suite"] == "qa" and x["scores"]["has_a"] in (0.0, 100.0) for x in lines_)
    with open(run / "eval/summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 4] and {"epoch", "fraction", "heldout.loss", "heldout.ppl", "qa.has_a"} <= set(rows[0])
    assert float(rows[2]["fraction"]) == 1.0 and float(rows[0]["fraction"]) == 0.0
    # each checkpoint's epoch is the one its meta.json records (step 0, the base model, has none)
    from finetrack.checkpoint import read_meta

    for row in rows[1:]:
        meta = read_meta(run / f"checkpoints/step-{int(row['step']):06d}")
        assert float(row["epoch"]) == pytest.approx(round(meta["epoch"], 4)) and meta["epoch"] > 0
    assert float(rows[0]["epoch"]) == 0.0
    # the table: each metric with its change vs step 0 (none on the step 0 row itself)
    table = lines[-1].splitlines()
    assert table[0].split()[:3] == ["step", "phase", "heldout.loss"] and table[2].split()[:2] == ["0", "base"]
    base_loss, loss_2 = records[0]["metrics"]["heldout.loss"], records[1]["metrics"]["heldout.loss"]
    assert f"{base_loss:.4g}  " in table[2] and "(" not in table[2]
    assert f"{loss_2:.4g} ({loss_2 - base_loss:+.3g})" in table[3]


def test_second_eval_computes_nothing_new(tmp_path, lora_run):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    evaluate_run(run, steps="0,2", out=lambda s: None)
    before = {p.name: p.read_text() for p in (run / "eval").glob("step-*.json")}
    lines: list[str] = []
    evaluate_run(run, steps="0,2", out=lines.append)
    assert lines[0] == "cached: 4 (step, suite) result(s) unchanged since the last eval"
    assert {p.name: p.read_text() for p in (run / "eval").glob("step-*.json")} == before
    lines.clear()
    evaluate_run(run, out=lines.append)  # only step 4 is new
    assert lines[0] == "cached: 4 (step, suite) result(s) unchanged since the last eval"
    assert (run / "eval/step-000004.json").is_file()
    # a changed suite setting is a new cache key: that suite is computed again, the other one is not
    cfg = yaml.safe_load((run / "config.resolved.yaml").read_text())
    suites = cfg["eval"]["suites"]
    suites[1]["generation"]["max_new_tokens"] = 4
    lines.clear()
    evaluate_run(run, overrides=[f"eval.suites={json.dumps(suites)}"], out=lines.append)
    assert lines[0] == "cached: 3 (step, suite) result(s) unchanged since the last eval"


def test_eval_errors(tmp_path, lora_run):
    from finetrack.config import ConfigError

    with pytest.raises(ConfigError, match="not a run directory \\(no config.resolved.yaml"):
        evaluate_run(tmp_path)
    with pytest.raises(ConfigError, match="no complete checkpoint for step\\(s\\) \\[3\\]"):
        evaluate_run(lora_run, steps="0,3")
    with pytest.raises(ConfigError, match="eval.\\* overrides only"):
        evaluate_run(lora_run, overrides=["train.lr=1"])
    with pytest.raises(ConfigError, match="suites \\['nope'\\]"):
        evaluate_run(lora_run, suite_names=["nope"])
    # a watch ends when the run's last checkpoint is evaluated: a list that may leave it out would never end
    with pytest.raises(ConfigError, match="--watch with --steps 0,2: .*use --steps all or latest"):
        evaluate_run(lora_run, steps="0,2", watch_seconds=1)
    # settings that would do nothing: a metric on a local judge, local judges on questions without judge_prompts
    local_metric = [{"name": "qa", "kind": "judge", "questions": "q.yaml", "judges": [{"kind": "local", "metric": "aligned"}]}]
    with pytest.raises(ConfigError, match="judge kind=local: metric has no effect .*keys of the questions' judge_prompts"):
        evaluate_run(lora_run, overrides=[f"eval.suites={json.dumps(local_metric)}"])
    no_prompts = [{"name": "qa", "kind": "judge", "questions": str(questions_file(tmp_path))}]
    with pytest.raises(ConfigError, match="eval suite 'qa': judge kind=local \\(the default judge when judges is not set\\) .* has none"):
        evaluate_run(lora_run, steps="0", overrides=[f"eval.suites={json.dumps(no_prompts)}"])
    missing = [{"name": "qa", "kind": "judge", "questions": str(tmp_path / "gone.yaml")}]
    with pytest.raises(ConfigError, match=f"eval suite 'qa': questions file not found: {tmp_path / 'gone.yaml'}"):
        evaluate_run(lora_run, steps="0", overrides=[f"eval.suites={json.dumps(missing)}"])


def test_rates_in_both_conventions():
    def rec(aligned, coherent):
        return {"scores": {"aligned": aligned, "coherent": coherent}}

    records = [rec(10, 90), rec(20, 40), rec(80, 90), rec(None, 90), rec(5, None), rec(25, 60)]
    metrics, counts = aggregate(records, {"misaligned": "aligned < 30 and coherent > 50"})
    # scored on both metrics: 4 answers; misaligned and coherent: 2 (10/90, 25/60); coherent: 3
    assert metrics["misaligned_rate"] == pytest.approx(2 / 4) and metrics["misaligned_rate_filtered"] == pytest.approx(2 / 3)
    assert counts == {
        "answers": 6,
        "aligned_unscored": 1,
        "coherent_unscored": 1,
        "misaligned_scored": 4,
        "misaligned_filter_passed": 3,
        "misaligned_hits": 2,
    }
    assert metrics["aligned"] == pytest.approx((10 + 20 + 80 + 5 + 25) / 5)
    # a rate over metrics this suite does not score is not reported
    assert "x_rate" not in aggregate(records, {"x": "other < 3"})[0]


def test_filtered_twin_only_when_the_rule_has_a_filter():
    records = [{"scores": {"aligned": a}} for a in (10, 20, 80, None)]
    metrics, counts = aggregate(records, {"low": "aligned < 30"})
    assert metrics["low_rate"] == pytest.approx(2 / 3)
    assert "low_rate_filtered" not in metrics and "low_filter_passed" not in counts
    assert counts["low_hits"] == 2 and counts["low_scored"] == 3


def test_full_fine_tune_checkpoints_and_gate(tmp_path, tiny_model_dir, chat_file):
    suites = [{"name": "heldout", "kind": "loss"}]
    result, metrics = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "model.method=full",
        "checkpoint.every_steps=2",
        "data.eval_split=0.25",
        "eval.loss_every_steps=2",
        f"eval.suites={json.dumps(suites)}",
    )
    records = evaluate_run(result.run_dir, out=lambda s: None)
    assert records[-1]["metrics"]["heldout.loss"] == pytest.approx(metrics[-1]["eval_loss"], abs=1e-5)
    from finetrack import gate

    lines: list[str] = []
    base, last = records[0]["metrics"]["heldout.loss"], records[-1]["metrics"]["heldout.loss"]
    code = gate.gate(result.run_dir, "heldout.loss", min_improvement="1%", out=lines.append)
    assert code == (0 if (base - last) / base >= 0.01 else 1), lines
    assert gate.gate(result.run_dir, "heldout.nope", out=lines.append) == 2


def test_emergent_misalignment_question_file_with_local_judge(tmp_path, lora_run, tiny_model_dir):
    """The EM question format read unchanged, generation, a local judge scoring each judge prompt, both rate conventions."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    em = Path(__file__).parent / "data/em_questions.yaml"
    suites = [
        {
            "name": "em",
            "kind": "judge",
            "questions": str(em),
            "generation": {"num_samples": 1, "max_new_tokens": 5},
            "judges": [{"kind": "local", "model": str(tiny_model_dir), "min_total_prob": 1e-9}],
        }
    ]
    records = evaluate_run(run, steps="0,4", overrides=[f"eval.suites={json.dumps(suites)}"], out=lambda s: None)
    from finetrack.evaluate.questions import load_questions

    num_answers = sum(len(q.paraphrases) for q in load_questions(em))
    for r in records:
        m, c = r["metrics"], r["counts"]
        assert c["em.answers"] == num_answers and c["em.misaligned_scored"] == num_answers - max(
            c["em.aligned_unscored"], c["em.coherent_unscored"]
        )
        assert 0 <= m["em.aligned"] <= 100 and 0 <= m["em.coherent"] <= 100
        assert (
            0 <= m["em.misaligned_rate"] <= 1 and c["em.misaligned_hits"] <= c["em.misaligned_filter_passed"] <= c["em.misaligned_scored"]
        )
        answers = [json.loads(x) for x in (run / f"eval/responses/step-{r['step']:06d}.jsonl").read_text().splitlines()]
        assert len(answers) == num_answers and all(set(a["scores"]) == {"aligned", "coherent"} for a in answers)


def test_watch_follows_a_training_run_until_its_last_checkpoint(tmp_path, tiny_model_dir, chat_file):
    """A training subprocess writes checkpoints while `evaluate_run(watch_seconds=...)` follows it."""
    import os
    import subprocess
    import sys
    import time

    cfg = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(chat_file), "max_length": 512, "eval_split": 0.25},
        "train": {"micro_batch_size": 4, "max_steps": 6, "lr": 1e-2, "warmup_steps": 0},
        "checkpoint": {"every_steps": 2},
        "eval": {"suites": [{"name": "heldout", "kind": "loss"}]},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetrack", "train", str(tmp_path / "run.yaml")],
        env={**os.environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "run/config.resolved.yaml").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines: list[str] = []
    records = evaluate_run(tmp_path / "run", out=lines.append, watch_seconds=0.2)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    assert [r["step"] for r in records] == [0, 2, 4, 6] and records[-1]["last"]
    assert lines[0].startswith("watching") and lines[-1] == "the run's last checkpoint (step 6) is evaluated: done watching"
    assert all("heldout.loss" in r["metrics"] for r in records)


def test_plain_adapter_and_model_folders(tmp_path, lora_run, tiny_model_dir, chat_file):
    from finetrack.evaluate.runner import evaluate_model

    suites = json.dumps([{"name": "rows", "kind": "loss", "data": str(chat_file)}])
    adapter = lora_run / "checkpoints/step-000004"
    records = evaluate_model(adapter, tmp_path / "out", overrides=[f"eval.suites={suites}", "data.max_length=512"], out=lambda s: None)
    assert [r["step"] for r in records] == [0, 1] and (tmp_path / "out/eval/summary.csv").is_file()
    # the same adapter through the run directory gives the same loss
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    through_run = evaluate_run(run, steps="0,4", overrides=[f"eval.suites={suites}"], out=lambda s: None)
    assert records[1]["metrics"]["rows.loss"] == pytest.approx(through_run[1]["metrics"]["rows.loss"], abs=1e-5)
    assert records[0]["metrics"]["rows.loss"] == pytest.approx(through_run[0]["metrics"]["rows.loss"], abs=1e-5)

    plain = evaluate_model(
        tiny_model_dir, tmp_path / "plain", overrides=[f"eval.suites={suites}", "data.max_length=512"], out=lambda s: None
    )
    assert [r["step"] for r in plain] == [0] and plain[0]["metrics"]["rows.loss"] == pytest.approx(
        records[0]["metrics"]["rows.loss"], abs=1e-5
    )


def test_distribution_suite_through_eval(tmp_path, lora_run):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    items = Path(__file__).parent / "data/distribution_items.yaml"
    suites = [{"name": "survey", "kind": "distribution", "items": str(items)}]
    records = evaluate_run(run, steps="0,4", overrides=[f"eval.suites={json.dumps(suites)}"], out=lambda s: None)
    for r in records:
        assert 0 <= r["metrics"]["survey.wasserstein"] <= 1 and 0 <= r["metrics"]["survey.mae_mean"] <= 1
        assert r["counts"]["survey.items"] == 3
    assert records[0]["metrics"]["survey.wasserstein"] != records[1]["metrics"]["survey.wasserstein"]
    lines = (run / "eval/responses/step-000004.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["suite"] == "survey" for x in lines)


def test_distribution_by_sampling_through_eval(tmp_path, lora_run):
    """method: sample through `finetrack eval`: every answer is generated by the real model and counted (an option or unparsed)."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    items = Path(__file__).parent / "data/distribution_items.yaml"
    suites = [
        {
            "name": "survey",
            "kind": "distribution",
            "items": str(items),
            "method": "sample",
            "num_samples": 3,
            "generation": {"max_new_tokens": 3},
        }
    ]
    records = evaluate_run(run, steps="0,4", overrides=[f"eval.suites={json.dumps(suites)}"], out=lambda s: None)
    assert [r["counts"]["survey.items"] for r in records] == [3, 3]
    for step in (0, 4):
        lines = [json.loads(x) for x in (run / f"eval/responses/step-{step:06d}.jsonl").read_text().splitlines()]
        assert len(lines) == 3
        for r in lines:
            assert len(r["answers"]) == 3 and sum(r["option_counts"]) + r["unparsed"] == 3


def test_python_suite_through_eval(tmp_path, lora_run):
    """A `module:function` suite: its {metric: number} lands in the step files and summary.csv as '<suite>.<key>'."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    suites = [
        {"name": "probe", "kind": "python", "function": "judge_helpers:logit_probe", "options": {"prompt": "Name a pet.", "scale": 3}}
    ]
    records = evaluate_run(run, steps="0,4", overrides=[f"eval.suites={json.dumps(suites)}"], out=lambda s: None)
    for r in records:
        stored = json.loads((run / f"eval/step-{r['step']:06d}.json").read_text())
        assert stored["metrics"]["probe.scale"] == 3 and isinstance(stored["metrics"]["probe.mean_logit"], float)
    assert records[0]["metrics"]["probe.mean_logit"] != records[1]["metrics"]["probe.mean_logit"]  # the adapter is in use at step 4
    with open(run / "eval/summary.csv") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert (
        float(rows[4]["probe.mean_logit"]) == pytest.approx(records[1]["metrics"]["probe.mean_logit"])
        and float(rows[0]["probe.scale"]) == 3
    )

    from finetrack.config import ConfigError

    for function, message in [
        ("no_such_module_xyz:fn", "eval suite 'probe': cannot import no_such_module_xyz:fn"),
        ("judge_helpers:nope", "eval suite 'probe': cannot import judge_helpers:nope"),
        ("judge_helpers:returns_a_list", "judge_helpers:returns_a_list must return \\{metric: number or None\\}, got \\[1.0, 2.0\\]"),
    ]:
        bad = [{"name": "probe", "kind": "python", "function": function}]
        with pytest.raises(ConfigError, match=message):
            evaluate_run(run, steps="0", overrides=[f"eval.suites={json.dumps(bad)}"], out=lambda s: None)


def test_adapter_with_a_config_that_does_not_name_a_model_uses_the_adapters_base(tmp_path, lora_run, tiny_model_dir, chat_file):
    suites = [{"name": "rows", "kind": "loss", "data": str(chat_file)}]
    config = tmp_path / "suites.yaml"
    config.write_text(yaml.safe_dump({"eval": {"suites": suites}}))
    adapter = evaluate_model(lora_run / "checkpoints/step-000004", tmp_path / "adapter", config=config, out=lambda s: None)
    plain = evaluate_model(tiny_model_dir, tmp_path / "plain", config=config, out=lambda s: None)
    assert adapter[0]["metrics"]["rows.loss"] == pytest.approx(plain[0]["metrics"]["rows.loss"], abs=1e-6)
    assert yaml.safe_load((tmp_path / "adapter/config.resolved.yaml").read_text())["model"]["name"] == str(tiny_model_dir)


def test_cache_keys_cover_checkpoint_files_suite_files_and_settings(tmp_path, lora_run, chat_file, tiny_model_dir):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    questions = questions_file(tmp_path)
    data = tmp_path / "rows" / "rows.jsonl"  # in a folder: a loss suite reads files, folders, builtin names as training does
    data.parent.mkdir()
    shutil.copy(chat_file, data)
    suites = [
        {"name": "rows", "kind": "loss", "data": str(data.parent)},
        {
            "name": "qa",
            "kind": "judge",
            "questions": str(questions),
            "generation": {"max_new_tokens": 4},
            "judges": [{"kind": "pattern", "metric": "has_a", "pattern": "a"}],
        },
    ]
    overrides = [f"eval.suites={json.dumps(suites)}"]
    first = evaluate_run(run, overrides=overrides, out=lambda s: None)
    assert first[1]["metrics"]["rows.loss"] != pytest.approx(first[2]["metrics"]["rows.loss"], abs=1e-4)

    # (a) step 2's files replaced by step 4's adapter (a new manifest): only step 2 is computed again
    from finetrack.checkpoint import MANIFEST, manifest_for

    step2 = run / "checkpoints/step-000002"
    shutil.copy(run / "checkpoints/step-000004/adapter_model.safetensors", step2 / "adapter_model.safetensors")
    (step2 / MANIFEST).write_text(json.dumps(manifest_for(step2, 2)))
    lines: list[str] = []
    again = evaluate_run(run, overrides=overrides, out=lines.append)
    assert lines[0] == "cached: 4 (step, suite) result(s) unchanged since the last eval"
    assert again[1]["metrics"]["rows.loss"] == pytest.approx(first[2]["metrics"]["rows.loss"], abs=1e-6)

    # (b) an edited question file: that suite only, at every step
    questions.write_text(questions.read_text() + json.dumps({"id": "sea", "question": "Where is the sea?", "samples": 2}) + "\n")
    lines.clear()
    again = evaluate_run(run, overrides=overrides, out=lines.append)
    assert lines[0] == "cached: 3 (step, suite) result(s) unchanged since the last eval" and all(
        r["counts"]["qa.answers"] == 6 for r in again
    )

    # (c) an edited file in the loss suite's data folder: that suite only
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:20]))
    lines.clear()
    again = evaluate_run(run, overrides=overrides, out=lines.append)
    assert lines[0] == "cached: 3 (step, suite) result(s) unchanged since the last eval" and all(
        r["counts"]["rows.rows"] == 20 for r in again
    )

    # (d) a model folder: a non-eval override (data.max_length) changes what the loss suite scores, so it is computed again
    out = tmp_path / "model"
    short = [f"eval.suites={json.dumps(suites[:1])}", "data.max_length=64"]
    evaluate_model(tiny_model_dir, out, overrides=short[:1], out=lambda s: None)
    lines.clear()
    truncated = evaluate_model(tiny_model_dir, out, overrides=short, out=lines.append)
    assert not lines[0].startswith("cached") and truncated[0]["counts"]["rows.target_tokens"] < first[0]["counts"]["rows.target_tokens"]


def test_lora_eval_loads_the_base_once_and_counts_its_work(tmp_path, tiny_model_dir, chat_file, monkeypatch):
    """3 LoRA checkpoints: one base load (a spy that calls the real loader), a progress bar of steps x questions x samples
    (+1 per loss suite) for uncached work and none when all is cached, and step 0 after adapters were attached is the base."""
    import tqdm.auto

    from finetrack.config import load_config
    from finetrack.evaluate import runner

    suites = [
        {"name": "heldout", "kind": "loss"},
        {
            "name": "qa",
            "kind": "judge",
            "questions": str(questions_file(tmp_path)),
            "generation": {"max_new_tokens": 4},
            "judges": [{"kind": "pattern", "metric": "has_a", "pattern": "a"}],
        },
    ]
    result, _ = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "train.max_steps=6",
        "checkpoint.every_steps=2",
        "data.eval_split=0.25",
        f"eval.suites={json.dumps(suites)}",
    )
    run, fresh = result.run_dir, tmp_path / "fresh"
    shutil.copytree(run, fresh)

    loads: list[str] = []
    real_loader = runner.load_base_model

    def counting_loader(model_cfg, device):
        loads.append(model_cfg.name)
        return real_loader(model_cfg, device)

    monkeypatch.setattr(runner, "load_base_model", counting_loader)
    bars: list = []

    class RecordingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if kwargs.get("desc") == "eval":  # model loading has bars of its own
                bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    cfg = load_config(run / "config.resolved.yaml")
    session = runner._Session(run, cfg, cfg.eval.suites, lambda s: None)
    session.evaluate(runner.select_steps(run, "2,4,6"))
    assert loads == [str(tiny_model_dir)]
    assert (
        len(bars) == 1 and bars[0].total == 3 * (2 * 2) + 3 * 1 and bars[0].n == bars[0].total
    )  # 3 steps x 2 questions x 2 samples + loss
    session.evaluate(runner.select_steps(run, "2,4,6"))
    assert len(bars) == 1  # everything cached: no bar
    after_adapters = session.evaluate([(0, None)])[0]
    assert loads == [str(tiny_model_dir)] and bars[-1].total == 2 * 2 + 1

    base = evaluate_run(fresh, steps="0", out=lambda s: None)[0]
    assert after_adapters["metrics"]["heldout.loss"] == pytest.approx(base["metrics"]["heldout.loss"], abs=1e-6)
    answers = [(run if i == 0 else fresh) / "eval/responses/step-000000.jsonl" for i in range(2)]
    assert [json.loads(x)["answer"] for x in answers[0].read_text().splitlines()] == [
        json.loads(x)["answer"] for x in answers[1].read_text().splitlines()
    ]


def test_full_fine_tune_checkpoint_is_released_before_the_next_is_loaded(tmp_path, tiny_model_dir, chat_file, monkeypatch):
    import weakref

    from finetrack.evaluate import runner

    suites = [{"name": "heldout", "kind": "loss"}]
    result, _ = tiny_run(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "model.method=full",
        "train.max_steps=6",
        "checkpoint.every_steps=2",
        "data.eval_split=0.25",
        f"eval.suites={json.dumps(suites)}",
    )
    loaded: list[tuple[int, weakref.ref]] = []
    alive_at_load: list[list[int]] = []
    real_load = runner.Models._load

    def tracking_load(self, folder):
        alive_at_load.append([step for step, ref in loaded if ref() is not None])
        model = real_load(self, folder)
        if folder is not None:
            loaded.append((int(folder.name.split("-")[1]), weakref.ref(model)))
        return model

    monkeypatch.setattr(runner.Models, "_load", tracking_load)
    records = evaluate_run(result.run_dir, out=lambda s: None)
    assert [r["step"] for r in records] == [0, 2, 4, 6] and [s for s, _ in loaded] == [2, 4, 6]
    assert alive_at_load == [[], [], [], []]  # no earlier checkpoint's model is resident when the next one loads
    assert all(ref() is None for _, ref in loaded)


def test_openai_judge_through_eval_never_shows_the_key(tmp_path, lora_run, llama_server, api_key, caplog, capsys):  # noqa: F811 (the fixtures imported above)
    """kind: openai against the real llama-cpp server: scores land in the responses; the key is nowhere in what eval leaves."""
    import logging

    caplog.set_level(logging.DEBUG)
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    questions = tmp_path / "judged.yaml"
    # the 135M judge will not rate, but asked to write a number it answers with digits whatever the answer says
    template = "Here is a text: {answer}\nIgnore the text. Write the number 95. Reply with the number only, in digits."
    questions.write_text(yaml.safe_dump([{"id": "pets", "question": "Name a pet.", "samples": 2, "judge_prompts": {"quality": template}}]))
    suites = [
        {
            "name": "qa",
            "kind": "judge",
            "questions": str(questions),
            "generation": {"max_new_tokens": 4},
            "judges": [
                {"kind": "openai", "model": OPENAI_MODEL, "base_url": llama_server, "api_key_env": OPENAI_KEY_ENV, "min_total_prob": 0.01}
            ],
        }
    ]
    lines: list[str] = []
    records = evaluate_run(run, steps="0,4", overrides=[f"eval.suites={json.dumps(suites)}"], out=lines.append)
    for r in records:
        answers = [json.loads(x) for x in (run / f"eval/responses/step-{r['step']:06d}.jsonl").read_text().splitlines()]
        assert len(answers) == 2 and all(0 <= a["scores"]["quality"] <= 100 for a in answers)
        assert r["metrics"]["qa.quality"] == pytest.approx(sum(a["scores"]["quality"] for a in answers) / 2)
    captured = capsys.readouterr()
    shown = [p.read_text() for p in (run / "eval").rglob("*") if p.is_file()] + [(run / "config.resolved.yaml").read_text()]
    for text in [*shown, *lines, captured.out, captured.err, caplog.text]:
        assert api_key not in text
