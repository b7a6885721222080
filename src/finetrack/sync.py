"""`finetrack sync SRC DST [--watch S]`: mirror the complete checkpoints and run files of a run (any fsspec URL or
a local path) into a local run directory, once or as they appear.

Each checkpoint is downloaded through storage.pull_checkpoint (a hidden temporary folder, verified in full,
then renamed), so DST only ever holds checkpoints that verify. checkpoints/best.json is mirrored after the
checkpoints, once DST holds the complete checkpoint it names: DST's best.json never names one it lacks. A watch is started together with the
launch, so it waits for a source that does not exist yet.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from . import checkpoint, rundir, storage
from .checkpoint import CheckpointError
from .processes import process_alive
from .redact import redact
from .rundir import BEST_FILE, size_text, step_name
from .watch import wait_for

_EXPECTED = "expected a finetrack run directory (holding checkpoints/step-NNNNNN/)"


def _sweep_stale_downloads(dst: Path, out: Callable[[str], None]) -> None:
    """Remove the temporary downloads (`.tmp-<name>-<pid>`) of a sync that was killed: another process's, and that process is gone."""
    leftovers = [
        *(dst / "checkpoints").glob(".tmp-step-*-*"),
        *(dst / "checkpoints").glob(f".tmp-{BEST_FILE}-*"),  # rundir.write_atomic's temporary name
        *(t for name in storage.RUN_FILES for t in dst.glob(f".tmp-{name}-*")),
    ]
    for tmp in leftovers:
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            out(f"removed {tmp} (left by a sync or resume that was stopped)")


def _sync_once(src: str, dst: Path, out: Callable[[str], None], skipped: dict[str, bytes], quiet: bool) -> list[int]:
    """One pass of sync(). `skipped` holds the remote manifests (and best.json) that failed, so that a watch retries a
    checkpoint only once it changes; the summary line is left out when `quiet` and nothing was fetched."""
    fs, root = storage.open_url(src)
    fetched, total_bytes, present, failed = [], 0, 0, 0
    for step in storage.remote_steps(src):
        name, local = step_name(step), checkpoint.checkpoint_dir(dst, step)
        try:
            remote, raw = storage.remote_manifest(fs, root, name, src)
        except CheckpointError as e:
            out(f"skipped {name}: {e}")
            failed += 1
            continue
        try:
            mine = checkpoint.verify(local, full=False) if local.is_dir() else None
        except CheckpointError:
            mine = None  # a broken local copy: pull_checkpoint replaces it
        if mine == remote:
            present += 1
            continue
        if skipped.get(name) == raw:
            failed += 1
            continue
        try:
            if mine is not None:  # never overwrite a good checkpoint
                raise CheckpointError(
                    f"the local copy differs from {storage.location(src, 'checkpoints', name)}; delete it to fetch that one"
                )
            storage.pull_checkpoint(src, step, dst)
        except CheckpointError as e:
            out(f"skipped {name}: {e}")
            skipped[name] = raw
            failed += 1
            continue
        size = sum(f["size"] for f in remote["files"].values()) + len(raw)
        out(f"fetched {name} ({size_text(size)})")
        fetched.append(step)
        total_bytes += size
    for name in storage.RUN_FILES:  # replaced whole: metrics.jsonl grows while the run trains
        storage.get_run_file(fs, root, name, dst)
    _sync_best(fs, root, src, dst, out, skipped)
    if fetched or not quiet:
        out(
            f"{redact(src)} -> {dst}: fetched {len(fetched)} checkpoint(s) ({size_text(total_bytes)}), {present} already present"
            + (f", {failed} not fetched (see above)" if failed else "")
        )
    return fetched


