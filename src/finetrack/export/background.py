"""`checkpoint.export: [merged, onnx:int8, ...]`: every checkpoint exported as training goes on, for users who serve
every checkpoint.

Each export is `finetrack export CHECKPOINT --format F [--quantize T] --output RUN_DIR/exports/step-N-F[-T]` in a
child process (its own memory, the CPU; training never waits for it), one at a time, in the order the checkpoints were
written. An export is complete only once its folder appears with EXPORT.json (publish.py renames it into place in
one step), so a run killed with kill -9 leaves at most a hidden `.tmp-*` folder, never a half export that looks
complete; the next attempt of the run deletes those and exports the retained checkpoints that have no export yet.
Retention keeps a checkpoint while its export is queued or running. A failed verification is a warning naming the
check (training goes on; the files are kept as `.rejected`); the run's last line says what was not exported.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from .. import checkpoint
from ..rundir import EXPORTS_DIR

log = logging.getLogger("finetrack")


def parse(entry: str) -> tuple[str, str | None]:
    """'onnx:int8' -> ('onnx', 'int8'); 'merged' -> ('merged', None)."""
    fmt, _, quantize = entry.partition(":")
    return fmt, quantize or None


def folder_name(step_folder: str, entry: str) -> str:
    """exports/ folder of one checkpoint's export, as `finetrack export` names it by default (step-N-onnx-int8)."""
    fmt, quantize = parse(entry)
    return f"{step_folder}-{fmt}" + (f"-{quantize}" if quantize else "")


class Exporter:
    """Runs the configured exports of each submitted checkpoint on one background thread, one child process each."""

    def __init__(self, entries: list[str], run_dir: Path) -> None:
        self.entries, self.run_dir = list(entries), Path(run_dir)
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: list[Path] = []
        self.failed: list[str] = []  # "step-N-F: why", for the run's last line
        self._thread = threading.Thread(target=self._work, name="finetrack-exporter", daemon=True)
        self._thread.start()

    def catch_up(self) -> int:
        """Delete what an attempt killed mid-export left (hidden .tmp-* folders), then queue every retained complete
        checkpoint whose exports are missing; returns how many were queued."""
        exports = self.run_dir / EXPORTS_DIR
        for stale in exports.glob(".tmp-*") if exports.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        queued = 0
        for found in checkpoint.complete_checkpoints(self.run_dir, warn=lambda _: None):
            if any(not (exports / folder_name(found.path.name, e) / "EXPORT.json").is_file() for e in self.entries):
                self.submit(found.path)
                queued += 1
        return queued

    def submit(self, folder: Path) -> None:
        with self._lock:
            self._pending.append(Path(folder))
        self._queue.put(Path(folder))

    def busy(self) -> set[Path]:
        """Checkpoints queued or being exported: retention keeps them until their exports are done."""
        with self._lock:
            return set(self._pending)

    def wait(self) -> list[str]:
        """Finish every queued export (training is over); returns the ones that failed."""
        if self.busy():
            log.info("exporting: waiting for %d checkpoint(s) (checkpoint.export)", len(self.busy()))
        self._queue.put(None)
        self._thread.join()
        return self.failed

    def _work(self) -> None:
        while (folder := self._queue.get()) is not None:
            try:
                for entry in self.entries:
                    self._export(folder, entry)
            finally:
                with self._lock:
                    self._pending.remove(folder)

    def _export(self, folder: Path, entry: str) -> None:
        name = folder_name(folder.name, entry)
        target = self.run_dir / EXPORTS_DIR / name
        if (target / "EXPORT.json").is_file() or not folder.is_dir():
            return
        if target.exists():  # no certificate: not an export (a leftover of an interrupted attempt)
            shutil.rmtree(target, ignore_errors=True)
        fmt, quantize = parse(entry)
        argv = [sys.executable, "-m", "finetrack", "export", str(folder), "--format", fmt, "--output", str(target)]
        argv += ["--quantize", quantize] if quantize else []
        env = {**os.environ, "TQDM_DISABLE": "1"}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        if done.returncode == 0:
            log.info("export: %s verified", target)
            return
        why = next((line for line in done.stderr.splitlines() if line.startswith("error:")), f"exit status {done.returncode}")
        self.failed.append(f"{name}: {why.removeprefix('error: ')}")
        log.warning("warning: export of %s as %s failed: %s", folder.name, entry, why.removeprefix("error: "))
