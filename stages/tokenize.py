"""Stage `tokenize`: the model's tokenizer over the three splits, as the task encodes a row; truncated at max_length
and not padded.

    python -m stages.tokenize [--params params.yaml]

Reads  paths.split_dir/{train,validation,test}.parquet, the tokenizer of model.name (a local folder under
       paths.pretrained_dir by default, which dvc.yaml declares as a dependency: a new model re-tokenizes)
Writes paths.tokenized_dir        a datasets DatasetDict in Arrow (data/: input_ids (int32), the task's targets
                                  (classification: labels, a ClassLabel), length), task.json (what train and
                                  evaluate need of the task: the label names) and tokenizer/ (the exact tokenizer)
       paths.tokenize_report      JSON: token length percentiles before truncation and the fraction truncated

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

from sft_pipeline import encoding, memo, tasks
from sft_pipeline.io import atomic_path, stage_main, write_json
from sft_pipeline.modeling import fingerprint, load_tokenizer
from sft_pipeline.params import Params


def run(params: Params) -> dict:
    from datasets import DatasetDict
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    paths, options, task = params.paths, params.tokenize, tasks.get(params)
    frames = {name: pd.read_parquet(paths.split_dir / f"{name}.parquet") for name in encoding.SPLITS}
    tokenizer = task.prepare_tokenizer(load_tokenizer(params.model.name, params.model), options)
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
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
