"""Task `classification`: a text in, one of a declared set of labels out (`task.type: classification`).

Rows: `text`, `label`, and optionally `id` and `annotator` (column names in clean.columns). clean normalises the
text (HTML, Unicode, whitespace; lowercasing and punctuation removal on request) and strips label and annotator;
validate maps labels and synonyms to validate.labels, rejects unknown labels and texts out of the length limits, and
resolves texts labelled more than once by annotator votes (sft_pipeline.data.labels); split keeps each class in every
split; tokenize encodes the text with the label as a ClassLabel; train builds `AutoModelForSequenceClassification`
with a new head for the labels; evaluate reports accuracy, macro and weighted precision/recall/F1, per-class scores,
the confusion matrix and the most confident errors; the served model takes raw texts and answers label and score.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from sft_pipeline import params as common
from sft_pipeline.data import labels as votes
from sft_pipeline.data.readers import Field as ReadField
from sft_pipeline.data.text import normalize_text
from sft_pipeline.data.validation import rejected_rows
from sft_pipeline.names import safe_name
from sft_pipeline.tasks.base import describe, Encoded, Evaluation, InputError, scalar, Task

CLEAN_COLUMNS = ["source_file", "line", "id", "text", "text_raw", "label", "annotator"]
VALIDATED_COLUMNS = ["text", "label", "source_file", "line", "id", "n_votes", "agreement"]
AVERAGES = ("macro", "weighted")
SCORES = ("precision", "recall", "f1")


# ------------------------------------------------------------------------------------------------ params


class Columns(common.Section):
    """Column (or JSON key) names in the annotation files. `id` and `annotator` are optional in the files."""

    text: str = "text"
    label: str = "label"
    id: str = "id"
    annotator: str = "annotator"


class Clean(common.Clean):
    columns: Columns = Columns()
    # Prodigy binary decisions: `answer: reject` on label X means the text is not X. This makes it the label
    # "not X" ({label} is X), so a binary textcat export trains a two-class model as it is; null rejects those
    # records (answer_reject) instead, e.g. when the file holds decisions on several labels.
    prodigy_rejected: str | None = "not {label}"

    lowercase: bool = False
    remove_punctuation: bool = False

    @model_validator(mode="after")
    def _rejected_label_is_another_label(self) -> "Clean":
        template = self.prodigy_rejected
        if template is not None and (not template.strip() or template.strip() == "{label}"):
            raise ValueError(f"prodigy_rejected: {template!r} would make a rejected label blank or the label itself; "
                             "give a template such as 'not {label}', or null")
        return self


class Validate(common.Validate):
    # canonical label -> synonyms; matching is case-insensitive after NFKC and whitespace trimming. A label is any
    # string (spaces, punctuation, any script). Omitted (or null): the labels are those found in the data, reported
    # sorted by validate, with spellings that differ only in case or Unicode form merged and listed.
    labels: dict[str, list[str]] | None = None
    conflict_policy: Literal["majority", "drop"] = "majority"
    # Share of the votes the winning label needs; ties never win.
    min_agreement: float = Field(0.5, gt=0, le=1)
    min_per_class: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _labels_well_formed(self) -> "Validate":
        if self.labels is not None and len(self.labels) < 2:
            raise ValueError("labels: declare at least two classes, or omit labels to take those in the data")
        blank = [name for name in self.labels or {} if not name.strip()]
        if blank:
            raise ValueError(f"labels: a label is blank ({blank[0]!r})")
        return self


class Evaluate(common.Evaluate):
    top_errors: int = Field(20, ge=0)


class Mlflow(common.Mlflow):
    registered_model: str = "sft-classifier"
    promotion_metric: str = "test_macro_f1"


class TaskSection(common.Task):
    type: Literal["classification"] = "classification"


class Params(common.Params):
    task: TaskSection = TaskSection()
    clean: Clean = Clean()
    validate_: Validate = Field(Validate(), alias="validate")
    evaluate: Evaluate = Evaluate()
    mlflow: Mlflow = Mlflow()

    @model_validator(mode="after")
    def _enough_per_class_for_every_split(self) -> "Params":
        # The split gives a class of n rows ratio * n rows of each split, rounded up or down (data/splitting.py):
        # at least one as soon as ratio * n >= 1.
        smallest = min(self.split.ratios.values())
        needed = math.ceil(1 / smallest - 1e-9)
        if self.validate_.min_per_class < needed:
            raise ValueError(
                f"validate.min_per_class = {self.validate_.min_per_class} is too small for the split ratio "
                f"{smallest}: a class needs {needed} rows (rows * ratio >= 1) to reach every split"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _per_class_metric_by_its_mlflow_key(cls, raw):
        """`test_f1_card payment` as written in params.yaml names the metric logged as `test_f1_card_payment-fb6cc4`
        (sft_pipeline.names): the check below and the gate then see the key MLflow has."""
        section = raw.get("mlflow") if isinstance(raw, dict) else None
        metric = section.get("promotion_metric") if isinstance(section, dict) else None
        if isinstance(metric, str):
            for score in SCORES:
                if metric.startswith(f"test_{score}_"):
                    label = metric.removeprefix(f"test_{score}_")
                    raw = {**raw, "mlflow": {**section, "promotion_metric": f"test_{score}_{safe_name(label)}"}}
                    break
        return raw

    @model_validator(mode="after")
    def _promotion_metric_is_logged(self) -> "Params":
        known = Classification().metric_names(self)
        per_class_of_found_labels = (self.validate_.labels is None
                                     and self.mlflow.promotion_metric.startswith(tuple(f"test_{s}_" for s in SCORES)))
        if self.mlflow.promotion_metric not in known and not per_class_of_found_labels:
            some = ", ".join(sorted(m for m in known if not m.startswith(("test_precision_", "test_recall_",
                                                                              "test_f1_"))))
            raise ValueError(f"mlflow.promotion_metric: {self.mlflow.promotion_metric!r} is not a metric of task "
                             f"classification; choose one of {some}, or test_f1_<label> (and precision, recall)")
        return self


# ------------------------------------------------------------------------------------------------ the task


class Classification(Task):
    name = "classification"
    params = Params
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    best_metric = "macro_f1"
    loss_is_batch_mean = True

    # clean

    def fields(self, options: Clean) -> list[ReadField]:
        c = options.columns
        return [ReadField("id", c.id), ReadField("text", c.text, required=True, strings_only=True),
                ReadField("label", c.label, required=True, choice=True, rejected_as=options.prodigy_rejected),
                ReadField("annotator", c.annotator, annotator=True)]

    def normalize(self, records: pd.DataFrame, options: Clean) -> pd.DataFrame:
        out = records.rename(columns={"text": "text_raw"})
        out["text"] = [normalize_text(t, options.lowercase, options.remove_punctuation) for t in out["text_raw"]]
        out["label"] = out["label"].str.strip()
        out["annotator"] = out["annotator"].where(out["annotator"].isna(),
                                                  out["annotator"].astype("string").str.strip())
        return out[CLEAN_COLUMNS]

    def duplicate_key(self, rows: pd.DataFrame):
        # Rows by different annotators are votes, kept for validate; empty texts are rejected there, one by one.
        return rows[["text", "label", "annotator"]], rows["text"] != ""

    # validate

    def validate(self, rows: pd.DataFrame, options: Validate):
        canonical, reason, detail = votes.row_reasons(rows, options)
        failed = reason.notna()
        row_rejected = rejected_rows(rows[failed], "", "")
        row_rejected["reason"] = reason[failed].to_numpy()
        row_rejected["detail"] = detail[failed].to_numpy()
        passing = rows[~failed].assign(label=canonical[~failed])
        agreement = votes.annotator_agreement(passing)
        kept, dropped, conflicts = votes.resolve_votes(passing, options)
        rejected = pd.concat([row_rejected, dropped], ignore_index=True)
        raw_labels = rows.loc[~failed, "label"]
        mapped = Counter(f"{r} -> {c}" for r, c in zip(raw_labels, canonical[~failed]) if r != c)
        declared = options.labels is not None
        label_names = options.labels if declared else sorted(set(kept["label"]))
        report = {
            "labels_declared": declared,
            "classes": {label: int((kept["label"] == label).sum()) for label in label_names},
            "labels_mapped": dict(sorted(mapped.items())),
            "conflicts": conflicts,
            "annotator_agreement": agreement,
        }
        return kept[VALIDATED_COLUMNS], rejected, report

    def problems(self, kept: pd.DataFrame, options: Validate) -> list[str]:
        return votes.check_classes(kept, options)

    def warnings(self, report: dict) -> list[str]:
        if report.get("labels_declared", True):
            return []
        classes = report["classes"]
        out = [f"validate.labels is not set: {len(classes)} labels found in the data: "
               + ", ".join(repr(label) for label in classes)]
        if report["labels_mapped"]:
            out.append("spellings merged into one label: " + "; ".join(
                f"{mapping} ({n} rows)" for mapping, n in report["labels_mapped"].items()))
        return out

    def summary_lines(self, report: dict) -> list[str]:
        lines = ["", "| class | rows |", "|---|---:|"]
        lines += [f"| {markdown_cell(label)} | {n} |" for label, n in report["classes"].items()]
        if not report.get("labels_declared", True):
            lines += ["", f"validate.labels is not set: the {len(report['classes'])} classes are those in the data."]
        conflicts = report["conflicts"]
        lines += ["", f"Texts with conflicting labels: {conflicts['conflicting_texts']} "
                      f"(resolved {conflicts['resolved']}, unresolved {conflicts['unresolved']})."]
        agreement = report["annotator_agreement"]
        if agreement and agreement.get("kappa") is not None:
            lines.append(f"Annotator agreement: {agreement['method']} kappa = {agreement['kappa']} "
                         f"over {agreement['texts_rated_twice_or_more']} texts.")
        return lines

    # split

    def split_key(self, rows: pd.DataFrame) -> pd.Series:
        return rows["text"]

    def strata(self, rows: pd.DataFrame) -> pd.Series:
        return rows["label"]

    # tokenize

    def encode(self, splits, tokenizer, options, cache) -> Encoded:
        from datasets import ClassLabel

        from sft_pipeline import encoding

        labels = sorted(set().union(*(set(f["label"]) for f in splits.values())))
        label_id = {label: i for i, label in enumerate(labels)}
        source, positions, encoded, hits = encoding.encode_splits(
            tokenizer, {name: frame["text"] for name, frame in splits.items()}, options, cache)
        datasets, stats = {}, {}
        for name, frame in splits.items():
            label_ids = frame["label"].map(label_id).to_numpy(dtype=np.int64)
            datasets[name], full = encoding.token_dataset(
                source, positions[name], {"labels": label_ids}, {"labels": ClassLabel(names=labels)},
                salt=[labels, options.max_length])
            stats[name] = encoding.length_stats(full, options.max_length)
        return Encoded(datasets, {"labels": labels, "label2id": label_id}, {"labels": labels, "splits": stats},
                       texts_encoded=encoded, rows_from_cache=hits)

    # train

    def model_kwargs(self, meta: dict, tokenizer) -> dict:
        labels = meta["labels"]
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {label: i for i, label in enumerate(labels)}, "pad_token_id": tokenizer.pad_token_id}

    def collator(self, tokenizer, device: str, options=None):
        from transformers import DataCollatorWithPadding

        # Pad each batch to its longest row; multiples of 8 suit tensor cores and cost nothing on a CPU.
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if device == "cuda" else None)

    def compute_metrics(self, eval_pred) -> dict:
        from sklearn.metrics import accuracy_score, f1_score

        logits, label_ids = eval_pred
        predictions = np.asarray(logits).argmax(axis=-1)
        return {
            "accuracy": float(accuracy_score(label_ids, predictions)),
            "macro_f1": float(f1_score(label_ids, predictions, average="macro", zero_division=0)),
        }

    # evaluate

    def evaluate(self, model, tokenizer, test, rows, meta, options: Evaluate, device: str, base=None) -> Evaluation:
        labels = meta["labels"]
        probs = predict_proba(model, tokenizer, test["input_ids"], options.batch_size, device)
        predicted = [labels[i] for i in probs.argmax(axis=1)]
        actual = [labels[i] for i in test["labels"]]
        frame = rows.assign(actual=actual, predicted=predicted, confidence=probs.max(axis=1))
        summary = classification_summary(actual, predicted, labels)
        details = {**summary, "most_confident_errors": confident_errors(frame, options.top_errors),
                   "mlflow_label_keys": {k: v for k, v in mlflow_label_keys(labels).items() if k != v}}
        m = summary["metrics"]
        return Evaluation(
            metrics=m,
            details=details,
            predictions=frame[["id", "source_file", "line", "actual", "predicted", "confidence"]],
            mlflow_metrics=flat_test_metrics(m),
            figures={"confusion_matrix.png": lambda path: confusion_image(actual, predicted, labels, path)},
            summary=f"test accuracy {m['accuracy']}, macro-F1 {m['macro']['f1']}, weighted-F1 "
                    f"{m['weighted']['f1']} on {m['test_rows']} rows",
            answers=pd.DataFrame({"label": predicted, "score": probs.max(axis=1)}),
        )

    def add_baselines(self, evaluation: Evaluation, train: pd.DataFrame, test: pd.DataFrame) -> Evaluation:
        from sft_pipeline import baselines

        scores = baselines.run(train["text"].tolist(), train["label"].tolist(), test["text"].tolist(),
                               test["label"].tolist())
        tuned = {"macro_f1": evaluation.metrics["macro"]["f1"], "accuracy": evaluation.metrics["accuracy"]}
        not_beaten = baselines.compare(tuned, scores)
        # metrics.json (DVC's metrics file) keeps the numbers; the evaluation report also says how each was made.
        evaluation.metrics["baselines"] = {name: {k: v[k] for k in ("accuracy", "macro_f1")} for name, v in scores.items()}
        evaluation.details["baselines"] = {**scores, "not_beaten": not_beaten}
        for name, values in scores.items():
            for metric in ("accuracy", "macro_f1"):
                evaluation.mlflow_metrics[f"baseline_{name}_{metric}"] = values[metric]
            evaluation.mlflow_metrics[f"gain_over_{name}_macro_f1"] = round(tuned["macro_f1"] - values["macro_f1"], 4)
        evaluation.summary += (f"; baselines: TF-IDF macro-F1 {scores['tfidf_logreg']['macro_f1']}, majority "
                               f"{scores['majority']['macro_f1']}")
        for line in not_beaten:
            print(f"evaluate: warning: {line}")
        return evaluation

    def metrics_lines(self, metrics: dict) -> list[str]:
        from sft_pipeline.baselines import NAMES, compare

        lines = [f"Test set ({metrics['test_rows']} rows): accuracy {metrics['accuracy']:.4f}, "
                 f"macro-F1 {metrics['macro']['f1']:.4f}, weighted-F1 {metrics['weighted']['f1']:.4f}"]
        for label, m in metrics["per_class"].items():
            lines.append(f"  {label:<20} P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  "
                         f"n={m['support']}")
        for name, scores in {k: v for k, v in metrics.get("baselines", {}).items() if k in NAMES}.items():
            gain = metrics["macro"]["f1"] - scores["macro_f1"]
            lines.append(f"Baseline, {NAMES[name]}: macro-F1 {scores['macro_f1']:.4f}, accuracy "
                         f"{scores['accuracy']:.4f} (fine-tuned {gain:+.4f} macro-F1)")
        for line in compare({"macro_f1": metrics["macro"]["f1"]}, metrics.get("baselines", {})):
            lines.append(f"Warning: {line}")
        return lines

    def metric_names(self, params) -> set[str]:
        names = {"test_accuracy"} | {f"test_{a}_{s}" for a in AVERAGES for s in SCORES}
        return names | {f"test_{s}_{safe_name(label)}" for s in SCORES for label in params.validate_.labels or {}}

    # promotion gate

    def gate_input(self, rows: pd.DataFrame, options: Evaluate) -> pd.DataFrame:
        # The split holds the cleaned text; the served model's cleaning leaves a cleaned text as it is.
        return pd.DataFrame({"text": rows["text"].astype(str).to_numpy()})

    def gate_outputs(self, answers: pd.DataFrame, rows: pd.DataFrame, meta: dict) -> pd.DataFrame:
        # Categories are the current data's labels: a label the model predicts that the data no longer has is NaN,
        # an error, as scikit-learn counts it with labels=labels.
        labels = list(meta["labels"])
        return pd.DataFrame({"actual": of_labels(rows["label"].astype(str), labels),
                             "predicted": of_labels(answers["label"].astype(str), labels)})

    def gate_scores(self, outputs: pd.DataFrame, weights) -> dict[str, np.ndarray]:
        return flat_test_metrics(resampled_label_metrics(outputs["actual"], outputs["predicted"], weights))

    def gate_note(self, served, meta: dict) -> str | None:
        model = getattr(getattr(served, "unwrap_python_model", lambda: None)(), "model", None)
        if model is None:
            return None
        known = set(model.config.id2label.values())
        current = set(meta["labels"])
        notes = []
        if current - known:
            notes.append(f"it was trained without {sorted(current - known)}, so their test rows count as its errors")
        if known - current:
            notes.append(f"its predictions of {sorted(known - current)}, labels the data no longer has, count as "
                         f"errors")
        if not notes:
            return None
        return "the champion's labels differ from the data's; scored against the current rows' labels: " + \
            "; ".join(notes)

    # serving

    def serving_config(self, params) -> dict:
        return {"max_length": params.tokenize.max_length, "batch_size": params.evaluate.batch_size,
                "lowercase": params.clean.lowercase, "remove_punctuation": params.clean.remove_punctuation}

    def signature(self):
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        # No input schema: MLflow would check it before predict and, doing so, turn 5 and null into the texts "5" and
        # "None" and keep only a record's first field ({"id": 1, "text": ...} became the text "1"). predict checks
        # the input itself (model_texts) and names the row and field of anything it cannot classify.
        return ModelSignature(inputs=None, outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]))

    def predict(self, model, tokenizer, model_input, config: dict) -> pd.DataFrame:
        """Raw texts get the training data's cleaning and truncation; the answer is label and its probability."""
        import torch

        texts = model_texts(model_input, config)
        max_length, batch_size = int(config.get("max_length", 512)), int(config.get("batch_size", 32))
        id2label = model.config.id2label
        labels, scores = [], []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length,
                                  padding=True, return_tensors="pt").to(model.device)
                best = torch.softmax(model(**batch).logits.float(), dim=-1).max(dim=-1)
                labels += [id2label[int(i)] for i in best.indices]
                scores += best.values.tolist()
        return pd.DataFrame({"label": pd.Series(labels, dtype=object), "score": pd.Series(scores, dtype=float)})


