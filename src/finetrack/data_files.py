"""Data stage, reading: a path spec -> files -> raw records, each with the file and line it came from.

Files are read as UTF-8 (a byte-order mark is dropped); bytes that are not UTF-8 are an error naming the
file, the byte offset and the line. A folder is read file by file (suffixes `.jsonl .json .csv .parquet`,
any case); everything else in it (other types, compressed files, subfolders) is listed as skipped in the
data report, never read silently. A path that is neither a local file nor a folder is tried as a
Hugging Face `datasets` source only when it could be a hub id, and the log says so.

Nothing here knows about chat rows: `data.py` validates the records.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .redact import redact
from .schema import DATA_FILE_SUFFIXES
from .errors import UserError

log = logging.getLogger("finetrack")

BUILTIN_DATA = {"builtin:demo-chat": Path(__file__).parent / "assets" / "demo_chat.jsonl"}
_FILE_KINDS = {suffix: suffix[1:] for suffix in DATA_FILE_SUFFIXES}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".tgz", ".7z")
# Suffixes that make a missing path a file, not a hub id ("data/train.txt" must not go to the Hub).
_FILE_LIKE_SUFFIXES = {*DATA_FILE_SUFFIXES, *_COMPRESSED, ".txt", ".tsv", ".yaml", ".yml", ".md", ".arrow", ".xlsx", ".xls", ".pkl"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"
ACCEPTED_FORMS = (
    "a .jsonl/.json/.csv/.parquet file, a folder of them, a `datasets` save_to_disk folder, "
    "a Hugging Face hub dataset id (owner/name), or builtin:demo-chat"
)
UTF8_HINT = "finetrack reads text files as UTF-8: re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > NEW`)"
CSV_FIELD_LIMIT_CHARS = 2**31 - 1  # the csv module's default (128 KiB) would refuse a long conversation in one cell


class DataError(UserError, ValueError):
    """A bad row or source; the message names file, line and field and what to do."""


@dataclass
class RawRow:
    source: str  # file path or dataset name
    line: int  # 1-based line (JSONL/CSV) or item number (JSON/Parquet/datasets)
    record: Any  # the parsed record, or a DataError for a line that could not be parsed (skippable with data.on_error=skip)
    # our field -> (the row's own field, its data.columns key): the fields data.columns renamed, named both ways in errors
    columns: dict[str, tuple[str, str]] | None = None


def first_line(e: BaseException) -> str:
    """An exception's message as one line (third-party messages can span many): the CLI prints one `error:` line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------- text
def _utf8_error(path: Path, data: bytes, e: UnicodeDecodeError, base_offset: int, line: int, error: type[ValueError]) -> ValueError:
    offset = base_offset + e.start
    bad = data[e.start : e.start + 1].hex()
    hint = UTF8_HINT
    if base_offset == 0 and data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        hint = "the file starts with a UTF-16 byte-order mark: re-save it as UTF-8"
    return error(f"{path}:{line}: not UTF-8 text: byte 0x{bad} at byte offset {offset} cannot be decoded; {hint}")


def _nul_error(path: Path, offset: int, line: int, error: type[ValueError]) -> ValueError:
    return error(
        f"{path}:{line}: NUL byte at byte offset {offset}: this is a binary file or UTF-16 text, not UTF-8; re-save the file as UTF-8 text"
    )


def read_text(path: Path, error: type[ValueError] = DataError) -> str:
    """The whole file as UTF-8 text (a leading byte-order mark dropped); bytes that are not UTF-8 or a NUL raise
    `error` naming the byte offset and line. Shared by the data, question and item readers."""
    data = path.read_bytes()
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        e.start += start
        raise _utf8_error(path, data, e, 0, data.count(b"\n", 0, e.start) + 1, error) from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise _nul_error(path, nul, data.count(b"\n", 0, nul) + 1, error)
    return text


