"""A judge behind an OpenAI-compatible chat completions endpoint (OpenAI, vLLM, llama.cpp's server, ...).

For each (question, answer) the judge template is filled and sent as one user message asking for a
single token with its top 20 log-probabilities; the score is `number_distribution_score` of the
probabilities of the tokens that are integers 0..100, as the emergent-misalignment evaluation does.
Only the first token is seen, so a number counts only when it is one token ("100" may not be).

Standard library only (urllib + a thread pool): no client package to install or keep in step.
The API key is read from an environment variable, sent only in the Authorization header, and kept
out of every log line and error message.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from .judges import MAX_SCORE, JudgeError, number_distribution_score
from .questions import fill_template, template_problem

log = logging.getLogger("finetrack")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
TOP_LOGPROBS = 20  # the most the OpenAI API returns
_BACKOFF_S = 1.0  # first wait before a retry; doubles each time (tests shorten it)
_MAX_WAIT_S = 60.0  # cap on a server's Retry-After
_RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
_INTEGER = re.compile(r"\d{1,3}")
_ERROR_TEXT_CHARS = 200


class _Retryable(Exception):
    """One failed attempt worth retrying; `wait_s` is the server's Retry-After when it gave one."""

    def __init__(self, what: str, wait_s: float | None = None) -> None:
        super().__init__(what)
        self.what, self.wait_s = what, wait_s


class OpenAIJudge:
    """An OpenAI-compatible endpoint as a 0-100 judge: the expected number in its first token's top logprobs.

    base_url: the API root ending before /chat/completions (default: $OPENAI_BASE_URL, else OpenAI's).
    api_key_env: the environment variable holding the key; unset is fine for a local server.
    min_total: a pair scores None when the top logprobs put less than this probability on 0..100.
    Requests run `max_concurrency` at a time; a connection error, timeout, 408 / 409 / 429 or 5xx is
    retried `retries` times with exponential backoff (honouring Retry-After), any other error is not.
    """

    def __init__(
        self,
        template: str,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        min_total: float = 0.25,
        timeout_s: float = 60,
        max_concurrency: int = 4,
        retries: int = 3,
    ) -> None:
        problem = template_problem(template)
        if problem:
            raise JudgeError(f"openai judge template {problem}")
        if not isinstance(model, str) or not model.strip():
            raise JudgeError(f"openai judge: model must be the endpoint's model name, got {model!r}")
        if not 0 <= min_total <= 1:
            raise JudgeError(f"openai judge min_total must be a probability in [0, 1], got {min_total!r}")
        if not timeout_s > 0:
            raise JudgeError(f"openai judge timeout_s must be > 0, got {timeout_s!r}")
        for name, value, least in (("max_concurrency", max_concurrency, 1), ("retries", retries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise JudgeError(f"openai judge {name} must be an integer >= {least}, got {value!r}")
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise JudgeError(f"openai judge base_url {self.base_url!r}: give an http:// or https:// URL (e.g. {DEFAULT_BASE_URL})")
        self.template, self.model, self.api_key_env = template, model, api_key_env
        self.min_total, self.timeout_s, self.max_concurrency, self.retries = min_total, timeout_s, max_concurrency, retries
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None:
            log.info("openai judge: $%s is not set; requests to %s go without an API key", api_key_env, self.base_url)

    def __repr__(self) -> str:  # never the key
        return f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def score(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        """number_distribution_score of each pair's number probabilities (None below min_total)."""
        return [number_distribution_score(p, self.min_total) for p in self.number_probs(pairs)]

    def number_probs(self, pairs: list[tuple[str, str]]) -> list[dict[int, float]]:
        """Probability of each integer 0..100 among the first token's top logprobs, per pair, in order."""
        if not pairs:
            return []
        prompts = [fill_template(self.template, q, a) for q, a in pairs]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts)), thread_name_prefix="openai-judge") as pool:
            futures = [pool.submit(self._ask, p) for p in prompts]
            try:
                return [number_probs_from_response(f.result(), self.base_url) for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()  # requests not started yet are dropped; running ones end on their own
                raise

    def _ask(self, prompt: str) -> dict:
        """POST one chat completion; the parsed JSON answer. Retries, then raises JudgeError."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": TOP_LOGPROBS,
        }
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.retries + 1):
            try:
                return self._post(url, body)
            except _Retryable as e:
                if attempt == self.retries:
                    raise JudgeError(
                        f"openai judge: POST {url} failed after {self.retries + 1} attempt(s): {e.what}; "
                        "check that the server is up and the judge's base_url (or $OPENAI_BASE_URL) is right"
                    ) from None
                wait_s = _BACKOFF_S * 2**attempt
                if e.wait_s is not None:
                    wait_s = max(wait_s, min(e.wait_s, _MAX_WAIT_S))
                log.warning("openai judge: %s: %s; retry %d/%d in %.1f s", url, e.what, attempt + 1, self.retries, wait_s)
                time.sleep(wait_s)
        raise AssertionError("unreachable")

    def _post(self, url: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            what = f"HTTP {e.code} {self._short(_read_quietly(e))}"
            if e.code in _RETRY_STATUSES:
                raise _Retryable(what, _retry_after_s(e.headers.get("Retry-After"))) from None
            raise JudgeError(f"openai judge: POST {url} answered {what}; check the model name, the URL and ${self.api_key_env}") from None
        except urllib.error.URLError as e:
            raise _Retryable(self._short(str(e.reason))) from None
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, a cut-off answer
            raise _Retryable(self._short(f"{type(e).__name__}: {e}")) from None
        try:
            return json.loads(raw)
        except ValueError:
            text = self._short(raw.decode(errors="replace"))
            raise JudgeError(f"openai judge: POST {url} answered with something that is not JSON: {text}") from None

    def _short(self, text: str) -> str:
        """Error text cut short and with the key blanked, should a server echo it back."""
        text = " ".join(text.split())
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text if len(text) <= _ERROR_TEXT_CHARS else text[:_ERROR_TEXT_CHARS] + "..."


def number_probs_from_response(response: dict, base_url: str = "the endpoint") -> dict[int, float]:
    """Probability of each integer 0..100 among the top logprobs of a chat completion's first token.

    A token counts when, stripped of whitespace, it is a plain integer in 0..100 ("7", " 42"); tokens
    that strip to the same number add up. Raises JudgeError when the response carries no logprobs.
    """
    try:
        first = response["choices"][0]["logprobs"]["content"][0]
        top = first["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        top = None
    if not top:
        raise JudgeError(
            f"openai judge: {base_url} returned no top logprobs for the first token; the endpoint must support "
            f"logprobs (the request asks for logprobs=true, top_logprobs={TOP_LOGPROBS}); use one that does "
            "(OpenAI chat models, vLLM, llama.cpp's server) or another judge"
        )
    probs: dict[int, float] = {}
    for entry in top:
        token, logprob = str(entry.get("token", "")).strip(), entry.get("logprob")
        if logprob is not None and _INTEGER.fullmatch(token) and int(token) <= MAX_SCORE:
            probs[int(token)] = probs.get(int(token), 0.0) + math.exp(float(logprob))
    return probs


def _read_quietly(error: urllib.error.HTTPError) -> str:
    """The error body's message (OpenAI's {"error": {"message": ...}} when it has that shape)."""
    try:
        text = error.read().decode(errors="replace")
    except OSError:
        return error.reason or ""
    try:
        message = json.loads(text)["error"]["message"]
        return str(message)
    except (ValueError, KeyError, TypeError):
        return text or str(error.reason or "")


def _retry_after_s(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None
