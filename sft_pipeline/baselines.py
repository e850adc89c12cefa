"""Baselines for a classifier, trained and scored on the same train and test rows as the fine-tuned model.

- `majority`: always the most frequent training label (scikit-learn's DummyClassifier): the score of knowing nothing.
- `tfidf_logreg`: character n-grams (1 to 3 characters within word boundaries, so it reads any script without a
  tokenizer: Chinese has no spaces) weighted by TF-IDF, and a logistic regression. Seconds at these sizes; it is
  what a user can train in one line, so a fine-tuned model that does not beat it is not worth its cost.

Above `MAX_TRAIN_ROWS` training rows, TF-IDF trains on a seeded sample of that many and says so.
"""

from __future__ import annotations

import time

import numpy as np

MAX_TRAIN_ROWS = 100_000
NGRAMS = (1, 3)


def _scores(actual, predicted) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": round(float(accuracy_score(actual, predicted)), 4),
            "macro_f1": round(float(f1_score(actual, predicted, average="macro", zero_division=0)), 4)}


def majority(train_labels: list[str], test_labels: list[str]) -> dict:
    from sklearn.dummy import DummyClassifier

    model = DummyClassifier(strategy="most_frequent").fit(np.zeros((len(train_labels), 1)), train_labels)
    predicted = model.predict(np.zeros((len(test_labels), 1)))
    return {**_scores(test_labels, predicted), "label": str(predicted[0]) if len(predicted) else None}


def tfidf_logreg(train_texts: list[str], train_labels: list[str], test_texts: list[str], test_labels: list[str],
                 seed: int = 0) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    started = time.perf_counter()
    note = None
    if len(train_texts) > MAX_TRAIN_ROWS:
        keep = np.sort(np.random.default_rng(seed).choice(len(train_texts), MAX_TRAIN_ROWS, replace=False))
        train_texts, train_labels = [train_texts[i] for i in keep], [train_labels[i] for i in keep]
        note = f"trained on a seeded sample of {MAX_TRAIN_ROWS} training rows"
    model = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=NGRAMS, sublinear_tf=True, min_df=2, max_features=300_000),
        LogisticRegression(max_iter=2000, C=10.0))
    model.fit(train_texts, train_labels)
    out = {**_scores(test_labels, model.predict(test_texts)), "train_rows": len(train_texts),
           "features": len(model[0].vocabulary_), "seconds": round(time.perf_counter() - started, 2)}
    return {**out, "note": note} if note else out


def compare(model_scores: dict, baselines: dict) -> list[str]:
    """One line per baseline the fine-tuned model does not beat on macro-F1 (empty when it beats them all)."""
    out = []
    for name, scores in baselines.items():
        if model_scores["macro_f1"] <= scores["macro_f1"]:
            out.append(f"the fine-tuned model's test macro-F1 {model_scores['macro_f1']:.4f} does not beat the "
                       f"{NAMES[name]} baseline's {scores['macro_f1']:.4f} on the same rows")
    return out


NAMES = {"majority": "majority-class", "tfidf_logreg": "TF-IDF character n-gram + logistic regression"}


def run(train_texts, train_labels, test_texts, test_labels) -> dict:
    return {"majority": majority(train_labels, test_labels),
            "tfidf_logreg": tfidf_logreg(train_texts, train_labels, test_texts, test_labels)}
