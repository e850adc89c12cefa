"""Stage `clean`: read every annotation file in the raw folder, normalise the text, collapse exact duplicates.

    python -m stages.clean [--params params.yaml]

Reads  paths.raw_dir (every *.csv, *.tsv, *.jsonl, *.json, *.parquet; dotfiles are ignored)
Writes paths.clean           Parquet: source_file, line, id, text, text_raw, label, annotator
       paths.clean_rejected  CSV: source_file, line, id, reason, detail, text (original) of every row that stops here
       paths.clean_report    JSON: per file rows read, kept, rejected per reason, lines decoded with the fallback

Normalisation: HTML tags removed and entities unescaped, Unicode NFKC, control and zero-width characters removed,
whitespace collapsed; lowercasing and punctuation removal only when params ask. Two rows are exact duplicates when
their normalised text, label and annotator are equal (rows by different annotators are votes, kept for `validate`).

Each file's rows are read and normalised once: paths.cache_dir/clean keeps them per file, keyed by the file's bytes
and name, the `clean` params and this code (stages/memo.py). When annotators add a file, only that file is read;
duplicates are still found across all files, and the outputs are the same as from an empty cache.
"""

from __future__ import annotations

import html
import re
import sys
import unicodedata
from pathlib import Path

import pandas as pd

from stages import memo
from stages.io import REJECTED_COLUMNS, StageError, stage_main, write_frame, write_json
from stages.params import Clean, Paths
from stages.readers import FORMATS, FileRead, read_file

DUPLICATE = "duplicate"
CLEAN_COLUMNS = ["source_file", "line", "id", "text", "text_raw", "label", "annotator"]

