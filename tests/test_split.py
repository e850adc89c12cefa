"""split: exact per class, stable through a ledger, the user's own splits kept, and never a text in two splits."""

import json

import pandas as pd
import pytest

from stages import clean, split, validate
from sft_pipeline.data import splitting
from sft_pipeline.data.splitting import Ledger, assign_splits, hash_unit
from sft_pipeline.io import StageError
from sft_pipeline.params import ParamsError, Split, parse
from tests.conftest import make_project, project_params, synthetic_rows, write_csv

OPTIONS = Split()
RATIOS = OPTIONS.ratios


def frame(n: int, start: int = 0, labels=("a", "b")) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"example text number {i}" for i in range(start, start + n)],
                         "label": [labels[i % len(labels)] for i in range(start, start + n)]})


def classes(n_classes: int, per_class: int, prefix: str = "c", tag: str = "", first: int = 0) -> pd.DataFrame:
    names = [f"{prefix}{c}" for c in range(first, first + n_classes)]
    return pd.DataFrame({"text": [f"{name} utterance {tag}{i}" for name in names for i in range(per_class)],
                         "label": [name for name in names for _ in range(per_class)]})


def fresh() -> Ledger:
    return Ledger(OPTIONS.seed, dict(RATIOS))


def off_by(rows: pd.DataFrame, assigned: pd.Series) -> float:
    """The largest |count - ratio * class size| over every class and split."""
    counts = pd.crosstab(rows["label"], assigned).reindex(columns=list(RATIOS), fill_value=0)
    sizes = counts.sum(axis=1)
    return max(abs(counts[name] - ratio * sizes).max() for name, ratio in RATIOS.items())


def test_hash_is_fixed_for_a_text_and_seed():
    values = hash_unit(pd.Series(["Hello world", "hello   WORLD", "other"]), seed=42)
    assert values[0] == values[1] != values[2]
    assert 0 <= values.min() and values.max() < 1
    # Pinned: a change of hashing would silently move rows between splits of existing projects.
    assert values[2] == pytest.approx(0.47047857390501646, abs=1e-15)
    assert hash_unit(pd.Series(["other"]), 7)[0] != values[2]


def test_thirty_classes_of_twenty_reach_every_split_and_new_rows_move_nothing():
    first = classes(30, 20)
    ledger = fresh()
    before = assign_splits(first["text"], first["label"], None, ledger, OPTIONS)
    counts = pd.crosstab(first["label"], before.split)
    assert (counts["train"] == 16).all() and (counts["validation"] == 2).all() and (counts["test"] == 2).all()
    assert before.stats["rows_new"] == 600 and before.stats["keys_in_ledger"] == 600
    # Most rows are where the seeded hash cut (the rule before the ledger) puts them: an old project moves few.
    cut = splitting.hash_cut(hash_unit(first["text"], OPTIONS.seed), RATIOS)
    assert (before.split.cat.codes.to_numpy() == cut).mean() > 0.8

    # New texts: 7 more in ten classes, 3 in five, and a new class of 15; shuffled in among the old rows.
    added = pd.concat([classes(10, 7, tag="new"), classes(5, 3, tag="new", first=20),
                       classes(1, 15, prefix="fresh")], ignore_index=True)
    union = pd.concat([first, added], ignore_index=True).sample(frac=1, random_state=3)
    after = assign_splits(union["text"], union["label"], None, ledger, OPTIONS)
    assert (after.split.loc[first.index] == before.split).all()
    assert after.stats["rows_kept"] == 600 and after.stats["rows_new"] == len(added)
    assert off_by(union, after.split) < 1
    assert (pd.crosstab(union["label"], after.split) >= 1).all().all()

    # Without a ledger: one placement for the set of rows, whatever their order.
    cold = assign_splits(union["text"], union["label"], None, fresh(), OPTIONS)
    again = assign_splits(union["text"], union["label"], None, fresh(), OPTIONS)
    reordered = union.iloc[::-1]
    other = assign_splits(reordered["text"], reordered["label"], None, fresh(), OPTIONS)
    assert (cold.split == again.split).all()
    assert (other.split.loc[union.index] == cold.split).all()
    assert off_by(union, cold.split) < 1