def iter_text_lines(path: Path, error: type[ValueError] = DataError) -> Iterator[tuple[int, str | ValueError]]:
    """(1-based line number, text) per line of a UTF-8 file; a line that is not UTF-8 text comes as an `error`
    instance naming its byte offset (the caller raises it or counts it). A UTF-16 file raises at once."""
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            body = raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
            skip = len(raw) - len(body)
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = _utf8_error(path, body, e, offset + skip, lineno, error)
                if lineno == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                    raise problem from None  # every line of a UTF-16 file would fail the same way
                yield lineno, problem
            else:
                nul = text.find("\x00")
                yield lineno, (text if nul < 0 else _nul_error(path, offset + skip + len(text[:nul].encode()), lineno, error))
            offset += len(raw)


# ---------------------------------------------------------------------------------------- sources
def file_kind(path: Path) -> str | None:
    """'jsonl', 'json', 'csv' or 'parquet' by suffix (any case), or None."""
    return _FILE_KINDS.get(path.suffix.lower())


def _skip_reason(f: Path) -> str:
    if f.is_dir():
        return "folder (subfolders are not read)"
    if f.suffix.lower() in _COMPRESSED:
        return "compressed (decompress it to read it)"
    return f"unknown file type '{f.suffix}'" if f.suffix else "no file suffix"


def _folder_files(p: Path, skipped: list[str] | None) -> list[Path]:
    files, other = [], []
    for f in sorted(p.iterdir()):
        (files if f.is_file() and file_kind(f) else other).append(f)
    listed = [f"{f.name}{'/' if f.is_dir() else ''} ({_skip_reason(f)})" for f in other]
    if not files:
        found = f"; found: {', '.join(listed[:8])}{' ...' if len(listed) > 8 else ''}" if listed else " (it is empty)"
        raise DataError(f"{p}: no .jsonl/.json/.csv/.parquet files in this folder{found}")
    if skipped is not None:
        skipped.extend(f"{p / name}" for name in listed)
    return files


def _looks_local(spec: str) -> bool:
    """Could this missing path only be a local path (not a hub dataset id such as 'owner/name')?"""
    if spec.startswith((".", "/", "~")) or "\\" in spec or not _HUB_ID.fullmatch(spec):
        return True
    p = Path(spec)
    return p.suffix.lower() in _FILE_LIKE_SUFFIXES or (len(p.parts) > 1 and Path(p.parts[0]).exists())


