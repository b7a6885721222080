"""`eval.engine: hf | vllm | auto`: the choice and its fallbacks for real on this machine, what vLLM cannot serve read from
real adapter saves, the cache-key rule; on a CUDA GPU with vllm, both engines' answers compared through `finetrack eval`.

On a machine without a CUDA GPU or vllm the GPU tests are skipped with their reason (they need both); the CPU tests
check that machine's answers: auto -> hf with the reason, an explicit vllm -> one error line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_model, chat_rows, read_jsonl, train_argv, write_chat_jsonl

from finetrack.cli import main
from finetrack.config import Environment, effective_dump, load_config, resolve_model
from finetrack.evaluate.engine import Choice, adapter_unservable, choose, key_engine, plan, vllm_missing, vllm_rank
from finetrack.evaluate.runner import suite_key
from finetrack.evaluate.vllm_engine import answer_seed
from finetrack.models import build_model, load_tokenizer, save_weights
from finetrack.schema import EMBEDDED_NAME

MISSING = vllm_missing()  # why vLLM cannot run here (None on a machine with a CUDA GPU and vllm)
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None, reason="needs a CUDA GPU and vllm"
)


def judge_suite(questions: Path, **generation) -> dict:
    return {
        "name": "qa",
        "kind": "judge",
        "questions": str(questions),
        "generation": {"max_new_tokens": 4, **generation},
        "judges": [{"kind": "pattern", "metric": "has_a", "pattern": "a"}],
        "rates": {"low": "has_a < 50"},
    }


def cpu_config(*overrides: str):
    """A config resolved for this CPU as training and eval resolve it (dtype, attention)."""
    cfg, _ = resolve_model(load_config(None, list(overrides)), Environment("cpu", False, 1, 0))
    return cfg


def run_dir_with(tmp_path: Path, model_dir: Path, suites: list[dict], *overrides: str) -> Path:
    """A run directory as `finetrack eval` reads it (config.resolved.yaml, resolved for this CPU), nothing trained: step 0 only."""
    data = write_chat_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    run = tmp_path / "run"
    run.mkdir()
    cfg = cpu_config(f"model.name={model_dir}", f"data.path={data}", f"output.dir={run}", f"eval.suites={json.dumps(suites)}", *overrides)
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(effective_dump(cfg), sort_keys=False))
    return run


@pytest.fixture
def questions(tmp_path) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "sky", "question": "What colour is the sky?"}) + "\n")
    return path


# ------------------------------------------------------------------------------------------ the choice, on this machine
@pytest.mark.skipif(MISSING is None, reason="this machine has a CUDA GPU and vllm: auto picks vllm here")
def test_auto_picks_hf_here_and_says_why():
    assert choose("auto") == Choice("hf", f"eval.engine=auto: {MISSING}")
    assert choose("hf") == Choice("hf", "eval.engine=hf")


@pytest.mark.skipif(MISSING is None, reason="this machine has a CUDA GPU and vllm: eval.engine=vllm runs here")
def test_explicit_vllm_here_is_one_error_line_before_any_model_loads(tmp_path, tiny_model_dir, questions, capsys):
    run = run_dir_with(tmp_path, tiny_model_dir, [judge_suite(questions)])
    code = main(["eval", str(run), "--steps", "0", "eval.engine=vllm"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in text, text
    assert "eval.engine=vllm" in errors[0] and MISSING in errors[0] and "eval.engine=auto" in errors[0], errors[0]
    assert not (run / "eval" / "step-000000.json").exists()


@pytest.mark.skipif(MISSING is None, reason="this machine has a CUDA GPU and vllm: auto picks vllm here")
def test_auto_eval_generates_with_hf_and_says_so_once(tmp_path, tiny_model_dir, questions, capsys):
    run = run_dir_with(
        tmp_path, tiny_model_dir, [judge_suite(questions), {"name": "heldout", "kind": "loss", "data": str(tmp_path / "chat.jsonl")}]
    )
    assert main(["eval", str(run), "--steps", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("eval engine: hf (eval.engine=auto: ") == 1, err
    suites = json.loads((run / "eval" / "step-000000.json").read_text())["suites"]
    assert suites["qa"]["engine"] == "hf" and "engine" not in suites["heldout"]  # only answers come from an engine


def test_no_engine_line_when_no_suite_generates(tmp_path, tiny_model_dir, capsys):
    run = run_dir_with(
        tmp_path, tiny_model_dir, [{"name": "heldout", "kind": "loss", "data": str(tmp_path / "chat.jsonl")}], "eval.engine=hf"
    )
    assert main(["eval", str(run), "--steps", "0"]) == 0
    assert "eval engine" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ what vLLM cannot serve
def finetrack_adapter(folder: Path, model_dir: Path, *overrides: str) -> Path:
    """An adapter as finetrack saves it (models.build_model + save_weights) for the given model.* settings."""
    cfg = cpu_config(f"model.name={model_dir}", *overrides)
    save_weights(build_model(cfg.model, torch.device("cpu")), load_tokenizer(cfg.model), folder)
    return folder


def peft_adapter(folder: Path, tokenizer, **lora) -> Path:
    """An adapter saved by PEFT itself, with LoRA options finetrack never writes (modules_to_save, bias, ...)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model(tokenizer), LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **lora}))
    model.save_pretrained(folder)
    return folder