def test_equal_keys_land_together_and_groups_still_fit_the_ratios():
    # Instruction data: one stratum, prompts asked several times (all copies of a prompt together).
    prompts = [f"prompt {i}" for i in range(300)] + ["Prompt  7", "PROMPT 7", "prompt 11"] + ["same"] * 12
    keys = pd.Series(prompts)
    result = assign_splits(keys, None, None, fresh(), OPTIONS)
    folded = keys.map(splitting.fold)
    assert result.split.groupby(folded, observed=True).nunique().max() == 1
    counts = result.split.value_counts()
    assert all(abs(counts[name] - ratio * len(keys)) < 1 for name, ratio in RATIOS.items())
    report = splitting.split_report(result, None, OPTIONS)
    assert report["beyond_one_row"] == [] and set(report["deviation"]) == set(RATIOS)


def test_user_rows_stay_and_count_in_the_deficits():
    rows = classes(2, 40)
    user = pd.Series(pd.NA, index=rows.index, dtype="string")
    user.iloc[:10] = "test"            # class c0: 10 user test rows, 4 by the ratios
    user.iloc[40:42] = "validation"    # class c1: 2 of its 4 validation rows given
    ledger = fresh()
    result = assign_splits(rows["text"], rows["label"], user, ledger, OPTIONS)
    assert (result.split.iloc[:10] == "test").all() and (result.split.iloc[40:42] == "validation").all()
    counts = pd.crosstab(rows["label"], result.split)
    # c0: test is over its share, takes nothing new; train and validation share the other 30 rows 8:1.
    assert counts.loc["c0"].to_dict() in ({"train": 27, "validation": 3, "test": 10},
                                          {"train": 26, "validation": 4, "test": 10})
    assert counts.loc["c1"].to_dict() == {"train": 32, "validation": 4, "test": 4}
    report = splitting.split_report(result, rows["label"], OPTIONS)
    assert "class 'c0': test has 10 rows, 4.00 by the ratios" in report["beyond_one_row"]
    assert result.stats["rows_user"] == 12 and len(ledger.user) == 12

    # The user later puts a text the ratios had placed in train into test: it moves, and the report says so.
    moved = user.copy()
    target = result.split[(result.split == "train") & (rows["label"] == "c1")].index[0]
    moved[target] = "test"
    again = assign_splits(rows["text"], rows["label"], moved, ledger, OPTIONS)
    assert again.split[target] == "test" and again.stats["rows_moved_by_user"] == 1
    assert (again.split.drop(target) == result.split.drop(target)).all()


def test_ledger_round_trip_and_a_changed_seed_starts_anew(tmp_path):
    path = tmp_path / "ledger.parquet"
    rows = frame(50)
    user = pd.Series(["test"] + [pd.NA] * 49, dtype="string")
    first = assign_splits(rows["text"], rows["label"], user, fresh(), OPTIONS)
    splitting.write_ledger(path, first.ledger)
    read, restarted = splitting.read_ledger(path, OPTIONS)
    assert restarted is None and read.splits == first.ledger.splits and read.user == first.ledger.user
    # Keys that left the data stay in the ledger, so a row that comes back returns to its split.
    some = rows.iloc[:20]
    later = assign_splits(some["text"], some["label"], None, read, OPTIONS)
    assert later.stats["keys_not_in_data"] == 30 and (later.split == first.split.iloc[:20]).all()

    reseeded, message = splitting.read_ledger(path, Split(seed=7))
    assert reseeded.splits == {} and "split.seed or split.ratios changed" in message and "seed 42" in message
    path.write_text("not parquet")
    with pytest.raises(StageError, match="not a split ledger.*dvc checkout"):
        splitting.read_ledger(path, OPTIONS)


