"""Labels the way users have them: any string, end to end, and a label set taken from the data when none is declared."""

import json
import random

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

from sft_pipeline.data import labels as votes
from sft_pipeline.names import safe_name
from sft_pipeline.params import ParamsError, parse
from sft_pipeline.tasks.classification import Validate, flat_test_metrics
from sft_pipeline.tracking import CHAMPION, flatten, use_store
from stages import clean, evaluate, split, tokenize, train, validate
from tests.conftest import project_params, write_csv, write_params

ODD = ["refund?", "a/b", "积极", "card payment"]
VOCABULARY = {
    "refund?": ["refund", "money", "back", "return", "order", "cancel", "charge", "receipt"],
    "a/b": ["test", "variant", "control", "experiment", "split", "bucket", "group", "cohort"],
    "积极": ["happy", "great", "love", "wonderful", "excellent", "glad", "smile", "joy"],
    "card payment": ["card", "visa", "payment", "declined", "pin", "terminal", "contactless", "debit"],
}


def odd_rows(n_per_class: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    for label, words in VOCABULARY.items():
        made = 0
        while made < n_per_class:
            text = " ".join(rng.choice(words) if rng.random() < 0.7 else rng.choice(["the", "a", "my", "is", "and"])
                            for _ in range(rng.randint(6, 10)))
            if text not in seen:
                seen.add(text)
                rows.append({"id": f"{label}-{made}", "text": text.capitalize() + ".", "label": label})
                made += 1
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("label", ["sport", "积极", "dépôt", "a_b", "v1.2", "x-y"])
def test_a_label_that_mlflow_takes_as_it_is_keeps_its_name(label):
    assert safe_name(label) == label


@pytest.mark.parametrize("label", ["refund?", "a/b", "card payment", "a:b", "..", "", "x" * 300, "a\nb", "a/../b"])
def test_any_other_label_gets_a_key_mlflow_and_file_systems_take(label):
    key = safe_name(f"test_f1_{label}")
    assert validate_param_and_metric_name(key) and not path_not_unique(key)
    assert len(key) <= 200 and "/" not in key


def test_labels_that_differ_only_in_unsafe_characters_get_different_keys():
    keys = {safe_name(label) for label in ["a/b", "a?b", "a b", "a:b", "a_b"]}
    assert len(keys) == 5
    # The same on every machine and run (blake2b of the label, no per-process salt): the key written in the README.
    assert safe_name("card payment") == "card_payment-fb6cc4" and safe_name("refund?") == "refund_-1c9574"


def test_flat_metrics_use_safe_keys_and_metrics_json_keeps_the_labels():
    per_class = {label: {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 4} for label in ODD}
    metrics = {"accuracy": 0.5, "macro": {"precision": 1, "recall": 1, "f1": 1},
               "weighted": {"precision": 1, "recall": 1, "f1": 1}, "per_class": per_class}
    flat = flat_test_metrics(metrics)
    assert flat["test_recall_积极"] == 0.25
    assert flat[f"test_f1_{safe_name('refund?')}"] == 1 / 3
    for key in flat:
        assert validate_param_and_metric_name(key) and not path_not_unique(key), key


def test_params_with_label_names_as_keys_are_one_json_param():
    flat = flatten({"validate": {"labels": {"refund?": ["Refund"], "a/b": []}, "min_chars": 3}})
    assert flat == {"validate.labels": '{"refund?": ["Refund"], "a/b": []}', "validate.min_chars": "3"}


def frame(labels: list[str]) -> pd.DataFrame:
    texts = [f"text number {i}" for i in range(len(labels))]
    return pd.DataFrame({"text": texts, "text_raw": texts, "label": labels,
                         "annotator": pd.Series([None] * len(labels), dtype="string"),
                         "source_file": "a.csv", "line": range(2, 2 + len(labels)), "id": None})


def test_without_declared_labels_the_set_is_found_and_spellings_merged_and_reported():
    from sft_pipeline.tasks.classification import Classification

    rows = frame(["card payment"] * 12 + ["Card Payment"] * 2 + ["refund?"] * 12 + ["积极"] * 10)
    options = Validate(min_per_class=10)
    kept, rejected, report = Classification().validate(rows, options)
    assert report["classes"] == {"card payment": 14, "refund?": 12, "积极": 10}
    assert list(report["classes"]) == sorted(report["classes"])
    assert report["labels_mapped"] == {"Card Payment -> card payment": 2}
    assert len(kept) + len(rejected) == len(rows) and rejected.empty
    assert set(kept["label"]) == {"card payment", "refund?", "积极"}
    warnings = Classification().warnings(report)
    assert "3 labels found in the data: 'card payment', 'refund?', '积极'" in warnings[0]
    assert "Card Payment -> card payment (2 rows)" in warnings[1]
    assert Classification().problems(kept, options) == []


def test_without_declared_labels_class_size_checks_still_apply():
    options = Validate(min_per_class=10)
    kept = frame(["a/b"] * 12 + ["积极"] * 3)
    problems = votes.check_classes(kept, options)
    assert len(problems) == 1 and problems[0].startswith("class '积极' has 3 rows, fewer than validate.min_per_class")
    one = votes.check_classes(frame(["a/b"] * 12), options)
    assert one == ["the data holds 1 label(s) ('a/b'); a classifier needs at least two"]


def test_declared_labels_still_reject_unknown_ones():
    rows = frame(["refund?"] * 3 + ["refunds"])
    canonical, reason, detail = votes.row_reasons(rows, Validate(labels={"refund?": [], "other": []}))
    assert reason.tolist()[-1] == "unknown_label" and canonical.tolist()[:3] == ["refund?"] * 3


def test_a_per_class_promotion_metric_is_written_with_the_label_and_becomes_its_mlflow_key(tmp_path):
    raw = project_params(tmp_path, mlflow__promotion_metric="test_f1_card payment")
    raw["validate"]["labels"] = {"card payment": [], "refund?": []}
    assert parse(raw).mlflow.promotion_metric == f"test_f1_{safe_name('card payment')}"
    raw["mlflow"]["promotion_metric"] = "test_f1_cash"
    with pytest.raises(ParamsError, match="'test_f1_cash' is not a metric of task classification"):
        parse(raw)
    del raw["validate"]["labels"]  # labels from the data: a per-class metric cannot be checked before validate
    assert parse(raw).mlflow.promotion_metric == "test_f1_cash"
    raw["validate"]["labels"] = {"only": []}
    with pytest.raises(ParamsError, match="declare at least two classes, or omit labels"):
        parse(raw)


def test_labels_with_punctuation_spaces_and_chinese_through_train_evaluate_and_registry(tmp_path, tiny_bert):
    raw = project_params(tmp_path, model=tiny_bert, train__epochs=3)
    del raw["validate"]["labels"]
    raw["mlflow"]["promotion_metric"] = "test_f1_refund?"
    params_file = write_params(tmp_path, raw)
    rows = odd_rows(16)
    rows[0] = {**rows[0], "label": rows[0]["label"].upper()}  # one spelling to merge (or a no-op for 积极)
    write_csv(tmp_path / "data/raw/tickets.csv", rows)
    for stage in (clean, validate, split, tokenize, train, evaluate):
        assert stage.main(["--params", str(params_file)]) == 0, stage.__name__
    params = parse(raw)

    report = json.loads(params.paths.validate_report.read_text())
    assert list(report["classes"]) == sorted(ODD) and sum(report["classes"].values()) == len(rows)
    metrics = json.loads(params.paths.metrics.read_text())
    assert set(metrics["per_class"]) == set(ODD)
    predictions = pd.read_csv(params.paths.predictions, dtype="string", keep_default_na=False)
    assert set(predictions["actual"]) == set(ODD) and set(predictions["predicted"]) <= set(ODD)
    details = json.loads(params.paths.evaluation.read_text())
    assert details["confusion_matrix"]["labels"] == sorted(ODD)
    assert details["mlflow_label_keys"] == {label: safe_name(label) for label in ["a/b", "card payment", "refund?"]}

    client = MlflowClient(use_store(params.paths))
    run_id = json.loads(params.paths.mlflow_run.read_text())["run_id"]
    logged = client.get_run(run_id).data.metrics
    for label in ODD:
        assert logged[f"test_f1_{safe_name(label)}"] == metrics["per_class"][label]["f1"]
    assert logged["test_f1_积极"] == metrics["per_class"]["积极"]["f1"]
    decision = json.loads(params.paths.promotion.read_text())
    assert decision["alias"] == CHAMPION and decision["metric"] == f"test_f1_{safe_name('refund?')}"

    model = mlflow.pyfunc.load_model(f"models:/{params.mlflow.registered_model}@{CHAMPION}")
    test = pd.read_parquet(params.paths.split_dir / "test.parquet")
    answer = model.predict(pd.DataFrame({"text": test["text"]}))
    assert answer["label"].tolist() == predictions["predicted"].tolist()


def test_a_confusion_matrix_of_chinese_labels_renders_every_glyph(tmp_path, recwarn):
    import warnings

    from PIL import Image

    from sft_pipeline import figures
    from sft_pipeline.tasks.classification import confusion_image

    labels = ["中性", "消极", "积极"]
    actual, predicted = ["积极", "消极", "中性", "积极"], ["积极", "中性", "中性", "消极"]
    assert figures.fallback_font_files(), "the Makefile installs mplfonts (Noto Sans CJK SC)"
    warnings.simplefilter("always")
    confusion_image(actual, predicted, labels, tmp_path / "cm.png")
    glyph_warnings = [str(w.message) for w in recwarn if "Glyph" in str(w.message) or "missing from" in str(w.message)]
    assert glyph_warnings == []
    assert figures.missing_glyphs(labels) == {} and figures.missing_glyphs(["ሀ"]) == {"ሀ": "ሀ"}
    assert Image.open(tmp_path / "cm.png").size[0] > 300
