"""Caches kept between runs of a stage, so that new annotations cost only their own work.

    paths.cache_dir/clean/<key>/      one entry per raw file: its rows read and normalised, its rejected rows
    paths.cache_dir/tokenize/<key>/   token ids and untruncated lengths per distinct text, in Arrow shards

A cache is a memo and nothing more: each entry is addressed by everything its result depends on (the bytes of the
file or the text, the stage's params, the code of the stage and the versions of the libraries that compute it), so a
stage writes byte-identical outputs whether its cache is full, empty or deleted (tests/test_memo.py checks this).
DVC does not track these folders: deleting one, or setting `paths.cache_dir` to null, costs time and changes nothing
else. Entries are written to a temporary name and renamed, so a killed stage leaves no half-written entry; an entry
that cannot be read anyway is removed and recomputed, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# Bump when the layout of an entry changes: older entries are then ignored.
LAYOUT = 1


def digest(data: Any) -> str:
    """A short stable hash of JSON-able data (a cache key)."""
    return hashlib.blake2b(json.dumps(data, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def file_digest(path: Path) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def source_digest(*modules: str) -> str:
    """Hash of the source files of `modules` (e.g. "sft_pipeline.encoding"): new code never reads an old code's entries."""
    import importlib.util

    hasher = hashlib.blake2b(digest_size=16)
    for name in modules:
        origin = importlib.util.find_spec(name).origin
        hasher.update(Path(origin).read_bytes())
    return hasher.hexdigest()


def library_versions(*names: str) -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in names}


def text_hashes(texts) -> tuple[np.ndarray, np.ndarray]:
    """A 128-bit blake2b hash of each text's UTF-8 bytes, as two uint64 halves (about 0.6 s per million texts)."""
    joined = b"".join(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                      for text in texts)
    halves = np.frombuffer(joined, dtype="<u8").reshape(-1, 2)
    return halves[:, 0].copy(), halves[:, 1].copy()


def _write_atomic(final: Path, write) -> None:
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_other_keys(folder: Path) -> int:
    """Remove the caches beside `folder`: those made under other keys (params, tokenizer, code); return how many."""
    removed = 0
    for other in folder.parent.iterdir() if folder.parent.is_dir() else ():
        if other != folder:
            shutil.rmtree(other, ignore_errors=True)
            removed += 1
    return removed


def _warn(stage: str, path: Path, exc: Exception) -> None:
    print(f"{stage}: warning: cache entry {path} is unreadable ({type(exc).__name__}: {exc}); removed, recomputing")


# ------------------------------------------------------------------------------------------------ clean


class FileCache:
    """Per raw file: the frames a stage derived from it, keyed by the file's bytes, its name and the stage's key.

    Disabled (every lookup misses, nothing is written) when `root` is None.
    """

    def __init__(self, root: Path | None, stage: str, key: dict):
        self.stage = stage
        self.dir = None if root is None else Path(root) / stage / digest({"layout": LAYOUT, **key})
        self.hits = self.misses = 0
        self.used: set[str] = set()

    def _entry(self, name: str, content: str) -> str:
        return digest({"name": name, "content": content})

    def get(self, name: str, content: str) -> tuple[dict[str, pd.DataFrame], dict] | None:
        """(frames, metadata) stored for this file name and content digest, or None."""
        if self.dir is None:
            return None
        entry = self.dir / self._entry(name, content)
        self.used.add(entry.name)
        if not (entry / "meta.json").is_file():
            self.misses += 1
            return None
        try:
            meta = json.loads((entry / "meta.json").read_text())
            frames = {f: pd.read_parquet(entry / f"{f}.parquet") for f in meta["frames"]}
        except Exception as exc:  # noqa: BLE001 - any damage to an entry means: recompute it
            _warn(self.stage, entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
            self.misses += 1
            return None
        self.hits += 1
        return frames, meta["meta"]

    def put(self, name: str, content: str, frames: dict[str, pd.DataFrame], meta: dict) -> None:
        if self.dir is None:
            return
        entry = self.dir / self._entry(name, content)
        tmp = self.dir / f".{entry.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        try:
            for frame_name, frame in frames.items():
                frame.to_parquet(tmp / f"{frame_name}.parquet", index=False)
            (tmp / "meta.json").write_text(json.dumps({"frames": list(frames), "meta": meta}))
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def prune(self) -> int:
        """Remove the entries of files that are gone or changed, and caches made under other keys; return how many."""
        if self.dir is None:
            return 0
        removed = _remove_other_keys(self.dir)
        for entry in self.dir.iterdir() if self.dir.is_dir() else ():
            if entry.name not in self.used:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed


# ------------------------------------------------------------------------------------------------ tokenize


class TokenCache:
    """Token ids and untruncated lengths per distinct text, for one tokenizer and max_length (the key).

    Each run that tokenizes new texts adds one Arrow shard (h1, h2, input_ids, full_length); `h1` is unique over all
    shards. When less than half the cached texts are still in use, the shards are rewritten as one.
    """

    COLUMNS = ("h1", "h2", "input_ids", "full_length")

    def __init__(self, root: Path | None, key: dict):
        self.dir = None if root is None else Path(root) / "tokenize" / digest({"layout": LAYOUT, **key})

    def load(self):
        """Every cached row as one Arrow table (possibly empty)."""
        import pyarrow as pa
        import pyarrow.feather as feather

        tables = []
        for shard in sorted(self.dir.glob("part-*.arrow")) if self.dir is not None and self.dir.is_dir() else ():
            try:
                table = feather.read_table(shard, memory_map=True)
                if tuple(table.column_names) != self.COLUMNS:
                    raise ValueError(f"columns {table.column_names}")
                tables.append(table)
            except Exception as exc:  # noqa: BLE001 - a damaged shard is recomputed
                _warn("tokenize", shard, exc)
                shard.unlink(missing_ok=True)
        if not tables:
            return self.empty()
        return pa.concat_tables(tables)

    @classmethod
    def empty(cls):
        import pyarrow as pa

        return pa.table({"h1": pa.array([], pa.uint64()), "h2": pa.array([], pa.uint64()),
                         "input_ids": pa.array([], pa.list_(pa.int32())), "full_length": pa.array([], pa.int32())})

    def update(self, source, cached_rows: int, live: np.ndarray) -> None:
        """Store the rows of `source` after the first `cached_rows` (the ones encoded now); `live` marks the rows in
        use. When fewer than half of all rows are live, the cache is rewritten as one shard of the live rows."""
        import pyarrow.feather as feather

        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        _remove_other_keys(self.dir)
        old = list(self.dir.glob("part-*.arrow"))
        compact = old and live.sum() * 2 < len(live)
        table = source.filter(live) if compact else source.slice(cached_rows)
        if table.num_rows:
            _write_atomic(self.dir / f"part-{uuid.uuid4().hex}.arrow", lambda tmp: feather.write_feather(table, tmp))
        if compact:
            for shard in old:
                shard.unlink(missing_ok=True)
