"""The base of every config section (shared by config.py and the eval suite specs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config problem the user must fix; the message says what to do."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
