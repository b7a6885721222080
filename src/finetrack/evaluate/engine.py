"""Which engine generates the answers of `finetrack eval` (`eval.engine: hf | vllm | auto`), and when vLLM falls back.

hf: transformers' generate() on the model the other suites use (generate.py). vllm: one vLLM instance holding the
run's base model, each checkpoint a LoRA request of its adapter folder (vllm_engine.py). vLLM generates the answers of
judge suites and of distribution suites with method sample; every other suite (and the judges) runs on transformers as
before. auto: vllm when this machine has a CUDA GPU and vllm imports, else hf; `vllm` where either is missing is an error.

One engine per eval pass. When vLLM cannot serve the run (a full fine-tune's checkpoints, QLoRA, float32 weights, DoRA)
or one of the selected checkpoints (see `adapter_unservable`), the whole pass falls back to hf and says why: a
trajectory's sampled answers then come from one engine. vLLM samples with its own random numbers (seeded per answer),
not torch's, so a sampled rate measured with vLLM is another draw than with hf: equal within its confidence interval,
not to the digit. Greedy answers are the same in both (tests/test_engine.py compares them on a GPU; bfloat16 kernels
may still break an exact tie between two tokens differently, which the cache below accepts).

Cache key (runner.suite_key): a greedy suite's key does not name the engine (a step evaluated with either is not
evaluated again); a sampled suite's key names vllm when vLLM generated its answers, and an hf key is what it was
before engines existed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, ModelConfig
from .generate import Answerer
from .spec import DistributionSuite, JudgeSuite

log = logging.getLogger("finetrack")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's LoRAConfig.max_lora_rank accepts
# names of input embeddings and output heads (Llama, GPT-2, GPT-NeoX...): vLLM serves LoRA on linear layers only
_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings")


@dataclass(frozen=True)
class Choice:
    """The engine of an eval pass and why (printed once, and again when it changes)."""

    engine: str  # "hf" | "vllm"
    reason: str


def generates(suite) -> bool:
    """Does the suite generate answers (what an engine does)? Judge suites, and distribution suites with method sample."""
    return isinstance(suite, JudgeSuite) or (isinstance(suite, DistributionSuite) and suite.method == "sample")


def sampled(suite) -> bool:
    """Does the suite sample its answers (temperature > 0)? Then they depend on the engine's random stream."""
    return generates(suite) and suite.generation.temperature > 0


def key_engine(suite, engine: str) -> str | None:
    """What a suite's cache key adds for the engine: "vllm" for answers vLLM sampled, else nothing (module docstring)."""
    return "vllm" if engine == "vllm" and sampled(suite) else None


def vllm_missing() -> str | None:
    """Why vLLM cannot run on this machine (no CUDA GPU, vllm not installed or not importing), or None."""
    import torch

    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU"
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install vllm)"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vllm is imported: its INFO lines would bury ours
    try:
        import vllm  # noqa: F401  (a broken install fails here, not after the models are loaded)
    except Exception as e:  # noqa: BLE001 - a broken install raises anything (ImportError, an ABI mismatch with torch, ...)
        return f"vllm does not import ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    return None


def choose(setting: str) -> Choice:
    """eval.engine -> the engine of this machine, with the reason; `vllm` where it cannot run is a ConfigError."""
    if setting == "hf":
        return Choice("hf", "eval.engine=hf")
    missing = vllm_missing()
    if missing is None:
        return Choice("vllm", "eval.engine=vllm" if setting == "vllm" else "eval.engine=auto: a CUDA GPU and vllm are here")
    if setting == "vllm":
        raise ConfigError(
            f"eval.engine=vllm: {missing}; run on a machine with a CUDA GPU and vllm (pip install vllm), "
            "or set eval.engine=auto (or hf) to generate with transformers"
        )
    return Choice("hf", f"eval.engine=auto: {missing}")