# A tag starts with a letter, "/" or "!" right after "<", so "a < b" and "x<3" survive.
_TAG = re.compile(r"<[/!]?[A-Za-z][^<>]{0,2000}>|<!--.*?-->", re.DOTALL)
# Script and style elements go with their content: it is code, never part of the text.
_SCRIPT = re.compile(r"<(script|style)\b[^<>]{0,2000}>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
# Control characters become spaces (a tab or newline separates words), zero-width ones vanish.
_STRIP_TABLE = {
    **{cp: " " for cp in range(0x20)},
    0x7F: " ",
    **{cp: " " for cp in range(0x80, 0xA0)},
    **{ord(ch): None for ch in _ZERO_WIDTH},
}
_PUNCTUATION = None


def normalize_text(text: str, lowercase: bool = False, remove_punctuation: bool = False) -> str:
    """The cleaned form of one text; idempotent."""
    if "<" in text:
        text = _TAG.sub(" ", _SCRIPT.sub(" ", text))
    text = html.unescape(text)
    text = unicodedata.normalize("NFKC", text)
    text = text.translate(_STRIP_TABLE)
    if lowercase:
        text = text.lower()
    if remove_punctuation:
        global _PUNCTUATION
        if _PUNCTUATION is None:
            import regex  # Unicode property classes; installed with transformers

            _PUNCTUATION = regex.compile(r"\p{P}+")
        text = _PUNCTUATION.sub(" ", text)
    return " ".join(text.split())


def normalize_frame(records: pd.DataFrame, options: Clean) -> pd.DataFrame:
    """Add `text` (normalised) next to `text_raw`, and strip the label and annotator."""
    out = records.rename(columns={"text": "text_raw"})
    out["text"] = [normalize_text(t, options.lowercase, options.remove_punctuation) for t in out["text_raw"]]
    out["label"] = out["label"].str.strip()
    out["annotator"] = out["annotator"].where(out["annotator"].isna(), out["annotator"].astype("string").str.strip())
    return out[CLEAN_COLUMNS]


def drop_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first of each (text, label, annotator); return (kept, rejected rows with the kept row they repeat).

    Empty texts are never collapsed: each one is rejected by `validate` with its own reason.
    """
    key = frame[["text", "label", "annotator"]].astype("string").fillna("\x00")
    dup = key.duplicated(keep="first")
    dup &= frame["text"] != ""
    if not dup.any():
        return frame.reset_index(drop=True), _empty_rejected()
    first = key.groupby(list(key.columns), sort=False, dropna=False).ngroup()
    first_index = frame.index.to_series().groupby(first.to_numpy()).transform("first")
    original = frame.loc[first_index[dup]]
    rejected = pd.DataFrame(
        {
            "source_file": frame.loc[dup, "source_file"].to_numpy(),
            "line": frame.loc[dup, "line"].to_numpy(),
            "id": frame.loc[dup, "id"].to_numpy(),
            "reason": DUPLICATE,
            "detail": [f"same text and label as {f}:{n}" for f, n in zip(original["source_file"], original["line"])],
            "text": frame.loc[dup, "text_raw"].to_numpy(),
        }
    )
    return frame[~dup].reset_index(drop=True), rejected


def _empty_rejected() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "line" else "object") for c in REJECTED_COLUMNS})


def raw_files(raw_dir: Path) -> list[Path]:
    if not raw_dir.is_dir():
        raise StageError(f"{raw_dir}: raw folder not found (run `python -m stages.import_default` or add files)")
    files = sorted(p for p in raw_dir.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))
    if not files:
        raise StageError(f"{raw_dir}: no annotation files ({', '.join(sorted(FORMATS))})")
    return files


def frames_from_read(read: FileRead, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One file's records (raw strings) and the rows its reader rejected, as frames."""
    columns = ["source_file", "line", "id", "text", "label", "annotator"]
    frame = pd.DataFrame([{"source_file": name, **r} for r in read.records], columns=columns).astype({"line": "int64"})
    frame = frame.astype({c: "string" for c in columns if c != "line"})
    rejected = [{"source_file": name, **r} for r in read.rejected]
    rejected_frame = pd.DataFrame(rejected, columns=REJECTED_COLUMNS) if rejected else _empty_rejected()
    return frame, rejected_frame


def clean_file(path: Path, name: str, options: Clean) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(normalised rows, rejected rows, what the report needs) for one raw file: everything but the duplicates,
    which are found across files."""
    read = read_file(path, options.columns, options.fallback_encoding)
    records, rejected = frames_from_read(read, name)
    ids = {r["line"]: r["id"] for r in read.records}
    summary = {
        "format": read.format,
        "rows_read": len(read.records) + len(read.rejected),
        "fallback_count": len(read.fallback_lines),
        "fallback_first_rows": [{"line": n, "id": ids.get(n)} for n in read.fallback_lines[:100]],
    }
    return normalize_frame(records, options), rejected, summary


def cache_key(options: Clean) -> dict:
    """What a file's cleaned rows depend on besides its bytes and name: the params and the code that reads."""
    return {"options": options.model_dump(mode="json"), "code": memo.source_digest("stages.clean", "stages.readers"),
            "libraries": memo.library_versions("pandas", "pyarrow")}


def clean_files(files: list[Path], raw_dir: Path, options: Clean, cache_dir: Path | None):
    """Every file's (name, normalised rows, rejected rows, summary), from the cache when the file is unchanged."""
    cache = memo.FileCache(cache_dir, "clean", cache_key(options))
    out = []
    for path in files:
        name = path.relative_to(raw_dir).as_posix()
        content = memo.file_digest(path) if cache.dir is not None else ""
        stored = cache.get(name, content)
        if stored is not None:
            frames, summary = stored
            rows, rejected = frames["rows"], frames["rejected"]
        else:
            rows, rejected, summary = clean_file(path, name, options)
            cache.put(name, content, {"rows": rows, "rejected": rejected}, summary)
        out.append((name, rows, rejected, summary))
    cache.prune()
    if cache.dir is not None:
        print(f"clean: {cache.hits} of {len(files)} files unchanged since an earlier run, taken from the cache")
    return out


def build_report(summaries: dict[str, dict], kept: pd.DataFrame, rejected: pd.DataFrame, options: Clean) -> dict:
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


def run(paths: Paths, options: Clean) -> dict:
    files = raw_files(paths.raw_dir)
    cleaned = clean_files(files, paths.raw_dir, options, paths.cache_dir)
    normalized = pd.concat([rows for _, rows, _, _ in cleaned], ignore_index=True)
    kept, duplicates = drop_duplicates(normalized)
    parts = [r for _, _, r, _ in cleaned if len(r)] + ([duplicates] if len(duplicates) else [])
    rejected = pd.concat(parts, ignore_index=True) if parts else _empty_rejected()
    rejected = rejected.sort_values(["source_file", "line"], kind="stable").reset_index(drop=True)
    report = build_report({name: summary for name, _, _, summary in cleaned}, kept, rejected, options)

    write_frame(paths.clean, kept)
    write_frame(paths.clean_rejected, rejected)
    write_json(paths.clean_report, report)
    t = report["totals"]
    for name, entry in report["files"].items():
        if entry["rows_read"] == 0:
            print(f"clean: warning: {name} has no rows (an empty file, or a header only)")
    print(f"clean: {t['rows_read']} rows read from {t['files']} files, {t['kept']} kept, rejected {t['rejected']}, "
          f"{t['decoded_with_fallback']} decoded with {options.fallback_encoding}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, lambda params: run(params.paths, params.clean))


if __name__ == "__main__":
    sys.exit(main())
