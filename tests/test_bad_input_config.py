"""Malformed config files and overrides through the real command line (`finetrack plan`, which fails on them before
any data or model is read): exit 2, exactly one `error:` line that names the file (and line) or the override and
the key, never a traceback."""

from __future__ import annotations

import json

import pytest

from finetrack.cli import main

NESTED = b"x: " + b"{a: " * 100 + b"1" + b"}" * 100 + b"\n"
DEEP_LIST = b"x: " + b"[" * 600 + b"]" * 600 + b"\n"
SUITE = b"eval:\n  suites:\n    - name: d\n      kind: distribution\n      items: items.yaml\n"

# (id, file content, what the error line must contain besides the file name)
FILE_CASES = [
    ("lr_inf", b"train:\n  lr: .inf\n", [":2:", "train.lr", "finite"]),
    ("lr_nan", b"train:\n  lr: .nan\n", [":2:", "train.lr", "finite"]),
    ("lr_negative", b"train:\n  lr: -1.0e-4\n", [":2:", "train.lr", "greater than 0"]),
    ("lr_zero", b"train:\n  lr: 0\n", ["train.lr", "greater than 0"]),
    ("grad_norm_negative", b"train:\n  max_grad_norm: -1\n", [":2:", "train.max_grad_norm", "greater than 0"]),
    ("grad_norm_zero", b"train:\n  max_grad_norm: 0\n", ["train.max_grad_norm", "greater than 0"]),
    ("beta_one", b"train:\n  adam_betas: [0.9, 1.0]\n", [":2:", "train.adam_betas", "less than 1"]),
    ("beta_negative", b"train:\n  adam_betas: [-0.1, 0.999]\n", ["train.adam_betas", "greater than or equal to 0"]),
    ("seed_negative", b"train:\n  seed: -1\n", ["train.seed", "greater than or equal to 0"]),
    ("seed_huge", b"train:\n  seed: 4294967296\n", ["train.seed", "less than or equal to 4294967295"]),
    ("max_steps_true", b"train:\n  max_steps: true\n", [":2:", "train.max_steps", "boolean"]),
    ("batch_false", b"train:\n  micro_batch_size: false\n", ["train.micro_batch_size", "boolean"]),
    ("steps_with_bool", b"checkpoint:\n  steps: [true, 5]\n", ["checkpoint.steps", "boolean"]),
    # the other way round: pydantic read 'yes', 'off', 1 and 0 as booleans (a quoted "yes" turned on remote code)
    ("remote_code_text", b"model:\n  trust_remote_code: 'yes'\n", [":2:", "model.trust_remote_code", "'yes', text: write true or false"]),
    ("shuffle_number", b"data:\n  shuffle: 0\n", [":2:", "data.shuffle", "0, a number: write true or false"]),
    ("pack_text", b"data:\n  pack: 'off'\n", [":2:", "data.pack", "or 'auto'", "write true or false"]),
    # an empty text was the current directory: `output.dir: ''` with --fresh moved the whole folder aside
    ("output_dir_empty", b"output:\n  dir: ''\n", [":2:", "output.dir", "empty: give a value"]),
    ("data_path_empty", b"data:\n  path: ''\n", [":2:", "data.path", "empty: give a value"]),
    ("remote_empty", b"checkpoint:\n  remote: ''\n", [":2:", "checkpoint.remote", "empty"]),
    ("prompt_empty", b"train:\n  sample_prompts: ['hi', '']\n", [":2:", "train.sample_prompts.1", "empty"]),
    ("data_path_no_files", b"data:\n  path: []\n", [":2:", "data.path", "at least 1 item"]),
    ("eval_split_quoted", b"data:\n  eval_split: '0.1'\n", [":2:", "data.eval_split", "write the fraction unquoted"]),  # was a path
    # PEFT reads [] as "not set": every layer was adapted
    ("layers_empty", b"model:\n  lora:\n    layers_to_transform: []\n", [":3:", "model.lora.layers_to_transform", "at least 1 item"]),
    (
        "layers_negative",
        b"model:\n  lora:\n    layers_to_transform: [-1]\n",
        ["model.lora.layers_to_transform.0", "greater than or equal to 0"],
    ),
    ("targets_empty", b"model:\n  lora:\n    target_modules: []\n", [":3:", "model.lora.target_modules", "at least 1 item"]),
    (
        "all_linear_in_list",
        b"model:\n  lora:\n    target_modules: [all-linear]\n",
        ["model.lora.target_modules", "write target_modules: all-linear"],
    ),
    ("epochs_inf", b"train:\n  num_epochs: .inf\n", ["train.num_epochs", "finite"]),
    ("warmup_ratio_nan", b"train:\n  warmup_ratio: .nan\n", ["train.warmup_ratio"]),
    ("temperature_inf", SUITE + b"      method: sample\n      generation: {temperature: .inf}\n", ["generation.temperature", "finite"]),
    ("duplicate_key", b"train:\n  lr: 1.0e-4\n  max_steps: 5\n  lr: 2.0e-4\n", [":4:", "duplicate key 'train.lr'", "line 2"]),
    ("duplicate_section", b"train:\n  lr: 1.0e-4\ndata:\n  max_length: 64\ntrain:\n  max_steps: 2\n", [":5:", "'train'", "line 1"]),
    ("undecodable", b"train:\n  lr: 1.0e-4\n  seed: \xff\xfe\n", [":3:", "byte 0xff at byte offset 28", "UTF-8"]),
    ("nested_mappings", NESTED, ["nested", "flatten"]),
    ("nested_lists", DEEP_LIST, ["nested"]),
    ("self_alias", b"x: &a [1, *a]\n", ["alias"]),
    ("nul_character", b"train:\n  lr: \x00\n", [":2:", "not allowed"]),
    ("syntax", b"train:\n  lr: [1\n  max_steps: 3\n", ["not valid YAML"]),
    ("top_level_list", b"- train\n- data\n", ["top level must be a mapping"]),
    ("section_is_a_value", b"train: 5\n", [":1:", "train", "section"]),
    ("renamed_first_epoch", b"checkpoint:\n  first_epoch: 4\n", [":2:", "checkpoint.first_epoch", "checkpoint.num_first_epoch"]),
    ("renamed_keep_last", b"checkpoint:\n  keep_last: 2\n", ["checkpoint.num_keep_last"]),
    ("renamed_log_spaced", b"checkpoint:\n  log_spaced: 5\n", ["checkpoint.num_log_spaced"]),
    ("renamed_suite_samples", SUITE + b"      method: sample\n      samples: 4\n", [":7:", "eval.suites.0.num_samples"]),
    ("dotted_key_in_file", b"train.lr: 1.0e-4\n", [":1:", "nest it", "'train:'"]),
    ("hf_learning_rate", b"train:\n  learning_rate: 1.0e-4\n", [":2:", "train.learning_rate", "train.lr"]),
    ("hf_batch_size_top_level", b"per_device_train_batch_size: 8\n", [":1:", "train.micro_batch_size"]),
    ("hf_grad_accum", b"train:\n  gradient_accumulation_steps: 4\n", ["train.grad_accum_steps"]),
    ("hf_epochs", b"train:\n  num_train_epochs: 3\n", ["train.num_epochs"]),
    ("hf_save_steps", b"checkpoint:\n  save_steps: 100\n", ["checkpoint.every_steps"]),
    ("hf_save_total_limit", b"train:\n  save_total_limit: 2\n", ["checkpoint.num_keep_last"]),
    ("peft_lora_r", b"model:\n  lora_r: 8\n", ["model.lora.r"]),
    ("hf_bf16", b"bf16: true\n", ["model.mixed_precision", "model.dtype: bfloat16"]),
    ("hf_max_seq_length", b"data:\n  max_seq_length: 512\n", ["data.max_length"]),
    ("hf_output_dir", b"output_dir: runs/x\n", ["output.dir"]),
    ("hf_model_name_or_path", b"model:\n  model_name_or_path: gpt2\n", ["model.name"]),
    ("hf_scheduler", b"train:\n  lr_scheduler_type: linear\n", ["train.lr_schedule"]),
    ("no_effect_pack_row", b"data:\n  pack: false\n  pack_row_tokens: 4096\n", [":3:", "data.pack_row_tokens has no effect"]),
    ("no_effect_probs_samples", SUITE + b"      num_samples: 7\n", [":6:", "num_samples has no effect with method=probs"]),
    ("no_effect_lora_on_full", b"model:\n  method: full\n  lora:\n    r: 8\n", [":3:", "model.lora has no effect"]),
    ("unknown_suite_kind", b"eval:\n  suites:\n    - name: a\n      kind: nope\n", [":3:", "eval.suites.0", "'nope'"]),
    # objectives
    ("unknown_objective", b"objective:\n  kind: ranking\n", [":2:", "objective.kind", "'causal_lm'"]),
    (
        "no_effect_regression_on_lm",
        b"objective:\n  regression:\n    loss: mae\n",
        [":2:", "objective.regression has no effect with objective.kind=causal_lm"],
    ),
    (
        "no_effect_neg_on_infonce",
        b"objective:\n  kind: contrastive\n  contrastive:\n    loss: infonce\n    lambda_neg: 2\n",
        [":5:", "lambda_neg has no effect with loss=infonce"],
    ),
    ("python_without_function", b"objective:\n  kind: python\n", ["objective.kind=python needs objective.python.function"]),
    (
        "python_bad_function",
        b"objective:\n  kind: python\n  python:\n    function: my_loss\n",
        [":4:", "objective.python.function", "pattern"],
    ),
    (
        "marker_without_text",
        b"objective:\n  kind: regression\n  regression:\n    pool: marker\n",
        ["pool=marker needs objective.regression.marker"],
    ),
    ("tau_zero", b"objective:\n  kind: contrastive\n  contrastive:\n    tau: 0\n", [":4:", "objective.contrastive.tau", "greater than 0"]),
    (
        "probe_with_recompute",
        b"model:\n  gradient_checkpointing: true\nobjective:\n  kind: regression\n  regression:\n    freeze_backbone: true\n",
        ["set model.gradient_checkpointing=false"],
    ),
    (
        "regression_suite_on_lm",
        b"data:\n  eval_split: 0.1\neval:\n  suites:\n    - name: r\n      kind: regression\n",
        [":6:", "objective.kind=regression"],
    ),
]


