"""Reading a run directory (the contract between stages, see DESIGN.md) with json and yaml only.

`finetrack report` and `finetrack gate` read artifacts, never a live process, so they need neither torch
nor fsspec: everything they read goes through here. checkpoint.py (which writes checkpoints and needs torch)
takes its folder names, manifest checks and small-file writes from this module, so each has one home.

    RUN_DIR/config.resolved.yaml  metrics.jsonl  samples.jsonl  checkpoints/step-NNNNNN/  checkpoints/best.json  eval/step-NNNNNN.json
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from .errors import UserError
from .schema import ConfigError

CONFIG_FILE = "config.resolved.yaml"
CHECKPOINTS_DIR, EVAL_DIR = "checkpoints", "eval"
MANIFEST = "MANIFEST.json"
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
MANIFEST_FORMAT = "finetrack-checkpoint/1"
_STEP_PREFIX = "step-"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and file."""


# ---------------------------------------------------------------------------------- step names
def step_name(step: int) -> str:
    """47 -> 'step-000047': the name of a checkpoint folder and (with a suffix) of its eval files."""
    return f"{_STEP_PREFIX}{step:06d}"


def is_step(value: object) -> bool:
    """A whole number >= 0, never a bool (True is an int to Python, not a step of a run)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_step(name: str) -> int | None:
    """`step-000047` -> 47; anything else (temporary folders, stray files, `step-47`, `step-0000047`) -> None: a
    step has one name, so two folders can never both be step 47."""
    digits = name[len(_STEP_PREFIX) :]
    if not name.startswith(_STEP_PREFIX) or not (digits.isascii() and digits.isdigit()):
        return None
    step = int(digits)
    return step if step_name(step) == name else None


EXPORTS_DIR = "exports"


def verified_export(run_dir: Path, step: int, fmt: str) -> tuple[Path | None, str]:
    """(the folder of a verified `fmt` export of checkpoint `step` under RUN_DIR/exports/, or None; what was found).
    Any type of the format counts (`onnx` is met by step-N-onnx or step-N-onnx-int8); its EXPORT.json must say
    verified (an export written with --no-verify does not count)."""
    found = []
    for folder in sorted(Path(run_dir, EXPORTS_DIR).glob(f"{step_name(step)}-{fmt}*")):
        if folder.name != f"{step_name(step)}-{fmt}" and not folder.name.startswith(f"{step_name(step)}-{fmt}-"):
            continue  # step-N-onnxfoo is not an onnx export
        try:
            certificate = json.loads((folder / "EXPORT.json").read_text())
        except (OSError, ValueError):
            found.append(f"{folder.name} (no readable EXPORT.json: incomplete)")
            continue
        if certificate.get("verified") is True:
            return folder, folder.name
        found.append(f"{folder.name} (not verified)")
    return None, "; ".join(found) or "none"


def split_checkpoint_url(url: str) -> tuple[str, int] | None:
    """'s3://b/run/checkpoints/step-000047' -> ('s3://b/run', 47); None when the URL does not end in a checkpoint."""
    root, _, name = url.rstrip("/").rpartition(f"/{CHECKPOINTS_DIR}/")
    step = parse_step(name)
    return (root, step) if root and step is not None else None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / step_name(step)


def step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoints/step-*` folder, complete or not, by step."""
    found = ((parse_step(d.name), d) for d in (Path(run_dir) / CHECKPOINTS_DIR).glob(f"{_STEP_PREFIX}*") if d.is_dir())
    return sorted((step, d) for step, d in found if step is not None)


def stray_step_folders(run_dir: Path) -> list[Path]:
    """Folders under checkpoints/ named like a checkpoint but not one (`step-1`, `step-abc`, `step-0000047`): never
    read as a step, and named by the commands that list checkpoints, so a hand-renamed folder is not passed over unsaid."""
    return sorted(d for d in (Path(run_dir) / CHECKPOINTS_DIR).glob(f"{_STEP_PREFIX}*") if d.is_dir() and parse_step(d.name) is None)


def eval_path(run_dir: Path, step: int) -> Path:
    """RUN_DIR/eval/step-NNNNNN.json: the eval record of one step (0 = the base model)."""
    return Path(run_dir) / EVAL_DIR / f"{step_name(step)}.json"


BEST_FILE = "best.json"  # in checkpoints/: the best checkpoint by checkpoint.best's metric
BEST_FORMAT = "finetrack-best/1"
BEST = "best"  # the word accepted wherever a step is (eval --steps, gate --step): the step best.json names
_BEST_FIX = "delete it (training rewrites it at the next improvement)"


def best_path(run_dir: Path) -> Path:
    """RUN_DIR/checkpoints/best.json: which checkpoint is the best so far (written atomically by training)."""
    return Path(run_dir) / CHECKPOINTS_DIR / BEST_FILE


def read_best(run_dir: Path) -> dict | None:
    """The run's best.json ({"format", "step", "metric", "mode", "value", "checkpoint"}), None when the run has none.
    A garbled file is a CheckpointError naming it."""
    path = best_path(run_dir)
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e}); {_BEST_FIX}") from None
    return parse_best(raw, str(path))


