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

import argparse
import sys

import numpy as np
import pandas as pd

from stages.io import atomic_path, run_main, write_json
from stages.modeling import fingerprint, load_tokenizer
from stages.params import Model, Paths, Tokenize, add_params_argument, load

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
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    features = Features(
        {"input_ids": Sequence(Value("int32")), "labels": ClassLabel(names=labels), "length": Value("int32")}
    )
    label_id = {label: i for i, label in enumerate(labels)}
    full_lengths: list[int] = []
    chunks = []
    texts = frame["text"].tolist()
    for start in range(0, len(texts), options.batch_size):
        batch = texts[start:start + options.batch_size]
        ids, full = encode(tokenizer, batch, options.max_length)
        full_lengths.extend(full)
        chunks.append({
            "input_ids": ids,
            "labels": [label_id[x] for x in frame["label"].iloc[start:start + options.batch_size]],
            "length": [len(x) for x in ids],
        })
    if not chunks:
        return Dataset.from_dict({k: [] for k in features}, features=features), np.array([], dtype=np.int64)
    from datasets import concatenate_datasets

    dataset = concatenate_datasets([Dataset.from_dict(c, features=features) for c in chunks])
    return dataset, np.asarray(full_lengths, dtype=np.int64)


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_argument(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        params = load(args.params)
        run(params.paths, params.model, params.tokenize)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
