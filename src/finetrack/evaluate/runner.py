"""`finetrack eval RUN_DIR`: the base model (step 0) and every selected checkpoint, through every suite.

The base weights are loaded once; LoRA / QLoRA checkpoints are adapters swapped in and out of one
PEFT model; full fine-tune checkpoints are loaded one at a time. Results are cached in the step
files themselves: a (step, suite) pair whose key (see suite_key: the checkpoint's manifest hash, the
suite's settings and files, the model and data settings) is unchanged is not computed again.

    eval/step-000047.json           metrics and counts per suite, with their cache keys
    eval/responses/step-000047.jsonl  every generated answer with its scores (judge suites)
    eval/summary.csv                one row per step, one column per metric
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .. import checkpoint, rundir
from ..config import Config, ConfigError, Environment, eval_key_settings, load_config, resolve_model
from ..data import source_files
from ..models import load_base_model, load_tokenizer, load_weights
from ..processes import rebalance
from ..rundir import write_atomic
from ..watch import wait_for
from .activations import Reference
from .results import flatten, read_step, trajectory_table, write_responses, write_step, write_summary
from .spec import (
    AdapterSuite,
    ContrastiveSuite,
    DirectionSuite,
    DistributionSuite,
    JudgeSuite,
    LossSuite,
    RegressionSuite,
    RepresentationSuite,
    SaeSuite,
)
from .suites import Judges, run_suite, skip_reason, suite_units

log = logging.getLogger("finetrack")


def select_steps(run_dir: Path, spec: str) -> list[tuple[int, Path | None]]:
    """'all' | 'latest' | 'best' | '0,47,94,best' -> [(step, checkpoint folder or None for the base model)]; best is
    the step checkpoints/best.json names (rundir.parse_steps: an error when the run has none or its checkpoint is gone)."""
    found = {f.step: f.path for f in checkpoint.complete_checkpoints(run_dir)}
    available = {0: None, **found}
    if spec == "all":
        return sorted(available.items())
    if spec == "latest":
        return [(0, None)] + ([max(found.items())] if found else [])
    wanted = rundir.parse_steps(run_dir, spec)
    missing = [s for s in wanted if s not in available]
    if missing:
        raise ConfigError(f"--steps: no complete checkpoint for step(s) {missing} in {run_dir}; available: {sorted(available)}")
    return [(s, available[s]) for s in wanted]


def suite_files(suite, cfg: Config) -> list[tuple[str, Path]]:
    """(config field, path) of every file a suite's result depends on; a missing one is a ConfigError naming the field."""
    if isinstance(suite, JudgeSuite):
        files = [("questions", Path(suite.questions))]
    elif isinstance(suite, DistributionSuite):
        files = [("items", Path(suite.items))]
    elif isinstance(suite, (RepresentationSuite, DirectionSuite, SaeSuite)):
        files = [(f, Path(getattr(suite, f))) for f in ("positive", "negative", "texts") if getattr(suite, f, None)]
        files += _probe_files(suite, cfg)
        if isinstance(suite, SaeSuite):  # a sae-lens folder: its config and weights
            sae = Path(suite.path)
            files += [("path", f) for f in sorted(sae.iterdir()) if f.is_file()] if sae.is_dir() else [("path", sae)]
    elif isinstance(suite, (LossSuite, RegressionSuite, ContrastiveSuite)):
        # the suite's own rows, or the run's held-out rows: an eval_split file, or cut from data.path. Read as the
        # data stage reads them (builtin names, folders of files); a `datasets` source has no local file to hash.
        if suite.data:
            specs = [("data", suite.data)]
        else:
            specs = [("data.sources" if cfg.data.sources else "data", p) for p in cfg.data.locations()]
        return [(field, f) for field, spec in specs for f in source_files(spec) or []]
    else:
        return []
    for field, path in files:
        if not path.is_file():
            raise ConfigError(f"eval suite '{suite.name}': {field} file not found: {path}; fix the path under eval.suites")
    return files


