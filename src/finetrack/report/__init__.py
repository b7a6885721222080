"""`finetrack report RUN_DIR [RUN_DIR ...]`: one self-contained HTML file built from run directories.

collect.py   reads a run directory (the run-directory contract, nothing else)
charts.py    line charts as inline SVG
page.py      the sections of the page
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import write_atomic
from .collect import load_run, unique_names
from .page import build_page


def write_report(run_dirs: list[Path], output: Path | None = None) -> Path:
    """Read the run directories, write the report (default: RUN_DIR/report.html for one run,
    ./report.html for several) and return its path."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d, name) for d, name in zip(run_dirs, unique_names(run_dirs))]
    path = Path(output) if output else (run_dirs[0] / "report.html" if len(run_dirs) == 1 else Path("report.html"))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, build_page(runs))
    return path