# ------------------------------------------------------------------------------------------------ helpers


EXPECTED_INPUT = ('Send texts: {"inputs": ["a text", ...]} or {"dataframe_records": [{"text": "a text"}, ...]}; '
                  'an empty list gets an empty answer.')
_MISSING = object()


def texts_of(model_input) -> list[str]:
    """The texts of what the served model was sent, in order: a str; a list, array or Series of str; a DataFrame or
    dict with a `text` field, or a list of such dicts (a DataFrame whose one column is the 0 of a list passes too).
    A row whose text is missing, null, not a string or blank, or input of another shape, is an InputError that
    names the row and the field."""
    values = _text_values(model_input)
    problems = [(i, "no `text` field" if v is _MISSING else f"`text` is {describe(v)}")
                for i, v in enumerate(values) if v is _MISSING or describe(v) is not None]
    if problems:
        raise InputError.of_rows(problems, len(values), EXPECTED_INPUT)
    return [str(v) for v in values]


def model_texts(model_input, config: dict) -> list[str]:
    """texts_of, cleaned as the training data was (config: lowercase, remove_punctuation); a text that cleaning
    leaves empty (only markup or invisible characters) is an InputError too: the model would answer noise."""
    raw = texts_of(model_input)
    texts = [normalize_text(t, config.get("lowercase", False), config.get("remove_punctuation", False)) for t in raw]
    problems = [(i, f"`text` is empty after cleaning ({raw[i][:40]!r}: markup, punctuation or invisible characters "
                    "only)") for i, t in enumerate(texts) if not t]
    if problems:
        raise InputError.of_rows(problems, len(texts), EXPECTED_INPUT)
    return texts


