"""Remote checkpoint storage: mirror a run directory to any fsspec URL, and back.

    URL/config.resolved.yaml  URL/data_report.json  URL/metrics.jsonl  URL/samples.jsonl
    URL/checkpoints/step-000047/<the files of the local checkpoint, MANIFEST.json uploaded last>
    URL/checkpoints/best.json       uploaded only once the checkpoint it names is complete on the remote

The completeness rule is the local one: a remote checkpoint counts only once its MANIFEST.json is
there, so it is uploaded after every other file and deleted before anything is replaced or removed.
Downloads land in a hidden temporary folder, are verified in full, then renamed to `step-*`.

URLs are anything fsspec opens: s3://bucket/prefix, gs://..., hf://..., file:///abs/path or a plain
local path. Credentials come from each backend's usual environment variables and config files, never
from the URL (refused: the URL is saved with the run), and every message passes URLs through redact.py's
`redact()`. The S3 endpoint (MinIO, R2, a test server) is set with AWS_ENDPOINT_URL, which botocore
under s3fs reads when the filesystem is first created in a process; AWS_MAX_ATTEMPTS and
AWS_RETRY_MODE set its retries the same way.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import checkpoint, rundir
from .checkpoint import MANIFEST, CheckpointError
from .redact import has_credentials, redact, scrub
from .rundir import BEST_FILE, step_name

# The run-level files a remote copy holds: a run resumed on an empty machine continues their history.
LOG_FILES = ("metrics.jsonl", "samples.jsonl")  # the run's history, appended step by step (sampling.SAMPLES_FILE)
RUN_FILES = ("config.resolved.yaml", "data_report.json", *LOG_FILES)
# Written by the Uploader into the local run directory (read by the report); never uploaded.
REMOTE_RECORD = "remote.json"


def describe_error(error: BaseException, url: str) -> str:
    """An exception's text on one line, safe to log: backends echo paths, and those may hold the URL's credentials."""
    return scrub(" ".join(str(error).split())[:300] or type(error).__name__, url)


def check_url(url: str) -> None:
    """Fail early on a backend that is not installed, or on credentials the backend would not take from the URL."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    if has_credentials(url):  # the URL is saved in config.resolved.yaml and meta.json: it must hold no secret
        raise ValueError(
            f"{redact(url)}: put no credentials in the URL (it is saved with the run and shown in messages); "
            f"set them {_credentials_hint(protocol)}"
        )
    if "?" in redact(url):  # a presigned URL's token or signature (?X-Amz-Signature=..., ?sig=..., ?token=...)
        raise ValueError(
            f"{redact(url).partition('?')[0]}?...: a query string is no part of a storage location and may hold a token or "
            "signature (the URL is saved with the run and shown in messages): remove it"
            + ("" if protocol in ("file", "local", "memory") else f", and set credentials {_credentials_hint(protocol)}")
        )
    fsspec.get_filesystem_class(protocol)  # ImportError naming the package to install


def _credentials_hint(protocol: str) -> str:
    """Where a backend takes credentials from, instead of the URL."""
    hints = {
        "s3": "e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials",
        "gs": "e.g. GOOGLE_APPLICATION_CREDENTIALS or gcloud auth application-default login",
        "hf": "e.g. HF_TOKEN or huggingface-cli login",
        "az": "e.g. AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY",
    }
    aliases = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}
    return hints.get(aliases.get(protocol, protocol), f"the way the {protocol} backend of fsspec reads them (its environment or config)")


