"""Cleaning with row accounting, for any task: read each raw file, let the task normalise its rows, collapse exact
duplicates across files, and account for every row read (kept, or rejected with a reason).

The task says which fields to read (`Task.fields`), how to normalise them (`Task.normalize`) and what makes two rows
duplicates (`Task.duplicate_key`); this module does the rest the same way for every task, the user's own splits
included: every cleaned row has a `split` column, the split that `split.column` or `split.files` gives its text (NA
for none), resolved here, before duplicates collapse and validate merges votes, so that no copy of a text loses it
(sft_pipeline/data/splitting.py). A value of the column that names no split rejects its row (`invalid_split`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sft_pipeline import memo
from sft_pipeline.data import splitting
from sft_pipeline.data.readers import FORMATS, Field, FileRead, read_file
from sft_pipeline.io import REJECTED_COLUMNS, StageError

DUPLICATE = "duplicate"


def empty_rejected() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "line" else "object") for c in REJECTED_COLUMNS})


def raw_files(raw_dir: Path) -> list[Path]:
    if not raw_dir.is_dir():
        raise StageError(f"{raw_dir}: raw folder not found (run `python -m sft_pipeline.defaults` or add files)")
    files = sorted(p for p in raw_dir.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))
    if not files:
        raise StageError(f"{raw_dir}: no annotation files ({', '.join(sorted(FORMATS))})")
    return files


def frames_from_read(read: FileRead, name: str, field_names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One file's records (raw strings) and the rows its reader rejected, as frames."""
    columns = ["source_file", "line", *field_names]
    frame = pd.DataFrame([{"source_file": name, **r} for r in read.records], columns=columns).astype({"line": "int64"})
    frame = frame.astype({c: "string" for c in columns if c != "line"})
    rejected = [{"source_file": name, **r} for r in read.rejected]
    rejected_frame = pd.DataFrame(rejected, columns=REJECTED_COLUMNS) if rejected else empty_rejected()
    return frame, rejected_frame


def clean_file(path: Path, name: str, task, options, split_column: str | None = None):
    """(normalised rows, rejected rows, what the report needs) for one raw file: everything but the duplicates,
    which are found across files. `split_column` (split.column): read it too, into the rows' `split`."""
    fields = task.fields(options)
    if split_column is not None:
        fields = [*fields, Field("split", split_column)]
    read = read_file(path, fields, options.fallback_encoding, tsv_quoting=options.tsv_quoting)
    records, rejected = frames_from_read(read, name, [f.name for f in fields])
    ids = {r["line"]: r.get("id") for r in read.records}
    summary = {
        "format": read.format,
        "rows_read": len(read.records) + len(read.rejected),
        "fallback_count": len(read.fallback_lines),
        "fallback_first_rows": [{"line": n, "id": ids.get(n)} for n in read.fallback_lines[:100]],
    }
    rows = task.normalize(records, options)
    rows["split"] = pd.Series(pd.NA, index=rows.index, dtype="string")
    if split_column is not None and len(rows):
        if list(rows["line"]) != list(records["line"]):
            raise AssertionError(f"{name}: {type(task).__name__}.normalize must return one row per record, in order")
        value = records["split"].set_axis(rows.index)
        rows["split"], invalid = splitting.parse_split_values(value)
        if invalid.any():
            bad = rows[invalid]
            rejected = pd.concat([rejected, pd.DataFrame({
                "source_file": bad["source_file"].to_numpy(), "line": bad["line"].to_numpy(),
                "id": bad["id"].to_numpy(), "reason": splitting.INVALID_SPLIT,
                "detail": [f"split column {split_column!r} is {v!r}, not train, validation or test (leave it empty "
                           f"to let split.ratios place the row)" for v in value[invalid]],
                "text": bad["text_raw"].to_numpy()}, columns=REJECTED_COLUMNS)], ignore_index=True)
            rows = rows[~invalid]
    return rows.reset_index(drop=True), rejected, summary


def cache_key(task, options, split_column: str | None = None) -> dict:
    """What a file's cleaned rows depend on besides its bytes and name: the task, its params, the code that reads."""
    return {"task": task.name, "options": options.model_dump(mode="json"), "split_column": split_column,
            "code": memo.source_digest(__name__, "sft_pipeline.data.readers", "sft_pipeline.data.text",
                                       "sft_pipeline.data.splitting", type(task).__module__, *task.clean_modules),
            "libraries": memo.library_versions("pandas", "pyarrow")}


