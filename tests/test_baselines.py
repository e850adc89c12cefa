"""Baselines beside every classifier evaluation: majority class and TF-IDF character n-grams + logistic regression."""

import pytest

from sft_pipeline import baselines

TRAIN = [("the match ended with a late goal", "sport"), ("the team won the cup final", "sport"),
         ("a goal in the last minute of the match", "sport"), ("shares fell as the market opened", "business"),
         ("the bank reported a record profit", "business"), ("investors sold shares in the bank", "business"),
         ("profit warning hits the market", "business"), ("这部电影很好看", "积极"), ("非常好看的电影", "积极"),
         ("这部电影太难看了", "消极"), ("难看的电影，浪费时间", "消极")]
TEST = [("late goal wins the match", "sport"), ("the market and the shares", "business"), ("很好看", "积极"),
        ("太难看了", "消极"), ("a bank with profit", "business")]


def columns(rows):
    return [t for t, _ in rows], [label for _, label in rows]


def test_majority_baseline_predicts_the_most_frequent_training_label():
    got = baselines.majority(columns(TRAIN)[1], columns(TEST)[1])
    assert got == {"accuracy": 0.4, "macro_f1": round(2 * 0.4 / 1.4 / 4, 4), "label": "business"}


def test_tfidf_baseline_reads_english_and_chinese_without_a_tokenizer():
    got = baselines.tfidf_logreg(*columns(TRAIN), *columns(TEST))
    assert (got["accuracy"], got["macro_f1"]) == (1.0, 1.0)
    assert got["train_rows"] == 11 and got["features"] > 0 and "note" not in got


def test_a_very_large_training_set_is_sampled_and_said(monkeypatch):
    monkeypatch.setattr(baselines, "MAX_TRAIN_ROWS", 8)
    got = baselines.tfidf_logreg(*columns(TRAIN * 2), *columns(TEST))
    assert got["train_rows"] == 8 and got["note"] == "trained on a seeded sample of 8 training rows"


@pytest.mark.parametrize("model_f1, beaten", [(0.95, []), (0.9, ["tfidf_logreg"]), (0.05, ["majority", "tfidf_logreg"])])
def test_compare_says_which_baselines_the_model_does_not_beat(model_f1, beaten):
    lines = baselines.compare({"macro_f1": model_f1}, {"majority": {"macro_f1": 0.1}, "tfidf_logreg": {"macro_f1": 0.9}})
    assert len(lines) == len(beaten)
    for line, name in zip(lines, beaten):
        assert baselines.NAMES[name] in line and f"{model_f1:.4f}" in line
