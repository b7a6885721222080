"""Config: typed schema, overrides, errors that say what to do, resolve() with reasons, every field read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from finetrack.config import Config, ConfigError, Environment, config_keys, help_config, load_config, resolve, resolved_yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = Environment(device_type="cpu", bf16_supported=False, num_processes=1, num_train_rows=2000)


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.model.method == "lora" and cfg.model.name == "smollm2-135m-instruct"


def test_typo_names_closest_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rte: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "unknown key 'train.learning_rte'" in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown key 'model.lora.rank'.*did you mean 'model.lora.r'"):
        load_config(None, ["model.lora.rank=8"])
    with pytest.raises(ConfigError, match=r"did you mean 'train.micro_batch_size'"):
        load_config(None, ["train.micro_batch_sise=8"])


FOREIGN = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "num_train_epochs": "train.num_epochs",
    "save_steps": "checkpoint.every_steps",
    "lora_r": "model.lora.r",
    "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "max_seq_length": "data.max_length",
    "warmup_steps": "train.warmup_steps",
    "lr_scheduler_type": "train.lr_schedule",
    "save_total_limit": "checkpoint.num_keep_last",
    "logging_steps": "train.log_every_steps",
    "eval_steps": "eval.loss_every_steps",
    "output_dir": "output.dir",
    "model_name_or_path": "model.name",
}


@pytest.mark.parametrize("key", sorted(FOREIGN))
@pytest.mark.parametrize("where", ["", "train.", "model.", "checkpoint."])
def test_keys_from_other_trainers_name_the_finetrack_key(key, where, tmp_path):
    """Whatever section a transformers/TRL/PEFT key is put under (or none), the hint names finetrack's key."""
    if f"{where}{key}" == "train.warmup_steps":
        return  # a real key there
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({where.rstrip("."): {key: 1}} if where else {key: 1}))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert f"unknown key '{where}{key}'" in str(e.value) and FOREIGN[key] in str(e.value), str(e.value)