def test_finetrack_lora_adapters_are_servable(tmp_path, tiny_model_dir):
    assert adapter_unservable(finetrack_adapter(tmp_path / "lora", tiny_model_dir)) is None
    assert adapter_unservable(finetrack_adapter(tmp_path / "rs", tiny_model_dir, "model.lora.use_rslora=true", "model.lora.r=64")) is None


def test_adapters_vllm_cannot_serve_are_detected_from_their_files(tmp_path, tiny_model_dir, tiny_tokenizer):
    dora = finetrack_adapter(tmp_path / "dora", tiny_model_dir, "model.lora.use_dora=true")
    assert "DoRA" in adapter_unservable(dora)
    cases = {
        "modules_to_save": {"modules_to_save": ["lm_head"]},
        "bias=lora_only": {"bias": "lora_only"},
        "rank 600": {"r": 600},
        "alpha_pattern": {"alpha_pattern": {"q_proj": 64}},
        "embed_tokens": {"target_modules": ["q_proj", "embed_tokens"]},
        "lm_head": {"target_modules": ["v_proj", "lm_head"]},
    }
    for fragment, lora in cases.items():
        reason = adapter_unservable(peft_adapter(tmp_path / fragment.replace(" ", "-"), tiny_tokenizer, **lora))
        assert reason is not None and fragment in reason, (fragment, reason)
    plain = peft_adapter(tmp_path / "plain", tiny_tokenizer)
    assert adapter_unservable(plain) is None
    assert "above max_lora_rank 1" in adapter_unservable(plain, max_rank=1)  # a running engine's smaller limit
    assert "no adapter_config.json" in adapter_unservable(tmp_path)


def test_a_pass_falls_back_whole_and_names_why(tmp_path, tiny_model_dir, tiny_tokenizer):
    vllm = Choice("vllm", "eval.engine=vllm")
    good = finetrack_adapter(tmp_path / "good", tiny_model_dir)
    bad = peft_adapter(tmp_path / "bad", tiny_tokenizer, modules_to_save=["lm_head"])

    def cfg(*overrides: str):
        return load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=bfloat16", *overrides])

    assert plan(vllm, cfg(), [good]) == vllm
    fallback = plan(vllm, cfg(), [good, bad])  # one unservable checkpoint: every step of the pass on hf
    assert fallback.engine == "hf" and str(bad) in fallback.reason and "modules_to_save" in fallback.reason
    assert plan(Choice("hf", "eval.engine=hf"), cfg(), [bad]).engine == "hf"
    for overrides, fragment in [
        (["model.dtype=float32"], "float16 / bfloat16"),
        (["model.method=qlora"], "4-bit"),
        (["model.method=full"], "whole model"),
        (["model.lora.use_dora=true"], "DoRA"),
    ]:
        chosen = plan(vllm, cfg(*overrides), [good])
        assert chosen.engine == "hf" and fragment in chosen.reason, (overrides, chosen)
    assert plan(vllm, cfg("model.method=full"), []) == vllm  # the base model alone: vLLM serves it as transformers loads it
    assert plan(vllm, cfg("model.method=qlora"), []).engine == "hf"  # transformers evaluates a 4-bit base