def clean_files(files: list[Path], raw_dir: Path, task, options, cache_dir: Path | None,
                split_column: str | None = None):
    """Every file's (name, normalised rows, rejected rows, summary), from the cache when the file is unchanged."""
    cache = memo.FileCache(cache_dir, "clean", cache_key(task, options, split_column))
    out = []
    for path in files:
        name = path.relative_to(raw_dir).as_posix()
        content = memo.file_digest(path) if cache.dir is not None else ""
        stored = cache.get(name, content)
        if stored is not None:
            frames, summary = stored
            rows, rejected = frames["rows"], frames["rejected"]
        else:
            rows, rejected, summary = clean_file(path, name, task, options, split_column)
            cache.put(name, content, {"rows": rows, "rejected": rejected}, summary)
        out.append((name, rows, rejected, summary))
    cache.prune()
    if cache.dir is not None:
        print(f"clean: {cache.hits} of {len(files)} files unchanged since an earlier run, taken from the cache")
    return out


def drop_duplicates(frame: pd.DataFrame, key: pd.DataFrame, eligible: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first row of each `key`; return (kept, rejected rows with the kept row they repeat).

    Rows outside `eligible` never collapse (an empty text, say: validate rejects each one with its own reason).
    """
    names = list(key.columns)
    what = "same " + (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + " as"
    key = key.astype("string").fillna("\x00")
    dup = key.duplicated(keep="first") & eligible
    if not dup.any():
        return frame.reset_index(drop=True), empty_rejected()
    first = key.groupby(list(key.columns), sort=False, dropna=False).ngroup()
    first_index = frame.index.to_series().groupby(first.to_numpy()).transform("first")
    original = frame.loc[first_index[dup]]
    rejected = pd.DataFrame(
        {
            "source_file": frame.loc[dup, "source_file"].to_numpy(),
            "line": frame.loc[dup, "line"].to_numpy(),
            "id": frame.loc[dup, "id"].to_numpy(),
            "reason": DUPLICATE,
            "detail": [f"{what} {f}:{n}" for f, n in zip(original["source_file"], original["line"])],
            "text": frame.loc[dup, "text_raw"].to_numpy(),
        }
    )
    return frame[~dup].reset_index(drop=True), rejected


def build_report(summaries: dict[str, dict], kept: pd.DataFrame, rejected: pd.DataFrame, options) -> dict:
    files = {}
    kept_per_file = kept["source_file"].value_counts()
    rejected_per_file = {name: group["reason"].value_counts().sort_index()
                         for name, group in rejected.groupby("source_file", sort=False)}
    for name, summary in summaries.items():
        mine = rejected_per_file.get(name, pd.Series(dtype="int64"))
        entry = {
            "format": summary["format"],
            "rows_read": summary["rows_read"],
            "kept": int(kept_per_file.get(name, 0)),
            "rejected": {str(k): int(v) for k, v in mine.items()},
            "decoded_with_fallback": {
                "count": summary["fallback_count"],
                "first_rows": summary["fallback_first_rows"],
            },
        }
        if entry["rows_read"] != entry["kept"] + sum(entry["rejected"].values()):
            raise AssertionError(f"{name}: row accounting broken: {entry}")
        files[name] = entry
    totals = {
        "files": len(files),
        "rows_read": sum(f["rows_read"] for f in files.values()),
        "kept": len(kept),
        "rejected": {str(k): int(v) for k, v in rejected["reason"].value_counts().sort_index().items()},
        "decoded_with_fallback": sum(f["decoded_with_fallback"]["count"] for f in files.values()),
    }
    if totals["rows_read"] != totals["kept"] + sum(totals["rejected"].values()):
        raise AssertionError(f"row accounting broken: {totals}")
    return {"fallback_encoding": options.fallback_encoding, "totals": totals, "files": files}


def clean(files: list[Path], raw_dir: Path, task, options, cache_dir: Path | None, split=None):
    """(kept rows, rejected rows, report) for all raw files; `split` (the split params): the user's splits."""
    column = split.column if split is not None else None
    cleaned = clean_files(files, raw_dir, task, options, cache_dir, column)
    normalized = pd.concat([rows for _, rows, _, _ in cleaned], ignore_index=True)
    user_report = None
    if split is not None and (split.column is not None or split.files):
        by_name = splitting.file_splits([name for name, _, _, _ in cleaned], split.files)
        by_file = normalized["source_file"].map(by_name).astype("string")
        normalized["split"], user_report = splitting.resolve_user_splits(
            normalized, task.split_key(normalized), normalized["split"], by_file)
    key, eligible = task.duplicate_key(normalized)
    kept, duplicates = drop_duplicates(normalized, key, eligible)
    parts = [r for _, _, r, _ in cleaned if len(r)] + ([duplicates] if len(duplicates) else [])
    rejected = pd.concat(parts, ignore_index=True) if parts else empty_rejected()
    rejected = rejected.sort_values(["source_file", "line"], kind="stable").reset_index(drop=True)
    report = build_report({name: summary for name, _, _, summary in cleaned}, kept, rejected, options)
    if user_report is not None:
        report["user_splits"] = user_report
    return kept, rejected, report