def _sync_best(fs, root: str, src: str, dst: Path, out: Callable[[str], None], skipped: dict[str, bytes]) -> None:
    """Mirror checkpoints/best.json once DST holds the complete checkpoint it names (fetched above, or already there).

    One naming a checkpoint DST lacks (not uploaded yet, or not fetched: see above) is left for a later pass, DST's
    own best.json kept; that is said once per content of the remote file, so a watch does not repeat it."""
    try:
        raw = fs.cat_file(f"{root}/checkpoints/{BEST_FILE}")
    except FileNotFoundError:
        return  # a run without checkpoint.best, or whose best checkpoint is not uploaded yet
    local = rundir.best_path(dst)
    if local.is_file() and local.read_bytes() == raw:
        return
    try:
        best = rundir.parse_best(raw, storage.location(src, "checkpoints", BEST_FILE))
        folder = rundir.checkpoint_dir(dst, best["step"])
        if not folder.is_dir():
            raise CheckpointError(f"it names {folder.name}, which {dst} does not hold yet; mirrored once it does")
        try:
            rundir.verify(folder, full=False)
        except CheckpointError as e:
            raise CheckpointError(f"it names {folder.name}, which {dst} holds incomplete ({e})") from None
    except CheckpointError as e:
        if skipped.get(BEST_FILE) != raw:
            out(f"skipped checkpoints/{BEST_FILE}: {e}")
        skipped[BEST_FILE] = raw
        return
    rundir.write_atomic(local, raw.decode("utf-8"))  # parse_best read it as UTF-8
    out(f"fetched checkpoints/{BEST_FILE} (best: {rundir.describe_best(best)})")


def _is_run(src: str) -> bool:
    """Does `src` look like a run directory yet: a checkpoints/ folder, or the config training writes before step 1?"""
    fs, root = storage.open_url(src)
    fs.invalidate_cache(root)  # s3fs caches listings: a watch must see the run appear
    return fs.isdir(f"{root}/checkpoints") or fs.isfile(f"{root}/config.resolved.yaml")


def sync(
    src: str, dst: Path, watch_seconds: float | None = None, out: Callable[[str], None] = print, stop: threading.Event | None = None
) -> list[int]:
    """Mirror the complete checkpoints and run files of a run (fsspec URL or local path) into run directory `dst`.

    A checkpoint that fails verification is reported and skipped. With watch_seconds, wait for the run to
    appear if it does not exist yet, then poll until Ctrl+C or `stop` is set. Returns the steps fetched.
    Raises ValueError for a source that is not a run (without watch_seconds) or is the destination itself.
    """
    dst = Path(dst)
    fs, root = storage.open_url(src)
    if isinstance(fs, LocalFileSystem) and Path(root).resolve() == dst.resolve():
        raise ValueError(f"sync: source and destination are the same directory ({dst})")
    stop = stop or threading.Event()
    if watch_seconds is None:
        fs.invalidate_cache(root)
        if not fs.exists(root):
            raise ValueError(f"sync: {redact(src)} does not exist; {_EXPECTED}")
        if not fs.isdir(f"{root}/checkpoints"):
            raise ValueError(f"sync: {redact(src)} has no checkpoints/ folder; {_EXPECTED}")
    elif not wait_for(lambda: _is_run(src), redact(src), watch_seconds, out, stop):
        return []
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    _sweep_stale_downloads(dst, out)  # once: a watch's own temporaries never outlive a poll
    skipped: dict[str, bytes] = {}
    if watch_seconds is None:
        return _sync_once(src, dst, out, skipped, quiet=False)
    out(f"watching {redact(src)} every {watch_seconds:g} s (Ctrl+C to stop)")
    fetched: list[int] = []
    try:
        while True:
            try:
                fetched += _sync_once(src, dst, out, skipped, quiet=True)
            except OSError as e:  # a network hiccup must not end a long watch
                out(f"poll of {redact(src)} failed: {storage.describe_error(e, src)}; trying again in {watch_seconds:g} s")
            if stop.wait(watch_seconds):
                return fetched
    except KeyboardInterrupt:
        return fetched