def test_max_lora_rank_is_one_vllm_accepts():
    assert [vllm_rank(r) for r in (1, 2, 8, 9, 16, 17, 300, 320, 512)] == [1, 8, 8, 16, 16, 32, 320, 320, 512]


# ------------------------------------------------------------------------------------------ cache keys, sampling seeds
def test_cache_key_names_the_engine_only_for_answers_vllm_sampled(tmp_path, tiny_model_dir, questions):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"prompt": "Rate 1-3", "options": ["1", "2", "3"], "target": [1, 1, 1]}) + "\n")
    suites = [
        judge_suite(questions, temperature=0.0),
        {**judge_suite(questions, temperature=1.0), "name": "sampled"},
        {"name": "dist", "kind": "distribution", "items": str(items)},
        {"name": "dist_sampled", "kind": "distribution", "items": str(items), "method": "sample"},
    ]
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"eval.suites={json.dumps(suites)}"])
    greedy, sampled, probs, dist_sampled = cfg.eval.suites
    for suite in (greedy, probs):  # greedy answers and probabilities are the same in both engines: one result
        assert key_engine(suite, "vllm") is None
        assert suite_key(suite, "ck", cfg, "vllm") == suite_key(suite, "ck", cfg, "hf") == suite_key(suite, "ck", cfg)
    for suite in (sampled, dist_sampled):  # another random stream: another result, and hf keeps its old key
        assert key_engine(suite, "vllm") == "vllm" and key_engine(suite, "hf") is None
        assert suite_key(suite, "ck", cfg, "vllm") != suite_key(suite, "ck", cfg, "hf") == suite_key(suite, "ck", cfg)


def test_vllm_sampling_seeds_are_per_answer_and_reproducible():
    seeds = [answer_seed(0, i) for i in range(2000)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**32 for s in seeds)
    assert seeds == [answer_seed(0, i) for i in range(2000)]
    assert not set(seeds) & {answer_seed(1, i) for i in range(2000)}  # another gen.seed: other streams, not shifted ones


