"""Stage `tokenize`: the model's tokenizer over the three splits, as the task encodes a row; truncated at max_length
and not padded.

    python -m stages.tokenize [--params params.yaml]

Reads  paths.split_dir/{train,validation,test}.parquet, the tokenizer of model.name (a local folder under
       paths.pretrained_dir by default, which dvc.yaml declares as a dependency: a new model re-tokenizes)
Writes paths.tokenized_dir        a datasets DatasetDict in Arrow (data/: input_ids (int32), the task's targets
                                  (classification: labels, a ClassLabel), length), task.json (what train and
                                  evaluate need of the task: the label names) and tokenizer/ (the exact tokenizer)
       paths.tokenize_report      JSON: token length percentiles before truncation and the fraction truncated; the
                                  vocabulary's coverage per split (unknown-token share, texts mostly unknown,
                                  tokens per character: sft_pipeline/coverage.py)

Fails, before encoding, when a split's unknown-token share exceeds tokenize.max_unknown_fraction: the model cannot
read the text (Chinese with an English vocabulary).

Batches are padded later, at train time, to the longest row of each batch.

Each distinct text is encoded once per tokenizer and max_length: paths.cache_dir/tokenize keeps token ids and
untruncated lengths by a 128-bit hash of the text (sft_pipeline/encoding.py, memo.py), so new annotations cost only
their own encoding. The output folder is byte-identical whether the cache was full, empty or absent.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

from sft_pipeline import coverage, encoding, memo, tasks
from sft_pipeline.io import StageError, atomic_path, stage_main, write_json
from sft_pipeline.modeling import fingerprint, load_tokenizer
from sft_pipeline.params import Params


def run(params: Params) -> dict:
    from datasets import DatasetDict
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    paths, options, task = params.paths, params.tokenize, tasks.get(params)
    frames = {name: pd.read_parquet(paths.split_dir / f"{name}.parquet") for name in encoding.SPLITS}
    tokenizer = task.prepare_tokenizer(load_tokenizer(params.model.name, params.model), options)
    vocabulary = coverage.report(tokenizer, {name: task.texts(f) for name, f in frames.items()},
                                 {name: _row_ids(f) for name, f in frames.items()})
    unreadable = coverage.problems(vocabulary, options.max_unknown_fraction, params.model.name)
    if unreadable:
        write_json(paths.tokenize_report, {"task": task.name, "model": params.model.name, "passed": False,
                                           "coverage": vocabulary, "problems": unreadable})
        raise StageError("tokenize: " + "\n  ".join(unreadable))
    with tempfile.TemporaryDirectory() as folder:
        # Saved before any call: encoding sets truncation on the Rust tokenizer, which save_pretrained would keep,
        # so the saved files would depend on whether anything was encoded (with a warm cache, nothing is).
        saved = Path(folder) / "tokenizer"
        tokenizer.save_pretrained(str(saved))
        tokenizer_hash = fingerprint(saved)  # the folder copied into the output below
        cache = memo.TokenCache(paths.cache_dir, encoding.cache_key(tokenizer_hash, tokenizer, options.max_length))
        encoded = task.encode(frames, tokenizer, options, cache)
        with atomic_path(paths.tokenized_dir, directory=True) as tmp:
            DatasetDict(encoded.datasets).save_to_disk(str(tmp / "data"))
            shutil.copytree(saved, tmp / "tokenizer")
            write_json(tmp / tasks.META_FILE, {"task": task.name, **encoded.meta})
    report = {
        "task": task.name,
        "model": params.model.name,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_fingerprint": tokenizer_hash,
        "vocab_size": len(tokenizer),
        "max_length": options.max_length,
        "coverage": vocabulary,
        **encoded.report,
    }
    write_json(paths.tokenize_report, report)
    rows = sum(len(f) for f in frames.values())
    print(f"tokenize: {rows} rows: {encoded.texts_encoded} texts encoded, "
          + (f"{encoded.rows_from_cache} rows from the cache" if paths.cache_dir
             else "no cache (paths.cache_dir is null)"))
    for name, stats in report.get("splits", {}).items():
        print(f"tokenize: {name}: {stats['rows']} rows, p50 {stats.get('p50')} / p95 {stats.get('p95')} tokens, "
              f"{stats.get('truncated_fraction', 0):.1%} truncated at {options.max_length}")
    for name, split in vocabulary["splits"].items():
        unknown = (f"{split['unknown_fraction']:.2%} unknown tokens, " if "unknown_fraction" in split
                   else "no unknown token (byte-level), ")
        print(f"tokenize: {name}: {unknown}{split['tokens_per_character']} tokens per character")
        if split.get("texts_mostly_unknown"):
            print(f"tokenize: warning: {split['texts_mostly_unknown']} {name} texts are more than half unknown "
                  f"tokens (ids {', '.join(split['mostly_unknown_examples'])}{', ...' if split['texts_mostly_unknown'] > 5 else ''})")
    return report


def _row_ids(frame: pd.DataFrame) -> list[str]:
    """A row's id where the file gave one, else its file and line: what a user can find the row by."""
    return [f"{f}:{line}" if pd.isna(i) else str(i)
            for i, f, line in zip(frame["id"], frame["source_file"], frame["line"])]


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
