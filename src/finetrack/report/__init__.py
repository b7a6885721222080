"""`finetrack report RUN_DIR [RUN_DIR ...]`: one self-contained HTML file built from run directories.

collect.py   reads a run directory (the run-directory contract, nothing else)
charts.py    line charts as inline SVG
page.py      the sections of the page
mixture.py   a weighted mixture (data.sources): per-source loss curves, the Data mixture table
validation.py  the best checkpoint, why a run stopped, validation during training
representations.py  the suites that compare with the base model: per-layer heat maps over the steps, their curves
heatmap.py   heat maps (layer x step) as inline SVG, on the line charts' step axis
"""

from __future__ import annotations

import os
from pathlib import Path

from ..rundir import write_atomic
from ..schema import ConfigError
from .collect import load_run, unique_names
from .page import build_page

REPORT_FILE = "report.html"


def write_report(run_dirs: list[Path], output: Path | str | None = None) -> Path:
    """Read the run directories, write the report (default: RUN_DIR/report.html for one run,
    ./report.html for several; `output` a folder, existing or written with a trailing slash: report.html
    inside it) and return its path."""
    run_dirs = [Path(d) for d in run_dirs]
    path = output_path(output) if output else (run_dirs[0] / REPORT_FILE if len(run_dirs) == 1 else Path(REPORT_FILE))
    runs = [load_run(d, name) for d, name in zip(run_dirs, unique_names(run_dirs))]
    check_output(path)  # before building the page
    html = build_page(runs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, html)
    except OSError as e:  # disk full, read-only mount, no permission: say which file and why
        raise ConfigError(f"report {path}: cannot be written ({e.strerror or e}); choose another file with -o") from None
    return path


def output_path(output: Path | str) -> Path:
    """The file -o names: report.html inside it when it is a folder, or ends in a slash (Path() drops the slash, so
    the text is looked at first: `-o out/` means a folder even before it exists)."""
    text = str(output)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return Path(text) / REPORT_FILE
    return Path(text)


def check_output(path: Path) -> None:
    """The report's output file must be a file name whose folder can be written; ConfigError naming it otherwise."""
    if path.is_dir():
        raise ConfigError(f"-o {path}: is a folder; give a file name such as {path / 'report.html'}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"-o {path}: {parent} is a file, not a folder; choose another path with -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"-o {path}: folder {parent} is not writable; choose another path with -o")