def source_files(spec: str, skipped: list[str] | None = None) -> list[Path] | None:
    """The files a path spec names, or None when it is a `datasets` source (a save_to_disk folder or a hub id).
    Files of a folder that are not read are appended to `skipped` as 'path (reason)'."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_DATA:
            raise DataError(f"data path {spec}: unknown builtin data; available: {', '.join(BUILTIN_DATA)}")
        return [BUILTIN_DATA[spec]]
    if "://" in spec:
        raise DataError(f"data path {redact(spec)}: URLs are not read as data; copy the file here first. Accepted: {ACCEPTED_FORMS}")
    p = Path(spec).expanduser()
    if p.is_dir() and any((p / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return None  # a `datasets` save_to_disk folder
    if p.is_dir():
        return _folder_files(p, skipped)
    if p.is_file():
        if p.suffix.lower() in _COMPRESSED:
            raise DataError(f"{p}: compressed files are not read; decompress it (e.g. gunzip) and give the .jsonl/.json/.csv/.parquet file")
        if not file_kind(p):
            raise DataError(f"{p}: unknown file type '{p.suffix}'; use .jsonl, .json, .csv or .parquet")
        return [p]
    if p.exists():
        raise DataError(f"{p}: not a regular file or folder; accepted: {ACCEPTED_FORMS}")
    if _looks_local(spec):
        raise DataError(f"data file not found: {spec} (no such file or folder here; relative paths start at the current directory)")
    return None


def read_rows(spec: str | list[str], split: str, skipped: list[str] | None = None) -> Iterator[RawRow]:
    """Yield raw records with their location. Unparseable lines are yielded as DataError records;
    a file that cannot be read at all, or holds no rows, raises DataError."""
    for one in [spec] if isinstance(spec, str) else spec:
        files = source_files(one, skipped)
        if files is None:
            yield from _read_datasets(one, split)
            continue
        for f in files:
            num_rows = 0
            for row in _read_file(f):
                num_rows += 1
                yield row
            if not num_rows:
                raise DataError(f"{f}: holds no rows (an empty file, a header only or an empty list); add rows or remove the file")


def _read_file(path: Path) -> Iterator[RawRow]:
    kind = file_kind(path)
    if kind == "jsonl":
        yield from _read_jsonl(path)
    elif kind == "json":
        yield from _read_json(path)
    elif kind == "csv":
        yield from _read_csv(path)
    else:
        yield from _read_parquet(path)


def parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """json.loads with every failure as a DataError naming the file and line (`line`: the JSONL line `text` is;
    None: `text` is the whole file): bad syntax, nesting too deep, numbers too long."""
    where = f"{path}:{line}" if line is not None else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"{path}:{line if line is not None else e.lineno}"
        raise DataError(f"{at}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply (over ~{sys.getrecursionlimit()} levels); a row is a flat object") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{where}: not valid JSON ({first_line(e)})") from None


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    for i, line in iter_text_lines(path):
        if isinstance(line, ValueError):
            yield RawRow(str(path), i, line)
        elif line.strip():
            try:
                yield RawRow(str(path), i, parse_json(line, path, i))
            except DataError as e:
                yield RawRow(str(path), i, e)


def _is_row(item: Any) -> bool:
    return isinstance(item, dict) and (any(k in item for k in ("messages", "prompt", "completion")) or isinstance(item.get("text"), str))


def _read_json(path: Path) -> Iterator[RawRow]:
    items = parse_json(read_text(path), path)
    if _is_row(items):
        raise DataError(f"{path}: holds one row object, not a list of rows; wrap it in [ ] or use .jsonl (one row per line)")
    if isinstance(items, dict) and len(items) == 1 and isinstance(next(iter(items.values())), list):
        items = next(iter(items.values()))  # {"data": [...]}: the list under one key
    if not isinstance(items, list):
        raise DataError(f"{path}: a .json file must hold a list of rows (or use .jsonl, one row per line), got {json_type(items)}")
    for i, item in enumerate(items, 1):
        yield RawRow(str(path), i, item)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages ('object', 'array', 'null', ...)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_csv(path: Path) -> Iterator[RawRow]:
    """Rows by header; a row with more or fewer cells than the header is a row error, never a changed row.
    Lines are where a row starts (a quoted cell can span lines)."""
    csv.field_size_limit(CSV_FIELD_LIMIT_CHARS)
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            hint = "a quote opened here is never closed" if "end of data" in str(e) else "quote cells holding quotes, commas or newlines"
            raise DataError(f"{path}:{start}: not valid CSV ({e}); {hint}") from None
        if not cells:
            continue  # a blank line
        if header is None:
            header = cells
            seen: dict[str, int] = {}
            for col, name in enumerate(header, 1):
                if name in seen:
                    raise DataError(f"{path}:{start}: duplicate column '{name}' in the header (columns {seen[name]} and {col}); rename one")
                seen[name] = col
            continue
        if len(cells) != len(header):
            more = len(cells) > len(header)
            yield RawRow(
                str(path),
                start,
                DataError(
                    f"{path}:{start}: the row has {len(cells)} cells but the header has {len(header)} columns"
                    + ("; a cell holding a comma must be quoted" if more else "")
                ),
            )
            continue
        yield RawRow(str(path), start, dict(zip(header, cells)))


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e)}); write it again, or use .jsonl") from None
    for i, record in enumerate(records, 1):
        yield RawRow(str(path), i, record)


def _read_datasets(name: str, split: str) -> Iterator[RawRow]:
    import datasets

    p = Path(name).expanduser()
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{p}: no split '{split}' in this saved dataset (it has {', '.join(ds)}); set data.split")
                ds = ds[split]
        else:
            log.info("data path %s is not a local file or folder: loading it as a Hugging Face `datasets` hub id (split %s)", name, split)
            ds = datasets.load_dataset(name, split=split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the datasets library's failures (network, not found, offline, bad files) share no base
        what = (
            "a `datasets` save_to_disk folder that cannot be loaded"
            if p.is_dir()
            else ("not a local file or folder, and loading it as a `datasets` hub id failed")
        )
        raise DataError(f"data path {name}: {what} ({first_line(e)}); accepted: {ACCEPTED_FORMS}") from None
    for i, record in enumerate(ds, 1):
        yield RawRow(name, i, record)