def _probe_files(suite, cfg: Config) -> list[tuple[str, Path]]:
    """The file a suite's probe prompts come from (activations.probe_texts): its own, the first judge suite's
    questions, or train.sample_prompts_file."""
    if suite.prompts:
        return [("prompts", Path(suite.prompts))]
    judge = next((s for s in cfg.eval.suites if isinstance(s, JudgeSuite)), None)
    if judge is not None:
        return [("prompts (the judge suite's questions)", Path(judge.questions))]
    if cfg.train.sample_every_steps is not None and cfg.train.sample_prompts_file:
        return [("prompts (train.sample_prompts_file)", Path(cfg.train.sample_prompts_file))]
    return []


def suite_key(suite, checkpoint_id: str, cfg: Config) -> str:
    """Cache key of one (step, suite) result: the checkpoint, the suite's settings and files, and the settings
    that change what a suite measures, marked on their fields (Knob eval_key in config.py: model.*, data.*,
    train.seed). Not the rest of train.*: a resume that raises max_steps keeps the cache."""
    settings = eval_key_settings(cfg)
    # every_steps says when a suite runs during training, not what it measures
    blob = json.dumps([suite.model_dump(mode="json", exclude={"every_steps"}), settings], sort_keys=True)
    for _, path in suite_files(suite, cfg):  # an edited question, item or data file is evaluated again
        stat = path.stat()
        blob += "\n" + _file_digest(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return hashlib.sha256(f"{checkpoint_id}\n{blob}".encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, mtime_ns: int, size_bytes: int) -> str:
    """sha256 of a file, hashed once per (path, mtime, size): a large data file is not re-read for every step."""
    return checkpoint.sha256_file(Path(path))


def checkpoint_id(cfg: Config, folder: Path | None) -> str:
    """What the result of a step depends on: the base model settings, or the checkpoint's manifest (its files' hashes)."""
    if folder is None:
        return f"base:{cfg.model.name}@{cfg.model.revision or ''}:{cfg.model.method}:{cfg.model.dtype}"
    if (folder / checkpoint.MANIFEST).is_file():
        return hashlib.sha256((folder / checkpoint.MANIFEST).read_bytes()).hexdigest()
    h = hashlib.sha256()  # a plain adapter folder (finetrack eval ADAPTER_DIR): hash its weights
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode() + checkpoint.sha256_file(f).encode())
    return h.hexdigest()


def _meta(folder: Path | None) -> dict:
    return checkpoint.read_meta(folder) if folder is not None and (folder / "meta.json").is_file() else {}


class Models:
    """Yields the model at each step; the base model is loaded once.

    On a regression run a checkpoint's model is a heads.WithHead: the language model (full or with its adapter) and
    the head the checkpoint holds (head.json + head.safetensors). The base model (step 0) has no trained head: the
    suites that need one skip it (see skip_reason)."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.base = load_base_model(cfg.model, device)
        self.base.eval()
        self.peft = None

    @contextmanager
    def at(self, folder: Path | None):
        """The model at one step (None = the base model: adapters switched off once a PEFT wrapper exists).

        A full fine-tune checkpoint is released on exit, before the next is loaded: otherwise the base
        and two full models would be resident at once. The caller must not keep a reference to it."""
        if folder is None and self.peft is not None:
            with self.peft.disable_adapter():
                yield self.peft
            return
        model = self._load(folder)
        try:
            yield self._with_head(model, folder)
        finally:
            if folder is not None and self.cfg.model.method == "full":
                del model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    @contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The base model while a checkpoint is loaded: the one PEFT model with its adapter switched off (LoRA / QLoRA),
        else the base weights, which stay loaded beside a full checkpoint."""
        if self.peft is None:
            yield self.base
            return
        with self.peft.disable_adapter():  # yields nothing: the model is the PEFT model itself
            yield self.peft

    def _with_head(self, model: torch.nn.Module, folder: Path | None) -> torch.nn.Module:
        """`model` with the checkpoint's regression head around it (regression runs), as training evaluated it."""
        if folder is None or self.cfg.objective.kind != "regression":
            return model
        from ..heads import WithHead, read_head

        head, layer = read_head(folder)
        return WithHead(model, head.to(self.device), layer).eval()

    def _load(self, folder: Path | None):
        if folder is None:
            return self.base
        if self.cfg.model.method == "full":
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(folder, dtype=self.base.dtype).to(self.device).eval()
        from peft import PeftModel

        # target_modules is saved from a set: its order differs between checkpoints of one run
        adapter_config = {
            k: sorted(v) if isinstance(v, list) else v for k, v in json.loads((folder / "adapter_config.json").read_text()).items()
        }
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, folder, is_trainable=False)
            self.adapter_config = adapter_config
        elif adapter_config == self.adapter_config:
            # same LoRA layout (one run): overwrite the adapter's tensors in place. Loading each checkpoint
            # as one more named adapter slows every later forward (measured: 1.9 s -> 4.4 s for the same
            # generation after three load/delete cycles), so one adapter slot is reused.
            load_weights(self.peft, folder)
        else:
            raise ConfigError(f"{folder}: its adapter_config.json differs from the first checkpoint's; evaluate it separately")
        return self.peft.eval()


