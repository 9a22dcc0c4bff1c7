"""Reading raw records from JSON, JSON lines, CSV, TSV, parquet and Arrow files (the text
ones also compressed with gzip, bzip2 or xz), or from a directory of such shards (as
`datasets` writes them), with errors that name the file and the record (0-based), so a user
can find and fix bad data. A directory holds data files only: anything else in it is an
error, never a file skipped in silence.

A malformed record is handed to a `BadRecords` policy: `error` stops with a one-line
message, `skip` leaves the record out and counts it. Record indices always refer to the
position in the file, skipped or not.
"""
from __future__ import annotations

import bisect
import bz2
import csv
import gzip
import io
import json
import logging
import lzma
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError

log = logging.getLogger(__name__)

Record = dict
# None marks a record that could not be parsed and was already reported (skip mode);
# it keeps the positions of the records after it.
Records = list[Optional[Record]]

BAD_RECORD_MODES = ("error", "skip")
# Bytes that are not UTF-8 are decoded with surrogateescape into lone surrogates
# U+DC80..U+DCFF, so the record that holds them can be named instead of the whole file failing.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_MAX_KEPT_MESSAGES = 20
_JSON_WHITESPACE = " \t\r\n"
FORMATS = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".arrow")
_TEXT_FORMATS = (".json", ".jsonl", ".ndjson", ".csv", ".tsv")
# The compressions `datasets` reads that the standard library decompresses (zstd needs a
# package shardtune does not depend on).
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
SUFFIXES = FORMATS + tuple(f + c for f in _TEXT_FORMATS for c in COMPRESSIONS)
_READABLE = f"{', '.join(FORMATS)}, or the text ones compressed as {', '.join(COMPRESSIONS)}"
# Not records, in a directory of data files: hidden files (.DS_Store, .crc), the markers
# Spark and Hadoop write (_SUCCESS), a `datasets` folder's metadata and a hub README.
_METADATA = ("dataset_info.json", "README.md")
# directory read by read_records -> [(index of its first record, file)], so that a message
# about record i of the directory names the shard file and the record within it (where())
_SHARDS: dict[str, list[tuple[int, Path]]] = {}


@dataclass
class BadRecords:
    """What to do with a malformed record: `error` raises at the first one, `skip` leaves
    it out and counts it (the first messages are kept for the report)."""

    mode: str = "error"
    count: int = 0
    messages: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in BAD_RECORD_MODES:
            raise UserError(f"unknown --on_bad_record {self.mode!r}; choose error or skip")

    def report(self, message: str) -> None:
        if self.mode == "error":
            raise UserError(f"{message}; fix the record, or pass --on_bad_record skip to leave bad records out")
        self.count += 1
        if len(self.messages) < _MAX_KEPT_MESSAGES:
            self.messages.append(message)
            log.warning("skipping bad record: %s", message)


def _kind(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix or ""): part-1.jsonl.gz -> (".jsonl", ".gz")."""
    name = path.name.lower()
    for compression in COMPRESSIONS:
        if name.endswith(compression):
            return Path(name[:-len(compression)]).suffix, compression
    return path.suffix.lower(), ""


def _readable(path: Path) -> bool:
    fmt, compression = _kind(path)
    return fmt in (_TEXT_FORMATS if compression else FORMATS)


def _decode(path: Path) -> str:
    opener = COMPRESSIONS.get(_kind(path)[1], open)
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, lzma.LZMAError) as err:  # a corrupt or truncated archive
        raise UserError(f"{path}: cannot decompress it ({err}); re-create the file") from None
    return data.decode("utf-8-sig", errors="surrogateescape")


def _undecodable(value) -> bool:
    """True when a parsed value holds bytes that were not valid UTF-8."""
    if isinstance(value, str):
        return bool(_UNDECODABLE.search(value))
    if isinstance(value, dict):
        return any(_undecodable(k) or _undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_undecodable(v) for v in value)
    return False


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def data_files(path: str | Path) -> list[Path]:
    """The files behind a data path: the file itself; for a directory, the Arrow files of a
    `datasets` save_to_disk in its order (state.json), else every data file in name order; any
    other entry but hidden files and metadata is an error, so no shard is left out unnoticed."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"data path {path} does not exist; check the dataset path flags")
    if (path / "dataset_dict.json").is_file():
        raise UserError(f"{path} holds several splits (a saved DatasetDict); point at one of them, "
                        f"e.g. {path / 'train'}")
    state = path / "state.json"
    if state.is_file():
        try:
            return [path / entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{state}: not a datasets save_to_disk state file ({err}); "
                            "remove it or point at the data files") from None
    files = sorted(p for p in path.iterdir() if not p.name.startswith((".", "_")) and p.name not in _METADATA)
    for file in files:
        if file.is_dir():
            raise UserError(f"{file}: a folder inside the data directory {path} is not read; "
                            f"move its files into {path}, or point the data path at it")
        if not _readable(file):
            raise UserError(f"{file}: not a data file shardtune reads ({_READABLE}); "
                            f"convert or decompress it, or move it out of {path}")
    if not files:
        raise UserError(f"{path}: no data files ({_READABLE}) in the directory")
    return files


def locate(source: str, i: int) -> tuple[str, int]:
    """Record i of a source as (file, record within it): a directory's shard file, else itself."""
    shards = _SHARDS.get(source)
    if shards:
        first, file = shards[bisect.bisect_right([start for start, _ in shards], i) - 1]
        return str(file), i - first
    return source, i


