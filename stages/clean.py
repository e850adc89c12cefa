"""Stage `clean`: read every annotation file in the raw folder, normalise the rows, collapse exact duplicates.

    python -m stages.clean [--params params.yaml]

Reads  paths.raw_dir (every *.csv, *.tsv, *.jsonl, *.json, *.parquet; dotfiles are ignored)
Writes paths.clean           Parquet: source_file, line, id, the task's columns (classification: text, text_raw,
                             label, annotator), split (the user's split of the row's text, from split.column or
                             split.files; NA for none)
       paths.clean_rejected  CSV: source_file, line, id, reason, detail, text (original) of every row that stops here
       paths.clean_report    JSON: per file rows read, kept, rejected per reason, lines decoded with the fallback;
                             `user_splits` (when split.column or split.files is set): rows per split, and the texts
                             given two splits, resolved to the more held-out one

What a row is, how it is normalised and what makes two rows duplicates is the task's (sft_pipeline/tasks/); for
classification: HTML tags removed and entities unescaped, Unicode NFKC, control and zero-width characters removed,
whitespace collapsed, lowercasing and punctuation removal only when params ask; duplicates are rows with the same
normalised text, label and annotator (rows by different annotators are votes, kept for `validate`).

Each file's rows are read and normalised once: paths.cache_dir/clean keeps them per file, keyed by the file's bytes
and name, the task, the `clean` params and the code (sft_pipeline/memo.py). When annotators add a file, only that
file is read; duplicates are still found across all files, and the outputs are the same as from an empty cache.
"""

from __future__ import annotations

import sys

from sft_pipeline import tasks
from sft_pipeline.data import cleaning, splitting
from sft_pipeline.io import stage_main, write_frame, write_json
from sft_pipeline.params import Params


def run(params: Params) -> dict:
    paths, options = params.paths, params.clean
    files = cleaning.raw_files(paths.raw_dir)
    kept, rejected, report = cleaning.clean(files, paths.raw_dir, tasks.get(params), options, paths.cache_dir,
                                            params.split)
    write_frame(paths.clean, kept)
    write_frame(paths.clean_rejected, rejected)
    write_json(paths.clean_report, report)
    t = report["totals"]
    for name, entry in report["files"].items():
        if entry["rows_read"] == 0:
            print(f"clean: warning: {name} has no rows (an empty file, or a header only)")
    print(f"clean: {t['rows_read']} rows read from {t['files']} files, {t['kept']} kept, rejected {t['rejected']}, "
          f"{t['decoded_with_fallback']} decoded with {options.fallback_encoding}")
    for line in splitting.user_split_lines(report.get("user_splits")):
        print(f"clean: {line}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