def _text_values(model_input) -> list:
    model_input = scalar(model_input)
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, pd.DataFrame):
        if not len(model_input):
            return []
        if "text" in model_input.columns:
            return model_input["text"].tolist()
        if list(model_input.columns) == [0]:
            return model_input[0].tolist()
        fields = ", ".join(f"`{c}`" for c in model_input.columns)
        raise InputError(f"no `text` field: the records have {fields}. {EXPECTED_INPUT}")
    if isinstance(model_input, dict):
        if "text" not in model_input:
            fields = ", ".join(f"`{c}`" for c in model_input) or "no fields"
            raise InputError(f"no `text` field: the input has {fields}. {EXPECTED_INPUT}")
        value = scalar(model_input["text"])
        return list(value) if isinstance(value, (list, tuple, np.ndarray, pd.Series)) else [value]
    if isinstance(model_input, np.ndarray) and model_input.ndim > 1:
        raise InputError(f"expected a list of texts, got an array of shape {list(model_input.shape)}. "
                         f"{EXPECTED_INPUT}")
    if isinstance(model_input, (list, tuple, np.ndarray)):
        return [scalar(x.get("text", _MISSING)) if isinstance(x, dict) else scalar(x) for x in model_input]
    raise InputError(f"expected texts, got {describe(model_input)}. {EXPECTED_INPUT}")


