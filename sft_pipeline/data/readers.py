"""Readers for annotation files: CSV, TSV, JSONL, JSON and Parquet, one record at a time where the format allows, and
the exports of two annotation tools, recognised by their content: Label Studio's JSON export and doccano's JSONL.

Each reader takes the fields a task reads (:class:`Field`: our name, the file's column, required or not) and returns a
:class:`FileRead`: the records that parsed (with their 1-based line, or row for JSON and Parquet) and the records
that did not, each with a reason. A defect in one line rejects that line only. A file that cannot be read at all
(binary, not JSON, missing a required column, a column named twice) raises :class:`StageError` naming the file,
because its rows could not be counted.

UTF-8 is read strictly. A line (or value) that is not valid UTF-8 is decoded with the fallback encoding when one is
configured, and counted as such; otherwise it is rejected as ``undecodable``.

CSV is read with quoting, strictly: a quoted field must close and be followed by the delimiter or the end of the
line. A quote that opens a field and never closes (or closes in the middle of later text) would otherwise swallow
the lines after it into one text; its line is rejected alone and the lines after it are read as rows. A quoted field
that spans lines is one record, unless lines inside it read as rows of the file on their own (the right number of
fields, and an id shaped like the ids of the file): then the opening quote is taken for the defect, in the same way. TSV is read without quote processing unless
`clean.tsv_quoting` is on, since most TSV exports do not quote (``"Great" movie`` keeps its quotes).

Label Studio (a JSON array of tasks with ``data`` and ``annotations`` or ``predictions``): one record per annotation,
at the task's 1-based index in the array; the label is the annotation's choice, the annotator its ``completed_by``.
doccano (a JSON object whose label is a list, under the label column or doccano's ``label``/``labels``): the list's
one label. What the classifier cannot take (no annotation, a skipped annotation, several choices, predictions only)
is rejected with a reason; see :func:`read_label_studio` and :func:`_choice_value`. Prodigy (JSONL records with
``answer`` and its ``_input_hash``/``_task_hash``): a binary decision ``accept`` on ``label`` is that label, ``reject``
is the label ``clean.prodigy_rejected`` makes of it (``not {label}``), ``ignore`` is rejected; a choice record's
label is its ``accept`` list's one option. All apply only to a field marked ``choice``, so a task that reads no class
label (instruction data) reads these files as plain JSON.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
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
DUPLICATE_KEY = "duplicate_key"
# Annotation-tool exports: what a classifier cannot take from them, each a rejected row.
UNLABELLED = "unlabelled"            # no annotation, or one without a choice; doccano: an empty label list
CANCELLED = "cancelled"              # Label Studio: the annotator skipped the task (was_cancelled)
PREDICTION_ONLY = "prediction_only"  # Label Studio: a model's predictions and no human annotation
MULTI_LABEL = "multi_label"          # several choices (a multi-select) or several doccano labels
SPAN_LABELS = "span_labels"          # doccano: [start, end, label] spans of sequence labelling, not a class
IGNORED = "ignored"                  # Prodigy: the annotator pressed ignore
ANSWER_REJECT = "answer_reject"      # Prodigy choice interface: the annotator rejected the task as a whole

# Prodigy writes both hashes on every record of `prodigy db-out`; with `answer`, they mark its records.
PRODIGY_HASHES = ("_input_hash", "_task_hash")
PRODIGY_ANSWERS = ("accept", "reject", "ignore")

# doccano writes a text's labels under `label` (export) or `labels` (import format), always as a list.
DOCCANO_LABEL_KEYS = ("label", "labels")


@dataclass(frozen=True)
class Field:
    """One value a task reads from each record: its name in our rows and its column (or JSON key) in the file.

    A required field must be a column of the file (else the file cannot be read) and a key of each JSON record (else
    the record is rejected); an absent or empty optional field is None. `strings_only`: in Parquet, the column must
    hold strings (a label or an id may also be integers). `structured`: the value may be a JSON list or object (a
    chat's `messages`), kept as its JSON text; in CSV and TSV such a value is a cell holding JSON text.

    `choice`: the value is one class label, which annotation tools export in their own shapes: in a Label Studio
    export it is an annotation's choice (from the Choices control named `column`, or the only one), in doccano a
    one-item list (under `column`, `label` or `labels`). `annotator`: in a Label Studio export, the annotation's
    `completed_by`. Only a task that reads a `choice` field reads Label Studio exports as such.

    `rejected_as`: for a `choice` field, the label a Prodigy binary decision `answer: reject` on label X becomes, with
    `{label}` standing for X ("not {label}" makes `not INSULT`); None rejects such records instead.
    """

    name: str
    column: str
    required: bool = False
    strings_only: bool = False
    structured: bool = False
    choice: bool = False
    annotator: bool = False
    rejected_as: str | None = None


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


def read_file(path: Path, fields: list[Field], fallback: str | None, tsv_quoting: bool = False) -> FileRead:
    """Read one file. `tsv_quoting` (clean.tsv_quoting): read quotes in a TSV file as CSV quoting, not as text."""
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
        if fmt == "tsv":
            return read_delimited(path, data, fields, fallback, "\t", quoting=tsv_quoting)
        return read_delimited(path, data, fields, fallback, ",")
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


def _no_duplicate_columns(path: Path, names: list[str], fields: list[Field], where: str) -> None:
    """A column we read that is named twice is an error: taking either one would be a guess. A duplicate among the
    columns we do not read (two empty names from trailing delimiters, say) changes nothing, so it passes."""
    read = {f.column for f in fields}
    twice = [name for name, n in Counter(names).items() if n > 1 and name in read]
    if twice:
        at = "; ".join(f"{name!r} at columns {', '.join(str(i + 1) for i, m in enumerate(names) if m == name)}"
                       for name in twice)
        raise StageError(f"{path}: column {', '.join(map(repr, twice))} appears more than once{where} ({at}); "
                         f"rename or remove the extra column, so the one read is not a guess")


def read_delimited(path: Path, data: bytes, fields: list[Field], fallback: str | None, delimiter: str,
                   quoting: bool = True) -> FileRead:
    """CSV or TSV. With `quoting`, CSV quoting read strictly (see the module's docstring); without, every character
    is text and every physical line is a record."""
    result = FileRead(path, "tsv" if delimiter == "\t" else "csv")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # surrogateescape keeps undecodable bytes intact through the CSV parser (its syntax is ASCII), so each record's
    # bytes can be decoded on their own and one bad line rejects only itself.
    lines = _split_lines(data.decode("utf-8", errors="surrogateescape"))
    if not lines:
        return result
    # strict: a quoted field that closes in the middle of text is an error. The lenient parser would append the rest
    # to the field, which is how a stray quote pairs with the next quote further down and swallows the lines between.
    dialect = {"delimiter": delimiter, "strict": True} if quoting else {"delimiter": delimiter,
                                                                          "quoting": csv.QUOTE_NONE}
    # Two mix-ups that make a header unreadable, said as such: a TSV named .csv, a quoted TSV read without quoting.
    hint = None
    if delimiter == "," and lines[0].count("\t") > lines[0].count(","):
        hint = "the header holds more tabs than commas: a tab-separated file named .csv? rename it .tsv"
    try:
        header = next(csv.reader(lines[:1], **dialect))
    except csv.Error as exc:
        raise StageError(f"{path}: line 1, the header, cannot be parsed ({exc}); {hint or 'fix its quotes'}") from None
    header = [name.strip() for name in header]
    if not quoting and header and all(len(name) > 1 and name[0] == name[-1] == '"' for name in header):
        hint = "the names are in quotes: a TSV written with quoting? set clean.tsv_quoting: true"
    _require_columns(path, header, fields, where=" in the header, line 1" + (f" ({hint})" if hint else ""))
    _no_duplicate_columns(path, header, fields, " in the header, line 1")
    width = len(header)
    index = {name: i for i, name in enumerate(header)}
    ids = [f.column for f in fields if f.name == "id" and f.column in index]
    key_column = index[ids[0]] if ids else None

    start = 1  # 0-based index into `lines` where the current reader starts
    while start < len(lines):
        # A generator, not a slice: a file with many bad lines restarts many times, each without copying the rest.
        reader = csv.reader((lines[i] for i in range(start, len(lines))), **dialect)
        consumed = 0
        restart = None
        while True:
            first = start + consumed + 1  # 1-based physical line where this record starts
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                end = start + reader.line_num  # the line where the parser gave up
                result.reject(first, MALFORMED, _syntax_detail(exc, first, end, lines, width, dialect, key_column),
                              _raw_line(lines, first))
                restart = first  # resume after the offending line
                break
            last = start + reader.line_num
            consumed = reader.line_num
            if not record:
                continue  # a blank line is not a record
            if last > first:
                # A quoted field spans lines. Legitimate for a text of several lines; but when the lines inside it
                # read as rows of the file (or the record has the wrong number of fields), the opening quote is a
                # stray one that swallowed them: reject the first line only and parse again from the next one.
                inside = _rows_inside(lines, first, last, width, dialect, key_column)
                if inside or len(record) != width:
                    if inside:
                        detail = (f"unbalanced quote: a quoted field opened on this line runs to line {last} and "
                                  f"takes in {_line_list(inside)}, which read as rows of their own")
                    else:
                        detail = (f"expected {width} fields, found {len(record)} (an unbalanced quote joined lines "
                                  f"{first}-{last})")
                    result.reject(first, MALFORMED, detail + "; " + _QUOTE_TODO, _raw_line(lines, first))
                    restart = first
                    break
            if len(record) != width:
                result.reject(first, MALFORMED, f"expected {width} fields, found {len(record)}",
                              _escape(delimiter.join(record)))
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


_QUOTE_TODO = ("this line is rejected and the lines after it are read as rows; close the quote, or double a quote "
               "that is part of the text (\"\")")


def _shape(value: str) -> str:
    """A value's form, for telling an id from prose: letters -> a, digits -> 9, runs collapsed ("business/001" ->
    "a/9", "17" -> "9", "The firm said" -> "a a a")."""
    return re.sub(r"\s+", " ", re.sub(r"\d+", "9", re.sub(r"[^\W\d_]+", "a", value.strip())))


def _rows_inside(lines: list[str], first: int, stop: int, width: int, dialect: dict,
                 key_column: int | None = None) -> list[int]:
    """The lines strictly between `first` and `stop` that read on their own as rows of the file, or none.

    A line reads as a row when it parses into `width` fields and, where the file has an id column, its id has the
    form of the id on the line that opened the quote (digits where that one has digits, and so on). Prose inside a
    legitimate quoted text may hold as many commas as the header by chance (BBC News articles do, on about one
    paragraph in three), but its first field is not shaped like an id. Without an id column every non-blank line
    inside must read as a row.
    """
    candidates = [n for n in range(first + 1, stop) if lines[n - 1].strip()]
    key_shape = None
    if key_column is not None:
        opening = lines[first - 1].split(dialect["delimiter"])
        if len(opening) > key_column and '"' not in "".join(opening[:key_column + 1]):
            key_shape = _shape(opening[key_column])
        if not key_shape:
            return []
    rows = []
    for n in candidates:
        try:
            values = next(csv.reader([lines[n - 1]], **dialect))
        except (csv.Error, StopIteration):
            continue
        if len(values) != width:
            continue
        if key_shape is not None and _shape(values[key_column]) != key_shape:
            continue
        rows.append(n)
    if key_shape is None and len(rows) != len(candidates):
        return []
    return rows


def _syntax_detail(exc: csv.Error, first: int, end: int, lines: list[str], width: int, dialect: dict,
                   key_column: int | None = None) -> str:
    message = str(exc)
    if "unexpected end of data" in message:
        inside = _rows_inside(lines, first, end + 1, width, dialect, key_column)
        took = f", taking in {_line_list(inside)}, which read as rows of their own" if inside else ""
        return (f"unbalanced quote: a quoted field opened on this line never closes (the file ends inside it, at "
                f"line {end}){took}; {_QUOTE_TODO}")
    if "expected after" in message:
        inside = _rows_inside(lines, first, end, width, dialect, key_column)
        took = f", taking in {_line_list(inside)}, which read as rows of their own" if inside else ""
        where = f"at line {end}" if end > first else "on this line"
        return (f"unbalanced quote: a quoted field opened on this line closes {where} in the middle of text, not "
                f"before {dialect['delimiter']!r} or the end of the line{took}; {_QUOTE_TODO}")
    return f"CSV syntax error: {message}"


def _line_list(numbers: list[int]) -> str:
    if len(numbers) == 1:
        return f"line {numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"lines {numbers[0]}-{numbers[-1]}"
    shown = ", ".join(map(str, numbers[:10]))
    return f"lines {shown}" + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")


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


class _RepeatedKeys(dict):
    """A JSON object with a key given twice or more: `json` keeps the last value silently, so the repeats are noted."""

    repeated: dict[str, int]


def _object_pairs(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    noted = _RepeatedKeys(obj)
    noted.repeated = {key: n for key, n in Counter(key for key, _ in pairs).items() if n > 1}
    return noted


def _loads(text: str):
    return json.loads(text, object_pairs_hook=_object_pairs)


def _key_of(obj: dict, f: Field) -> str | None:
    """The key of `obj` that holds field `f`: its column, or for a class label a doccano list under `label`/`labels`
    (doccano's export and import spellings), so an export is read unchanged whatever clean.columns.label says."""
    if f.column in obj:
        return f.column
    if f.choice:
        for key in DOCCANO_LABEL_KEYS:
            if isinstance(obj.get(key), list):
                return key
    return None


def _found_keys(obj: dict, fields: list[Field]) -> set[str]:
    found = set(obj) | {f.column for f in fields if _key_of(obj, f) is not None}
    if _is_prodigy(obj, fields):  # a choice record's label is under `accept`, a binary one's under `label`
        found |= {f.column for f in fields if f.choice and ("accept" in obj or "label" in obj)}
    return found


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
            obj = _loads(text)
        except json.JSONDecodeError as exc:
            result.reject(number, INVALID_JSON, f"not valid JSON: {exc.msg} at column {exc.colno}", text)
            continue
        if not isinstance(obj, dict):
            result.reject(number, INVALID_JSON, f"expected a JSON object, found {type(obj).__name__}", text)
            continue
        seen_keys.update(_found_keys(obj, fields))
        if used_fallback:
            result.fallback_lines.append(number)
        _accept_object(result, number, obj, fields, text)
    if _required(fields) and not seen_keys and result.rejected \
            and all(r["reason"] == INVALID_JSON for r in result.rejected):
        # Said as what it most likely is, rather than as the missing keys of no object at all.
        first = result.rejected[0]
        raise StageError(f"{path}: no line is a JSON object (line {first['line']}: {first['detail']}); JSON Lines "
                         f"holds one object per line, so a pretty-printed JSON document belongs in a .json file")
    if (result.records or result.rejected) and not (set(_required(fields)) <= seen_keys):
        hint = ""
        if "annotations" in seen_keys and any(f.choice and f.column not in seen_keys for f in fields):
            hint = (" (label ids under 'annotations': an export of doccano before 1.6? export again from a later "
                    "doccano, which writes label names)")
        _require_columns(path, sorted(seen_keys), fields, kind="key", where=hint)
    return result


def _accept_object(result: FileRead, number: int, obj: dict, fields: list[Field], original: str) -> None:
    ids = [f.column for f in fields if f.name == "id"]
    record_id = obj.get(ids[0]) if ids else None
    record_id = None if record_id is None else str(record_id)
    if _is_prodigy(obj, fields):
        obj = _prodigy_label(result, number, obj, fields, original, record_id)
        if obj is None:
            return
    keys = {f.column: _key_of(obj, f) for f in fields}
    missing = [f.column for f in fields if f.required and keys[f.column] is None]
    if missing:
        result.reject(number, MISSING_FIELD, f"no key {', '.join(map(repr, missing))}", original, record_id)
        return
    repeated = {key: n for key, n in getattr(obj, "repeated", {}).items() if key in keys.values()}
    if repeated:
        said = ", ".join(f"{key!r} {n} times" for key, n in repeated.items())
        result.reject(number, DUPLICATE_KEY, f"the object gives key {said}; JSON would keep the last one silently, "
                                             f"so remove the others", original, record_id)
        return
    values = {column: None if key is None else obj[key] for column, key in keys.items()}
    for f in fields:
        if f.choice and isinstance(values[f.column], list):
            value, reason, detail = _choice_value(values[f.column], keys[f.column])
            if reason is not None:
                result.reject(number, reason, detail, original, record_id)
                return
            values[f.column] = value
    bad = [f.column for f in fields if f.required and not f.structured and isinstance(values[f.column], (dict, list))]
    if bad:
        result.reject(number, INVALID_JSON, f"{', '.join(bad)}: expected a string, found a JSON container", original)
        return
    result.accept(number, _row_values(values.get, fields))


def _is_prodigy(obj: dict, fields: list[Field]) -> bool:
    return (any(f.choice for f in fields) and obj.get("answer") in PRODIGY_ANSWERS
            and any(key in obj for key in PRODIGY_HASHES))


def _prodigy_label(result: FileRead, number: int, obj: dict, fields: list[Field], original: str,
                   record_id: str | None) -> dict | None:
    """A Prodigy record with its class label in the choice field's column, or None when it was rejected.

    Prodigy stores a decision, not a label: in a binary `textcat` record, `label` is the label asked about and
    `answer` says whether it applies, so reading `label` alone would turn every `reject` into that label. A choice
    interface record (`options`, `accept`: the chosen option ids) has its label in `accept`.
    """
    choice = next(f for f in fields if f.choice)
    answer = obj["answer"]
    if answer == "ignore":
        result.reject(number, IGNORED, "answer: ignore, the annotator skipped it in Prodigy, so it holds no label",
                      original, record_id)
        return None
    if isinstance(obj.get("accept"), list):
        if answer == "reject":
            result.reject(number, ANSWER_REJECT, "answer: reject on a choice task, the annotator rejected the task "
                                                 "itself, so it holds no label", original, record_id)
            return None
        return {**obj, choice.column: obj["accept"]}  # a list: one option is the label, others are rejected
    asked = obj.get(choice.column, obj.get("label"))
    if not isinstance(asked, str) or not asked.strip():
        return obj  # no label asked about: read as it is, and the usual checks say what is missing
    if answer == "accept":
        return {**obj, choice.column: asked}
    if choice.rejected_as is None:
        result.reject(number, ANSWER_REJECT, f"answer: reject on label {asked!r}, the text is not {asked!r}; "
                                             f"clean.prodigy_rejected is null, so it is not read as a label",
                      original, record_id)
        return None
    return {**obj, choice.column: choice.rejected_as.replace("{label}", asked)}


def _choice_value(items: list, key: str) -> tuple[object, str | None, str | None]:
    """A class label given as a list (doccano): (the label, None, None) for one item, else (None, reason, detail).

    An empty list is a text nobody labelled; several labels are a multi-label annotation, and the classifier takes one
    label per text, so choosing one here would be a guess; spans ([start, end, label]) are sequence labelling.
    """
    if any(isinstance(item, (list, dict)) for item in items):
        return None, SPAN_LABELS, (f"{key}: {len(items)} spans such as {items[0]!r}, from sequence labelling, not "
                                   f"one class for the text; export a text-classification project instead")
    if not items:
        return None, UNLABELLED, f"{key}: an empty list, so the text has no label; label it and export again"
    if len(items) > 1:
        return None, MULTI_LABEL, (f"{key}: {len(items)} labels {items!r}; the classifier takes one label per text, "
                                   f"so keep one in the annotation tool and export again")
    return items[0], None, None


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
        doc = _loads(text)
    except json.JSONDecodeError as exc:
        raise StageError(
            f"{path}: line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg}); "
            f"a JSON file is parsed whole, so fix it, or use JSON Lines to have bad lines rejected one by one"
        ) from None
    if isinstance(doc, dict) and any(f.structured and f.column in doc for f in fields):
        doc = [doc]  # one conversation saved as one object ({"conversations": [...]}): one record
    if not isinstance(doc, list):
        raise StageError(f"{path}: expected a JSON array of objects at the top level, found {type(doc).__name__}")
    if any(f.choice for f in fields) and _is_label_studio(doc):
        return read_label_studio(result, doc, fields, used_fallback)
    keys = set().union(*(_found_keys(obj, fields) for obj in doc if isinstance(obj, dict))) if doc else set()
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


# ------------------------------------------------------------------------------------------------ Label Studio


def _is_label_studio(doc: list) -> bool:
    """Label Studio's JSON export (and import) format: tasks with a `data` object and `annotations` or `predictions`.
    One such task is enough: the same file may hold flat tasks (no `data` wrapper), which Label Studio also imports."""
    return any(isinstance(task, dict) and isinstance(task.get("data"), dict)
               and ("annotations" in task or "predictions" in task) for task in doc)


def _choices(result: object) -> list | None:
    """The choices of one annotation result, or None if it is not a Choices result (a TextArea, a span, ...)."""
    if not isinstance(result, dict) or not isinstance(result.get("value"), dict):
        return None
    choices = result["value"].get("choices")
    return choices if isinstance(choices, list) else None


def _results(annotation: object) -> list:
    if not isinstance(annotation, dict) or not isinstance(annotation.get("result"), list):
        return []
    return annotation["result"]


def _choice_control(path: Path, doc: list, name: str) -> object:
    """The Choices control (`from_name`) whose choice is the label: the one named `name` (clean.columns.label), else
    the file's only one. Several and none so named, or none in any annotation that has results: an error, since the
    label would be a guess, or there is none to read. Skipped annotations do not count."""
    controls: Counter = Counter()
    others: Counter = Counter()
    for task in doc:
        annotations = task.get("annotations") if isinstance(task, dict) else None
        for annotation in annotations if isinstance(annotations, list) else []:
            if isinstance(annotation, dict) and annotation.get("was_cancelled"):
                continue
            for result in _results(annotation):
                if _choices(result) is not None:
                    controls[result.get("from_name")] += 1
                elif isinstance(result, dict):
                    others[f"{result.get('type', 'a result')} {result.get('from_name')!r}"] += 1
    if name in controls:
        return name
    if len(controls) == 1:
        return next(iter(controls))
    if controls:
        raise StageError(f"{path}: a Label Studio export whose annotations use {len(controls)} Choices controls "
                         f"({', '.join(repr(c) for c in sorted(controls, key=str))}) and none is named {name!r}; "
                         f"set clean.columns.label to the control that holds the class")
    if others:
        raise StageError(f"{path}: a Label Studio export with no Choices result in any annotation (found: "
                         f"{', '.join(sorted(others))}), so it holds no class label; move it out of the raw folder")
    return None


def _task_data(task: object) -> dict | None:
    """A task's data: its `data` object, or for a flat task (no `data` wrapper) its own keys but the annotations."""
    if not isinstance(task, dict):
        return None
    if "data" in task:
        return task["data"] if isinstance(task["data"], dict) else None
    return {key: value for key, value in task.items() if key not in ("annotations", "predictions")}


def _completed_by(value: object) -> str | None:
    """The annotator: `completed_by` is a user id, or (Label Studio Enterprise) a user object: its e-mail, else id."""
    if isinstance(value, dict):
        value = value.get("email") or value.get("id")
    return None if value is None or value == "" else str(value)


def read_label_studio(result: FileRead, doc: list, fields: list[Field], used_fallback: bool) -> FileRead:
    """Label Studio's JSON export: one record per annotation, its row the task's 1-based index in the array, so a
    task's annotators are rows (votes) of the same text.

    The label is the annotation's choice in the Choices control of :func:`_choice_control`; the annotator its
    `completed_by`; every other field (the text, the id) the task's `data.<column>`, else the task's own key (so the
    id is the task id unless data holds an id column). The label comes from the results and the text from `data`, so
    a control named like a data field (both `text`) does not clash. Rejected, one row each, the detail naming the task
    and the annotation: a task without annotations (`unlabelled`, or `prediction_only` when it holds a model's
    predictions: they are not annotations; a prediction an annotator accepted is exported as an annotation), the same
    for a flat task; an annotation marked `was_cancelled` (skipped: `cancelled`), one without a choice (`unlabelled`),
    one with several (a multi-select: `multi_label`).
    """
    path = result.path
    result.format = "labelstudio"
    label = next(f for f in fields if f.choice)
    annotator = next((f for f in fields if f.annotator), None)
    plain = [f for f in fields if f is not label and f is not annotator]
    found = set().union(*(data for data in map(_task_data, doc) if data is not None))
    missing = [f.column for f in plain if f.required and f.column not in found]
    if missing:
        raise StageError(f"{path}: a Label Studio export with no data key {', '.join(map(repr, missing))} in any task "
                         f"(found: {', '.join(map(repr, sorted(found))) or 'none'}); set clean.columns to the data "
                         f"field that holds it")
    control = _choice_control(path, doc, label.column)
    ids = [f.column for f in plain if f.name == "id"]
    for number, task in enumerate(doc, start=1):
        if not isinstance(task, dict):
            result.reject(number, INVALID_JSON, f"task {number}: expected an object, found {type(task).__name__}",
                          json.dumps(task, ensure_ascii=False))
            continue
        if used_fallback:
            result.fallback_lines.append(number)
        where = f"task {number}" + (f" (id {task['id']})" if task.get("id") is not None else "")
        data = _task_data(task)
        if data is None:
            result.reject(number, INVALID_JSON, f"{where}: 'data' is a {type(task['data']).__name__}, expected an "
                                                f"object", json.dumps(task, ensure_ascii=False))
            continue
        values = {f.column: data[f.column] if f.column in data else task.get(f.column) for f in plain}
        record_id = values[ids[0]] if ids else None
        record_id = None if record_id is None else str(record_id)
        shown = next((values[f.column] for f in plain if f.required and isinstance(values[f.column], str)), None)
        original = shown if shown is not None else json.dumps(data, ensure_ascii=False)

        annotations = task.get("annotations") or []
        if not isinstance(annotations, list):
            result.reject(number, INVALID_JSON, f"{where}: 'annotations' is a {type(annotations).__name__}, expected "
                                                f"a list", original, record_id)
            continue
        if not annotations:
            flat = "" if "data" in task else " (a flat task, with no 'data' wrapper)"
            predictions = task.get("predictions") or []
            if predictions:
                result.reject(number, PREDICTION_ONLY,
                              f"{where}{flat}: {len(predictions)} model prediction(s) and no annotation; predictions "
                              f"are not labels: annotate the task (or accept a prediction) in Label Studio and export "
                              f"again", original, record_id)
            else:
                result.reject(number, UNLABELLED, f"{where}{flat}: no annotation; annotate it in Label Studio and "
                                                  f"export again, or leave it out of the export", original, record_id)
            continue

        task_problem = None
        absent = [f.column for f in plain if f.required and f.column not in data]
        repeated = [key for key in getattr(data, "repeated", {}) if key in values]
        containers = [f.column for f in plain if f.required and not f.structured
                      and isinstance(values[f.column], (dict, list))]
        if absent:
            task_problem = (MISSING_FIELD, f"no data key {', '.join(map(repr, absent))}")
        elif repeated:
            task_problem = (DUPLICATE_KEY, f"data gives key {', '.join(map(repr, repeated))} more than once; JSON "
                                           f"would keep the last one silently, so remove the others")
        elif containers:
            task_problem = (INVALID_JSON, f"data {', '.join(containers)}: expected a string, found a JSON container")
        for k, annotation in enumerate(annotations, start=1):
            at = f"{where}, annotation {k}"
            if isinstance(annotation, dict) and annotation.get("id") is not None:
                at += f" (id {annotation['id']})"
            if not isinstance(annotation, dict):
                result.reject(number, INVALID_JSON, f"{at}: expected an object, found {type(annotation).__name__}",
                              original, record_id)
                continue
            if annotation.get("was_cancelled"):
                result.reject(number, CANCELLED, f"{at}: skipped in Label Studio (was_cancelled), so it holds no "
                                                 f"label", original, record_id)
                continue
            if task_problem is not None:
                result.reject(number, task_problem[0], f"{at}: {task_problem[1]}", original, record_id)
                continue
            results = _results(annotation)
            choices = [choice for r in results if isinstance(r, dict) and r.get("from_name") == control
                       for choice in (_choices(r) or [])]
            if not choices:
                empty = " (its result is empty)" if not results else ""
                result.reject(number, UNLABELLED, f"{at}: no choice in the Choices control {control!r}{empty}; "
                                                  f"label it in Label Studio and export again", original, record_id)
                continue
            if len(choices) > 1:
                result.reject(number, MULTI_LABEL,
                              f"{at}: {len(choices)} choices {choices!r} in the Choices control {control!r} (a "
                              f"multi-select); the classifier takes one label per text, so keep one in Label "
                              f"Studio and export again", original, record_id)
                continue
            row = {**values, label.column: choices[0]}
            if annotator is not None:
                row[annotator.column] = _completed_by(annotation.get("completed_by"))
            result.accept(number, _row_values(row.get, fields))
    return result


def read_parquet(path: Path, fields: list[Field], fallback: str | None) -> FileRead:
    import pyarrow as pa
    import pyarrow.parquet as pq

    result = FileRead(path, "parquet")
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as exc:
        raise StageError(f"{path}: not a readable Parquet file ({exc})") from None
    _require_columns(path, names, fields)
    # Parquet allows two columns of one name (pyarrow writes them); the one read would be a guess.
    _no_duplicate_columns(path, names, fields, " in the schema")
    wanted = [f.column for f in fields if f.column in names]
    try:
        table = pq.read_table(path, columns=wanted)  # only the columns read: a repeated other one is no obstacle
    except (pa.ArrowInvalid, OSError) as exc:
        raise StageError(f"{path}: not a readable Parquet file ({exc})") from None
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
