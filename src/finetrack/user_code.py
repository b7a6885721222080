"""Your code, named in a config as 'module:name' or 'path/to/file.py:name': found, hashed and imported in one place
(objective.python.function, train.callbacks). A name that cannot be found is a ConfigError naming the config field."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .schema import ConfigError


def source_file(spec: str, field: str) -> Path:
    """The file defining `spec`: 'path/to/file.py:name' (relative to the working directory, like data paths) or
    'module:name' (an importable module's file)."""
    module = spec.rpartition(":")[0]
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            raise ConfigError(f"{field}={spec}: no such file {path}")
        return path.resolve()
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        raise ConfigError(f"{field}={spec}: no module {module} (give 'file.py:name' for a file, or put the module on PYTHONPATH)")
    return Path(found.origin).resolve()


def source_sha256(spec: str, field: str) -> str:
    """sha256 of the file defining `spec` (a checkpoint records it: a changed file is a changed run)."""
    return hashlib.sha256(source_file(spec, field).read_bytes()).hexdigest()


def load(spec: str, field: str) -> Any:
    """The callable `spec` names (a function or a class). A file is imported once per process under a name derived from
    its path, so two files with the same name do not collide."""
    module, _, attr = spec.rpartition(":")
    path = source_file(spec, field)
    if module.endswith(".py"):
        name = f"finetrack_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        loaded = sys.modules.get(name) or importlib.util.module_from_spec(loader_spec)
        if name not in sys.modules:
            sys.modules[name] = loaded
            try:
                loader_spec.loader.exec_module(loaded)
            except BaseException:
                del sys.modules[name]  # a file that failed to import is imported again next time, not half-loaded
                raise
    else:
        loaded = importlib.import_module(module)
    found = getattr(loaded, attr, None)
    if not callable(found):
        raise ConfigError(f"{field}={spec}: {path} defines no function or class '{attr}'")
    return found
