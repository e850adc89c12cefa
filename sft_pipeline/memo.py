"""Caches kept between runs of a stage, so that new annotations cost only their own work.

    paths.cache_dir/clean/<key>/      one entry per raw file: its rows read and normalised, its rejected rows
    paths.cache_dir/tokenize/<key>/   token ids and untruncated lengths per distinct text, in Arrow shards
    paths.cache_dir/files.json        sha256 of the base model's files (train's checkpoint fingerprint), by stat

A cache is a memo and nothing more: each entry is addressed by everything its result depends on (the bytes of the
file or the text, the stage's params, the code of the stage and the versions of the libraries that compute it), so a
stage writes byte-identical outputs whether its cache is full, empty or deleted (tests/test_memo.py checks this).
DVC does not track these folders: deleting one, or setting `paths.cache_dir` to null, costs time and changes nothing
else. Entries are written to a temporary name and renamed, so a killed stage leaves no half-written entry; an entry
that cannot be read anyway is removed and recomputed, with a warning. The token cache lists its shards in shards.json,
replaced only after a new shard is in place and before old ones are deleted, so a kill at any step of an update leaves
a cache that reads each text once (tests/test_fault_state.py kills it at each step in turn).
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


def file_digests(files, memo_file: Path | None = None) -> dict[Path, str]:
    """{path: sha256 of its bytes}. With `memo_file`, a digest is reused while the file's resolved path, size,
    mtime, ctime and inode are the ones it was computed for: rewriting a file changes its ctime even when its size
    and mtime are put back, so only a changed file is read again (sha256 reads about 1.6 GB/s here; README)."""
    known = {}
    if memo_file is not None and Path(memo_file).is_file():
        try:
            known = json.loads(Path(memo_file).read_text())
        except ValueError:
            pass  # a memo that cannot be read is recomputed
    known = known if isinstance(known, dict) else {}
    out, seen = {}, {}
    for path in files:
        real = Path(path).resolve()
        info = real.stat()
        stamp = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
        entry = known.get(str(real))
        if isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str):
            out[path] = entry["sha256"]
        else:
            with open(real, "rb") as fh:
                out[path] = hashlib.file_digest(fh, "sha256").hexdigest()
        seen[str(real)] = {"stat": stamp, "sha256": out[path]}
    if memo_file is not None and any(known.get(k) != v for k, v in seen.items()):
        kept = {k: v for k, v in known.items() if Path(k).exists()}
        Path(memo_file).parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(Path(memo_file), lambda tmp: tmp.write_text(json.dumps({**kept, **seen}, indent=1)))
    return out


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

    `shards.json` names the shards that make up the cache, and is replaced (atomically) only after a new shard is in
    place; shards it does not name are deleted only after that. A kill at any point therefore leaves either the old
    list of shards or the new one, never both: a shard not yet listed, or no longer listed, is never read and is
    removed by the next update. A cache that is damaged anyway (a shard unreadable or missing, texts stored twice, as
    a cache written before shards.json could be left by a kill in its compaction) is read as far as it is sound, with
    a warning, and rewritten whole by the next update; entries of one text that disagree discard the cache.
    """

    COLUMNS = ("h1", "h2", "input_ids", "full_length")
    MANIFEST = "shards.json"

    def __init__(self, root: Path | None, key: dict):
        self.dir = None if root is None else Path(root) / "tokenize" / digest({"layout": LAYOUT, **key})
        # What load() found: the shards it read, whether shards.json listed them, whether to rewrite the cache whole.
        self.shards: list[str] | None = None
        self.listed = self.damaged = False

    def _listed(self) -> tuple[list[str], bool]:
        """(the shard names that make up the cache, whether shards.json said so)."""
        manifest = self.dir / self.MANIFEST
        if manifest.is_file():
            try:
                names = json.loads(manifest.read_text())["shards"]
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ValueError("'shards' is not a list of names")
                return names, True
            except Exception as exc:  # noqa: BLE001 - an unreadable list: read what is there, rewrite it
                _warn("tokenize", manifest, exc)
                self.damaged = True
        # No list (a cache written before there was one): every shard in the folder.
        return sorted(p.name for p in self.dir.glob("part-*.arrow")), False

    def load(self):
        """Every cached row as one Arrow table (possibly empty), each text once."""
        import pyarrow as pa
        import pyarrow.feather as feather

        self.shards, self.listed, self.damaged = [], False, False
        if self.dir is None or not self.dir.is_dir():
            return self.empty()
        names, self.listed = self._listed()
        tables = []
        for name in names:
            shard = self.dir / name
            try:
                table = feather.read_table(shard, memory_map=True)
                if tuple(table.column_names) != self.COLUMNS:
                    raise ValueError(f"columns {table.column_names}")
            except Exception as exc:  # noqa: BLE001 - a damaged or missing shard is recomputed
                _warn("tokenize", shard, exc)
                self.damaged = True
                continue
            tables.append(table)
            self.shards.append(name)
        if not tables:
            return self.empty()
        return self._unique(pa.concat_tables(tables))

    def _unique(self, table):
        """`table` with each text once; an empty table when two entries of one text disagree."""
        h1 = table.column("h1").to_numpy()
        _, first, inverse = np.unique(h1, return_index=True, return_inverse=True)
        if len(first) == len(h1):
            return table
        self.damaged = True
        again = np.flatnonzero(first[inverse] != np.arange(len(h1)))
        original = first[inverse[again]]
        agree = all(table.column(c).take(again).equals(table.column(c).take(original)) for c in self.COLUMNS)
        if not agree:
            print(f"tokenize: warning: the token cache {self.dir} holds different entries for one text; it is "
                  f"discarded and rebuilt")
            return self.empty()
        print(f"tokenize: warning: the token cache {self.dir} holds {len(again)} texts twice (a compaction cut short "
              f"by a kill?); each is read once and the cache is rewritten")
        return table.take(np.sort(first))

    @classmethod
    def empty(cls):
        import pyarrow as pa

        return pa.table({"h1": pa.array([], pa.uint64()), "h2": pa.array([], pa.uint64()),
                         "input_ids": pa.array([], pa.list_(pa.int32())), "full_length": pa.array([], pa.int32())})

    def update(self, source, cached_rows: int, live: np.ndarray) -> None:
        """Store the rows of `source` after the first `cached_rows` (the ones encoded now; the first ones are what
        load() returned); `live` marks the rows in use. When fewer than half of all rows are live, or the cache was
        damaged, the cache is rewritten as one shard of the live rows."""
        import pyarrow.feather as feather

        if self.dir is None:
            return
        if self.shards is None:
            raise RuntimeError("TokenCache.update() needs the state of load(): call load() first")
        self.dir.mkdir(parents=True, exist_ok=True)
        _remove_other_keys(self.dir)
        before = self.shards
        compact = self.damaged or bool(before and live.sum() * 2 < len(live))
        table = source.filter(live) if compact else source.slice(cached_rows)
        shards = [] if compact else list(before)
        if table.num_rows:
            name = f"part-{uuid.uuid4().hex}.arrow"
            _write_atomic(self.dir / name, lambda tmp: feather.write_feather(table, tmp))
            shards.append(name)
        if shards != before or not self.listed:
            _write_atomic(self.dir / self.MANIFEST, lambda tmp: tmp.write_text(json.dumps({"shards": shards})))
        # Only now is every other file unused: the shards compacted away, and what a killed run left (a shard it
        # wrote but never listed, a temporary file).
        for path in self.dir.iterdir():
            if path.name in shards or path.name == self.MANIFEST:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self.shards, self.listed, self.damaged = shards, True, False