def predict_proba(model, tokenizer, ids, batch_size: int, device: str) -> np.ndarray:
    """Class probabilities per row, batched over rows sorted by length so that little padding is computed."""
    import torch
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    order = np.argsort([len(x) for x in ids], kind="stable")
    probs = None
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate([{"input_ids": ids[i]} for i in chunk]).to(device)
            out = torch.softmax(model(**batch).logits.float(), dim=-1).cpu().numpy()
            if probs is None:
                probs = np.zeros((len(ids), out.shape[1]), dtype=np.float32)
            probs[chunk] = out
    return probs if probs is not None else np.zeros((0, 0), dtype=np.float32)


def classification_summary(actual: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Metrics computed once; `metrics` goes to the DVC metrics file as it is."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    metrics: dict = {"accuracy": round(float(accuracy_score(actual, predicted)), 4)}
    for average in AVERAGES:
        p, r, f, _ = precision_recall_fscore_support(actual, predicted, labels=labels, average=average, zero_division=0)
        metrics[average] = {"precision": round(float(p), 4), "recall": round(float(r), 4), "f1": round(float(f), 4)}
    p, r, f, support = precision_recall_fscore_support(actual, predicted, labels=labels, zero_division=0)
    per_class = {
        label: {"precision": round(float(p[i]), 4), "recall": round(float(r[i]), 4), "f1": round(float(f[i]), 4),
                "support": int(support[i])}
        for i, label in enumerate(labels)
    }
    matrix = confusion_matrix(actual, predicted, labels=labels)
    return {
        "metrics": {**metrics, "per_class": per_class, "test_rows": len(actual)},
        "confusion_matrix": {"labels": labels, "rows_actual_columns_predicted": matrix.tolist()},
    }


def of_labels(values, labels: list[str]) -> pd.Categorical:
    """Values as a categorical over `labels`; a value that is not one of them is NaN."""
    known = set(labels)
    return pd.Categorical([v if v in known else None for v in np.asarray(values, dtype=object)], categories=labels)


def resampled_label_metrics(actual: pd.Categorical, predicted: pd.Categorical, weights) -> dict:
    """classification_summary's `metrics` (unrounded, without test_rows) for every row of `weights` at once, each
    value an array over those rows; the labels are `actual`'s categories, a NaN prediction is an error.

    A resample's true positives, predicted and actual counts per class are weighted sums over rows, so a thousand
    resamples cost one sparse product instead of a thousand scikit-learn calls (equal to
    precision_recall_fscore_support with labels=labels and zero_division=0; tests/test_gate.py checks it).
    """
    from scipy import sparse

    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    actual = pd.Categorical(actual)
    labels = list(actual.categories)
    a = np.asarray(actual.codes)
    p = np.asarray(of_labels(predicted, labels).codes)
    n, k = len(a), len(labels)

    def per_class(mask: np.ndarray, codes: np.ndarray) -> np.ndarray:
        rows = np.flatnonzero(mask)
        indicator = sparse.csr_matrix((np.ones(len(rows)), (rows, codes[rows])), shape=(n, k))
        return np.asarray(indicator.T @ weights.T).T  # resamples x classes

    def ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
        return np.divide(top, bottom, out=np.zeros_like(top, dtype=np.float64), where=bottom > 0)

    correct = (a == p) & (a >= 0)
    tp, n_predicted, support = per_class(correct, a), per_class(p >= 0, p), per_class(a >= 0, a)
    scores = {"precision": ratio(tp, n_predicted), "recall": ratio(tp, support),
              "f1": ratio(2 * tp, n_predicted + support)}
    total_support = support.sum(axis=1)
    return {
        "accuracy": ratio(weights @ correct.astype(np.float64), weights.sum(axis=1)),
        "macro": {name: s.mean(axis=1) for name, s in scores.items()},
        "weighted": {name: ratio((s * support).sum(axis=1), total_support) for name, s in scores.items()},
        "per_class": {label: {**{name: s[:, i] for name, s in scores.items()}, "support": support[:, i]}
                      for i, label in enumerate(labels)},
    }


def flat_test_metrics(metrics: dict) -> dict[str, float]:
    """The metrics.json dict as flat MLflow metric names: test_accuracy, test_macro_f1, test_f1_<class>, ...; a class
    whose name MLflow does not take as it is gets its safe form (sft_pipeline.names, listed in the evaluation
    report)."""
    flat = {"test_accuracy": metrics["accuracy"]}
    for average in AVERAGES:
        for name, value in metrics[average].items():
            flat[f"test_{average}_{name}"] = value
    for label, key in mlflow_label_keys(list(metrics["per_class"])).items():
        for name in SCORES:
            flat[f"test_{name}_{key}"] = metrics["per_class"][label][name]
    return flat


def mlflow_label_keys(labels: list[str]) -> dict[str, str]:
    """Label -> the name it has in MLflow metric keys."""
    keys = {label: safe_name(label) for label in labels}
    clash = [k for k, n in Counter(keys.values()).items() if n > 1]
    if clash:
        same = [label for label, key in keys.items() if key == clash[0]]
        raise ValueError(f"labels {same} share the MLflow key {clash[0]!r}; rename one of them")
    return keys


def markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def confident_errors(frame: pd.DataFrame, top: int, max_chars: int = 300) -> list[dict]:
    errors = frame[frame["actual"] != frame["predicted"]].sort_values("confidence", ascending=False).head(top)
    return [
        {"id": r.id, "source": f"{r.source_file}:{r.line}", "actual": r.actual, "predicted": r.predicted,
         "confidence": round(float(r.confidence), 4), "text": r.text[:max_chars]}
        for r in errors.itertuples()
    ]


def confusion_image(actual: list[str], predicted: list[str], labels: list[str], path) -> None:
    """The confusion matrix as a PNG, every label written as it is (sft_pipeline/figures.py: fonts for any script)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    from sft_pipeline import figures

    plt = figures.pyplot()
    for label, characters in figures.missing_glyphs(labels).items():
        print(f"evaluate: warning: no installed font draws {characters!r} of label {label!r}; the confusion matrix "
              f"shows boxes there (the label itself is unchanged everywhere else)")

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ConfusionMatrixDisplay.from_predictions(actual, predicted, labels=labels, ax=ax, colorbar=False,
                                            xticks_rotation=45)
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
