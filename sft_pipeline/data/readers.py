"""Readers for annotation files: CSV, TSV, JSONL, JSON and Parquet, one record at a time where the format allows.

Each reader takes the fields a task reads (:class:`Field`: our name, the file's column, required or not) and returns a
:class:`FileRead`: the records that parsed (with their 1-based line, or row for JSON and Parquet) and the records
that did not, each with a reason. A defect in one line rejects that line only. A file that cannot be read at all
(binary, not JSON, missing a required column) raises :class:`StageError` naming the file, because its rows could not
be counted.

UTF-8 is read strictly. A line (or value) that is not valid UTF-8 is decoded with the fallback encoding when one is
configured, and counted as such; otherwise it is rejected as ``undecodable``.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sft_pipeline.io import StageError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}

# A single text may legitimately be long (the validate stage rejects it with a reason); the csv default is 128 KiB.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

# Undecodable bytes, after a surrogateescape decode.
_SURROGATE = re.compile("[\udc80-\udcff]")

MALFORMED = "malformed_line"
UNDECODABLE = "undecodable"
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_field"


@dataclass(frozen=True)
class Field:
    """One value a task reads from each record: its name in our rows and its column (or JSON key) in the file.

    A required field must be a column of the file (else the file cannot be read) and a key of each JSON record (else
    the record is rejected); an absent or empty optional field is None. `strings_only`: in Parquet, the column must
    hold strings (a label or an id may also be integers). `structured`: the value may be a JSON list or object (a
    chat's `messages`), kept as its JSON text; in CSV and TSV such a value is a cell holding JSON text.
    """

    name: str
    column: str
    required: bool = False
    strings_only: bool = False
    structured: bool = False


@dataclass
class FileRead:
    """What one file yielded. `records` keep the raw strings; `fallback_lines` lists lines decoded with the fallback."""

    path: Path
    format: str
    records: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    fallback_lines: list[int] = field(default_factory=list)

    def accept(self, line: int, values: dict) -> None:
        self.records.append({"line": line, **values})

    def reject(self, line: int, reason: str, detail: str, text: str | None, record_id: str | None = None) -> None:
        self.rejected.append({"line": line, "id": record_id, "reason": reason, "detail": detail, "text": text})


def file_format(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise StageError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
            f"convert it to one of {', '.join(sorted(FORMATS))} or move it out of the raw folder"
        ) from None


def read_file(path: Path, fields: list[Field], fallback: str | None) -> FileRead:
    fmt = file_format(path)
    if fmt in ("csv", "tsv", "jsonl", "json"):
        data = path.read_bytes()
        nul = data.find(b"\x00", 0, 65536)
        if nul >= 0:
            line = data.count(b"\n", 0, nul) + 1
            raise StageError(f"{path}: contains NUL bytes (the first at line {line}, byte {nul}), so it is not a "
                             f"{fmt.upper()} text file (binary or UTF-16?)")
        if fmt == "json":
            return read_json_array(path, data, fields, fallback)
        if fmt == "jsonl":
            return read_jsonl(path, data, fields, fallback)
        return read_delimited(path, data, fields, fallback, "\t" if fmt == "tsv" else ",")
    return read_parquet(path, fields, fallback)


def decode(raw: bytes, fallback: str | None) -> tuple[str | None, bool]:
    """Strict UTF-8, then the fallback; returns (text or None, used_fallback)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        if fallback is None:
            return None, False
        try:
            return raw.decode(fallback), True
        except UnicodeDecodeError:
            return None, False


def _undecodable_detail(raw: bytes, fallback: str | None) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"byte {raw[exc.start:exc.end]!r} at offset {exc.start} is not valid UTF-8"
    tried = f" nor {fallback}" if fallback else "; set clean.fallback_encoding if the file uses another encoding"
    return where + tried


def _row_values(get, fields: list[Field]) -> dict:
    def text_of(value):
        if value is None:
            return ""
        if isinstance(value, float) and value != value:  # NaN
            return ""
        if isinstance(value, (list, dict)):
            return json.dumps(value, ensure_ascii=False)
        return value if isinstance(value, str) else str(value)

    values = {}
    for f in fields:
        value = get(f.column)
        values[f.name] = text_of(value) if f.required else (None if value in (None, "") else text_of(value))
    return values


def _required(fields: list[Field]) -> list[str]:
    return [f.column for f in fields if f.required]


def _require_columns(path: Path, found: list[str], fields: list[Field], kind: str = "column", where: str = "") -> None:
    missing = [name for name in _required(fields) if name not in found]
    if missing:
        raise StageError(
            f"{path}: no {kind} {', '.join(map(repr, missing))} (found: {', '.join(map(repr, found)) or 'none'})"
            f"{where}; rename it in the file or set clean.columns in params.yaml"
        )


def read_delimited(path: Path, data: bytes, fields: list[Field], fallback: str | None, delimiter: str) -> FileRead:
    result = FileRead(path, "tsv" if delimiter == "\t" else "csv")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # surrogateescape keeps undecodable bytes intact through the CSV parser (its syntax is ASCII), so each record's
    # bytes can be decoded on their own and one bad line rejects only itself.
    lines = _split_lines(data.decode("utf-8", errors="surrogateescape"))
    if not lines:
        return result
    header = next(csv.reader(lines[:1], delimiter=delimiter))
    header = [name.strip() for name in header]
    _require_columns(path, header, fields, where=" in the header, line 1")
    index = {name: i for i, name in enumerate(header)}

    start = 1  # 0-based index into `lines` where the current reader starts
    while start < len(lines):
        reader = csv.reader(lines[start:], delimiter=delimiter)
        consumed = 0
        restart = None
        while True:
            first = start + consumed + 1  # 1-based physical line where this record starts
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                result.reject(first, MALFORMED, f"CSV syntax error: {exc}", _raw_line(lines, first))
                restart = first  # resume after the offending line
                break
            last = start + reader.line_num
            consumed = reader.line_num
            if not record:
                continue  # a blank line is not a record
            if len(record) != len(header):
                detail = f"expected {len(header)} fields, found {len(record)}"
                if last > first:
                    # Usually an unbalanced quote that swallowed the following lines: reject the first line only
                    # and parse again from the next one, so the lines after it are not lost.
                    detail += f" (an unbalanced quote joined lines {first}-{last})"
                    result.reject(first, MALFORMED, detail, _raw_line(lines, first))
                    restart = first
                    break
                result.reject(first, MALFORMED, detail, _escape(delimiter.join(record)))
                continue
            values = {}
            bad = False
            for name, i in index.items():
                raw = record[i]
                if _SURROGATE.search(raw):
                    raw_bytes = raw.encode("utf-8", errors="surrogateescape")
                    decoded, used_fallback = decode(raw_bytes, fallback)
                    if decoded is None:
                        result.reject(first, UNDECODABLE, f"{name}: {_undecodable_detail(raw_bytes, fallback)}",
                                      _escape(delimiter.join(record)))
                        bad = True
                        break
                    if used_fallback and (not result.fallback_lines or result.fallback_lines[-1] != first):
                        result.fallback_lines.append(first)
                    raw = decoded
                values[name] = raw
            if not bad:
                result.accept(first, _row_values(values.get, fields))
        if restart is None:
            break
        start = restart  # `restart` is 1-based, so as a 0-based index it is the line after the bad one
    return result


def _split_lines(text: str) -> list[str]:
    """Physical lines, split on \n only: str.splitlines would also split inside texts on \x0c, \x85 or \u2028."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _raw_line(lines: list[str], line: int) -> str:
    return _escape(lines[line - 1].rstrip("\r\n"))


def _escape(text: str) -> str:
    """Undecodable bytes as \\xNN, so a rejected row can be written and read back as UTF-8."""
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def read_jsonl(path: Path, data: bytes, fields: list[Field], fallback: str | None) -> FileRead:
    result = FileRead(path, "jsonl")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    seen_keys: set[str] = set()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        text, used_fallback = decode(raw, fallback)
        if text is None:
            result.reject(number, UNDECODABLE, _undecodable_detail(raw, fallback),
                          raw.decode("utf-8", errors="backslashreplace"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            result.reject(number, INVALID_JSON, f"not valid JSON: {exc.msg} at column {exc.colno}", text)
            continue
        if not isinstance(obj, dict):
            result.reject(number, INVALID_JSON, f"expected a JSON object, found {type(obj).__name__}", text)
            continue
        seen_keys.update(obj)
        if used_fallback:
            result.fallback_lines.append(number)
        _accept_object(result, number, obj, fields, text)
    if (result.records or result.rejected) and not (set(_required(fields)) <= seen_keys):
        _require_columns(path, sorted(seen_keys), fields, kind="key")
    return result


def _accept_object(result: FileRead, number: int, obj: dict, fields: list[Field], original: str) -> None:
    missing = [key for key in _required(fields) if key not in obj]
    ids = [f.column for f in fields if f.name == "id"]
    record_id = obj.get(ids[0]) if ids else None
    if missing:
        result.reject(number, MISSING_FIELD, f"no key {', '.join(map(repr, missing))}", original,
                      None if record_id is None else str(record_id))
        return
    bad = [f.column for f in fields if f.required and not f.structured and isinstance(obj[f.column], (dict, list))]
    if bad:
        result.reject(number, INVALID_JSON, f"{', '.join(bad)}: expected a string, found a JSON container", original)
        return
    result.accept(number, _row_values(obj.get, fields))


def read_json_array(path: Path, data: bytes, fields: list[Field], fallback: str | None) -> FileRead:
    result = FileRead(path, "json")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        return result
    text, used_fallback = decode(data, fallback)
    if text is None:
        raise StageError(f"{path}: {_undecodable_detail(data, fallback)}")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StageError(
            f"{path}: line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg}); "
            f"a JSON file is parsed whole, so fix it, or use JSON Lines to have bad lines rejected one by one"
        ) from None
    if isinstance(doc, dict) and any(f.structured and f.column in doc for f in fields):
        doc = [doc]  # one conversation saved as one object ({"conversations": [...]}): one record
    if not isinstance(doc, list):
        raise StageError(f"{path}: expected a JSON array of objects at the top level, found {type(doc).__name__}")
    keys = set().union(*(obj for obj in doc if isinstance(obj, dict))) if doc else set()
    if doc:
        _require_columns(path, sorted(keys), fields, kind="key")
    for number, obj in enumerate(doc, start=1):
        original = json.dumps(obj, ensure_ascii=False)
        if not isinstance(obj, dict):
            result.reject(number, INVALID_JSON, f"item {number}: expected an object, found {type(obj).__name__}",
                          original)
            continue
        if used_fallback:
            result.fallback_lines.append(number)
        _accept_object(result, number, obj, fields, original)
    return result


def read_parquet(path: Path, fields: list[Field], fallback: str | None) -> FileRead:
    import pyarrow as pa
    import pyarrow.parquet as pq

    result = FileRead(path, "parquet")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StageError(f"{path}: not a readable Parquet file ({exc})") from None
    _require_columns(path, table.column_names, fields)
    wanted = [f.column for f in fields if f.column in table.column_names]
    strings_only = {f.column for f in fields if f.strings_only}
    structured = {f.column for f in fields if f.structured}
    for name in wanted:
        kind = table.schema.field(name).type
        if name in structured and (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_struct(kind)
                                   or pa.types.is_map(kind)):
            continue
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        textual = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
        binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        integral = pa.types.is_integer(kind) or pa.types.is_boolean(kind)
        if name in strings_only and not (textual or binary):
            raise StageError(f"{path}: column {name!r} has type {kind}, expected string; fix the file's schema")
        if name not in strings_only and not (textual or binary or integral):
            raise StageError(f"{path}: column {name!r} has type {kind}, expected string or integer")
    values = {name: table.column(name).to_pylist() for name in wanted}
    for row in range(table.num_rows):
        record = {}
        bad = None
        for name in wanted:
            value = values[name][row]
            if isinstance(value, bytes):
                decoded, used_fallback = decode(value, fallback)
                if decoded is None:
                    bad = (name, value)
                    break
                if used_fallback:
                    result.fallback_lines.append(row + 1)
                value = decoded
            record[name] = value
        if bad is not None:
            result.reject(row + 1, UNDECODABLE, f"{bad[0]}: {_undecodable_detail(bad[1], fallback)}",
                          bad[1].decode("utf-8", errors="backslashreplace"))
            continue
        result.accept(row + 1, _row_values(record.get, fields))
    return result
