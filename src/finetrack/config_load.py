"""Reading a config: a YAML file plus `section.key=value` overrides -> a validated `Config`, and every
problem as one message that says what, where (file:line, or the override) and what to do.

Also the `--help-config` text and the key list its snapshot test compares (tests/snapshots/config_keys.txt).
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from .config import Config
from .evaluate.spec import SUITE_CLASSES
from .schema import ConfigError, fix_yaml_floats
from .yamlfile import YamlDoc, parse_yaml, read_yaml

_SUITE_KINDS = {typing.get_args(c.model_fields["kind"].annotation)[0] for c in SUITE_CLASSES}

# Keys renamed so that counts say so (`num_`): the old name is an error that names the new one.
RENAMED = {
    "checkpoint.first_epoch": "checkpoint.num_first_epoch",
    "checkpoint.per_epoch": "checkpoint.num_per_epoch",
    "checkpoint.log_spaced": "checkpoint.num_log_spaced",
    "checkpoint.keep_last": "checkpoint.num_keep_last",
}
RENAMED_LEAVES = {"samples": "num_samples"}  # eval suites and their generation settings, wherever they sit

# What other trainers (transformers' TrainingArguments, TRL, axolotl, PEFT) call a finetrack key: by leaf name,
# whatever section the user put it under (or none).
FOREIGN_KEYS = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.micro_batch_size",
    "train_batch_size": "train.micro_batch_size",
    "micro_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_accumulation": "train.grad_accum_steps",
    "num_train_epochs": "train.num_epochs",
    "epochs": "train.num_epochs",
    "lr_scheduler_type": "train.lr_schedule",
    "lr_scheduler": "train.lr_schedule",
    "warmup_steps": "train.warmup_steps",
    "warmup_ratio": "train.warmup_ratio",
    "logging_steps": "train.log_every_steps",
    "optim": "train.optimizer",
    "adam_beta1": "train.adam_betas",
    "adam_beta2": "train.adam_betas",
    "adam_epsilon": "train.adam_eps",
    "max_grad_norm": "train.max_grad_norm",
    "weight_decay": "train.weight_decay",
    "seed": "train.seed",
    "max_steps": "train.max_steps",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.num_keep_last",
    "eval_steps": "eval.loss_every_steps",
    "per_device_eval_batch_size": "eval.micro_batch_size",
    "output_dir": "output.dir",
    "model_name_or_path": "model.name",
    "base_model": "model.name",
    "model_name": "model.name",
    "model_id": "model.name",
    "torch_dtype": "model.dtype",
    "bf16": "model.mixed_precision (bf16 autocast over float32 weights, what bf16: true means in transformers; bfloat16 weights are model.dtype: bfloat16)",
    "fp16": "model.dtype (e.g. model.dtype: float16)",
    "load_in_4bit": "model.method (model.method: qlora)",
    "attn_implementation": "model.attn_implementation",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "lora_r": "model.lora.r",
    "lora_rank": "model.lora.r",
    "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout",
    "lora_target_modules": "model.lora.target_modules",
    "target_modules": "model.lora.target_modules",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "max_length": "data.max_length",
    "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length",
    "dataset": "data.path",
    "dataset_name": "data.path",
    "train_file": "data.path",
    "packing": "data.pack",
    "report_to": "train.report_to",
    "resume_from_checkpoint": "the --resume-from flag of finetrack train",
}


# ------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate.

    A `resolved:` block (present in a run's config.resolved.yaml) is ignored: it is recomputed.
    """
    doc, source = YamlDoc({}), None
    if path is not None:
        path, source = Path(path), str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
        doc = read_yaml(path, ConfigError)
        if doc.data is None:
            doc = YamlDoc({}, doc.lines)
        if not isinstance(doc.data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, train, ...), got {_kind(doc.data)}")
        doc.data.pop("resolved", None)
    tree = fix_yaml_floats(doc.data)
    overridden: dict[str, str] = {}  # dotted key -> the override that set it
    for text in overrides:
        parts, value = parse_override(text)
        _set_path(tree, parts, value, f"override '{text}'")
        overridden[".".join(parts)] = text
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source, doc, overridden, tree)) from None
    except RecursionError:  # a self-referencing YAML alias
        raise ConfigError(f"{source or 'overrides'}: a value refers to itself (a YAML alias inside its own anchor); write it out") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 1e-4). The value is parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not section.key=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{text}': the key must name a section and a field, e.g. train.lr=1e-4{_section_hint(key.strip())}")
    value = parse_yaml(raw, f"override '{text}'", ConfigError, lines=False).data if raw.strip() else None
    # YAML reads 1e-4 as a string (YAML 1.1 wants a dot); a user means a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return parts, value


