"""Where a finished export goes, never half-written: an export is complete when its EXPORT.json is there.

Local: the export is built in a hidden folder beside the output (`.tmp-<name>-<pid>`), EXPORT.json written last,
then renamed into place in one step. Any fsspec URL (as checkpoint.remote: s3://, gs://, file://): every file is
uploaded, EXPORT.json last; an earlier export at that URL is refused (its EXPORT.json would vouch for mixed files).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..checkpoint import CheckpointError
from ..redact import redact, scrub
from ..schema import ConfigError

CERTIFICATE = "EXPORT.json"


def is_url(output: str) -> bool:
    return "://" in output


def check_url(output: str) -> None:
    """A URL --output whose backend is unknown or missing, or that carries credentials, is a ConfigError naming it (its
    credentials redacted), before any model loads; as checkpoint.remote and `sync` refuse the same URLs."""
    if not is_url(output):
        return
    from .. import storage

    try:
        storage.check_url(output)
    except (ImportError, ValueError) as e:
        shown = redact(output)
        # storage's messages start with the redacted URL: named once, after the flag
        why = str(e).removeprefix(f"{shown}: ")
        if isinstance(e, ValueError) and why.startswith("Protocol not known"):  # fsspec's words for an unknown scheme
            why += "; give a local folder or an fsspec URL (s3://, gs://, file://, ...)"
        raise ConfigError(f"--output {shown}: {scrub(why, output)}") from None


def check_free(output: str) -> None:
    """Refuse an output that already holds something (an export is never written over another)."""
    if is_url(output):
        from .. import storage

        fs, root = storage.open_url(output)
        if fs.exists(root) and fs.ls(root):
            raise CheckpointError(f"--output {redact(output)}: not empty; choose a new location (an export is never written over another)")
    elif Path(output).exists():
        raise CheckpointError(f"--output {output}: already exists; remove it or choose another folder")


def staging_dir(output: str, scratch: Path) -> Path:
    """The folder an export is built in: beside a local output (the final rename stays on one file system), else in
    `scratch`."""
    if is_url(output):
        folder = scratch / "export"
    else:
        target = Path(output).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = target.parent / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def publish(staged: Path, output: str) -> str:
    """Move (local) or upload (URL) the finished export in `staged`, EXPORT.json last; returns where it is."""
    if not is_url(output):
        target = Path(output).resolve()
        os.replace(staged, target)  # one rename: the folder appears with its EXPORT.json, or not at all
        return str(target)
    from .. import storage

    fs, root = storage.open_url(output)
    files = sorted(p for p in staged.rglob("*") if p.is_file() and p.name != CERTIFICATE)
    for path in files:
        storage.put_file(fs, f"{root}/{path.relative_to(staged).as_posix()}", path)
    storage.put_file(fs, f"{root}/{CERTIFICATE}", data=(staged / CERTIFICATE).read_bytes())
    shutil.rmtree(staged, ignore_errors=True)
    return redact(output)