def where(source: str, i: int) -> str:
    """"FILE: record I", for bad-record messages."""
    file, index = locate(source, i)
    return f"{file}: record {index}"


def read_records(path: str | Path, bad: BadRecords | None = None) -> Records:
    """All records of a file, or of a directory's files one after another; the format is
    taken from each file's suffix."""
    bad = bad or BadRecords()
    files = data_files(path)
    if Path(path).is_file():
        return _read_file(Path(path), bad)
    records: Records = []
    shards = []
    for file in files:
        shards.append((len(records), file))
        records += _read_file(file, bad)
    _SHARDS[str(path)] = shards
    return records


def _read_file(path: Path, bad: BadRecords) -> Records:
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; check the dataset path flags")
    if not _readable(path):
        raise UserError(f"{path}: unsupported file type; use {_READABLE}, or a directory of them")
    suffix = _kind(path)[0]
    if suffix == ".json":
        return _read_json(path, bad)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, _decode(path), bad)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, bad, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _read_parquet(path)
    return _read_arrow(path)


def _read_json(path: Path, bad: BadRecords) -> Records:
    text = _decode(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # A .json file may also be JSON lines; try that before giving up.
        if text.lstrip().startswith("{") and "\n" in text.strip():
            return _read_jsonl(path, text, bad)
        # One syntax error makes the rest of an array unreadable, so this is never skippable.
        undecodable = _UNDECODABLE.search(text, 0, err.pos + 1)
        if undecodable:
            line = _line_of(text, undecodable.start())
            raise UserError(f"{path}: line {line}: bytes are not valid UTF-8; re-save the file as UTF-8") from None
        raise UserError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}; "
                        "fix the file (a JSON array cannot be read past an error)") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrappers
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records, found {type(data).__name__}")
    out: Records = []
    for i, rec in enumerate(data):
        if _undecodable(rec):
            bad.report(f"{path}: record {i}: bytes are not valid UTF-8")
            rec = None
        out.append(rec)
    return out


def _read_jsonl(path: Path, text: str, bad: BadRecords) -> Records:
    out: Records = []
    # "\n" only: str.splitlines() also breaks on U+2028, U+0085, \x1c and more, which a JSON
    # string may hold raw (json.dumps(ensure_ascii=False) writes them so). A "\r" left by a
    # "\r\n" line end is JSON whitespace.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip(_JSON_WHITESPACE):
            continue
        where = f"{path}: record {len(out)} (line {lineno})"
        if _UNDECODABLE.search(line):
            bad.report(f"{where}: bytes are not valid UTF-8")
            out.append(None)
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            bad.report(f"{where}: invalid JSON: {err.msg}")
            out.append(None)
    return out


def _read_csv(path: Path, bad: BadRecords, delimiter: str) -> Records:
    # strict: a stray or unclosed quote is an error, not a silently merged field
    reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as err:
        raise UserError(f"{path}: invalid CSV header: {err}") from None
    out: Records = []
    while True:
        where = f"{path}: record {len(out)} (line {reader.line_num + 1})"
        try:
            row = next(reader)
        except StopIteration:
            return out
        except csv.Error as err:
            bad.report(f"{where}: invalid CSV: {err}")
            out.append(None)
            continue
        if not row:  # a blank line is no record
            continue
        if len(row) != len(header):
            bad.report(f"{where}: wrong number of columns ({len(row)} for header {header})")
            out.append(None)
        elif any(_UNDECODABLE.search(v) for v in row):
            bad.report(f"{where}: bytes are not valid UTF-8")
            out.append(None)
        else:
            out.append(dict(zip(header, row)))


def _read_parquet(path: Path) -> Records:
    import pyarrow.parquet as pq  # pulled in by `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises many types for corrupt files
        raise UserError(f"{path}: cannot read parquet: {err}") from None


def _read_arrow(path: Path) -> Records:
    """An Arrow IPC file: the stream format `datasets` writes, or the random-access one."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as mapped:
            try:
                table = pa.ipc.open_stream(mapped).read_all()
            except pa.ArrowInvalid:
                mapped.seek(0)
                table = pa.ipc.open_file(mapped).read_all()
        return table.to_pylist()
    except Exception as err:  # pyarrow raises many types for corrupt files
        raise UserError(f"{path}: cannot read Arrow data: {err}") from None


def valid_records(records: Records, required: tuple[str, ...], source: str, bad: BadRecords | None = None,
                  optional: tuple[str, ...] = (), start: int = 0) -> list[Record]:
    """The records that are objects with string values for `required` (and for `optional`
    when present). `start` is the file position of records[0], for messages."""
    bad = bad or BadRecords()
    out = []
    for i, rec in enumerate(records, start=start):
        if rec is None:
            continue  # unreadable, already reported
        problem = _field_problem(rec, required, optional)
        if problem:
            bad.report(f"{where(source, i)}: {problem}")
        else:
            out.append(rec)
    return out


def _field_problem(rec, required: tuple[str, ...], optional: tuple[str, ...]) -> str | None:
    if not isinstance(rec, dict):
        return f"expected an object with fields {list(required)}, got {type(rec).__name__}"
    for name in required:
        if name not in rec:
            return f"missing field {name!r}"
    for name in required + tuple(n for n in optional if n in rec):
        if not isinstance(rec[name], str):
            got = "null" if rec[name] is None else type(rec[name]).__name__
            return f"field {name!r} must be a string, got {got}"
    return None