def parse_best(raw: bytes, where: str) -> dict:
    """A best.json's content, checked (our format, a whole step); CheckpointError naming `where` otherwise. Also what
    sync reads a remote copy with."""
    try:
        best = json.loads(raw.decode("utf-8"))  # UTF-8 only: sync writes the same bytes back as text
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
        raise CheckpointError(f"{where}: unreadable ({e}); {_BEST_FIX}") from None
    step = best.get("step") if isinstance(best, dict) else None
    if not isinstance(best, dict) or best.get("format") != BEST_FORMAT or not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{where}: not a {BEST_FORMAT} record; {_BEST_FIX}")
    return best


def require_best(run_dir: Path) -> dict:
    """best.json of a run asked for its best step; CheckpointError saying how to get one when the run has none."""
    best = read_best(run_dir)
    if best is None:
        raise CheckpointError(
            f"{run_dir} has no {CHECKPOINTS_DIR}/{BEST_FILE}: "
            "set checkpoint.best in the config (the best checkpoint by a validation metric)"
        )
    return best


def best_checkpoint(run_dir: Path) -> tuple[dict, Path]:
    """best.json and the checkpoint folder it names, that folder complete (manifest present, files of their sizes);
    CheckpointError naming both when the checkpoint is gone or incomplete (a hand deletion, a partial copy)."""
    best = require_best(run_dir)
    folder = checkpoint_dir(run_dir, best["step"])
    try:
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such folder")
        verify(folder, full=False)
    except CheckpointError as e:
        raise CheckpointError(
            f"{best_path(run_dir)} names step {best['step']}, whose checkpoint is gone or incomplete ({e}); "
            f"restore {folder.name} (e.g. `finetrack sync` from checkpoint.remote) or give the step of another checkpoint"
        ) from None
    return best, folder


def describe_best(best: dict, with_step: bool = True) -> str:
    """'step 40, eval_loss 0.51 (min)' (without the step: 'eval_loss 0.51 (min)'): a best.json as messages show it."""
    value = best.get("value")
    shown = f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"
    mode = f" ({best['mode']})" if isinstance(best.get("mode"), str) else ""
    return (f"step {best['step']}, " if with_step else "") + f"{best.get('metric', '?')} {shown}{mode}"


def resolve_step(run_dir: Path, text: str) -> int:
    """A step as a command line gives it: a number, or 'best' (the step best.json names; CheckpointError when the run
    has none). ValueError for anything else."""
    text = text.strip()
    if text == BEST:
        return require_best(run_dir)["step"]
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a step number or {BEST!r}")
    return int(text)


def parse_steps(run_dir: Path, spec: str) -> list[int]:
    """`--steps 0,47,best` -> [0, 40, 47]: the steps named, 'best' as the step best.json names (its checkpoint checked
    complete), sorted, each once. ConfigError for text that is not such a list ('all' and 'latest' are the caller's)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or not all(p.isdigit() or p == BEST for p in parts):
        raise ConfigError(f"--steps {spec}: use all, latest, best, or a comma-separated list of steps such as 0,47,94 or 0,best")
    steps = {int(p) for p in parts if p != BEST}
    if BEST in parts:
        steps.add(best_checkpoint(run_dir)[0]["step"])
    return sorted(steps)


def responses_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / EVAL_DIR / "responses" / f"{step_name(step)}.jsonl"


def eval_files(run_dir: Path) -> dict[int, Path]:
    """Step -> eval file for every eval/step-NNNNNN.json of the run; anything else in eval/ is ignored."""
    files = {}
    for path in (Path(run_dir) / EVAL_DIR).glob(f"{_STEP_PREFIX}*.json"):
        step = parse_step(path.name.removesuffix(".json"))
        if step is not None and path.is_file():
            files[step] = path
    return dict(sorted(files.items()))


# ---------------------------------------------------------------------------------- small files
def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace a small file so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, or a signal while starting: leave no stray temporary file
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def size_text(num_bytes: int) -> str:
    """A size for people: 1.2 GB, 340.5 MB, 12.0 kB, 17 B (decimal units, as disks and clouds bill them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def read_json(path: Path) -> object:
    """The JSON value of a file; ValueError (or OSError) naming nothing: callers say which file and what to do."""
    return json.loads(Path(path).read_bytes())


def read_jsonl(path: Path, bad_lines: list[int] | None = None) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line; a missing file is empty.

    A line that is not a JSON object (a run killed mid-write, a hand edit) is left out and its number
    appended to `bad_lines`; with bad_lines None such a line is a ConfigError naming the file and line.
    """
    return [row for _, row in read_jsonl_numbered(path, bad_lines)]


def read_jsonl_numbered(path: Path, bad_lines: list[int] | None = None) -> list[tuple[int, dict]]:
    """As read_jsonl, each object with its line number (1-based): for a reader that checks the objects' fields and
    must name the line of one it leaves out."""
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[tuple[int, dict]] = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            row = None
        if isinstance(row, dict):
            rows.append((number, row))
        elif bad_lines is not None:
            bad_lines.append(number)
        else:
            raise ConfigError(f"{path}:{number}: not a JSON object; fix or delete that line")
    return rows


# ------------------------------------------------------------------------------------- the run
def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def require_run_dir(path: Path, verb: str) -> Path:
    """`path` as a run directory, or one ConfigError saying what it is instead and what to do."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such run directory; give the output.dir of a run (`finetrack {verb} RUN_DIR`)")
    if not path.is_dir():
        raise ConfigError(f"{path}: is a file, not a run directory; give the folder holding {CONFIG_FILE}")
    if not is_run_dir(path):
        raise ConfigError(
            f"{path}: not a run directory (no {CONFIG_FILE}; `finetrack train` writes one before step 1, "
            f"`finetrack eval CONFIG.yaml --steps 0` before a baseline)"
        )
    return path