def open_url(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    check_url(url)
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def location(url: str, *parts: str) -> str:
    """A remote location as messages show it: the redacted URL joined with `parts`."""
    return "/".join([redact(url).rstrip("/"), *parts])


def put_file(fs: fsspec.AbstractFileSystem, rpath: str, lpath: Path | None = None, data: bytes = b"") -> None:
    """Upload local file `lpath`, or `data`. Object stores need no folders and replace objects whole; a local mirror needs both."""
    if isinstance(fs, LocalFileSystem):
        parent, name = rpath.rsplit("/", 1)
        fs.makedirs(parent, exist_ok=True)
        if lpath is None:  # manifests and run files go through a rename: readers never see half of one
            tmp = f"{parent}/.tmp-{name}-{os.getpid()}"
            fs.pipe_file(tmp, data)
            fs.mv(tmp, rpath)
            return
    if lpath is None:
        fs.pipe_file(rpath, data)
    else:
        fs.put_file(str(lpath), rpath)


def remote_manifest(fs: fsspec.AbstractFileSystem, root: str, name: str, url: str) -> tuple[dict, bytes]:
    """(parsed, raw bytes) of the MANIFEST.json of remote checkpoint `name`; CheckpointError naming it otherwise."""
    where = location(url, "checkpoints", name, MANIFEST)
    try:
        raw = fs.cat_file(f"{root}/checkpoints/{name}/{MANIFEST}")
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing (the upload did not finish)") from None
    except Exception as e:  # every backend has its own error types
        raise CheckpointError(f"{where}: download failed ({describe_error(e, url)})") from None
    return checkpoint.parse_manifest(raw, where), raw


# ------------------------------------------------------------------------------------- upload
def push_checkpoint(folder: Path, url: str) -> bool:
    """Upload one complete local checkpoint to URL/checkpoints/<folder name>/, MANIFEST.json last.

    Returns False, uploading nothing, when the remote already holds an identical manifest.
    """
    folder = Path(folder)
    manifest = checkpoint.verify(folder, full=False)
    fs, root = open_url(url)
    rdir = f"{root}/checkpoints/{folder.name}"
    try:
        if remote_manifest(fs, root, folder.name, url)[0] == manifest:
            return False
    except CheckpointError:
        pass  # none yet, or unreadable: replaced like a different one
    if fs.exists(f"{rdir}/{MANIFEST}"):  # first: a crash while files are replaced leaves an incomplete folder, never a mixed one
        fs.rm_file(f"{rdir}/{MANIFEST}")
    for rel in manifest["files"]:
        put_file(fs, f"{rdir}/{rel}", folder / rel)
    put_file(fs, f"{rdir}/{MANIFEST}", data=(folder / MANIFEST).read_bytes())
    return True


def push_run_files(run_dir: Path, url: str) -> None:
    """Upload the run-level files that exist, so the remote copy is a usable run directory."""
    fs, root = open_url(url)
    for name in RUN_FILES:
        if (path := Path(run_dir) / name).is_file():
            data = path.read_bytes()
            if name.endswith(".jsonl"):  # the training loop may be mid-line: whole lines only
                data = data[: data.rfind(b"\n") + 1]
            put_file(fs, f"{root}/{name}", data=data)


def push_best(run_dir: Path, url: str, on_remote: set[int], sent: bytes | None = None) -> bytes | None:
    """Upload RUN_DIR/checkpoints/best.json when it differs from `sent` (the content uploaded last) and names a step in
    `on_remote` (checkpoints complete on the remote), so the remote's best.json never names a checkpoint it lacks.

    Returns the content the remote now holds as far as this process knows: `sent` when nothing was uploaded (no
    best.json, unchanged, or its checkpoint not uploaded yet: a later call uploads it). CheckpointError for a
    garbled local best.json (never uploaded); backend errors propagate.
    """
    path = rundir.best_path(run_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return sent
    if raw == sent or rundir.parse_best(raw, str(path))["step"] not in on_remote:
        return sent
    fs, root = open_url(url)
    put_file(fs, f"{root}/checkpoints/{BEST_FILE}", data=raw)  # whole (an object, or a rename on a local mirror)
    return raw


def pull_logs(url: str, run_dir: Path) -> list[str]:
    """Download the run's logs (LOG_FILES) that `run_dir` lacks; returns the names fetched.

    A run resumed from the remote on an empty machine needs the remote metrics.jsonl (and
    samples.jsonl): its own would start at the resumed step, and its next upload would replace the
    remote history with that partial file.
    """
    fs, root = open_url(url)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return [name for name in LOG_FILES if not (Path(run_dir) / name).exists() and get_run_file(fs, root, name, Path(run_dir))]


def get_run_file(fs: fsspec.AbstractFileSystem, root: str, name: str, dst: Path) -> bool:
    """Download URL/name to dst/name through a temporary name (readers never see half of one); False if the remote has none."""
    tmp = dst / f".tmp-{name}-{os.getpid()}"
    try:
        fs.get_file(f"{root}/{name}", str(tmp))
        os.replace(tmp, dst / name)
        return True
    except FileNotFoundError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ listing
def forget_listings(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Drop the cached listings of `root` and of every folder below it. s3fs's invalidate_cache(path) drops `path`
    and its parents only, and find() never replaces a listing it already holds: a checkpoint folder listed while it
    uploaded would otherwise stay without its MANIFEST.json (and checkpoints/ without best.json) for the life of the
    process, and cat_file() of those files would raise FileNotFoundError (a `sync --watch`, the Uploader's process)."""
    fs.invalidate_cache(root)
    for key in [k for k in fs.dircache if k.startswith(f"{root}/")]:
        fs.dircache.pop(key, None)


def remote_steps(url: str) -> list[int]:
    """Steps of the remote checkpoints that have a MANIFEST.json, ascending."""
    fs, root = open_url(url)
    forget_listings(fs, root)  # s3fs caches listings; polling must see new checkpoints
    try:
        paths = fs.find(f"{root}/checkpoints")  # one listing, not one request per checkpoint
    except FileNotFoundError:
        return []
    steps = set()
    for path in paths:
        parts = path.rstrip("/").rsplit("/", 2)
        if len(parts) == 3 and parts[2] == MANIFEST and (step := checkpoint.parse_step(parts[1])) is not None:
            steps.add(step)
    return sorted(steps)


def delete_remote_checkpoints(url: str) -> int:
    """Delete URL/checkpoints, each checkpoint's manifest first; returns how many checkpoint folders were deleted."""
    fs, root = open_url(url)
    fs.invalidate_cache(root)
    base, deleted = f"{root}/checkpoints", 0
    if fs.exists(f"{base}/{BEST_FILE}"):  # first: it must never name a checkpoint that is being deleted
        fs.rm_file(f"{base}/{BEST_FILE}")
    for path in fs.ls(base, detail=False) if fs.exists(base) else []:
        if checkpoint.parse_step(path.rstrip("/").rsplit("/", 1)[-1]) is not None:
            if fs.exists(f"{path}/{MANIFEST}"):
                fs.rm_file(f"{path}/{MANIFEST}")  # first, as locally: an interrupted delete leaves an incomplete folder
            fs.rm(path, recursive=True)
            deleted += 1
    fs.invalidate_cache(root)
    if fs.exists(base):  # leftovers that are not checkpoints (stray files, temporary names)
        fs.rm(base, recursive=True)
    return deleted


# ----------------------------------------------------------------------------------- download
def pull_checkpoint(url: str, step: int, run_dir: Path) -> Path:
    """Download URL/checkpoints/step-NNNNNN into run_dir/checkpoints/, verified in full; returns its path.

    A local copy that verifies is kept as it is; one that does not is replaced. Any failure raises
    CheckpointError naming the remote file and leaves nothing under a `step-*` name.
    """
    fs, root = open_url(url)
    name = step_name(step)
    rdir, where = f"{root}/checkpoints/{name}", location(url, "checkpoints", name)
    final = checkpoint.checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest, raw = remote_manifest(fs, root, name, url)
        if manifest.get("step") != step:
            raise CheckpointError(f"{where}/{MANIFEST}: says step {manifest.get('step')}, expected {step}")
        for rel in manifest["files"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{rdir}/{rel}", str(tmp / rel))
            except FileNotFoundError:
                raise CheckpointError(f"{where}/{rel}: missing on the remote (listed in {MANIFEST})") from None
            except Exception as e:  # every backend has its own error types
                raise CheckpointError(f"{where}/{rel}: download failed ({describe_error(e, url)})") from None
        (tmp / MANIFEST).write_bytes(raw)
        try:
            checkpoint.verify(tmp, full=True)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(str(tmp), where)) from None
        checkpoint.fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        try:
            checkpoint.verify(final, full=True)
        except CheckpointError:
            checkpoint.discard(final)  # broken: the verified download replaces it
        else:
            shutil.rmtree(tmp)
            if (final / MANIFEST).read_bytes() == raw:
                return final
            raise CheckpointError(f"{final} already holds a different checkpoint than {where}; move it away to fetch that one")
    os.rename(tmp, final)
    return final


def pull_newest_resumable(url: str, run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest remote checkpoint with resume state, downloaded and verified; bad ones are named
    through warn() and the previous one is tried. None if there is none."""
    fs, root = open_url(url)
    for step in reversed(remote_steps(url)):
        name = step_name(step)
        try:
            if checkpoint.is_resumable(remote_manifest(fs, root, name, url)[0]):
                return pull_checkpoint(url, step, run_dir)
            warn(f"skipping remote checkpoint {name}: weights only (its resume state was removed by checkpoint.keep_optimizer_state=last)")
        except CheckpointError as e:
            warn(f"skipping remote checkpoint {name}: {e}")
    return None


# ------------------------------------------------------------------------ background uploads
class Uploader:
    """Uploads checkpoints on one background thread so training never waits for the network.

    A checkpoint still failing after `retries` attempts is logged, then retried with the next submit()
    and once more by wait(). After every upload attempt and at the end, RUN_DIR/remote.json records
    {"url": redacted URL, "uploaded_steps": [...], "failed_steps": [...]} for the report.

    checkpoints/best.json (written locally by training, atomically, after the best checkpoint is complete and
    before that checkpoint is submitted) is not submitted itself: after every successful checkpoint upload, and once
    more in wait(), the local best.json is uploaded if it changed since this Uploader last uploaded it and the step
    it names is complete on the remote (uploaded here, or found there by catch_up()). So the remote best.json only
    ever names a checkpoint the remote holds, and lags the local one while that checkpoint uploads. A failed
    best.json upload is logged and retried at those same moments.
    """

    def __init__(self, url: str, run_dir: Path, retries: int = 3, backoff_s: float = 1.0, log: logging.Logger | None = None):
        check_url(url)  # a wrong URL stops the run at its start, not after its first checkpoint
        self.url, self.run_dir = url, Path(run_dir)
        self.retries, self.backoff_s = max(1, retries), backoff_s
        self.log = log or logging.getLogger("finetrack")
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: list[Path] = []  # queued or uploading
        self._failed: list[Path] = []  # retried with the next submit()
        self._broken: list[Path] = []  # no longer verify locally: retrying cannot help
        self._uploaded_steps: set[int] = set()  # complete on the remote: uploaded here, or found there by catch_up()
        self._failed_steps: set[int] = set()  # the last attempt failed: not on the remote (yet)
        self._record_lock = threading.Lock()  # one writer of remote.json at a time (its temporary name is per process)
        self._best_sent: bytes | None = None  # checkpoints/best.json as this Uploader last uploaded it
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="finetrack-uploader", daemon=True)
        self._thread.start()

    def submit(self, folder: Path) -> None:
        """Queue a complete checkpoint for upload, after re-queueing earlier failures."""
        if self._stopped:
            raise RuntimeError("Uploader.submit() after wait(): create a new Uploader")
        with self._lock:
            retry, self._failed = self._failed, []
        for f in [*retry, Path(folder)]:
            self._enqueue(f)

    def catch_up(self) -> int:
        """Queue the run's complete local checkpoints that the remote lacks (uploads an earlier attempt
        of this run did not finish); returns how many."""
        try:
            on_remote = set(remote_steps(self.url))
        except Exception as e:  # every backend has its own error types; the next checkpoint retries anyway
            self.log.warning(
                "could not list %s (%s): earlier checkpoints are not re-uploaded now", redact(self.url), describe_error(e, self.url)
            )
            return 0
        with self._lock:
            self._uploaded_steps |= on_remote
        self._write_record()
        missing = [f.path for f in checkpoint.complete_checkpoints(self.run_dir) if f.step not in on_remote]
        for folder in missing:
            self._enqueue(folder)
        return len(missing)

    def busy(self) -> set[Path]:
        """Folders queued, uploading or failed: they must not be deleted yet."""
        with self._lock:
            return {*self._pending, *self._failed}

    def wait(self) -> list[Path]:
        """Retry failures once more, wait for every upload, stop the thread; returns the folders not uploaded."""
        if not self._stopped:
            with self._lock:
                retry, self._failed = self._failed, []
                waiting = len(self._pending) + len(retry)
            if waiting:
                self.log.info("waiting for %d checkpoint upload(s) to %s", waiting, redact(self.url))
            for f in retry:
                self._enqueue(f)
            self._stopped = True
            self._queue.put(None)
            self._thread.join()
            self._push_best()  # the thread has ended: no other caller
            self._write_record()
        return [*self._failed, *self._broken]

    def _enqueue(self, folder: Path) -> None:
        with self._lock:
            if folder in self._pending:
                return
            self._pending.append(folder)
        self._queue.put(folder)

    def _work(self) -> None:
        while (folder := self._queue.get()) is not None:
            outcome = self._upload(folder)
            step = checkpoint.parse_step(folder.name)  # folders come from checkpoint_dir / complete_checkpoints: step-NNNNNN
            with self._lock:  # one critical section: busy() never misses a failed folder
                self._pending.remove(folder)
                if outcome == "done":
                    self._uploaded_steps.add(step)
                    self._failed_steps.discard(step)
                else:  # a failed re-upload took the remote manifest away first: not there now
                    (self._failed if outcome == "failed" else self._broken).append(folder)
                    self._failed_steps.add(step)
                    self._uploaded_steps.discard(step)
            if outcome == "done":  # the checkpoint best.json names may be complete on the remote now
                self._push_best()
            self._write_record()

    def _push_best(self) -> None:
        """Upload checkpoints/best.json if it changed and its checkpoint is on the remote (push_best); never raises."""
        with self._lock:
            on_remote = set(self._uploaded_steps)
        try:
            self._best_sent = push_best(self.run_dir, self.url, on_remote, self._best_sent)
        except CheckpointError as e:  # garbled locally: training rewrites it at its next improvement
            self.log.warning("not uploading %s: %s", BEST_FILE, e)
        except Exception as e:  # network and backend errors of every kind: retried after the next checkpoint upload
            self.log.warning(
                "upload of checkpoints/%s to %s failed: %s (retried after the next checkpoint upload)",
                BEST_FILE,
                redact(self.url),
                describe_error(e, self.url),
            )

    def _write_record(self) -> None:
        """Replace RUN_DIR/remote.json (atomically: the report may read it while the run goes on)."""
        with self._lock:
            record = {"url": redact(self.url), "uploaded_steps": sorted(self._uploaded_steps), "failed_steps": sorted(self._failed_steps)}
        try:
            with self._record_lock:
                checkpoint.write_atomic(self.run_dir / REMOTE_RECORD, json.dumps(record, indent=2) + "\n")
        except OSError as e:  # the uploads themselves go on; only the report's record is stale
            self.log.warning("could not write %s: %s", self.run_dir / REMOTE_RECORD, e)

    def _upload(self, folder: Path) -> str:
        """'done', 'failed' (retried later) or 'broken' (the local checkpoint no longer verifies)."""
        for attempt in range(self.retries):
            try:
                push_checkpoint(folder, self.url)
                push_run_files(self.run_dir, self.url)
                return "done"
            except CheckpointError as e:
                self.log.warning("not uploading checkpoint %s: %s", folder.name, describe_error(e, self.url))
                return "broken"
            except Exception as e:  # network and backend errors of every kind: retried, then reported
                if attempt + 1 < self.retries:
                    time.sleep(self.backoff_s * 2**attempt)
                    continue
                self.log.warning(
                    "upload of checkpoint %s to %s failed after %d attempt(s): %s (retried with the next checkpoint)",
                    folder.name,
                    redact(self.url),
                    self.retries,
                    describe_error(e, self.url),
                )
        return "failed"