def test_renamed_count_keys_name_the_new_key():
    for old, new in [
        ("checkpoint.first_epoch=2", "checkpoint.num_first_epoch"),
        ("checkpoint.per_epoch=2", "checkpoint.num_per_epoch"),
        ("checkpoint.log_spaced=2", "checkpoint.num_log_spaced"),
        ("checkpoint.keep_last=2", "checkpoint.num_keep_last"),
        ("train.sample_generation.samples=2", "train.sample_generation.num_samples"),
    ]:
        with pytest.raises(ConfigError, match=f"renamed to '{new}'"):
            load_config(None, [old])


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "train.max_steps=7",
            "model.gradient_checkpointing=true",
            "model.lora.target_modules=[q_proj, v_proj]",
            "data.eval_split=0.1",
            "train.max_grad_norm=null",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.max_steps == 7
    assert cfg.model.gradient_checkpointing is True
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.eval_split == 0.1 and cfg.train.max_grad_norm is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.method=full", "model.lora.r=8"], "model.lora has no effect with model.method=full"),
        (["model.method=lora", "model.qlora.quant_type=fp4"], "model.qlora has no effect with model.method=lora"),
        (["data.pack=false", "data.pack_row_tokens=4096"], "data.pack_row_tokens has no effect with data.pack=false"),
        (["train.warmup_steps=10", "train.warmup_ratio=0.1"], "train.warmup_ratio has no effect when train.warmup_steps is set"),
        (["eval.loss_every_steps=5"], "eval.loss_every_steps has no effect without data.eval_split"),
        (["model.method=full", "model.dtype=float16"], "use bfloat16 or float32"),
        (["model.revision=main"], "model.revision has no effect with model.name=smollm2-135m-instruct"),
        ([f"model.name={ROOT}", "model.revision=v1.0"], "model.revision has no effect with model.name=/"),  # a local directory
        (["data.split=test"], "data.split has no effect on files or builtin data"),  # builtin:demo-chat
        (["data.path=rows.jsonl", "data.split=validation"], "data.split has no effect on files"),
        (["data.path=rows.parquet", "data.eval_split=held.csv", "data.split=dev"], "data.split has no effect"),
    ],
)
def test_no_effect_settings_are_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_hub_sources_take_a_revision_and_a_split():
    cfg = load_config(None, ["model.name=org/some-model", "model.revision=v1.0", "data.path=org/chat-set", "data.split=dev"])
    assert cfg.model.revision == "v1.0" and cfg.data.split == "dev"
    # a split applies when any source is a `datasets` one (here the eval file is one)
    assert load_config(None, ["data.path=rows.jsonl", "data.eval_split=org/chat-set", "data.split=dev"]).data.split == "dev"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr", "is not section.key=value"),
        ("lr=1e-4", "must name a section and a field"),
        ("train.max_steps=many", "override 'train.max_steps=many': train.max_steps: Input should be a valid integer"),
        ("train.micro_batch_size=0", "train.micro_batch_size: Input should be greater than 0 (got 0)"),
        ("model.method=adapter", "model.method: Input should be 'full', 'lora' or 'qlora'"),
        ("data.eval_split=1.5", "a fraction must be in (0, 1)"),
        ("train.lr=[1", "override 'train.lr=[1': not valid YAML"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_every_shipped_config_loads():
    paths = sorted((ROOT / "examples").glob("*.yaml")) + [ROOT / "src/finetrack/assets/demo.yaml"]
    assert len(paths) >= 4
    for p in paths:
        load_config(p)


def test_resolve_fills_autos_with_reasons():
    cfg, res = resolve(load_config(None, ["train.micro_batch_size=8", "train.grad_accum_steps=2", "train.num_epochs=3"]), ENV)
    assert cfg.model.dtype == "float32" and "CPU" in res.reasons["model.dtype"]
    assert cfg.train.lr == 2e-4 and cfg.data.pack is True and cfg.model.attn_implementation == "sdpa"
    assert res["steps_per_epoch"] == 125 and res["total_steps"] == 375
    assert res["warmup_steps"] == round(0.03 * 375)
    gpu = Environment(device_type="cuda", bf16_supported=True, num_processes=4, num_train_rows=2000)
    cfg, res = resolve(load_config(None, ["model.method=qlora"]), gpu)
    assert cfg.model.dtype == "bfloat16" and cfg.model.qlora.compute_dtype == "bfloat16"
    assert res["global_batch_size"] == 32 and res["steps_per_epoch"] == 2000 // 32


@pytest.mark.parametrize(
    "overrides, total",
    [
        ([], 125),
        (["train.num_epochs=2.5"], 313),
        (["train.max_steps=40"], 40),
        (["train.max_steps=40", "train.num_epochs=0.1"], 13),
        (["train.max_steps=40", "train.num_epochs=3"], 40),
    ],
)
def test_total_steps_from_epochs_and_max_steps(overrides, total):
    _, res = resolve(load_config(None, ["train.micro_batch_size=16", *overrides]), ENV)
    assert res["steps_per_epoch"] == 125 and res["total_steps"] == total


def test_resolve_rejects_too_little_data():
    env = Environment(device_type="cpu", bf16_supported=False, num_processes=1, num_train_rows=5)
    with pytest.raises(ConfigError, match="only 5 training rows but one optimizer step needs 8"):
        resolve(load_config(), env)


def test_resolved_yaml_round_trips(tmp_path):
    cfg, res = resolve(load_config(None, ["train.max_steps=9"]), ENV)
    f = tmp_path / "config.resolved.yaml"
    f.write_text(resolved_yaml(cfg, res))
    tree = yaml.safe_load(f.read_text())
    assert tree["resolved"]["total_steps"] == {"value": 9, "reason": "train.max_steps"}
    again = load_config(f)  # the resolved block is recomputed, not an error
    assert again == cfg


def test_help_config_lists_every_key():
    text = help_config()
    for section, model in Config.model_fields.items():
        for name in model.annotation.model_fields:
            assert f"{section}.{name}:" in text or f"[{section}.{name}]" in text, f"{section}.{name}"
    # the suite and judge keys too, with types a person reads (no `typing.Annotated[...]`, no `<class ...>`)
    assert "eval.suites[kind=distribution].num_samples: int (> 0, <= 10000) = 50" in text
    assert "eval.suites[kind=judge].judges[].kind: 'local' | 'openai' | 'pattern' | 'python' = \"local\"" in text
    assert "train.max_steps: int | null (> 0) = null" in text and "train.lr_schedule: 'cosine' | 'linear' | 'constant'" in text
    assert not re.search(r"typing|Annotated|<class|NoneType|FieldInfo|Literal\[", text)


SNAPSHOT = ROOT / "tests/snapshots/config_keys.txt"


def test_config_key_set_snapshot():
    """Every config key with its type, bounds and default: a new, renamed or retyped knob is a deliberate change.
    After such a change, regenerate the snapshot and review its diff:
        .venv/bin/python -c "from finetrack.config import config_keys; print(config_keys(), end='')" > tests/snapshots/config_keys.txt
    """
    assert config_keys() == SNAPSHOT.read_text(), "config keys changed: regenerate tests/snapshots/config_keys.txt (see this test)"


def _section_class(annotation) -> type | None:
    """The config section a field holds (`model: ModelConfig`, `x: Foo | None`), or None for a plain value."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseModel) else None
    return next((a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _leaf_fields(cls, prefix=""):
    """(dotted key, section class, field name) of every plain-valued field under `cls`."""
    for name, info in cls.model_fields.items():
        sub = _section_class(info.annotation)
        if sub is not None:
            yield from _leaf_fields(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", cls, name


def _config_reads(scope: ast.AST, classes: dict[str, type]) -> set[tuple[type, str]]:
    """(section class, field) for every attribute read in `scope` whose object is known to be that section: a
    parameter or class attribute annotated with it (`cfg: DataConfig`), a chain from one (`cfg.train.lr`), or a
    name bound to such a chain (`m, d = cfg.model, cfg.data`; `self.cfg = cfg`; `for suite in cfg.eval.suites`).
    A bare attribute name (`p.name`, `url.split`) counts for nothing."""
    env: dict[str, type | None] = {}

    def type_of(node: ast.AST) -> type | None:
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return env.get(f"self.{node.attr}")
            owner = type_of(node.value)
            if owner is not None and node.attr in owner.model_fields:
                return _section_class(owner.model_fields[node.attr].annotation)
        return None

    def key(target: ast.AST) -> str | None:
        if isinstance(target, ast.Name):
            return target.id
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            return f"self.{target.attr}"
        return None

    def annotated(annotation: ast.AST | None) -> type | None:
        names = re.findall(r"\w+", ast.unparse(annotation)) if annotation is not None else []
        return next((classes[n] for n in names if n in classes), None)

    def bind(target: ast.AST, value: ast.AST) -> None:
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            for t, v in zip(target.elts, value.elts):
                bind(t, v)
        elif key(target) and type_of(value) is not None:
            env[key(target)] = type_of(value)

    for node in ast.walk(scope):
        if isinstance(node, ast.arg) and annotated(node.annotation):
            env[node.arg] = annotated(node.annotation)
        elif isinstance(node, ast.AnnAssign) and key(node.target) and annotated(node.annotation):
            name = key(node.target)
            env[name if name.startswith("self.") or not isinstance(scope, ast.ClassDef) else f"self.{name}"] = annotated(node.annotation)
    for _ in range(3):  # bindings that depend on later ones
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    bind(target, node.value)
            elif isinstance(node, (ast.For, ast.comprehension)):
                bind(node.target, node.iter)
    return {
        (t, node.attr)
        for node in ast.walk(scope)
        if isinstance(node, ast.Attribute)
        for t in [type_of(node.value)]
        if t is not None and node.attr in t.model_fields
    }


def test_every_config_field_is_read():
    """A field declared but never read is a silent no-op: every leaf must be read outside config.py through an
    object known to be its section (`cfg.train.lr`, `lora.r` after `lora = cfg.lora`, `cfg.split` with
    `cfg: DataConfig`); of the config modules only resolve() counts (validators and Knobs merely check values)."""
    from pydantic import BaseModel

    classes: dict[str, type] = {"Config": Config}
    for _, owner, _ in _leaf_fields(Config):
        classes[owner.__name__] = owner
    for cls in list(classes.values()):  # a section read through its base class (`gen: GenerationConfig`) counts
        classes.update({base.__name__: base for base in cls.__mro__ if issubclass(base, BaseModel) and base.model_fields})
    used: set[tuple[type, str]] = set()
    for path in (ROOT / "src/finetrack").rglob("*.py"):
        tree = ast.parse(path.read_text())
        scopes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        if path.name in (
            "config.py",
            "config_data.py",
            "config_load.py",
            "config_monitor.py",
            "schema.py",
        ):  # the schema's own checks merely check values
            scopes = []
        if path.name == "config_resolve.py":
            scopes = [n for n in scopes if isinstance(n, ast.FunctionDef) and n.name in ("resolve", "resolve_model")]
        for scope in scopes:
            used |= _config_reads(scope, classes)
    unread = [key for key, owner, name in _leaf_fields(Config) if not any(issubclass(owner, cls) and name == f for cls, f in used)]
    assert not unread, f"config fields never read: {unread}"


def test_field_read_check_can_fail():
    """The check above counts a read only through an object of the right section."""
    classes = {"Config": Config, "DataConfig": Config.model_fields["data"].annotation}
    data_cls = classes["DataConfig"]
    reads = _config_reads(ast.parse("def f(cfg: Config, p, url):\n    d = cfg.data\n    return d.split, p.path, url.name").body[0], classes)
    assert (data_cls, "split") in reads and (data_cls, "path") not in reads
    assert _config_reads(ast.parse("def f(x):\n    return x.split, x.path").body[0], classes) == set()