def test_user_split_values_and_globs():
    named, invalid = splitting.parse_split_values(pd.Series([" Test", "train", "", None, "dev", "VALIDATION"]))
    assert named.tolist()[:2] == ["test", "train"] and named.tolist()[5] == "validation"
    assert named.isna().tolist() == [False, False, True, True, True, False]
    assert invalid.tolist() == [False, False, False, False, True, False]
    files = {"test": ["test*.csv", "benchmark/*.jsonl"], "validation": ["dev/*"]}
    assert splitting.file_splits(["test.csv", "benchmark/a/b.jsonl", "dev/x.csv", "train.csv"], files) == \
        {"test.csv": "test", "benchmark/a/b.jsonl": "test", "dev/x.csv": "validation", "train.csv": None}
    with pytest.raises(StageError, match=r"dev/test1.csv: matched by the split.files globs of test \('\*test\*'\), "
                                         r"validation \('dev/\*'\)"):
        splitting.file_splits(["dev/test1.csv"], {"test": ["*test*"], "validation": ["dev/*"]})


def test_a_text_given_two_splits_goes_with_every_copy_to_the_more_held_out():
    rows = pd.DataFrame({"source_file": ["test.csv", "train.csv", "train.csv", "train.csv", "train.csv"],
                         "line": [2, 2, 3, 4, 5], "id": ["t1", "a", "b", "c", "d"],
                         "text": ["Shared text", "shared   TEXT", "only in train", "shared text", "pinned"]})
    by_column = pd.Series([pd.NA, pd.NA, pd.NA, "train", "validation"], dtype="string")
    by_file = pd.Series(["test", "train", "train", "train", "train"], dtype="string")
    resolved, report = splitting.resolve_user_splits(rows, rows["text"], by_column, by_file)
    assert resolved.tolist() == ["test", "test", "train", "test", "validation"]
    c = report["conflicts"]
    assert c["texts_given_two_splits"] == 2  # the shared text, and line 5 (its column against its file)
    assert c["rows_moved_to_a_more_held_out_split"] == 2
    assert report["rows"] == {"train": 1, "validation": 1, "test": 3}
    assert [(e["line"], e["split"], e["because"]) for e in c["examples"]] == [
        (2, "test", "same text as test.csv:2"), (4, "test", "same text as test.csv:2"),
        (5, "validation", "its column and its file disagree")]


def test_split_params_are_strict(tmp_path):
    with pytest.raises(ParamsError, match="split.files: 'dev' is not a split"):
        parse(project_params(tmp_path, split__files={"dev": ["dev*.csv"]}))
    with pytest.raises(ParamsError, match="split.files.test: give at least one glob"):
        parse(project_params(tmp_path, split__files={"test": []}))
    with pytest.raises(ParamsError, match=r"split.colum: unknown key"):
        parse(project_params(tmp_path, split__colum="split"))


