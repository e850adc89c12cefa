"""The stage caches (sft_pipeline/memo.py): outputs are byte-identical with a full, empty, damaged or absent cache, and a
warm run only does the work of what is new."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from tests.conftest import prepared_project, project_params, synthetic_rows, write_csv
from sft_pipeline import memo
from sft_pipeline.encoding import SPLITS
from stages import clean, split, tokenize
from sft_pipeline.params import parse


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tokenize_outputs(params) -> dict:
    out = folder_digest(params.paths.tokenized_dir)
    out["report"] = params.paths.tokenize_report.read_text()
    return out


def with_cache(params, cache_dir):
    return params.model_copy(update={"paths": params.paths.model_copy(update={"cache_dir": cache_dir})})


def run_tokenize(params, capsys) -> tuple[int, int]:
    """Run the stage; (rows, texts encoded) as it printed them."""
    capsys.readouterr()
    tokenize.run(params)
    line = next(l for l in capsys.readouterr().out.splitlines() if "texts encoded" in l)
    rows, encoded = line.split(": ")[1].split(" rows")[0], line.split(": ")[2].split(" texts")[0]
    return int(rows), int(encoded)


def add_validated_rows(params, rows: list[dict]) -> None:
    frame = pd.read_parquet(params.paths.validated)
    extra = pd.DataFrame(rows).assign(source_file="b.csv", line=range(2, 2 + len(rows)), n_votes=1, agreement=1.0)
    pd.concat([frame, extra[frame.columns]], ignore_index=True).to_parquet(params.paths.validated)
    split.run(params)


def test_token_cache_warm_run_encodes_nothing_and_writes_identical_files(tmp_path, tiny_bert, capsys):
    params, _ = prepared_project(tmp_path, tiny_bert)
    assert params.paths.cache_dir == tmp_path / ".cache/stages"
    no_cache = with_cache(params, None)
    assert run_tokenize(no_cache, capsys) == (120, 120)
    reference = tokenize_outputs(params)
    assert not params.paths.cache_dir.exists()  # with cache_dir null, nothing is written there

    assert run_tokenize(params, capsys) == (120, 120)  # cold cache: everything encoded once
    assert tokenize_outputs(params) == reference
    shards = list(params.paths.cache_dir.glob("tokenize/*/part-*.arrow"))
    assert len(shards) == 1
    assert run_tokenize(params, capsys) == (120, 0)  # warm: nothing encoded
    assert tokenize_outputs(params) == reference
    assert list(params.paths.cache_dir.glob("tokenize/*/part-*.arrow")) == shards  # nothing new to store


def test_token_cache_encodes_only_new_texts_and_matches_a_cold_run(tmp_path, tiny_bert, capsys):
    params, _ = prepared_project(tmp_path, tiny_bert)
    run_tokenize(params, capsys)
    new = [r for r in synthetic_rows(45, seed=7, prefix="n") if r["text"] not in
           set(pd.read_parquet(params.paths.validated)["text"])][:12]
    # One new text twice (validate keeps such rows when annotators agree): encoded once.
    add_validated_rows(params, new + [dict(new[0], id="again")])
    capsys.readouterr()
    tokenize.run(params)
    assert "133 rows: 12 texts encoded, 120 rows from the cache" in capsys.readouterr().out
    warm = tokenize_outputs(params)
    assert len(list(params.paths.cache_dir.glob("tokenize/*/part-*.arrow"))) == 2

    capsys.readouterr()
    tokenize.run(with_cache(params, None))
    assert "133 rows: 132 texts encoded, no cache (paths.cache_dir is null)" in capsys.readouterr().out
    assert tokenize_outputs(params) == warm


def test_token_cache_is_keyed_by_max_length_and_compacted(tmp_path, tiny_bert, capsys):
    params, _ = prepared_project(tmp_path, tiny_bert)
    run_tokenize(params, capsys)
    first_key = {p.parent.name for p in params.paths.cache_dir.glob("tokenize/*/part-*.arrow")}
    longer = params.model_copy(update={"tokenize": params.tokenize.model_copy(update={"max_length": 48})})
    assert run_tokenize(longer, capsys) == (120, 120)  # another max_length: nothing reusable
    second_key = {p.parent.name for p in params.paths.cache_dir.glob("tokenize/*/part-*.arrow")}
    assert len(second_key) == 1 and second_key != first_key  # the other length's cache is removed

    # Keep under half of the rows (a third of train, all of validation and test, so every class keeps every split):
    # the cache is rewritten as one shard holding only those.
    parts = {name: pd.read_parquet(params.paths.split_dir / f"{name}.parquet") for name in SPLITS}
    parts["train"] = parts["train"].iloc[: len(parts["train"]) // 3]
    kept = pd.concat(parts.values(), ignore_index=True)
    assert len(kept) < 60
    kept.to_parquet(params.paths.validated)
    split.run(params)
    assert run_tokenize(longer, capsys) == (len(kept), 0)
    shards = list(params.paths.cache_dir.glob("tokenize/*/part-*.arrow"))
    assert len(shards) == 1
    import pyarrow.feather as feather

    assert feather.read_table(shards[0]).num_rows == len(kept)


def test_damaged_token_cache_is_recomputed(tmp_path, tiny_bert, capsys):
    params, _ = prepared_project(tmp_path, tiny_bert)
    run_tokenize(params, capsys)
    reference = tokenize_outputs(params)
    shard = next(params.paths.cache_dir.glob("tokenize/*/part-*.arrow"))
    shard.write_bytes(b"not arrow at all")
    tokenize.run(params)
    out = capsys.readouterr().out
    assert f"cache entry {shard} is unreadable" in out and "120 texts encoded" in out
    assert tokenize_outputs(params) == reference


def test_hash_collision_bypasses_the_token_cache(tmp_path, tiny_bert, capsys, monkeypatch):
    params, _ = prepared_project(tmp_path, tiny_bert)
    run_tokenize(with_cache(params, None), capsys)
    reference = tokenize_outputs(params)
    real = memo.text_hashes

    def colliding(texts):
        h1, h2 = real(texts)
        return np.zeros_like(h1), h2  # every text shares its first half

    monkeypatch.setattr(memo, "text_hashes", colliding)
    tokenize.run(params)
    out = capsys.readouterr().out
    assert "cache is bypassed" in out and "120 texts encoded" in out
    assert tokenize_outputs(params) == reference
    assert not list(params.paths.cache_dir.glob("tokenize/*/part-*.arrow"))


# ------------------------------------------------------------------------------------------------ clean

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bad_input"
# Every fixture that clean reads (the others stop the stage), so the cache round-trips each kind of row.
READABLE = ["bom.csv", "latin1.csv", "malformed_quotes.csv", "too_many_fields.csv", "empty_text.csv", "nan.csv",
            "nan.jsonl", "whitespace_only.csv", "unknown_label.csv", "label_synonyms.csv", "duplicates.csv",
            "conflicting_labels.csv", "html.csv", "control_zero_width.csv", "long_text.csv", "empty.csv",
            "header_only.csv", "broken_line.jsonl"]


def clean_project(tmp_path):
    params = parse(project_params(tmp_path))
    raw = params.paths.raw_dir
    raw.mkdir(parents=True)
    for name in READABLE:
        shutil.copy(FIXTURES / name, raw / name)
    # Cross-file duplicates: the second file repeats rows of the first.
    rows = synthetic_rows(10, seed=5)
    write_csv(raw / "good_a.csv", rows)
    write_csv(raw / "good_b.csv", rows[:5] + synthetic_rows(3, seed=6, prefix="b"))
    return params


def clean_outputs(params) -> dict:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest()
            for p in (params.paths.clean, params.paths.clean_rejected, params.paths.clean_report)}


def run_clean(params, capsys) -> int:
    """Run clean; how many files it took from the cache."""
    capsys.readouterr()
    clean.run(params)
    line = next((l for l in capsys.readouterr().out.splitlines() if "taken from the cache" in l), None)
    return -1 if line is None else int(line.split(": ")[1].split(" of ")[0])


def test_clean_cache_gives_identical_outputs_for_every_kind_of_row(tmp_path, capsys):
    params = clean_project(tmp_path)
    files = len(list(params.paths.raw_dir.iterdir()))
    assert run_clean(with_cache(params, None), capsys) == -1
    reference = clean_outputs(params)
    report = json.loads(params.paths.clean_report.read_text())
    assert report["totals"]["rejected"]["duplicate"] >= 5 + 2  # the cross-file ones and the fixture's own
    assert report["totals"]["decoded_with_fallback"] == 1

    assert run_clean(params, capsys) == 0
    assert clean_outputs(params) == reference
    assert run_clean(params, capsys) == files
    assert clean_outputs(params) == reference


def test_clean_cache_follows_changed_added_and_removed_files(tmp_path, capsys):
    params = clean_project(tmp_path)
    raw = params.paths.raw_dir
    run_clean(params, capsys)
    files = len(list(raw.iterdir()))
    entries = lambda: len([p for p in params.paths.cache_dir.glob("clean/*/*") if not p.name.startswith(".")])
    assert entries() == files

    # good_a.csv edited (one row's label changes), good_c.csv added, good_b.csv removed.
    text = (raw / "good_a.csv").read_text()
    (raw / "good_a.csv").write_text(text.replace(",sport\n", ",tech\n", 1))
    write_csv(raw / "good_c.csv", synthetic_rows(4, seed=9, prefix="c"))
    (raw / "good_b.csv").unlink()
    assert run_clean(params, capsys) == files - 2  # every file but the edited and the new one
    warm = clean_outputs(params)
    assert entries() == files  # the removed file's and the old good_a.csv's entries are gone

    run_clean(with_cache(params, None), capsys)
    assert clean_outputs(params) == warm

    # Other clean params: nothing can be reused, and the old entries are removed.
    lower = params.model_copy(update={"clean": params.clean.model_copy(update={"lowercase": True})})
    assert run_clean(lower, capsys) == 0
    assert len(list(params.paths.cache_dir.glob("clean/*"))) == 1
    kept = pd.read_parquet(params.paths.clean)
    assert (kept["text"] == kept["text"].str.lower()).all()


def test_damaged_clean_cache_entry_is_recomputed(tmp_path, capsys):
    params = clean_project(tmp_path)
    run_clean(params, capsys)
    reference = clean_outputs(params)
    entry = next(p for p in params.paths.cache_dir.glob("clean/*/*") if (p / "rows.parquet").is_file())
    (entry / "rows.parquet").write_bytes(b"PAR1 damaged")
    clean.run(params)
    assert f"cache entry {entry} is unreadable" in capsys.readouterr().out
    assert clean_outputs(params) == reference