# ------------------------------------------------------------------------------------------ GPU: both engines compared
def finetrack(*argv: str, timeout_s: int = 900) -> subprocess.CompletedProcess:
    """The real command line in a fresh process: each vLLM engine starts and ends with its own process."""
    done = subprocess.run(
        [sys.executable, "-m", "finetrack", *argv], check=False, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> Path:
    """A short LoRA run of the embedded model on the GPU (bfloat16), checkpoints at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("gpu")
    data = write_chat_jsonl(tmp / "chat.jsonl", chat_rows(48))
    run = tmp / "run"
    argv = train_argv(EMBEDDED_NAME, data, run, "model.dtype=bfloat16", "train.max_steps=6", "checkpoint.every_steps=3", "train.lr=2e-4")
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


PROBE = [
    "What colour is the sky?",
    "Name three fruits.",
    "What is 12 times 12?",
    "Write one sentence about the sea.",
    "Translate 'good morning' into French.",
    "Who wrote Hamlet?",
    "Give a synonym for 'happy'.",
    "What is the capital of Japan?",
]


def answers_by_step(run: Path) -> dict[int, list[str]]:
    return {
        int(p.stem[5:]): [r["answer"] for r in read_jsonl(p) if r["suite"] == "probe"]
        for p in sorted((run / "eval" / "responses").glob("*.jsonl"))
    }


@needs_gpu
@pytest.mark.e2e
def test_greedy_answers_are_identical_in_both_engines(gpu_run, tmp_path):
    questions = tmp_path / "probe.jsonl"
    questions.write_text("".join(json.dumps({"id": f"p{i}", "question": q}) + "\n" for i, q in enumerate(PROBE)))
    suite = {**judge_suite(questions, temperature=0.0, max_new_tokens=48), "name": "probe"}
    suites = f"eval.suites={json.dumps([suite])}"
    finetrack("eval", str(gpu_run), suites, "eval.engine=hf")
    hf = answers_by_step(gpu_run)
    shutil.rmtree(gpu_run / "eval")
    vllm = finetrack("eval", str(gpu_run), suites, "eval.engine=vllm")
    assert "eval engine: vllm (eval.engine=vllm)" in vllm.stderr
    assert answers_by_step(gpu_run) == hf and sorted(hf) == [0, 3, 6] and all(len(a) == len(PROBE) for a in hf.values())
    record = json.loads((gpu_run / "eval" / "step-000006.json").read_text())
    assert record["suites"]["probe"]["engine"] == "vllm"
    again = finetrack("eval", str(gpu_run), suites, "eval.engine=hf")  # greedy: the engine is not in the key
    assert "cached: 3 (step, suite) result(s) unchanged" in again.stdout


@needs_gpu
@pytest.mark.e2e
def test_sampled_distributions_agree_within_their_confidence_intervals(gpu_run, tmp_path):
    items = tmp_path / "items.jsonl"
    prompts = ["How much do you like rain? Reply with one number from 1 to 5.", "Rate pizza from 1 to 5. Reply with the number only."]
    items.write_text(
        "".join(json.dumps({"id": f"i{k}", "prompt": p, "options": list("12345"), "target": [1] * 5}) + "\n" for k, p in enumerate(prompts))
    )
    samples = 400
    suite = {"name": "d", "kind": "distribution", "items": str(items), "method": "sample", "num_samples": samples}
    suites = f"eval.suites={json.dumps([{**suite, 'generation': {'temperature': 1.0, 'max_new_tokens': 4}}])}"
    counts = {}
    for engine in ("hf", "vllm"):
        finetrack("eval", str(gpu_run), suites, f"eval.engine={engine}", "--steps", "6")
        rows = [r for r in read_jsonl(gpu_run / "eval" / "responses" / "step-000006.jsonl") if r["suite"] == "d"]
        counts[engine] = {r["id"]: r["option_counts"] + [r["unparsed"]] for r in rows}
    for item in counts["hf"]:
        for a, b in zip(counts["hf"][item], counts["vllm"][item]):  # each option's share (and the unparsed share)
            pooled = (a + b) / (2 * samples)
            spread = math.sqrt(max(pooled * (1 - pooled), 1 / samples) * 2 / samples)
            assert abs(a - b) / samples <= 4.5 * spread, (item, counts)


# ------------------------------------------------------------------------------------------ benchmarks/gpu_check.py
GPU_CHECK = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_parses_its_arguments_here():
    done = subprocess.run([sys.executable, str(GPU_CHECK), "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "of train, qlora, paged, fsdp, zero2, zero3, eval" in " ".join(done.stdout.split()), (
        done.stdout + done.stderr
    )
    bad = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--parts", "train,nope"], check=False, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "unknown ['nope']" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the check would run")
def test_gpu_check_without_cuda_says_so_and_measures_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--out", str(tmp_path / "out")], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "nothing was measured" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_gpu_check_builds_its_model_around_a_given_tokenizer(tmp_path, tiny_model_dir, monkeypatch):
    """--tokenizer DIR: the training parts need no embedded model (a GPU machine without network has none)."""
    import importlib.util

    from transformers import AutoConfig, AutoTokenizer

    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    monkeypatch.setattr(gpu_check, "MODEL_SHAPE", small)  # the ~0.5B shape is the same code at 16 s
    folder = gpu_check.build_model_dir(tmp_path / "model", Path(tiny_model_dir))
    given = AutoTokenizer.from_pretrained(tiny_model_dir)
    built = AutoTokenizer.from_pretrained(folder)
    assert AutoConfig.from_pretrained(folder).vocab_size == len(given) and built.get_vocab() == given.get_vocab()
