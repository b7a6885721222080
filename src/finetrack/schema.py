"""The base of every config section (shared by config.py and the eval suite specs), and config trees flattened."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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