def select_suites(cfg: Config, suite_names: list[str] | None) -> list:
    """The suites named (all of eval.suites when None); an unknown name or no suite at all is a ConfigError."""
    suites = [s for s in cfg.eval.suites if not suite_names or s.name in suite_names]
    unknown = sorted(set(suite_names or []) - {s.name for s in cfg.eval.suites})
    if unknown or not suites:
        raise ConfigError(
            f"eval suites {unknown or '(none configured)'}: the config defines {[s.name for s in cfg.eval.suites] or 'none'}; "
            "add them under eval.suites in the config (or eval.suites=[...] on the command line)"
        )
    return suites


def evaluate_run(
    run_dir: Path,
    steps: str = "all",
    suite_names: list[str] | None = None,
    overrides: list[str] = (),
    out: Callable[[str], None] = print,
    watch_seconds: float | None = None,
) -> list[dict]:
    """Evaluate the selected steps of a run with its eval suites; returns the step records (also written to RUN_DIR/eval).

    With watch_seconds, keep polling for new checkpoints (evaluating each as it completes) until the
    run's last checkpoint is evaluated or Ctrl+C.
    """
    run_dir = Path(run_dir)
    bad = [o for o in overrides if not o.startswith("eval.")]
    if bad:
        raise ConfigError(f"{bad}: finetrack eval takes eval.* overrides only (the rest of the run's config is what it was trained with)")
    if watch_seconds is not None and steps not in ("all", "latest"):
        # an explicit list may omit the run's last checkpoint, whose evaluation is what ends a watch
        raise ConfigError(
            f"--watch with --steps {steps}: a watch ends when the run's last checkpoint is evaluated; use --steps all or latest"
        )
    # a watch is started together with training: the run directory may not be there yet
    if watch_seconds is not None and not wait_for(lambda: (run_dir / "config.resolved.yaml").is_file(), str(run_dir), watch_seconds, out):
        out("stopped watching")
        return []
    rundir.require_run_dir(run_dir, "eval")
    cfg = load_config(run_dir / "config.resolved.yaml", list(overrides))
    session = _Session(run_dir, cfg, select_suites(cfg, suite_names), out)
    if watch_seconds is None:
        return session.evaluate(select_steps(run_dir, steps))
    out(f"watching {run_dir} every {watch_seconds:g} s for new checkpoints (Ctrl+C to stop)")
    records: list[dict] = []
    try:
        while True:
            records = session.evaluate(select_steps(run_dir, steps), quiet=True)
            last = [r for r in records if r.get("last")]
            if last:
                out(f"the run's last checkpoint (step {last[0]['step']}) is evaluated: done watching")
                return records
            time.sleep(watch_seconds)
            rebalance()  # a training process beside this one may have started or ended: share the cores
    except KeyboardInterrupt:
        out("stopped watching")
        return records


