"""Judges: each maps (question, answer) pairs to a score in [0, 100], or None when it cannot score one.

Every judge has the same interface, `score(pairs: list[tuple[str, str]]) -> list[float | None]`
(the `Judge` protocol), one result per pair in order:

- `LocalJudge`: a local Hugging Face causal LM reads a judge prompt and the score is the expected
  value of the number it would answer (0-100), computed exactly from its token probabilities.
- `PatternJudge`: a regular expression found in the answer -> 100, else 0.
- `PythonJudge`: "module:function" called as function(question, answer).

- `OpenAIJudge` (in `openai_judge.py`): an OpenAI-compatible endpoint; it fills the same template, asks
  for the top logprobs of the first answer token, and hands the numbers it finds to
  `number_distribution_score`, as the emergent-misalignment evaluation does.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .questions import fill_template, template_problem
from .spec import EvalError

log = logging.getLogger("finetrack")

MAX_SCORE = 100
_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
_ATTENTION_WITH_4D_MASKS = ("eager", "sdpa")
_logged_end_tokens: set[int] = set()  # id(tokenizer): say once per tokenizer which end-of-turn token is used


class JudgeError(EvalError):
    """A judge that cannot be built or a value it cannot accept; the message says what to do."""


class Judge(Protocol):
    def score(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        """One score in [0, 100] or None per (question, answer) pair, in order."""
        ...


def number_distribution_score(probs: dict[int, float], min_total: float = 0.25) -> float | None:
    """Expected value of a distribution over the answers 0..100, renormalized over those integers.

    Keys outside 0..100 are ignored. None when the total probability on 0..100 is below min_total
    (the judge mostly did not answer with a number), or is zero.
    """
    in_range = {n: p for n, p in probs.items() if 0 <= n <= MAX_SCORE}
    total = sum(in_range.values())
    if total <= 0 or total < min_total:
        return None
    return sum(n * p for n, p in in_range.items()) / total


# ------------------------------------------------------------------------------------------ pattern / python
class PatternJudge:
    """100.0 when `pattern` is found anywhere in the answer (re.search), else 0.0.

    flags: letters of re flags, any of i (ignore case), m (multiline), s (dot matches newline), x (verbose).
    """

    def __init__(self, pattern: str, flags: str = "i") -> None:
        unknown = sorted(set(flags) - set(_REGEX_FLAGS))
        if unknown:
            raise JudgeError(f"pattern judge flags {flags!r}: unknown letter(s) {unknown}; use any of {''.join(_REGEX_FLAGS)}")
        bits = 0
        for letter in flags:
            bits |= _REGEX_FLAGS[letter]
        try:
            self.regex = re.compile(pattern, bits)
        except re.error as e:
            raise JudgeError(
                f"pattern judge: {pattern!r} is not a valid regular expression ({e}); fix it (escape literal characters with \\)"
            ) from None

    def score(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        """100.0 for each answer the pattern is found in, 0.0 for the others."""
        return [100.0 if self.regex.search(answer) else 0.0 for _, answer in pairs]


class PythonJudge:
    """A scoring function named "module:function" (imported, never unpickled or evaluated).

    The function is called as function(question, answer) and must return None or a number in [0, 100].
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.function = _import_function(spec)

    def score(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        """function(question, answer) per pair; raises JudgeError on a value outside None / [0, 100]."""
        out: list[float | None] = []
        for i, (question, answer) in enumerate(pairs):
            value = self.function(question, answer)
            if value is None:
                out.append(None)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= MAX_SCORE:
                raise JudgeError(
                    f"python judge {self.spec}: returned {value!r} ({type(value).__name__}) for pair #{i} "
                    f"(question {question[:60]!r}); it must return None or a number in [0, 100]"
                )
            out.append(float(value))
        return out


def _import_function(spec: str) -> Callable[[str, str], object]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise JudgeError(f"python judge {spec!r}: write it as 'module:function' (e.g. mypkg.judges:refusal)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise JudgeError(
            f"python judge {spec!r}: cannot import module '{module_name}' ({e}); install it or put its folder on PYTHONPATH"
        ) from None
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise JudgeError(
                f"python judge {spec!r}: module '{module_name}' ({getattr(module, '__file__', '?')}) has no attribute '{attr}'"
            )
        target = getattr(target, part)
    if not callable(target):
        raise JudgeError(f"python judge {spec!r}: '{attr}' is a {type(target).__name__}, not a function of (question, answer)")
    return target


# ------------------------------------------------------------------------------------------ local model
class LocalJudge:
    """A local causal LM as a 0-100 judge: the expected number it answers to the filled template.

    For each pair the template is filled, rendered as one user message with the tokenizer's chat
    template (add_generation_prompt=True), and for every n in 0..100 we compute
    P(the reply is exactly str(n)) = P(tokens of str(n), then the end-of-turn token | prompt).
    Requiring the end-of-turn token keeps "4" from counting the mass of "42", and multiplying over
    the tokens handles numbers that span several tokens. The candidates are tokenized on their own
    (no special tokens) and appended to the prompt ids, since tokenizing prompt + candidate jointly can
    merge tokens across the boundary. Only this canonical tokenization of each number is counted.

    How (see `_score_batch`): one forward over the prompts fills a KV cache, then one more forward scores
    all 101 candidates at once as a prefix tree ("1" -> "10" -> "100") of 101 tokens that attend to the
    cached prompt and to their own ancestors (a 4D attention mask). That costs about 101 extra token
    positions per pair, instead of 101 copies of the prompt (a padded batch of full sequences) or 101
    copies of its KV cache (a batch of continuations over an expanded cache, which on a 1,000-token
    prompt is gigabytes). It needs eager or sdpa attention (no flash attention: it takes no 4D mask).
    """

    def __init__(
        self,
        model_dir: str | Path,
        template: str,
        device: str = "cpu",
        min_total: float = 0.25,
        batch_size: int = 8,
        dtype: str = "float32",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise JudgeError(f"local judge: {model_dir} is not a model folder (no config.json); give a local Hugging Face model directory")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise JudgeError(f"local judge dtype {dtype!r}: use float32, bfloat16 or float16")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), trust_remote_code=False, local_files_only=True)
        self._setup(model.to(device).eval(), tokenizer, template, min_total, batch_size)

    @classmethod
    def from_model(cls, model, tokenizer, template: str, min_total: float = 0.25, batch_size: int = 8) -> LocalJudge:
        """A judge over an already loaded model and tokenizer (not copied; put the model in eval mode yourself)."""
        judge = cls.__new__(cls)
        judge._setup(model, tokenizer, template, min_total, batch_size)
        return judge

    def _setup(self, model, tokenizer, template: str, min_total: float, batch_size: int) -> None:
        problem = template_problem(template)
        if problem:
            raise JudgeError(f"local judge template {problem}")
        if not getattr(tokenizer, "chat_template", None):
            raise JudgeError("local judge: the tokenizer has no chat template; use an instruct / chat model as the judge")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise JudgeError(f"local judge batch_size must be an integer >= 1, got {batch_size!r}")
        attention = getattr(model.config, "_attn_implementation", None)
        if attention not in (None, *_ATTENTION_WITH_4D_MASKS):
            raise JudgeError(
                f"local judge: the model uses attn_implementation={attention!r}, which takes no custom 4D attention mask; "
                "load the judge model with attn_implementation='sdpa'"
            )
        self.model, self.tokenizer, self.template = model, tokenizer, template
        if not 0 <= min_total <= 1:
            raise JudgeError(f"local judge min_total must be a probability in [0, 1], got {min_total!r}")
        self.min_total, self.batch_size = min_total, batch_size
        self.end_id = end_of_turn_id(tokenizer)
        self.candidates = [tokenizer(str(n), add_special_tokens=False)["input_ids"] for n in range(MAX_SCORE + 1)]
        self.tree = _PrefixTree(self.candidates, self.end_id)

    def prompt_ids(self, question: str, answer: str) -> list[int]:
        """Token ids of the judge prompt for one pair, ending where the judge's reply begins."""
        messages = [{"role": "user", "content": fill_template(self.template, question, answer)}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the rendered text already holds any BOS the template wants: add no more special tokens
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def number_probs(self, pairs: list[tuple[str, str]]) -> list[dict[int, float]]:
        """P(reply == str(n)) for n in 0..100, per pair."""
        prompts = [self.prompt_ids(q, a) for q, a in pairs]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
        out: list[dict[int, float]] = [{} for _ in prompts]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            logprobs = self._score_batch([prompts[i] for i in chunk])  # (b, 101)
            for row, i in enumerate(chunk):
                out[i] = {n: math.exp(lp) for n, lp in enumerate(logprobs[row].tolist())}
        return out

    def score(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        """number_distribution_score of each pair's number probabilities (None below min_total)."""
        return [number_distribution_score(p, self.min_total) for p in self.number_probs(pairs)]

    def _score_batch(self, prompts: list[list[int]]):
        """log P(candidate n, then end of turn | prompt) for every prompt and n: (b, 101) float32."""
        import torch
        from transformers import DynamicCache

        model, tree = self.model, self.tree
        device = next(model.parameters()).device
        dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype  # the compute dtype, also for quantized models
        b, prompt_len = len(prompts), max(len(p) for p in prompts)
        _check_window(model.config, prompt_len + tree.max_depth)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        ids = torch.zeros(b, prompt_len, dtype=torch.long, device=device)  # left padding: every prompt ends at column -1
        for r, p in enumerate(prompts):
            ids[r, prompt_len - len(p) :] = torch.tensor(p, device=device)
        valid = torch.arange(prompt_len, device=device)[None, :] >= (prompt_len - lengths)[:, None]  # (b, P)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)

        # Tree: every node sees the real prompt tokens, itself and its ancestors.
        tree_allowed = torch.cat(
            [valid[:, None, :].expand(b, tree.size, prompt_len), tree.allowed.to(device)[None].expand(b, -1, -1)], dim=-1
        )  # (b, Q, P + Q)
        tree_ids = tree.tokens.to(device)[None].expand(b, -1)
        tree_positions = lengths[:, None] + tree.depths.to(device)[None] - 1  # a depth-1 node sits right after the prompt

        # The prompt pass takes the usual 2D padding mask: transformers builds the causal mask (no (b, P, P)
        # tensor of ours) and keeps the pad rows finite; a NaN there would reach the tree pass through the
        # cache, which the brute-force test (a padded batch) would catch.
        # A plain DynamicCache keeps every position (one built from the config may crop sliding-window layers).
        cache = DynamicCache()
        with torch.inference_mode():
            first = model(
                input_ids=ids,
                attention_mask=valid.long(),
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            rest = model(
                input_ids=tree_ids,
                attention_mask=_additive(tree_allowed, dtype),
                position_ids=tree_positions,
                past_key_values=first.past_key_values,
                use_cache=True,
            )
        logits = torch.cat([first.logits[:, -1:], rest.logits], dim=1).float()  # (b, 1 + Q, V): row 0 = after the prompt
        # log-softmax read only where needed: no second (b, 1 + Q, V) tensor for large vocabularies
        normalizer = torch.logsumexp(logits, dim=-1)  # (b, 1 + Q)
        rows, tokens = tree.step_rows.to(device), tree.step_tokens.to(device)
        steps = logits[:, rows, tokens] - normalizer[:, rows]  # (b, 101, S)
        return (steps * tree.step_mask.to(device)).sum(-1).cpu()


class _PrefixTree:
    """The 101 candidate token sequences as a tree of their prefixes (one node per distinct prefix).

    tokens / depths (Q,): each node's last token and its length; allowed (Q, Q): node i may attend to
    node j (j is i or an ancestor of i). For candidate n, step s reads the log-probability of
    step_tokens[n, s] in logits row step_rows[n, s] (row 0: after the prompt; row k: after node k-1);
    the last real step is the end-of-turn token; step_mask zeroes the padding steps.
    """

    def __init__(self, candidates: list[list[int]], end_id: int) -> None:
        import torch

        index: dict[tuple[int, ...], int] = {}
        parents: list[int] = []
        for seq in candidates:
            if not seq:
                raise JudgeError("local judge: the tokenizer turns a number into no tokens; use another judge model")
            for k in range(1, len(seq) + 1):
                prefix = tuple(seq[:k])
                if prefix not in index:
                    index[prefix] = len(parents)
                    parents.append(index[prefix[:-1]] if k > 1 else -1)
        prefixes = sorted(index, key=index.get)
        self.size = len(prefixes)
        self.max_depth = max(len(p) for p in prefixes)
        self.tokens = torch.tensor([p[-1] for p in prefixes])
        self.depths = torch.tensor([len(p) for p in prefixes])
        self.allowed = torch.zeros(self.size, self.size, dtype=torch.bool)
        for i in range(self.size):
            j = i
            while j >= 0:
                self.allowed[i, j] = True
                j = parents[j]
        num_steps = max(len(seq) for seq in candidates) + 1
        rows = torch.zeros(len(candidates), num_steps, dtype=torch.long)
        toks = torch.zeros(len(candidates), num_steps, dtype=torch.long)
        mask = torch.zeros(len(candidates), num_steps)
        for n, seq in enumerate(candidates):
            targets = list(seq) + [end_id]
            for s, token in enumerate(targets):
                rows[n, s] = 0 if s == 0 else 1 + index[tuple(seq[:s])]
                toks[n, s] = token
                mask[n, s] = 1.0
        self.step_rows, self.step_tokens, self.step_mask = rows, toks, mask


def _additive(allowed, dtype):
    """A boolean (b, q, k) "may attend" mask as the additive (b, 1, q, k) float mask eager and sdpa both take
    (transformers passes a 4D mask through unchanged)."""
    import torch

    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _check_window(config, num_positions: int) -> None:
    """Scoring attends over the whole prompt: refuse prompts longer than a sliding attention window."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        sliding = any("sliding" in str(t) for t in layer_types)
    else:
        sliding = bool(window) and getattr(text, "use_sliding_window", True) is not False
    if sliding and window and num_positions > window:
        raise JudgeError(
            f"local judge: a judge prompt of {num_positions} tokens is longer than the model's sliding attention window ({window}); "
            "shorten the judge template or the answers, or use a judge model without sliding-window attention"
        )


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: the special token the chat template puts right after an
    assistant message (e.g. <|im_end|>, <|eot_id|>, <end_of_turn>), else the tokenizer's eos token."""
    sentinel = "ft-judge-sentinel-1729"
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except (TemplateError, ValueError):  # some templates reject a closing assistant turn (raise_exception): use eos below
        text = ""
    special = set(tokenizer.all_special_ids)
    end_id, source = None, ""
    if sentinel in text:
        tail = tokenizer(text.split(sentinel, 1)[1], add_special_tokens=False)["input_ids"]
        if tail and tail[0] in special:
            end_id, source = tail[0], "the chat template's end of an assistant turn"
    if end_id is None and tokenizer.eos_token_id is not None:
        end_id, source = tokenizer.eos_token_id, "the tokenizer's eos token (the chat template shows no special end-of-turn token)"
    if end_id is None:
        raise JudgeError(
            "local judge: the tokenizer has no eos token and its chat template ends a turn with no special token; use another judge model"
        )
    if id(tokenizer) not in _logged_end_tokens:
        _logged_end_tokens.add(id(tokenizer))
        log.info("local judge: a reply ends with %r (%s)", tokenizer.convert_ids_to_tokens(end_id), source)
    return end_id
