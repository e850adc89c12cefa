"""Texts to token ids, fast and cached, for any task: one pass of the Rust tokenizer gives the truncated ids and each
text's untruncated length; a memo (sft_pipeline.memo.TokenCache) serves texts encoded in an earlier run.

Each distinct text is encoded once per tokenizer and max_length: the cache keeps token ids and untruncated lengths by
a 128-bit hash of the text, so new annotations cost only their own encoding. What is written from it is
byte-identical whether the cache was full, empty or absent.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from sft_pipeline import memo

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


def cache_key(tokenizer_hash: str, tokenizer, max_length: int) -> dict:
    """What token ids depend on: the saved tokenizer, max_length, this module's code and the encoding libraries."""
    return {"tokenizer": tokenizer_hash, "class": type(tokenizer).__name__, "max_length": max_length,
            "code": memo.source_digest(__name__),
            "libraries": memo.library_versions("transformers", "tokenizers")}


def encode_table(tokenizer, texts: list[str], options):
    """Arrow columns input_ids (list<int32>) and full_length (int32) for `texts`, a batch at a time.

    Straight to Arrow through numpy: the Python lists of a batch are freed before the next, which keeps peak memory
    flat at a million rows (Dataset.from_dict per batch was slower, too).
    """
    import pyarrow as pa

    id_chunks, full_chunks = [], []
    for start in range(0, len(texts), options.batch_size):
        ids, full = encode(tokenizer, texts[start:start + options.batch_size], options.max_length)
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for row in ids for t in row), dtype=np.int32, count=int(offsets[-1]))
        id_chunks.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)))
        full_chunks.append(pa.array(np.asarray(full, dtype=np.int32)))
    if not id_chunks:
        return pa.chunked_array([], pa.list_(pa.int32())), pa.chunked_array([], pa.int32())
    return pa.chunked_array(id_chunks), pa.chunked_array(full_chunks)


def encode_with_cache(tokenizer, texts: pd.Series, options, cache: memo.TokenCache):
    """(source table, row -> source position, texts encoded now, rows served by the cache): every text's ids from
    the cache or encoded.

    Texts are identified by a 128-bit hash. Distinct texts are encoded once. Should two different texts ever share
    a 64-bit half of it, the cache is bypassed for the run and every row is encoded.
    """
    import pyarrow as pa

    h1, h2 = memo.text_hashes(texts)
    cached = cache.load()
    c1, c2 = cached["h1"].to_numpy(), cached["h2"].to_numpy()
    position = pd.Index(c1).get_indexer(h1) if len(c1) else np.full(len(h1), -1, dtype=np.int64)
    found = position >= 0
    collision = bool((c2[position[found]] != h2[found]).any())
    missing = np.flatnonzero(~found)
    _, first = np.unique(h1[missing], return_index=True)
    new_rows = missing[np.sort(first)]
    if len(missing):
        representative = new_rows[pd.Index(h1[new_rows]).get_indexer(h1[missing])]
        collision = collision or bool((h2[representative] != h2[missing]).any())
    if collision:
        print("tokenize: warning: two texts share a 64-bit hash; the cache is bypassed for this run")
        cached, new_rows = memo.TokenCache.empty(), np.arange(len(texts))
        position = np.arange(len(texts), dtype=np.int64)
        found[:] = False
    else:
        position[missing] = len(c1) + pd.Index(h1[new_rows]).get_indexer(h1[missing])
    ids, full = encode_table(tokenizer, texts.iloc[new_rows].tolist(), options)
    new = pa.table({"h1": pa.array(h1[new_rows]), "h2": pa.array(h2[new_rows]), "input_ids": ids,
                    "full_length": full}).combine_chunks()
    source = pa.concat_tables([cached, new]).combine_chunks()
    if not collision:
        live = np.zeros(source.num_rows, dtype=bool)
        live[position] = True
        cache.update(source, len(c1), live)
    return source, position, len(new_rows), int(found.sum())


def token_dataset(source, position: np.ndarray, columns: dict, features: dict, salt):
    """One split as a datasets.Dataset: `input_ids` and `length` of the rows at `position` in the source table, plus
    the task's `columns` (name -> numpy array, one value per row) with their `features`; and each row's untruncated
    length.

    The dataset's fingerprint (saved in state.json) is a hash of its content and `salt`, not the random one `datasets`
    would pick: the same rows and tokenizer then give a byte-identical folder, which DVC sees as unchanged.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset, DatasetInfo, Features, Sequence, Value

    schema = Features({"input_ids": Sequence(Value("int32")), **features, "length": Value("int32")})
    taken = source.select(["input_ids", "full_length"]).take(pa.array(position, type=pa.int64())).combine_chunks()
    ids = taken.column("input_ids").chunk(0) if taken.num_rows else pa.array([], pa.list_(pa.int32()))
    lengths = pc.list_value_length(ids).cast(pa.int32())
    content = hashlib.blake2b(json.dumps(salt).encode(), digest_size=8)
    arrays = [lengths.to_numpy(zero_copy_only=False), ids.flatten().to_numpy(zero_copy_only=False),
              *columns.values()]
    for array in arrays:
        content.update(np.ascontiguousarray(array).tobytes())
    table = pa.table({"input_ids": ids, **{name: pa.array(values) for name, values in columns.items()},
                      "length": lengths})
    dataset = Dataset(table.cast(schema.arrow_schema), info=DatasetInfo(features=schema),
                      fingerprint=content.hexdigest())
    full = taken.column("full_length").to_numpy() if taken.num_rows else np.zeros(0, dtype=np.int32)
    return dataset, full.astype(np.int64)


def encode_splits(tokenizer, texts: dict[str, pd.Series], options, cache: memo.TokenCache):
    """Every split's texts through the cache: (source table, {split: row positions in it}, texts encoded now, rows
    served by the cache)."""
    joined = pd.concat(list(texts.values()), ignore_index=True)
    source, position, encoded, hits = encode_with_cache(tokenizer, joined, options, cache)
    positions, start = {}, 0
    for name, column in texts.items():
        positions[name] = position[start:start + len(column)]
        start += len(column)
    return source, positions, encoded, hits