def evaluate_model(
    path: Path,
    output: Path | None = None,
    config: Path | None = None,
    overrides: list[str] = (),
    out: Callable[[str], None] = print,
    suite_names: list[str] | None = None,
) -> list[dict]:
    """`finetrack eval MODEL_OR_ADAPTER_DIR`: a plain model (step 0) or an adapter (step 0 = its base model,
    step 1 = the adapter), with the suites of `config` and/or `eval.*` overrides; results go to `output`
    (default ./eval-<folder name>), laid out like a run directory's eval/."""
    import yaml

    from ..config import effective_dump

    path = Path(path)
    adapter = (path / "adapter_config.json").is_file()
    if not adapter and not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a run directory (config.resolved.yaml), a model (config.json) or an adapter (adapter_config.json)")
    cfg = load_config(config, list(overrides))
    if adapter:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{path}/adapter_config.json: no base_model_name_or_path; evaluate it from a config with model.name set")
        # the config's model.name only when it sets one: the default (embedded) name must not replace the adapter's base
        update = {
            "name": cfg.model.name if "name" in cfg.model.model_fields_set else base,
            "method": cfg.model.method if cfg.model.method != "full" else "lora",
        }
    else:
        update = {"name": str(path), "method": "full"}
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=update)})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, _ = resolve_model(cfg, Environment(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported(), 1, 0))
    if not cfg.eval.suites:
        raise ConfigError("no eval suites: give --config CONFIG.yaml with eval.suites, or eval.suites=[...] on the command line")
    suites = select_suites(cfg, suite_names)
    output = Path(output or f"eval-{path.resolve().name}")
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "config.resolved.yaml", yaml.safe_dump(effective_dump(cfg), sort_keys=False))
    selected = [(0, None)] + ([(1, path.resolve())] if adapter else [])
    return _Session(output, cfg, suites, out).evaluate(selected)


