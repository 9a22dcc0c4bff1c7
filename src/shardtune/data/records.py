"""Reading raw records from JSON, JSON lines, CSV and parquet, with errors that name
the file and the record, so a user can find and fix bad data."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable

from ..errors import UserError

Record = dict


def _decode(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: bytes are not valid UTF-8; re-save the file as UTF-8") from None


def read_records(path: str | Path) -> list[Record]:
    """All records of one file; the format is taken from the suffix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; check the dataset path flags")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _read_parquet(path)
    raise UserError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .csv or .parquet")


def _read_json(path: Path) -> list[Record]:
    text = _decode(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # A .json file may also be JSON lines; try that before giving up.
        if text.lstrip().startswith("{") and "\n" in text.strip():
            return _read_jsonl(path)
        raise UserError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrappers
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records, found {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[Record]:
    out = []
    for lineno, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: record {len(out)} (line {lineno}): invalid JSON: {err.msg}") from None
    return out


def _read_csv(path: Path, delimiter: str) -> list[Record]:
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as err:
        raise UserError(f"{path}: record {reader.line_num - 1}: invalid CSV: {err}") from None
    for i, row in enumerate(rows):
        if None in row or any(v is None for v in row.values()):
            raise UserError(f"{path}: record {i}: wrong number of columns (header: {reader.fieldnames})")
    return rows


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq  # pulled in by `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises many types for corrupt files
        raise UserError(f"{path}: cannot read parquet: {err}") from None


def check_fields(records: Iterable[Record], required: tuple[str, ...], source: str) -> None:
    """Every record must be an object with string values for `required`."""
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{source}: record {i}: expected an object with fields {list(required)}")
        for name in required:
            if name not in rec:
                raise UserError(f"{source}: record {i}: missing field {name!r}")
            if not isinstance(rec[name], str):
                raise UserError(
                    f"{source}: record {i}: field {name!r} must be a string, got {type(rec[name]).__name__}"
                )
