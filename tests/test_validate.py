"""validate: label synonyms, row checks, conflict policies, kappa, thresholds and the row accounting."""

import json

import pandas as pd
import pytest

from sft_pipeline.data.labels import annotator_agreement, resolve_votes, synonym_map
from sft_pipeline.data.validation import validate_rows
from sft_pipeline.io import StageError
from sft_pipeline.params import parse
from sft_pipeline.tasks.classification import Classification, Validate
from stages import clean, validate
from tests.conftest import project_params, synthetic_rows, write_csv, write_params

OPTIONS = Validate(labels={"positive": ["pos", "积极", "POSITIVE"], "negative": ["neg"]}, min_chars=3, max_chars=40,
                   min_per_class=1)


def frame(rows):
    """rows: (text, label) or (text, label, annotator)."""
    return pd.DataFrame({
        "source_file": "a.csv",
        "line": range(2, len(rows) + 2),
        "id": [str(i) for i in range(len(rows))],
        "text": [r[0] for r in rows],
        "text_raw": [r[0] for r in rows],
        "label": [r[1] for r in rows],
        "annotator": [r[2] if len(r) > 2 else None for r in rows],
    })


def test_synonyms_map_case_insensitively():
    mapping = synonym_map(OPTIONS.labels)
    assert mapping["pos"] == mapping["positive"] == mapping["积极"] == "positive"
    assert mapping["neg"] == "negative"
    with pytest.raises(StageError, match="'X' is listed under both 'a' and 'b'"):
        synonym_map({"a": ["x"], "b": ["X"]})


def test_row_checks_each_get_a_reason():
    rows = [("fine text", " POSITIVE "), ("other text", "积极"), ("unknown one", "meh"), ("no label", ""),
            ("", "neg"), ("ab", "neg"), ("x" * 41, "neg"), ("good enough", "neg")]
    kept, rejected, report = validate_rows(Classification(), frame(rows), OPTIONS)
    assert kept[["text", "label"]].values.tolist() == [
        ["fine text", "positive"], ["other text", "positive"], ["good enough", "negative"]]
    assert dict(zip(rejected["line"], rejected["reason"])) == {
        4: "unknown_label", 5: "missing_label", 6: "empty_text", 7: "too_short", 8: "too_long"}
    assert report["rejected"] == {"empty_text": 1, "missing_label": 1, "too_long": 1, "too_short": 1,
                                  "unknown_label": 1}
    assert report["labels_mapped"] == {" POSITIVE  -> positive": 1, "neg -> negative": 1, "积极 -> positive": 1}
    assert report["rows_in"] == report["kept"] + sum(report["rejected"].values())


def test_majority_vote_resolves_and_merges():
    rows = [("text one", "pos", "a"), ("text one", "pos", "b"), ("text one", "neg", "c"),
            ("text two", "pos", "a"), ("text two", "neg", "b"),
            ("text three", "neg", "a"), ("text three", "neg", "a")]
    kept, dropped, stats = resolve_votes(frame(rows).assign(label=lambda f: f["label"].map(
        {"pos": "positive", "neg": "negative"})), OPTIONS)
    assert kept[["text", "label", "n_votes"]].values.tolist() == [["text one", "positive", 3],
                                                                  ["text three", "negative", 1]]
    assert kept["agreement"].round(3).tolist() == [0.667, 1.0]
    assert sorted(zip(dropped["line"], dropped["reason"])) == [
        (3, "merged_vote"), (4, "outvoted"), (5, "conflict_unresolved"), (6, "conflict_unresolved"),
        (8, "duplicate")]
    assert stats == {"texts_with_several_rows": 2, "conflicting_texts": 2, "resolved": 1, "unresolved": 1}


def test_min_agreement_and_drop_policy():
    rows = [("t", "positive", "a"), ("t", "positive", "b"), ("t", "negative", "c")]
    strict = OPTIONS.model_copy(update={"min_agreement": 0.75})
    kept, dropped, _ = resolve_votes(frame(rows), strict)
    assert kept.empty and set(dropped["reason"]) == {"conflict_unresolved"}
    drop = OPTIONS.model_copy(update={"conflict_policy": "drop"})
    kept, dropped, _ = resolve_votes(frame(rows), drop)
    assert kept.empty and dropped["reason"].tolist() == ["conflict"] * 3


def test_cohen_kappa_for_two_annotators():
    from sklearn.metrics import cohen_kappa_score

    a = ["positive", "positive", "negative", "negative", "positive", "negative"]
    b = ["positive", "negative", "negative", "negative", "positive", "positive"]
    rows = [(f"text {i}", la, "ann1") for i, la in enumerate(a)] + [(f"text {i}", lb, "ann2") for i, lb in enumerate(b)]
    result = annotator_agreement(frame(rows))
    assert result["method"] == "cohen"
    assert result["kappa"] == pytest.approx(cohen_kappa_score(a, b), abs=1e-4)
    assert result["kappa"] == pytest.approx(1 / 3, abs=1e-4)


def test_fleiss_kappa_for_three_annotators_agreeing_fully():
    rows = [(f"text {i}", "positive" if i % 2 else "negative", ann) for i in range(6) for ann in ("a", "b", "c")]
    result = annotator_agreement(frame(rows))
    assert result["method"] == "fleiss" and result["ratings_per_text"] == 3 and result["texts_used"] == 6
    assert result["kappa"] == pytest.approx(1.0)


def make_clean_outputs(tmp_path, rows, **overrides):
    raw = project_params(tmp_path, **overrides)
    write_csv(tmp_path / "data" / "raw" / "a.csv", rows)
    params = parse(raw)
    clean.run(params)
    return params, write_params(tmp_path, raw)


def test_run_writes_reports_and_keeps_accounting(tmp_path):
    rows = synthetic_rows(12) + [{"id": "x1", "text": "Unknown label text here", "label": "weather"},
                                 {"id": "x2", "text": "Sports synonym text", "label": "sports"}]
    params, _ = make_clean_outputs(tmp_path, rows)
    report = validate.run(params)
    assert report["passed"] and report["classes"] == {"sport": 13, "business": 12, "tech": 12}
    assert report["rejected"] == {"unknown_label": 1}
    assert report["overall"]["rows_read"] == 38 == report["kept"] + 1
    assert len(pd.read_parquet(params.paths.validated)) == 37
    assert "Status: **passed**" in params.paths.validate_summary.read_text()


def test_too_few_rows_in_a_class_fails_naming_class_file_and_counts(tmp_path, capsys):
    rows = [r for r in synthetic_rows(12) if r["label"] != "tech"] + synthetic_rows(12)[:0]
    rows += [r for r in synthetic_rows(12, seed=5) if r["label"] == "tech"][:4]
    params, params_file = make_clean_outputs(tmp_path, rows)
    assert validate.main(["--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert "class 'tech' has 4 rows, fewer than validate.min_per_class = 10 (4 from a.csv)" in err
    assert not params.paths.validated.exists()
    report = json.loads(params.paths.validate_report.read_text())
    assert report["passed"] is False and report["classes"]["tech"] == 4


def test_reject_fraction_threshold(tmp_path):
    rows = synthetic_rows(12) + [{"id": f"u{i}", "text": f"Unlabelled example {i}", "label": "??"} for i in range(4)]
    params, _ = make_clean_outputs(tmp_path, rows, validate__max_reject_fraction=0.05)
    with pytest.raises(StageError, match=r"4 of 40 rows \(10.0%\) were rejected.*a.csv: 4 of 40 rows \(unknown_label: 4\)"):
        validate.run(params)
