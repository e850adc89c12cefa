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


# ------------------------------------------------------------------------------------------------ train checkpoints


def trainable_project(tmp_path, tiny_bert):
    """A tokenized tiny project whose base model is a copy in tmp_path/model (the test may change it); one epoch."""
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    params, params_file = prepared_project(tmp_path, model, train__epochs=1)
    tokenize.run(params)
    return params, params_file, model


def replace_weights_in_place(model: Path) -> None:
    """Other weights under the same name, size and mtime: as a model re-exported, or another seed's copy with -p."""
    import torch
    from transformers import BertConfig, BertModel

    weights = model / "model.safetensors"
    before, stat = weights.read_bytes(), weights.stat()
    torch.manual_seed(1)
    BertModel(BertConfig.from_pretrained(str(model))).save_pretrained(str(model))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns) and weights.read_bytes() != before


def test_a_checkpoint_is_resumed_only_from_the_same_base_weights(tmp_path, tiny_bert):
    from stages import train

    params, _, model = trainable_project(tmp_path, tiny_bert)
    first = train.run(params, track=False)
    steps = first["global_steps"]
    assert first["resumed_from"] is None and steps > 0
    again = train.run(params, track=False)  # same weights: the last checkpoint is resumed
    assert again["resumed_from"] == str(params.paths.checkpoints_dir / f"checkpoint-{steps}")

    replace_weights_in_place(model)
    third = train.run(params, track=False)
    assert third["resumed_from"] is None and third["global_steps"] == steps
    marker = json.loads((params.paths.checkpoints_dir / "fingerprint.json").read_text())
    import hashlib

    assert marker["weights"]["model.safetensors"] == hashlib.sha256(
        (model / "model.safetensors").read_bytes()).hexdigest()
    # The digests were remembered under paths.cache_dir and the rewritten file was read again, not taken from there.
    remembered = json.loads((params.paths.cache_dir / "files.json").read_text())
    assert remembered[str((model / "model.safetensors").resolve())]["sha256"] == marker["weights"]["model.safetensors"]