def vllm_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds rank r (r above 512 is not served: adapter_unservable)."""
    return next(v for v in VLLM_LORA_RANKS if v >= r)


def run_unservable(model: ModelConfig, has_checkpoints: bool) -> str | None:
    """Why vLLM cannot serve this run's steps as finetrack trained them, or None. The base model alone (step 0) it
    serves whatever the method."""
    if model.dtype == "float32":
        return "model.dtype=float32: vLLM's LoRA kernels run in float16 / bfloat16 only"
    if model.method == "qlora":  # transformers evaluates its base in 4 bits too: vLLM's would be another model
        return "model.method=qlora: the base is a 4-bit bitsandbytes model, which vLLM does not load as finetrack does"
    if not has_checkpoints:
        return None
    if model.method == "full":
        return "model.method=full: each checkpoint is a whole model, not an adapter on the base that vLLM holds"
    if model.lora.use_dora:
        return "model.lora.use_dora: vLLM serves no DoRA adapters"
    return None


def adapter_rank(folder: Path) -> int:
    """The largest LoRA rank of an adapter folder (r, and any per-module rank_pattern)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return max([int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def adapter_unservable(folder: Path, max_rank: int = VLLM_LORA_RANKS[-1]) -> str | None:
    """Why vLLM cannot serve this adapter folder as PEFT would apply it, from its adapter_config.json and the tensor
    names of adapter_model.safetensors (vLLM's PEFTHelper.validate_legal and its LoRA loader refuse these), or None."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return "no adapter_config.json: not a LoRA adapter"
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        return f"a {config['peft_type']} adapter: vLLM serves LoRA only"
    if config.get("modules_to_save"):
        return f"modules_to_save={config['modules_to_save']}: whole modules trained beside the adapter, which vLLM does not load"
    if config.get("use_dora"):
        return "use_dora: vLLM serves no DoRA adapters"
    if config.get("bias", "none") != "none":
        return f"bias={config['bias']}: vLLM serves adapters without trained biases only"
    if config.get("trainable_token_indices"):
        return "trainable_token_indices: trained embedding rows, which vLLM does not load here"
    if config.get("alpha_pattern"):
        return "alpha_pattern: per-module LoRA scaling, which vLLM ignores (the answers would differ)"
    if adapter_rank(folder) > max_rank:
        return f"rank {adapter_rank(folder)}: above max_lora_rank {max_rank} of the vLLM engine"
    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.is_file():
        return "no adapter_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())  # a safe_open handle is not iterable
    embedding = sorted({n for key in names for n in _EMBEDDING_NAMES if f".{n}." in f".{key}"})
    if embedding:
        return f"LoRA on {', '.join(embedding)}: vLLM serves LoRA on linear layers only"
    return None


def plan(choice: Choice, cfg: Config, folders: list[Path]) -> Choice:
    """The engine of one eval pass over the base model and these checkpoint folders: `choice`, or hf with the reason
    when vLLM cannot serve the run or one of them (one engine per pass: module docstring)."""
    if choice.engine == "hf":
        return choice
    why = run_unservable(cfg.model, bool(folders))
    if why:
        return Choice("hf", f"vLLM cannot serve this run ({why}); transformers generates every step")
    for folder in folders:
        why = adapter_unservable(folder)
        if why:
            return Choice("hf", f"vLLM cannot serve {folder} ({why}); transformers generates every step of this pass")
    return choice


class EvalEngine:
    """The engine of one `finetrack eval` session: chosen once (an explicit vllm that cannot run fails here, before
    any model loads), planned for each pass, vLLM started when a step first needs answers from it."""

    def __init__(self, cfg: Config, suites: list) -> None:
        self.cfg, self.choice = cfg, choose(cfg.eval.engine)
        self.generating = any(generates(s) for s in suites)  # no answers to generate: the engine does not matter
        self.current: Choice | None = None
        self.folders: list[Path] = []  # the checkpoint folders of the current pass
        self.vllm = None  # vllm_engine.VllmEngine, once started

    def plan(self, folders: list[Path]) -> str:
        """The engine of this pass ('hf' | 'vllm'), logged the first time and whenever it changes (a watch)."""
        choice = plan(self.choice, self.cfg, folders)
        if choice.engine == "vllm" and self.vllm is not None:  # the running engine's rank limit holds for new checkpoints
            bigger = next((f for f in folders if adapter_rank(f) > self.vllm.max_lora_rank), None)
            if bigger is not None:
                choice = Choice(
                    "hf", f"vLLM cannot serve {bigger} (rank {adapter_rank(bigger)} above the running engine's {self.vllm.max_lora_rank})"
                )
        if self.generating and choice != self.current:
            log.info("eval engine: %s (%s)", choice.engine, choice.reason)
        self.current = choice
        self.folders = folders
        return choice.engine

    def answerer(self, folder: Path | None, checkpoint_id: str) -> Answerer | None:
        """What generates at this step: vLLM with the step's adapter (None = transformers on the model itself)."""
        if self.current is None or self.current.engine != "vllm":
            return None
        if self.vllm is None:
            from .vllm_engine import VllmEngine

            # the run's rank, or a larger one of an adapter evaluated on its own (plan refused those above 512)
            rank = min(max([self.cfg.model.lora.r, *(adapter_rank(f) for f in self.folders)]), VLLM_LORA_RANKS[-1])
            self.vllm = VllmEngine(self.cfg.model, vllm_rank(rank), enable_lora=self.cfg.model.method != "full")
        return self.vllm.at(folder, checkpoint_id)
