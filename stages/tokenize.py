"""Stage `tokenize`: the model's tokenizer over the three splits, truncated at max_length and not padded.

    python -m stages.tokenize [--params params.yaml]

Reads  paths.split_dir/{train,validation,test}.parquet, the tokenizer of model.name (a local folder under
       paths.pretrained_dir by default, which dvc.yaml declares as a dependency: a new model re-tokenizes)
Writes paths.tokenized_dir        a datasets DatasetDict in Arrow: input_ids (int32), labels (ClassLabel), length;
                                  plus label_map.json and tokenizer/ (the exact tokenizer, reused by train)
       paths.tokenize_report      JSON: token length percentiles before truncation and the fraction truncated

Batches are padded later, at train time, to the longest row of each batch.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pandas as pd

from stages.io import atomic_path, stage_main, write_json
from stages.modeling import fingerprint, load_tokenizer
from stages.params import Model, Paths, Tokenize

SPLITS = ("train", "validation", "test")
PERCENTILES = (50, 90, 95, 99)


def encode(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Token ids truncated to `max_length`, and each text's full length, from a single tokenizer pass.

    A fast tokenizer hands back the truncated-away tokens as overflow pieces (stride 0, so they do not overlap):
    their lengths, less the special tokens each piece repeats, add up to the untruncated length.
    """
    if not tokenizer.is_fast:
        ids = tokenizer(texts, truncation=True, max_length=max_length, verbose=False)["input_ids"]
        full = [len(x) for x in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        return ids, full
    backend = _configured_backend(tokenizer, max_length)
    if backend is None:
        return _encode_via_call(tokenizer, texts, max_length)
    n_special = tokenizer.num_special_tokens_to_add(pair=False)
    # The Rust encodings are read directly: `tokenizer(...)` would also build attention masks, type ids and a
    # BatchEncoding for every row, which costs as much as the tokenization itself (bench/ measures both).
    encodings = backend.encode_batch(texts, add_special_tokens=True)
    ids = [e.ids for e in encodings]
    full = [len(i) + sum(len(o.ids) - n_special for o in e.overflowing) if len(i) >= max_length else len(i)
            for i, e in zip(ids, encodings)]
    return ids, full


def _configured_backend(tokenizer, max_length: int):
    """The Rust tokenizer, set up exactly as `tokenizer(texts, truncation=True, max_length=...)` sets it, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    configure = getattr(tokenizer, "set_truncation_and_padding", None)
    if backend is None or configure is None:
        return None
    from transformers.tokenization_utils_base import TruncationStrategy
    from transformers.utils import PaddingStrategy

    configure(padding_strategy=PaddingStrategy.DO_NOT_PAD, truncation_strategy=TruncationStrategy.LONGEST_FIRST,
              max_length=max_length, stride=0, pad_to_multiple_of=None, padding_side=None)
    split = getattr(tokenizer, "split_special_tokens", False)
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    return backend


def _encode_via_call(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[int]]:
    n_special = tokenizer.num_special_tokens_to_add(pair=False)
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        return_overflowing_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    ids: list = [None] * len(texts)
    full = [n_special] * len(texts)
    for piece, sample in zip(enc["input_ids"], enc["overflow_to_sample_mapping"]):
        if ids[sample] is None:
            ids[sample] = piece
        full[sample] += len(piece) - n_special
    return ids, full


def length_stats(full: np.ndarray, max_length: int) -> dict:
    if len(full) == 0:
        return {"rows": 0}
    stats = {f"p{p}": int(np.percentile(full, p)) for p in PERCENTILES}
    return {
        "rows": int(len(full)),
        "mean": round(float(full.mean()), 1),
        **stats,
        "max": int(full.max()),
        "truncated_fraction": round(float((full > max_length).mean()), 4),
        "tokens_kept_fraction": round(float(np.minimum(full, max_length).sum() / full.sum()), 4),
    }


def tokenize_split(frame: pd.DataFrame, tokenizer, labels: list[str], options: Tokenize):
    """(datasets.Dataset, untruncated lengths) for one split."""
    import pyarrow as pa
    from datasets import ClassLabel, Dataset, DatasetInfo, Features, Sequence, Value

    features = Features(
        {"input_ids": Sequence(Value("int32")), "labels": ClassLabel(names=labels), "length": Value("int32")}
    )
    label_id = {label: i for i, label in enumerate(labels)}
    label_ids = frame["label"].map(label_id).to_numpy(dtype=np.int64)
    full_lengths = np.empty(len(frame), dtype=np.int64)
    # The dataset's fingerprint (saved in state.json) is a hash of its content, not the random one `datasets`
    # would pick: the same splits and tokenizer then give a byte-identical folder, which DVC sees as unchanged.
    content = hashlib.blake2b(json.dumps([labels, options.max_length]).encode(), digest_size=8)
    tables = []
    texts = frame["text"].tolist()
    for start in range(0, len(texts), options.batch_size):
        stop = min(start + options.batch_size, len(texts))
        ids, full = encode(tokenizer, texts[start:stop], options.max_length)
        full_lengths[start:stop] = full
        # Straight to Arrow through numpy, one batch at a time: the Python lists of a batch are freed before the
        # next, which keeps peak memory flat at a million rows (Dataset.from_dict per batch was slower, too).
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for row in ids for t in row), dtype=np.int32, count=int(offsets[-1]))
        for array in (lengths, flat, label_ids[start:stop]):
            content.update(array.tobytes())
        tables.append(pa.table({
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            "labels": pa.array(label_ids[start:stop]),
            "length": pa.array(lengths),
        }))
    table = pa.concat_tables(tables) if tables else features.arrow_schema.empty_table()
    dataset = Dataset(table.cast(features.arrow_schema), info=DatasetInfo(features=features),
                      fingerprint=content.hexdigest())
    return dataset, full_lengths


def run(paths: Paths, model: Model, options: Tokenize) -> dict:
    from datasets import DatasetDict
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()

    frames = {name: pd.read_parquet(paths.split_dir / f"{name}.parquet") for name in SPLITS}
    labels = sorted(set().union(*(set(f["label"]) for f in frames.values())))
    tokenizer = load_tokenizer(model.name, model)
    datasets, report_splits = {}, {}
    for name, frame in frames.items():
        datasets[name], full = tokenize_split(frame, tokenizer, labels, options)
        report_splits[name] = length_stats(full, options.max_length)
    with atomic_path(paths.tokenized_dir, directory=True) as tmp:
        DatasetDict(datasets).save_to_disk(str(tmp / "data"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_json(tmp / "label_map.json", {"labels": labels, "label2id": {l: i for i, l in enumerate(labels)}})
        tokenizer_hash = fingerprint(tmp / "tokenizer")
    report = {
        "model": model.name,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_fingerprint": tokenizer_hash,
        "vocab_size": len(tokenizer),
        "max_length": options.max_length,
        "labels": labels,
        "splits": report_splits,
    }
    write_json(paths.tokenize_report, report)
    for name, stats in report_splits.items():
        print(f"tokenize: {name}: {stats['rows']} rows, p50 {stats.get('p50')} / p95 {stats.get('p95')} tokens, "
              f"{stats.get('truncated_fraction', 0):.1%} truncated at {options.max_length}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, lambda params: run(params.paths, params.model, params.tokenize))


if __name__ == "__main__":
    sys.exit(main())