def read_config(run_dir: Path) -> dict:
    """config.resolved.yaml as plain data (no validation: a reader shows what the run was trained with)."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    try:
        tree = yaml.safe_load(path.read_bytes())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable ({' '.join(str(e).split())}); restore it from a checkpoint's meta.json or re-run") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: holds a {type(tree).__name__}, not the sections of a config; restore it or re-run")
    # each section a mapping: readers look keys up in them (a hand edit `model: x` crashed the report)
    for key in ("model", "data", "objective", "train", "checkpoint", "eval", "output", "resolved"):
        if tree.get(key) is not None and not isinstance(tree[key], dict):
            raise ConfigError(
                f"{path}: '{key}' holds a {type(tree[key]).__name__}, not a section; restore the file (a checkpoint's meta.json "
                "holds the config) or re-run"
            )
    return tree


def judge_rates(config: dict) -> dict[str, dict[str, str]]:
    """Judge suite name -> its named rates ('misaligned': 'aligned < 30 and coherent > 50'), from a plain config."""
    from .evaluate.spec import JudgeSuite  # pydantic only: no torch

    default_rates = JudgeSuite.model_fields["rates"].get_default(call_default_factory=True)
    out = {}
    suites = (config.get("eval") or {}).get("suites") if isinstance(config.get("eval"), dict) else None
    for suite in suites or []:
        if isinstance(suite, dict) and suite.get("kind") == "judge" and isinstance(suite.get("name"), str):
            rates = suite.get("rates", default_rates)
            out[suite["name"]] = rates if isinstance(rates, dict) else {}
    return out


def read_eval(path: Path, run_dir: Path | None = None) -> dict:
    """One eval/step-NNNNNN.json record, checked for shape; EvalError naming the file and the fix otherwise."""
    from .evaluate.spec import EvalError

    path = Path(path)
    again = f"delete it and re-run `finetrack eval {run_dir if run_dir is not None else path.parent.parent}`"
    try:
        record = read_json(path)
    except OSError as e:
        raise EvalError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise EvalError(f"{path}: not valid JSON ({' '.join(str(e).split())[:120]}); {again}") from None
    if not isinstance(record, dict) or not is_step(record.get("step")) or not isinstance(record.get("metrics", {}), dict):
        raise EvalError(f"{path}: not a finetrack eval record (an object with 'step' >= 0 and 'metrics'); {again}")
    return record


# ------------------------------------------------------------------------------------ checkpoints
def parse_manifest(raw: bytes, where: str) -> dict:
    """A manifest's content, checked: our format, and only files inside the checkpoint folder. `where` names it in errors."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{where}: not a finetrack manifest (format {MANIFEST_FORMAT})")
    if any(PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts for rel in manifest["files"]):
        raise CheckpointError(f"{where}: lists files outside the checkpoint folder")
    return manifest


def read_manifest(folder: Path) -> dict:
    """The manifest of a checkpoint folder; CheckpointError naming the file if it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint was not completely written)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    return parse_manifest(raw, str(path))


def verify(folder: Path, full: bool = True) -> dict:
    """Check every file the manifest lists: present, same size and (with full=True) same sha256.

    Returns the manifest; raises CheckpointError naming the first bad file. Files the manifest does
    not list are ignored (never read).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    for rel, want in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if not isinstance(want, dict) or size != want.get("size"):
            raise CheckpointError(
                f"{path}: {size} bytes, {MANIFEST} says {want.get('size') if isinstance(want, dict) else want} (truncated or overwritten)"
            )
        if full and sha256_file(path) != want.get("sha256"):
            raise CheckpointError(f"{path}: sha256 does not match {MANIFEST} (corrupted)")
    return manifest


def is_resumable(manifest: dict) -> bool:
    return STATE_JSON in manifest["files"] and STATE_TENSORS in manifest["files"]


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((Path(folder) / "meta.json").read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{Path(folder) / 'meta.json'}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{Path(folder) / 'meta.json'}: not a JSON object")
    return meta