def _set_path(tree: dict, parts: list[str], value: Any, source: str) -> None:
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _kind(value: Any) -> str:
    return {list: "a list", str: "text", type(None): "nothing"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------ messages
def _all_keys(model_cls: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config, suite keys as eval.suites.<key>."""
    keys = []
    for name, info in model_cls.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        for sub in _sections_in(info.annotation):
            keys.extend(k for k in _all_keys(sub, path + ".") if k not in keys)
    return keys


def _section_hint(key: str) -> str:
    """_hint for an override key that names no field: nothing for an empty key, the section's keys for a section."""
    from .config import Config

    if not key:
        return ""
    if key in Config.model_fields:  # `model=5`: "did you mean 'model'?" named the key that was typed
        fields = list(_section_of(Config.model_fields[key].annotation).model_fields)
        return f" ('{key}' is a section: set one of its keys, e.g. {key}.{fields[0]}=...)"
    return _hint(key)


def _section_of(annotation: Any) -> type[BaseModel]:
    return next(a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel))


def _hint(key: str) -> str:
    """What to write instead of an unknown key: the renamed key, the finetrack name of another trainer's key, or the closest."""
    parts = key.split(".")
    leaf = parts[-1]
    if key in RENAMED:
        return f": renamed to '{RENAMED[key]}' (count keys start with num_)"
    key = ".".join(p for p in parts if not p.isdigit())  # eval.suites.0.x -> eval.suites.x for the lookups below
    if leaf in RENAMED_LEAVES and parts[0] in ("eval", "train") and len(parts) > 2:  # a suite's or a generation's count
        return f": renamed to '{'.'.join([*parts[:-1], RENAMED_LEAVES[leaf]])}' (count keys start with num_)"
    if leaf in FOREIGN_KEYS:
        return f" (finetrack calls it {FOREIGN_KEYS[leaf]})"
    keys = _all_keys()
    leaf_matches = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    guess = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    best = leaf_matches[0] if leaf_matches else (guess[0] if guess else None)
    return f" (did you mean '{best}'?)" if best else ""


_KEY_IN_TEXT = re.compile(rf"\b(?:{'|'.join(Config.model_fields)})(?:\.\w+)+")  # a section name, then its keys


def _tags(loc: tuple) -> str:
    """The kinds a tagged list item may be (eval.suites: loss, judge, ...), for a message about one that names none."""
    from .evaluate.spec import SuiteConfig

    if loc and loc[0] == "eval":
        union = typing.get_args(SuiteConfig)[0]
        return ", ".join(typing.get_args(typing.get_type_hints(member)["kind"])[0] for member in typing.get_args(union))
    return "see --help-config"


def _format_validation_error(err: ValidationError, source: str | None, doc: YamlDoc, overridden: dict[str, str], tree: dict) -> str:
    """One line per problem: `FILE:LINE: key: message (got value)` or `override 'k=v': ...`; several under one heading."""
    problems: dict[str, list[str]] = {}  # key -> messages (a union gives one per member: joined with 'or')
    inputs: dict[str, Any] = {}
    for e in err.errors():
        parts = _clean_loc(e["loc"])
        key = ".".join(map(str, parts))
        if e["type"] == "extra_forbidden":
            if len(parts) == 1 and key in _all_keys():  # `train.lr: 1` at the top of a file
                section, rest = key.split(".", 1)
                hint = f": in a file, nest it ('{section}:' and under it, indented, '{rest}: ...'); dotted keys are for overrides"
            else:
                hint = _hint(key)
            problems.setdefault(key, []).append(f"unknown key '{key}'{hint}")
            continue
        text = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("model_type", "model_attributes_type", "dict_type"):  # `train: 5`
            text = "should be a section: keys indented under it, not a single value"
        elif e["type"] == "union_tag_not_found":  # pydantic: "Unable to extract tag using discriminator 'kind'"
            tag = e["ctx"]["discriminator"].strip("'")
            text = f"needs {tag}: one of {_tags(e['loc'])}"
        for msg in text.split("\n"):  # a check across keys: one problem per line
            # a section's check names the key it is about ("data.eval_split=1.5: ..."): point at that key's line
            named = _KEY_IN_TEXT.search(msg)
            where_key = named.group(0) if named and named.group(0).startswith(key) else key
            problems.setdefault(where_key, []).append(msg)
            if "input" in e and not isinstance(e["input"], dict) and where_key == key:
                inputs[key] = e["input"]
    lines = []
    for key, msgs in problems.items():
        where = _where(key, source, doc, overridden)
        got = f" (got {_show(inputs[key])})" if key in inputs else ""
        msgs = list(dict.fromkeys(msgs))
        if len(msgs) > 1 and all(m.startswith("Input should be ") for m in msgs):  # the members of a union, e.g. train.lr
            said = "Input should be " + ", or ".join(m.removeprefix("Input should be ") for m in msgs)
        else:
            said = "; ".join(msgs)
        names_key = bool(key) and key in said
        lines.append(f"{where}{'' if names_key or not key else key + ': '}{said}{got}")
    if len(lines) == 1:
        return lines[0]
    return f"{source or 'overrides'}: {len(lines)} problems in the config:\n  " + "\n  ".join(lines)


def _clean_loc(loc: tuple) -> list:
    """pydantic's location without union members (`float`, `literal['auto']`, a suite's kind tag)."""
    out: list = []
    for p in loc:
        s = str(p)
        if s.startswith(("function-", "literal[", "list[", "tuple[", "dict[", "constrained-")) or s in (
            "float",
            "int",
            "str",
            "bool",
            "none",
        ):
            continue
        if out and isinstance(out[-1], int) and s in _SUITE_KINDS:
            continue
        out.append(p)
    return out


def _where(key: str, source: str | None, doc: YamlDoc, overridden: dict[str, str]) -> str:
    """'FILE:LINE: ' for a key the file spells out, "override 'k=v': " for one an override set."""
    for set_key, text in overridden.items():
        if key == set_key or key.startswith(set_key + ".") or (key and set_key.startswith(key + ".")):
            return f"override '{text}': "
    if source is None:
        return ""
    line = doc.line_of(key.split(".")) if key else None
    return f"{source}:{line}: " if line else f"{source}: "


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -------------------------------------------------------------------------------------- help, keys
def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    """The config sections a field holds: itself, the members of a list of sections (eval suites, judges)."""
    if isinstance(annotation, type):
        return [annotation] if issubclass(annotation, BaseModel) else []
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _sections_in(args[0])
    if origin in (list, Union, types.UnionType):
        return [c for a in args for c in _sections_in(a)]
    return []


def type_name(annotation: Any) -> str:
    """A type as a user reads it: `int | null`, `'cosine' | 'linear' | 'constant'`, `list[str]`, `[float, float]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is Annotated:  # `Annotated[float, Field(gt=0)]` inside a union or tuple: its bounds
        metadata = [m for a in args[1:] for m in (a.metadata if isinstance(a, FieldInfo) else [a])]
        return type_name(args[0]) + _bounds(metadata)
    if origin is Literal:
        return " | ".join(json.dumps(a) if not isinstance(a, str) else f"'{a}'" for a in args)
    if origin in (Union, types.UnionType):
        sections = _sections_in(annotation)
        if sections and len(sections) == len(args):
            return " | ".join(f"{_kind_of(c)} suite" if c in SUITE_CLASSES else "section" for c in sections)
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        if _sections_in(args[0]):
            inner = "suite" if set(_sections_in(args[0])) <= set(SUITE_CLASSES) else "section"
            return f"list of {inner}s (keys below)"
        return f"list[{type_name(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict or annotation is dict:
        return f"mapping {type_name(args[0])} -> {type_name(args[1])}" if args else "mapping"
    if isinstance(annotation, type):
        return {"str": "text", "NoneType": "null"}.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _kind_of(cls: type[BaseModel]) -> str:
    return typing.get_args(cls.model_fields["kind"].annotation)[0]


def _walk(cls: type[BaseModel], prefix: str, out: list[tuple[str, str, str, str]], defaults: BaseModel | None = None) -> None:
    """(header or key, type, default, description) rows of every key under `cls`; a header row has an empty type.
    `defaults`: the section's default instance where its field has one (a distribution suite's generation has
    max_new_tokens 8, not GenerationConfig's 256)."""
    for name, info in cls.model_fields.items():
        key = f"{prefix}{name}"
        sections = _sections_in(info.annotation)
        if info.is_required():
            default: Any = None
        elif defaults is not None:
            default = getattr(defaults, name)
        else:
            default = info.get_default(call_default_factory=True)
        if isinstance(info.annotation, type) and sections:  # a nested section
            out.append((f"[{key}]", "", "", info.description or ""))
            _walk(info.annotation, f"{key}.", out, default)
            continue
        shown = "required" if info.is_required() else json.dumps(to_jsonable_python(default))
        out.append((key, type_name(info.annotation) + _bounds(info.metadata), shown, info.description or ""))
        for sub in sections:  # a list of sections: their keys as key[kind=...].field
            item = f"{key}[kind={_kind_of(sub)}]" if sub in SUITE_CLASSES else f"{key}[]"
            out.append((f"[{item}]", "", "", ""))
            _walk(sub, f"{item}.", out)


def _bounds(metadata: list) -> str:
    """' (> 0)', ' (0 .. 4294967295)' from a field's constraints."""
    found = {b: getattr(m, b) for m in metadata for b in ("gt", "ge", "lt", "le") if getattr(m, b, None) is not None}
    low = f"> {found['gt']}" if "gt" in found else f">= {found['ge']}" if "ge" in found else ""
    high = f"< {found['lt']}" if "lt" in found else f"<= {found['le']}" if "le" in found else ""
    if "ge" in found and "le" in found:
        return f" ({found['ge']} .. {found['le']})"
    return f" ({', '.join(b for b in (low, high) if b)})" if low or high else ""


def _rows() -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    _walk(Config, "", rows)
    return rows


def help_config() -> str:
    """Every config key with type, default and description (the `--help-config` text)."""
    lines = []
    for key, kind, default, description in _rows():
        if not kind:
            lines.append(f"\n{key}" + (f"  {description}" if description else ""))
        else:
            lines.append(f"  {key}: {kind} = {default}" + (f"\n      {description}" if description else ""))
    return "\n".join(lines).lstrip("\n")


def config_keys() -> str:
    """Every config key with its type and default, one per line: the snapshot that makes a new knob a deliberate change."""
    return "".join(f"{key}: {kind} = {default}\n" for key, kind, default, _ in _rows() if kind)
