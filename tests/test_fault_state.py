"""State that must survive faults: the token cache, the train checkpoints and their MLflow run, the flows' state.

A kill is simulated in-process: at the chosen filesystem step the code raises `Killed`, and every later step of the
dying call does nothing (a killed process runs no cleanup either). The next run must then work and write what a
cold run writes.

    .venv/bin/python -m pytest tests/test_fault_state.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from sft_pipeline import memo
from sft_pipeline.encoding import SPLITS
from stages import split, tokenize
from tests.conftest import prepared_project, synthetic_rows
from tests.test_memo import add_validated_rows, run_tokenize, tokenize_outputs, with_cache


class Killed(BaseException):
    """The process died here (BaseException: no `except Exception` of the code under test catches it)."""


class KillSwitch:
    """Counts the filesystem steps (os.replace, Path.unlink, shutil.rmtree) made while `target` runs; at step `at` it
    raises Killed, and after that no step of the dying call has any effect."""

    def __init__(self, monkeypatch, owner, target: str, at: int):
        self.at, self.steps, self.active, self.dead = at, 0, False, False
        real_replace, real_unlink, real_rmtree = os.replace, Path.unlink, shutil.rmtree
        monkeypatch.setattr(os, "replace", self._step(real_replace))
        monkeypatch.setattr(Path, "unlink", self._step(real_unlink))
        monkeypatch.setattr(shutil, "rmtree", self._step(real_rmtree))
        real_target = getattr(owner, target)

        def watched(*args, **kwargs):
            self.active = True
            try:
                return real_target(*args, **kwargs)
            finally:
                self.active = False

        monkeypatch.setattr(owner, target, watched)

    def _step(self, real):
        def step(*args, **kwargs):
            if self.active:
                if self.dead:
                    return None
                self.steps += 1
                if self.steps == self.at:
                    self.dead = True
                    raise Killed(f"killed at step {self.at}")
            return real(*args, **kwargs)

        return step


def cache_folder(params) -> Path:
    (folder,) = params.paths.cache_dir.glob("tokenize/*")
    return folder


def listed_shards(params) -> list[str]:
    return json.loads((cache_folder(params) / memo.TokenCache.MANIFEST).read_text())["shards"]


def cached_texts(params) -> pd.Series:
    """h1 of every row in the shards the cache lists."""
    import pyarrow.feather as feather

    return pd.Series([h for name in listed_shards(params)
                      for h in feather.read_table(cache_folder(params) / name).column("h1").to_pylist()])


# ------------------------------------------------------------------------------------------------ token cache


def test_a_cache_left_with_every_text_twice_is_read_once_and_rewritten(tmp_path, tiny_bert, capsys):
    """The state a kill between writing a compacted shard and deleting the old ones left before shards.json existed:
    no list, the same texts in two shards. It made every later tokenize fail (pandas: 'Reindexing only valid with
    uniquely valued Index objects') until the cache was deleted by hand."""
    params, _ = prepared_project(tmp_path, tiny_bert)
    run_tokenize(with_cache(params, None), capsys)
    reference = tokenize_outputs(params)
    run_tokenize(params, capsys)
    folder = cache_folder(params)
    (shard,) = folder.glob("part-*.arrow")
    shutil.copy(shard, folder / "part-0-copy.arrow")
    (folder / memo.TokenCache.MANIFEST).unlink()

    capsys.readouterr()
    tokenize.run(params)
    out = capsys.readouterr().out
    assert "holds 120 texts twice" in out and "120 rows: 0 texts encoded, 120 rows from the cache" in out
    assert tokenize_outputs(params) == reference
    # Rewritten as one listed shard, each text once; the next run reads it without a warning.
    assert len(listed_shards(params)) == 1 and sorted(p.name for p in folder.iterdir()) == sorted(
        [memo.TokenCache.MANIFEST, *listed_shards(params)])
    assert cached_texts(params).is_unique and len(cached_texts(params)) == 120
    capsys.readouterr()
    tokenize.run(params)
    assert "warning" not in capsys.readouterr().out
    assert tokenize_outputs(params) == reference


def test_entries_of_one_text_that_disagree_discard_the_cache(tmp_path, tiny_bert, capsys):
    import pyarrow as pa
    import pyarrow.feather as feather

    params, _ = prepared_project(tmp_path, tiny_bert)
    run_tokenize(with_cache(params, None), capsys)
    reference = tokenize_outputs(params)
    run_tokenize(params, capsys)
    folder = cache_folder(params)
    (shard,) = listed_shards(params)
    table = feather.read_table(folder / shard)
    wrong = table.slice(0, 1).set_column(2, "input_ids", pa.array([[101, 7, 102]], pa.list_(pa.int32())))
    feather.write_feather(wrong, folder / "part-1-wrong.arrow")
    (folder / memo.TokenCache.MANIFEST).write_text(json.dumps({"shards": [shard, "part-1-wrong.arrow"]}))

    capsys.readouterr()
    tokenize.run(params)
    out = capsys.readouterr().out
    assert "different entries for one text; it is discarded" in out and "120 texts encoded" in out
    assert tokenize_outputs(params) == reference
    assert len(cached_texts(params)) == 120 and not (folder / "part-1-wrong.arrow").exists()


def test_a_listed_shard_that_is_missing_is_recomputed(tmp_path, tiny_bert, capsys):
    params, _ = prepared_project(tmp_path, tiny_bert)
    run_tokenize(with_cache(params, None), capsys)
    reference = tokenize_outputs(params)
    run_tokenize(params, capsys)
    (cache_folder(params) / listed_shards(params)[0]).unlink()
    capsys.readouterr()
    tokenize.run(params)
    out = capsys.readouterr().out
    assert "is unreadable (FileNotFoundError" in out and "120 texts encoded" in out
    assert tokenize_outputs(params) == reference
    assert run_tokenize(params, capsys) == (120, 0)


def new_rows(params, n: int) -> list[dict]:
    known = set(pd.read_parquet(params.paths.validated)["text"])
    return [r for r in synthetic_rows(45, seed=7, prefix="n") if r["text"] not in known][:n]


def keep_under_half(params) -> None:
    """A third of train, all of validation and test: fewer than half the cached texts stay in use."""
    parts = {name: pd.read_parquet(params.paths.split_dir / f"{name}.parquet") for name in SPLITS}
    parts["train"] = parts["train"].iloc[: len(parts["train"]) // 3]
    pd.concat(parts.values(), ignore_index=True).to_parquet(params.paths.validated)
    split.run(params)


@pytest.mark.parametrize("change", ["append", "compact"])
def test_a_kill_at_any_step_of_a_cache_update_leaves_a_cache_that_works(tmp_path, tiny_bert, capsys, monkeypatch,
                                                                       change):
    """append: a run with 12 new texts adds a shard; compact: a run that uses under half of the cached texts rewrites
    two shards as one. Killed at each of the update's filesystem steps in turn, the next run succeeds, writes what a
    cold run writes, and leaves a cache that serves every text with nothing else in its folder."""
    params, _ = prepared_project(tmp_path, tiny_bert)
    run_tokenize(params, capsys)
    add_validated_rows(params, new_rows(params, 12))
    if change == "compact":
        run_tokenize(params, capsys)
        assert len(listed_shards(params)) == 2
        keep_under_half(params)
    rows = sum(len(pd.read_parquet(params.paths.split_dir / f"{n}.parquet")) for n in SPLITS)
    run_tokenize(with_cache(params, None), capsys)
    reference = tokenize_outputs(params)
    before = tmp_path / "cache-before"
    shutil.copytree(params.paths.cache_dir, before)

    at = 0
    while True:
        at += 1
        shutil.rmtree(params.paths.cache_dir)
        shutil.copytree(before, params.paths.cache_dir)
        with monkeypatch.context() as patch:
            switch = KillSwitch(patch, memo.TokenCache, "update", at)
            try:
                tokenize.run(params)
            except Killed:
                pass
        if not switch.dead:
            break  # `at` is past the last step: every step was tried
        capsys.readouterr()
        tokenize.run(params)
        assert tokenize_outputs(params) == reference, f"killed at step {at}"
        assert run_tokenize(params, capsys) == (rows, 0), f"killed at step {at}"
        assert sorted(p.name for p in cache_folder(params).iterdir()) == sorted(
            [memo.TokenCache.MANIFEST, *listed_shards(params)]), f"killed at step {at}"
        assert cached_texts(params).is_unique
    # append: the new shard, shards.json; compact: the new shard, shards.json, the two old shards.
    assert at - 1 == {"append": 2, "compact": 4}[change]