def test_run_writes_three_files_and_exact_class_counts(tmp_path):
    params = parse(project_params(tmp_path))
    data = frame(600, labels=("sport", "tech", "business")).assign(
        source_file="a.csv", line=range(600), id=None, n_votes=1, agreement=1.0)
    params.paths.validated.parent.mkdir(parents=True)
    data.to_parquet(params.paths.validated)
    report = split.run(params)
    parts = {name: pd.read_parquet(params.paths.split_dir / f"{name}.parquet") for name in RATIOS}
    assert report["rows"] == {name: len(p) for name, p in parts.items()} == {"train": 480, "validation": 60,
                                                                            "test": 60}
    assert report["classes"]["sport"] == {"train": 160, "validation": 20, "test": 20}
    texts = [set(p["text"]) for p in parts.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    ledger, restarted = splitting.read_ledger(params.paths.split_ledger, OPTIONS)
    assert restarted is None and len(ledger.splits) == 600 and ledger.user == set()


def test_a_class_missing_from_a_split_is_an_error(tmp_path):
    params = parse(project_params(tmp_path))
    data = frame(200).assign(source_file="a.csv", line=0, id=None, n_votes=1, agreement=1.0)
    data = pd.concat([data, pd.DataFrame({"text": ["lonely"], "label": ["rare"], "source_file": ["a.csv"],
                                          "line": [1], "id": [None], "n_votes": [1], "agreement": [1.0]})])
    params.paths.validated.parent.mkdir(parents=True)
    data.to_parquet(params.paths.validated)
    with pytest.raises(StageError, match="class 'rare' has no row in"):
        split.run(params)
    assert not params.paths.split_ledger.exists()


def run_data_stages(params):
    clean.run(params)
    validate.run(params)
    return split.run(params)


def membership(params) -> dict[str, str]:
    return {text: name for name in RATIOS for text in pd.read_parquet(params.paths.split_dir / f"{name}.parquet")["text"]}


def test_a_fixed_test_file_stays_test_while_new_rows_are_placed(tmp_path, capsys):
    params = parse(project_params(tmp_path, split__column="split", split__files={"test": ["benchmark/*.csv"]}))
    raw = params.paths.raw_dir
    train_rows = synthetic_rows(30, seed=1)
    bench = synthetic_rows(5, seed=2, prefix="b")
    shared = bench[0]
    # The same text (spaced and cased differently) in the train file, once as a plain row and once as a second vote.
    train_rows += [{"id": "copy1", "text": "  " + shared["text"].upper(), "label": shared["label"]},
                   {"id": "copy2", "text": shared["text"], "label": shared["label"], "annotator": "x"}]
    train_rows[0]["split"] = "dev"          # no such split: rejected
    train_rows[1]["split"] = "Validation"   # the user's word for one row
    write_csv(raw / "train.csv", train_rows, columns=("id", "text", "label", "annotator", "split"))
    write_csv(raw / "benchmark" / "official.csv", bench)
    report = run_data_stages(params)
    out = capsys.readouterr().out

    where = membership(params)
    bench_texts = {r["text"] for r in bench}
    assert {where[t] for t in bench_texts} == {"test"}
    assert where[train_rows[1]["text"]] == "validation"
    assert train_rows[0]["text"] not in where
    assert shared["text"].upper().strip() in {t for t, s in where.items() if s == "test"}
    user = report["user"]
    assert user["by_file"] == 15 and user["by_column"] == 1
    assert user["conflicts"]["rows_joining_their_text"] == 2
    assert {e["id"] for e in user["conflicts"]["examples"]} == {"copy1", "copy2"}
    assert "2 rows without a split joined a copy of their text that has one" in out
    assert "train.csv:92 (id copy1): no split -> test, same text as benchmark/official.csv:2" in out
    assert report["ledger"]["rows_user"] == 15 + 1 + 1  # the copy that stays a separate text (upper case) too

    rejected = pd.read_csv(params.paths.clean_rejected, dtype="string")
    bad = rejected[rejected["reason"] == "invalid_split"]
    assert bad["line"].tolist() == ["2"] and "'split' is 'dev', not train, validation or test" in bad["detail"].iloc[0]
    validation = json.loads(params.paths.validate_report.read_text())
    assert validation["overall"]["rows_read"] == 90 + 2 + 15 == validation["overall"]["kept"] + len(rejected) + \
        len(pd.read_csv(params.paths.validate_rejected))

    # New annotations: the benchmark stays the test split, no row moves, the others follow the ratios.
    write_csv(raw / "more.csv", synthetic_rows(12, seed=3, prefix="m"))
    again = run_data_stages(params)
    after = membership(params)
    assert {t: s for t, s in after.items() if t in where} == where
    assert again["ledger"]["rows_kept"] == len(where) - 17 and again["ledger"]["rows_new"] == 36
    assert {after[t] for t in bench_texts} == {"test"}


@pytest.mark.e2e
def test_the_ledger_survives_dvc_repro_and_remembers_rows_that_left(tmp_path):
    from tests.test_pipeline import dvc

    (tmp_path / "no-model").mkdir()
    root = make_project(tmp_path / "p", tmp_path / "no-model", synthetic_rows(30, seed=11))
    write_csv(root / "data/raw/batch2.csv", synthetic_rows(6, seed=12, prefix="n"))
    dvc(root, "repro", "split")
    ledger = root / "data/split_ledger.parquet"
    first, _ = splitting.read_ledger(ledger, OPTIONS)
    assert len(first.splits) == 108
    (root / "data/raw/batch2.csv").unlink()
    dvc(root, "repro", "split")
    second, _ = splitting.read_ledger(ledger, OPTIONS)
    report = json.loads((root / "reports/split.json").read_text())
    # DVC did not delete the ledger before the stage ran: batch2's keys are still there, every split unchanged.
    assert second.splits == first.splits
    assert report["ledger"]["keys_not_in_data"] == 18 and report["ledger"]["rows_kept"] == 90
    assert "path: data/split_ledger.parquet" in (root / "dvc.lock").read_text()