def test_a_hub_model_is_fingerprinted_by_the_files_of_its_cached_snapshot(tmp_path, tiny_bert, monkeypatch):
    import huggingface_hub.constants

    from sft_pipeline import training
    from sft_pipeline.params import Model

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_bert, snapshot)
    (snapshot / "README.md").write_text("a model card does not change the weights")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    hub = Model(name="someone/tiny-bert")
    assert training.model_folder(hub) == snapshot
    local = training.weights_fingerprint(Model(name=str(tiny_bert)))
    assert training.weights_fingerprint(hub) == local and "README.md" not in local
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(local)
    (snapshot / "config.json").write_text((snapshot / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert training.weights_fingerprint(hub)["config.json"] != local["config.json"]


def test_train_deletes_only_the_checkpoints_it_made(tmp_path):
    from sft_pipeline import training
    from sft_pipeline.io import StageError

    folder = tmp_path / "ck"
    assert training.prepare_checkpoints(folder, {"train": 1}) is None
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (folder / training.RUN_ID_FILE).write_text("abc")
    (folder / ".fingerprint.json.x1.tmp").write_text("")  # what a kill in an atomic write leaves

    # Stale (other params): what train made goes, the folder itself stays.
    inode = folder.stat().st_ino
    assert training.prepare_checkpoints(folder, {"train": 2}) is None
    assert sorted(p.name for p in folder.iterdir()) == [training.FINGERPRINT_FILE] and folder.stat().st_ino == inode

    # A file of the user's beside train's checkpoints: refused, stale or not, and nothing deleted.
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    (folder / "checkpoint-final.bin").write_text("mine too")
    for current in ({"train": 2}, {"train": 3}):
        with pytest.raises(StageError) as refused:
            training.prepare_checkpoints(folder, current)
        message = str(refused.value)
        assert str(folder) in message and "checkpoint-final.bin, notes.txt" in message
        assert "Move those files away, or set paths.checkpoints_dir" in message
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint-4", "checkpoint-final.bin", training.FINGERPRINT_FILE, "notes.txt"]


def test_train_refuses_a_checkpoints_folder_it_did_not_make(tmp_path, tiny_bert, capsys):
    from stages import train

    params, params_file, _ = trainable_project(tmp_path, tiny_bert)
    # Another tool's Trainer output, with no fingerprint.json of ours: it looks like checkpoints, and is not ours.
    theirs = params.paths.checkpoints_dir / "checkpoint-500"
    theirs.mkdir(parents=True)
    (theirs / "trainer_state.json").write_text("{}")
    capsys.readouterr()
    assert train.main(["--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert f"{params.paths.checkpoints_dir}: paths.checkpoints_dir holds checkpoint-500, which train did not make" \
        in err
    assert (theirs / "trainer_state.json").read_text() == "{}"
    assert not params.paths.model_dir.exists()


# ------------------------------------------------------------------------------------------------ MLflow run


def test_a_run_left_running_is_ended_killed_when_a_new_training_supersedes_it(tmp_path, tiny_bert):
    from mlflow.tracking import MlflowClient

    from sft_pipeline import tracking
    from sft_pipeline.io import read_json, write_json
    from stages import train

    params, _, _ = trainable_project(tmp_path, tiny_bert)
    client = MlflowClient(tracking.tracking_uri(params.paths))
    abandoned = client.create_run(tracking.experiment_id(params.paths, params.mlflow)).info.run_id
    write_json(params.paths.mlflow_run, {"run_id": abandoned})  # its process was killed; no checkpoints left

    train.run(params)
    first = read_json(params.paths.mlflow_run)["run_id"]
    assert first != abandoned
    old = client.get_run(abandoned)
    assert old.info.status == "KILLED" and old.data.tags["superseded.by"] == first
    assert "checkpoints were not resumed" in old.data.tags["superseded.reason"]
    assert client.get_run(first).info.status == "FINISHED"

    # Killed after its last checkpoint: the next training resumes it and continues the same run, as before.
    client.update_run(first, status="RUNNING")
    report = train.run(params)
    assert report["resumed_from"] is not None and read_json(params.paths.mlflow_run)["run_id"] == first
    resumed = client.get_run(first)
    assert resumed.info.status == "FINISHED" and "superseded.by" not in resumed.data.tags

    # Killed again, then the params change (the checkpoints are stale): a new run, and the old one ends KILLED.
    client.update_run(first, status="RUNNING")
    other = params.model_copy(update={"train": params.train.model_copy(update={"seed": 1})})
    report = train.run(other)
    second = read_json(params.paths.mlflow_run)["run_id"]
    assert report["resumed_from"] is None and second != first
    assert client.get_run(first).info.status == "KILLED"
    assert client.get_run(first).data.tags["superseded.by"] == second
    assert client.get_run(second).info.status == "FINISHED"
    assert client.get_run(abandoned).data.tags["superseded.by"] == first  # an ended run is left as it was


# ------------------------------------------------------------------------------------------------ flow state


def test_a_failed_write_of_the_watch_state_leaves_the_previous_state(tmp_path, monkeypatch):
    """The watch flow's body (watch_flow.fn, with the pipeline flow and Prefect's logger stood in for: no API server
    is needed) records data/raw's hash after a run; a disk that fills while the next state is written must leave the
    previous one, which then makes the next watch run the pipeline again rather than skip new annotations."""
    import errno
    import logging

    import flows.pipeline as flows_pipeline
    from sft_pipeline.params import parse
    from tests.conftest import project_params, write_csv, write_params

    raw = project_params(tmp_path)
    write_params(tmp_path, raw)
    params = parse(raw)
    state_file = params.paths.watch_state
    write_csv(params.paths.raw_dir / "a.csv", synthetic_rows(3))
    runs, ran_on = [], {}

    def pipeline(root):  # stands in for dvc repro: afterwards, DVC finds the raw folder up to date
        runs.append(root)
        ran_on["sha256"] = flows_pipeline.raw_fingerprint(params.paths.raw_dir)["sha256"]
        return {"clean": "ran"}

    def dvc_status(root):  # what `dvc status` says: clean is stale while data/raw differs from the last repro
        up_to_date = ran_on.get("sha256") == flows_pipeline.raw_fingerprint(params.paths.raw_dir)["sha256"]
        return {} if up_to_date else {"clean": [{"changed deps": {"data/raw": "modified"}}]}

    monkeypatch.setattr(flows_pipeline, "get_run_logger", lambda: logging.getLogger("test-watch"))
    monkeypatch.setattr(flows_pipeline, "pipeline_flow", pipeline)
    monkeypatch.setattr(flows_pipeline, "dvc_status", dvc_status)
    # No git or DVC here: the snapshot (dvc add) and the commit after a run are stood in for too.
    monkeypatch.setattr(flows_pipeline.versions, "snapshot", lambda root, paths: {})
    monkeypatch.setattr(flows_pipeline, "pin_run", lambda root, params, changes: {"commit": None})
    watch = flows_pipeline.watch_flow.fn

    assert watch(root=str(tmp_path))["ran"] is True
    recorded = state_file.read_text()
    assert json.loads(recorded)["sha256"] == flows_pipeline.raw_fingerprint(params.paths.raw_dir)["sha256"]
    assert watch(root=str(tmp_path)).name == flows_pipeline.SKIPPED and len(runs) == 1

    write_csv(params.paths.raw_dir / "b.csv", synthetic_rows(2, seed=4, prefix="b"))
    real_write = Path.write_text

    def disk_full(self, data, *args, **kwargs):
        real_write(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", disk_full)
        with pytest.raises(OSError, match="No space left"):
            watch(root=str(tmp_path))
    assert len(runs) == 2
    assert state_file.read_text() == recorded  # the previous state, whole
    assert sorted(p.name for p in state_file.parent.iterdir() if "watch" in p.name) == [state_file.name]

    # DVC ran for b.csv, so the next watch skips; the state it kept still says what is new since then.
    skipped = watch(root=str(tmp_path))
    assert skipped.name == flows_pipeline.SKIPPED and len(runs) == 2 and "1 new (b.csv)" in skipped.message

    write_csv(params.paths.raw_dir / "c.csv", synthetic_rows(2, seed=5, prefix="c"))
    assert watch(root=str(tmp_path))["ran"] is True and len(runs) == 3
    assert json.loads(state_file.read_text())["sha256"] == flows_pipeline.raw_fingerprint(
        params.paths.raw_dir)["sha256"]

    # A state file cut short before writes were atomic: read as absent (reported), not a crash; a run replaces it.
    state_file.write_text('{"sha256": "3f2a')
    skipped = watch(root=str(tmp_path))
    assert skipped.name == flows_pipeline.SKIPPED and "3 new (a.csv, b.csv, c.csv)" in skipped.message
    write_csv(params.paths.raw_dir / "d.csv", synthetic_rows(2, seed=6, prefix="d"))
    assert watch(root=str(tmp_path))["ran"] is True and len(runs) == 4
    assert json.loads(state_file.read_text())["files"] == 4