def evaluate_baseline(
    config_path: str, overrides: list[str], suite_names: list[str] | None, out: Callable[[str], None] = print
) -> list[dict]:
    """`finetrack eval CONFIG.yaml --steps 0`: the base model, before training, into the run directory that
    `finetrack train CONFIG.yaml` will use (output.dir), as eval/step-000000.json.

    The config is resolved for this machine as training resolves it, so the cache key of step 0 is the one a
    later `finetrack eval RUN_DIR` computes from the run's config.resolved.yaml: the base model is not
    evaluated again unless a setting that matters to it changed. A run directory that has no
    config.resolved.yaml yet gets this one (training rewrites it before step 1), so `eval`, `gate` and
    `report` work on the baseline alone.
    """
    import yaml

    from ..config import resolved_yaml
    from ..schema import fix_yaml_floats

    cfg = load_config(config_path, list(overrides))
    run_dir = Path(cfg.output.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir {run_dir}: is a file; set output.dir in {config_path} to a folder for the run")
    if not cfg.eval.suites:
        raise ConfigError(f"{config_path}: no eval.suites to evaluate the base model with; add suites under eval.suites")
    suites = select_suites(cfg, suite_names)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, res = resolve_model(cfg, Environment(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported(), 1, 0))
    text = resolved_yaml(cfg, res)
    # the settings exactly as a later eval reads them back from config.resolved.yaml: the same cache keys
    tree = yaml.safe_load(text)
    tree.pop("resolved", None)
    cfg = Config.model_validate(fix_yaml_floats(tree))
    try:
        (run_dir / rundir.EVAL_DIR).mkdir(parents=True, exist_ok=True)
        if not rundir.is_run_dir(run_dir):
            write_atomic(run_dir / rundir.CONFIG_FILE, text)
    except OSError as e:
        raise ConfigError(f"output.dir {run_dir}: cannot be written ({e.strerror or e}); set output.dir to a writable folder") from None
    out(f"baseline: the base model {cfg.model.name} into {run_dir / rundir.EVAL_DIR} (step 0 of the run that training will write)")
    return _Session(run_dir, cfg, suites, out).evaluate([(0, None)])


class _Session:
    """What stays loaded between evaluation passes (a watch): tokenizer, base model, judge models."""

    def __init__(self, run_dir: Path, cfg: Config, suites: list, out: Callable[[str], None]) -> None:
        from accelerate import Accelerator

        self.run_dir, self.cfg, self.suites, self.out = run_dir, cfg, suites, out
        self.accelerator = Accelerator()
        self.tokenizer = load_tokenizer(cfg.model)
        self.models: Models | None = None
        self.judges = Judges(cfg, self.accelerator.device)
        self.base_results: dict = {}  # what suites computed on the base model (Reference.cache), kept between steps
        self.shown_table = ""

    def evaluate(self, selected: list[tuple[int, Path | None]], quiet: bool = False) -> list[dict]:
        from tqdm.auto import tqdm

        run_dir, cfg, suites, tokenizer = self.run_dir, self.cfg, self.suites, self.tokenizer
        meta = {s: _meta(f) for s, f in selected if f is not None}
        total_steps = max([m.get("total_steps", 0) for m in meta.values()] + [1])
        todo, records = {}, {}
        previous = _previous_checkpoints(run_dir, selected)
        for step, folder in selected:
            where = None if folder is None else str(folder.relative_to(run_dir)) if folder.is_relative_to(run_dir) else str(folder)
            records[step] = read_step(run_dir, step) or {"step": step, "checkpoint": where, "suites": {}}
            records[step].update(
                epoch=meta.get(step, {}).get("epoch", 0.0),
                fraction=min(step / total_steps, 1.0),
                last="last" in meta.get(step, {}).get("rules", []),
            )
            step_id = checkpoint_id(cfg, folder)  # hashes an adapter folder without a manifest: once per step
            # the adapter suite's rotation is measured from the previous checkpoint: its result depends on both
            previous_id = step_id + ":" + checkpoint_id(cfg, previous[step]) if previous[step] else step_id
            keys = {s.name: suite_key(s, previous_id if isinstance(s, AdapterSuite) else step_id, cfg) for s in suites}
            todo[step] = [(s, keys[s.name]) for s in suites if records[step]["suites"].get(s.name, {}).get("key") != keys[s.name]]
        units_per_step = {s.name: suite_units(s) for s in suites}  # answers (judge), items (distribution), 1 otherwise
        units = sum(units_per_step[s.name] for step in todo for s, _ in todo[step])
        cached = sum(len(suites) - len(todo[s]) for s in todo)
        if cached and not quiet:
            self.out(f"cached: {cached} (step, suite) result(s) unchanged since the last eval")
        if units:
            bar = tqdm(total=units, desc="eval", unit="answer")
            for step, folder in selected:
                runnable = []
                for suite, key in todo[step]:
                    skipped = skip_reason(suite, cfg, folder)
                    if skipped:  # a record of its own: cached like a result, read as "no value" by report and gate
                        records[step]["suites"][suite.name] = {"key": key, "metrics": {}, "counts": {}, "skipped": skipped}
                        bar.update(units_per_step[suite.name])
                    else:
                        runnable.append((suite, key))
                # no model is loaded for a step whose every suite is skipped (a regression run's baseline) or reads files alone
                if runnable:
                    bar.set_postfix(step=step)
                    needs_model = not all(isinstance(suite, AdapterSuite) for suite, _ in runnable)
                    self.models = self.models or (Models(cfg, self.accelerator.device) if needs_model else None)
                    reference = Reference(folder, previous[step], lambda: self.models.reference(), self.base_results)
                    with self.models.at(folder) if needs_model else nullcontext() as m:
                        for suite, key in runnable:
                            result = run_suite(suite, m, tokenizer, cfg, self.accelerator, self.judges, bar, reference=reference)
                            write_responses(run_dir, step, suite.name, result.pop("responses", None))
                            records[step]["suites"][suite.name] = {"key": key, **result}
                        del m  # a full checkpoint is freed when at() exits: no reference may outlive the block
                if todo[step]:
                    write_step(run_dir, records[step])
            bar.close()
        for record in records.values():
            write_step(run_dir, flatten(record))
        table = trajectory_table(write_summary(run_dir))
        if table != self.shown_table:  # a watch prints the table again only when it changed
            self.out(table)
            self.shown_table = table
        return [records[s] for s, _ in selected]


def _previous_checkpoints(run_dir: Path, selected: list[tuple[int, Path | None]]) -> dict[int, Path | None]:
    """Per selected step, the run's complete checkpoint just before it (None: the first, or the base model)."""
    found = sorted((f.step, f.path) for f in checkpoint.complete_checkpoints(run_dir)) if (run_dir / "checkpoints").is_dir() else []
    return {step: max(((s, p) for s, p in found if s < step), default=(0, None))[1] if folder else None for step, folder in selected}