def _run(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


OVERRIDE_CASES = [
    ("train.max_steps=true", ["override 'train.max_steps=true'", "train.max_steps", "boolean"]),
    ("train.lr=.inf", ["override 'train.lr=.inf'", "train.lr", "finite"]),
    ("train.learning_rate=1e-4", ["train.learning_rate", "train.lr"]),
    ("checkpoint.per_epoch=2", ["checkpoint.num_per_epoch"]),
    ("train.lr={a: 1, a: 2}", ["override 'train.lr={a: 1, a: 2}'", "duplicate key"]),
    ("train.seed=-5", ["train.seed"]),
    ("model.gradient_checkpointing=1", ["override 'model.gradient_checkpointing=1'", "write true or false"]),
    ("eval.suites=[{name: x}]", ["eval.suites.0", "needs kind: one of loss, judge, distribution"]),  # pydantic's words before
    ("model=5", ["'model' is a section: set one of its keys, e.g. model.name="]),  # "did you mean 'model'?" before
]


@pytest.mark.parametrize("override, expected", OVERRIDE_CASES, ids=[c[0] for c in OVERRIDE_CASES])
def test_bad_override(override, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text("train:\n  max_steps: 3\n")
    line = _run(["plan", "cfg.yaml", override], capsys)
    for text in expected:
        assert text in line, (text, line)


def test_config_path_that_is_a_folder_or_missing(tmp_path, capsys):
    (tmp_path / "dir.yaml").mkdir()
    assert "it is a folder" in _run(["plan", str(tmp_path / "dir.yaml")], capsys)
    assert "config file not found" in _run(["train", str(tmp_path / "missing.yaml")], capsys)


def test_several_problems_are_one_error_line_each_with_its_line(tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text("train:\n  lr: .inf\n  seed: -1\n")
    line = _run(["plan", str(tmp_path / "cfg.yaml")], capsys)
    assert "2 problems" in line and "cfg.yaml:2: train.lr" in line and "cfg.yaml:3: train.seed" in line


def test_question_and_item_files_refuse_duplicate_keys_too(tmp_path):
    """The item/question readers use the same YAML reader: a duplicate key names both lines."""
    from finetrack.evaluate.distribution import DistributionError, load_items
    from finetrack.evaluate.questions import QuestionError, load_questions

    f = tmp_path / "items.yaml"
    f.write_text("- prompt: a\n  options: [1, 2]\n  target: [1, 1]\n  prompt: b\n")
    with pytest.raises(DistributionError, match=r"items.yaml:4: duplicate key '0.prompt' \(first at line 1\)"):
        load_items(f)
    q = tmp_path / "q.yaml"
    q.write_text("- id: a\n  question: one\n  question: two\n")
    with pytest.raises(QuestionError, match=r"q.yaml:3: duplicate key"):
        load_questions(q)


# ------------------------------------------------------------------ validation during training, early stopping, best, callbacks
PROBE = b"eval:\n  every_steps: 5\n  suites:\n    - {name: probe, kind: python, function: 'probes:score'}\n"
HELD_OUT = b"data:\n  eval_split: 0.1\neval:\n  loss_every_steps: 5\n"

WATCH_CASES = [
    (
        "es_metric_not_validation",
        b"train:\n  early_stopping:\n    metric: loss\n",
        [":3:", "train.early_stopping.metric=loss: not a validation metric", "val/<suite>.<metric>"],
    ),
    (
        "es_eval_loss_without_eval_split",
        b"train:\n  early_stopping:\n    metric: eval_loss\n",
        [":3:", "train.early_stopping.metric=eval_loss", "data.eval_split and eval.loss_every_steps"],
    ),
    (
        "es_eval_loss_without_loss_every_steps",
        b"data:\n  eval_split: 0.1\ntrain:\n  early_stopping: {metric: eval_loss}\n",
        [":4:", "train.early_stopping.metric=eval_loss", "eval.loss_every_steps"],
    ),
    (
        "es_unknown_suite",
        PROBE + b"train:\n  early_stopping: {metric: val/nope.score, mode: max}\n",
        [":6:", "train.early_stopping.metric=val/nope.score", "no suite 'nope' in eval.suites", "probe"],
    ),
    (
        "es_suite_without_a_dot",
        PROBE + b"train:\n  early_stopping: {metric: val/probe, mode: max}\n",
        [":6:", "train.early_stopping.metric=val/probe: not a validation metric"],
    ),
    (
        "best_suite_not_run_during_training",
        b"eval:\n  suites:\n    - {name: probe, kind: python, function: 'probes:score'}\ncheckpoint:\n  best: {metric: val/probe.score, mode: max}\n",
        [":5:", "checkpoint.best.metric=val/probe.score", "suite 'probe' does not run during training"],
    ),
    (
        "best_suite_every_steps_zero",
        (
            b"eval:\n  every_steps: 5\n  suites:\n    - {name: probe, kind: python, function: 'probes:score', every_steps: 0}\n"
            b"checkpoint:\n  best: {metric: val/probe.score, mode: max}\n"
        ),
        ["checkpoint.best.metric=val/probe.score", "does not run during training"],
    ),
    (
        "es_mode_auto_ambiguous",
        PROBE + b"train:\n  early_stopping:\n    metric: val/probe.score\n",
        [":6:", "train.early_stopping.mode=auto", "val/probe.score is ambiguous", "set train.early_stopping.mode=min or max"],
    ),
    ("eval_every_steps_without_suites", b"eval:\n  every_steps: 5\n", [":2:", "eval.every_steps has no effect without eval.suites"]),
    ("eval_every_steps_zero", PROBE.replace(b"every_steps: 5", b"every_steps: 0"), [":2:", "eval.every_steps", "greater than 0"]),
    (
        "suite_every_steps_negative",
        b"eval:\n  suites:\n    - name: probe\n      kind: python\n      function: 'probes:score'\n      every_steps: -1\n",
        [":6:", "eval.suites.0.every_steps", "greater than or equal to 0"],
    ),
    (
        "best_metric_not_validation",
        b"checkpoint:\n  best:\n    metric: accuracy\n",
        [":3:", "checkpoint.best.metric=accuracy: not a validation metric"],
    ),
    ("best_bad_mode", HELD_OUT + b"checkpoint:\n  best:\n    mode: lowest\n", [":7:", "checkpoint.best.mode", "'min' or 'max'"]),
    (
        "es_patience_zero",
        HELD_OUT + b"train:\n  early_stopping:\n    patience: 0\n",
        [":7:", "train.early_stopping.patience", "greater than 0"],
    ),
    (
        "es_min_delta_negative",
        HELD_OUT + b"train:\n  early_stopping:\n    min_delta: -0.1\n",
        [":7:", "train.early_stopping.min_delta", "greater than or equal to 0"],
    ),
    (
        "callback_without_colon",
        b"train:\n  callbacks:\n    - my_callbacks.Recorder\n",
        [":3:", "train.callbacks.0.function", "pattern", "my_callbacks.Recorder"],
    ),
    (
        "callback_options_not_a_mapping",
        b"train:\n  callbacks:\n    - function: cb.py:Recorder\n      options: [1, 2]\n",
        [":4:", "train.callbacks.0.options"],
    ),
    ("callbacks_not_a_list", b"train:\n  callbacks: cb.py:Recorder\n", [":2:", "train.callbacks", "list"]),
]


# ------------------------------------------------------------------------------------------ mixtures (data.sources)
SOURCES = b"data:\n  sources:\n    - {path: a.jsonl, weight: 0.5}\n    - {path: b.jsonl, weight: 0.5}\n"
MIXTURE_CASES = [
    ("path_and_sources", SOURCES + b"  path: c.jsonl\n", ["data.path and data.sources are both set"]),
    (
        "weight_zero",
        b"data:\n  sources:\n    - {path: a.jsonl, weight: 0}\n",
        [":3:", "data.sources.0.weight", "greater than or equal to 0.000001"],
    ),
    # two weights of 1e308 summed to inf (every target share 0.0); one of 1e-320 was never drawn
    (
        "weight_huge",
        b"data:\n  sources:\n    - {path: a.jsonl, weight: 1.0e+308}\n",
        [":3:", "data.sources.0.weight", "less than or equal to 1000000"],
    ),
    (
        "weight_tiny",
        b"data:\n  sources:\n    - {path: a.jsonl, weight: 1.0e-320}\n",
        [":3:", "data.sources.0.weight", "greater than or equal to 0.000001"],
    ),
    ("weight_missing", b"data:\n  sources:\n    - {path: a.jsonl}\n", [":3:", "data.sources.0.weight", "required"]),
    ("path_missing", b"data:\n  sources:\n    - {weight: 1}\n", [":3:", "data.sources.0.path", "required"]),
    (
        "same_name_twice",
        b"data:\n  sources:\n    - {path: x/a.jsonl, weight: 1}\n    - {path: y/a.jsonl, weight: 1}\n",
        ["data.sources.1 and data.sources.0 are both named 'a'", "distinct name"],
    ),
    ("bad_name", b"data:\n  sources:\n    - {name: 'my set', path: a.jsonl, weight: 1}\n", ["data.sources.0.name='my set'", "letters"]),
    ("eval_file_for_all", SOURCES + b"  eval_split: held.jsonl\n", ["data.eval_split=held.jsonl", "data.sources.N.eval_split"]),
    ("source_eval_fraction", b"data:\n  sources:\n    - {path: a.jsonl, weight: 1, eval_split: 1.5}\n", ["data.sources.0.eval_split=1.5"]),
    (
        "source_unknown_column",
        b"data:\n  sources:\n    - {path: a.jsonl, weight: 1, columns: {question: q}}\n",
        ["data.sources.0.columns.question"],
    ),
    ("source_unknown_key", b"data:\n  sources:\n    - {path: a.jsonl, weight: 1, share: 0.5}\n", [":3:", "data.sources.0.share"]),
    ("on_source_end_alone", b"data:\n  on_source_end: stop\n", [":2:", "data.on_source_end has no effect without data.sources"]),
    ("on_source_end_bad", SOURCES + b"  on_source_end: wrap\n", [":5:", "data.on_source_end", "'repeat' or 'stop'"]),
    ("sources_not_a_list", b"data:\n  sources: a.jsonl\n", [":2:", "data.sources", "list"]),
    (
        "watch_unknown_source",
        SOURCES + b"  eval_split: 0.1\neval:\n  loss_every_steps: 5\ncheckpoint:\n  best: {metric: source/c.eval_loss}\n",
        ["checkpoint.best.metric=source/c.eval_loss: no source 'c' in data.sources", "['a', 'b']"],
    ),
    (
        "watch_source_without_held_out_rows",
        b"data:\n  sources:\n    - {path: a.jsonl, weight: 1, eval_split: 0.1}\n    - {path: b.jsonl, weight: 1}\n"
        b"eval:\n  loss_every_steps: 5\ncheckpoint:\n  best: {metric: source/b.eval_loss}\n",
        ["checkpoint.best.metric=source/b.eval_loss: source 'b' has no held-out rows"],
    ),
]


@pytest.mark.parametrize(
    "content, expected",
    [c[1:] for c in FILE_CASES + WATCH_CASES + MIXTURE_CASES],
    ids=[c[0] for c in FILE_CASES + WATCH_CASES + MIXTURE_CASES],
)
def test_bad_config_file(content, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_bytes(content)
    line = _run(["plan", "cfg.yaml"], capsys)
    for text in ["cfg.yaml", *expected]:
        assert text in line, (text, line)


def test_mode_auto_reads_the_direction_from_a_clear_name(tmp_path, capsys):
    """Not an error: a suite metric whose name says which way is better (loss: min), and the held-out loss."""
    (tmp_path / "cfg.yaml").write_bytes(
        HELD_OUT + b"  every_steps: 5\n  suites:\n    - {name: held, kind: loss}\n"
        b"train:\n  early_stopping: {metric: val/held.loss}\ncheckpoint:\n  best: {}\n"
    )
    assert main(["plan", str(tmp_path / "cfg.yaml")]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("{function: 'missing.py:Recorder'}", ["train.callbacks[0].function=missing.py:Recorder", "no such file missing.py"]),
        ("{function: 'no_such_module_xyz:Recorder'}", ["train.callbacks[0].function=no_such_module_xyz:Recorder", "no module"]),
        ("'cb.py:Nope'", ["train.callbacks[0].function=cb.py:Nope", "defines no function or class 'Nope'"]),
        ("{function: 'cb.py:Recorder', options: {colour: red}}", ["callback cb.py:Recorder", "options {'colour': 'red'}", "TypeError"]),
    ],
    ids=["missing_file", "missing_module", "missing_class", "unknown_option"],
)
def test_bad_callback_is_one_error_line_before_any_work(entry, expected, tmp_path, capsys, monkeypatch, tiny_model_dir, chat_file):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cb.py").write_text("class Recorder:\n    def on_stop(self, view):\n        pass\n")
    line = _run(["train", f"model.name={tiny_model_dir}", f"data.path={chat_file}", "output.dir=run", f"train.callbacks=[{entry}]"], capsys)
    for text in expected:
        assert text in line, (text, line)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "settings, expected",
    [
        (
            [
                "eval.every_steps=2",
                "eval.suites=[{name: probe, kind: python, function: 'ft_bad_probe:probe'}]",
                "train.early_stopping={metric: val/probe.nope, mode: max}",
            ],
            ["train.early_stopping.metric", "val/probe.nope", "not measured", "val/probe.score"],
        ),
        (
            ["data.eval_split=0.25", "eval.loss_every_steps=2", "checkpoint.best={metric: eval_nope, mode: min}"],
            ["checkpoint.best.metric", "eval_nope", "not measured", "eval_loss"],
        ),
    ],
    ids=["suite_metric", "held_out_term"],
)
def test_a_watched_metric_that_is_not_produced_fails_at_the_first_validation(
    settings, expected, tmp_path, capsys, monkeypatch, tiny_model_dir, chat_file
):
    """The config cannot know which metrics a suite or the objective gives: the first validation that measures the
    watched one's suite (step 0, the base model, for a suite; the first held-out loss for eval_*) says so in one line
    naming the key to fix, before any training for a suite."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ft_bad_probe.py").write_text("def probe(model, tokenizer, options):\n    return {'score': 1.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["train", f"model.name={tiny_model_dir}", f"data.path={chat_file}", "output.dir=run", "data.max_length=256"]
    line = _run([*argv, "train.micro_batch_size=4", "train.max_steps=6", *settings], capsys)
    for text in expected:
        assert text in line, (text, line)
    # a suite's metric is refused at step 0, before any training; the held-out loss's at its first validation (step 2)
    logged = (tmp_path / "run/metrics.jsonl").read_text().splitlines() if (tmp_path / "run/metrics.jsonl").exists() else []
    assert [json.loads(x)["step"] for x in logged] == ([] if "eval.every_steps=2" in settings else [1])
    assert ("at step 0" if "eval.every_steps=2" in settings else "at step 2") in line
    assert not (tmp_path / "run/checkpoints").exists() or not any((tmp_path / "run/checkpoints").iterdir())
