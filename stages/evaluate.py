"""Stage `evaluate`: score the fine-tuned model on the test split with scikit-learn.

    python -m stages.evaluate [--params params.yaml]

Reads  paths.model_dir, paths.tokenized_dir (test split, label map), paths.split_dir/test.parquet (texts)
Writes paths.metrics      JSON, the DVC metrics file: accuracy, macro and weighted precision/recall/F1, per class
       paths.evaluation   JSON: the same plus support per class, the confusion matrix and the most confident errors
       paths.predictions  CSV per test row: id, actual, predicted, confidence (the confusion-matrix plot reads it)
       paths.promotion    JSON: the registered model version, the alias it got (champion or challenger) and why

Into the MLflow run that train opened (paths.mlflow_run) it logs the same test metrics, the data and evaluation
reports, the confusion matrix as an image, and the model as a pyfunc (stages/serving.py, tokenizer inside), which it
registers under mlflow.registered_model; the promotion gate in stages/tracking.py then sets the alias.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from stages.io import StageError, read_json, stage_main, write_frame, write_json
from stages.modeling import load_classifier, load_tokenizer, pick_device
from stages.params import Evaluate, Model, Params, Paths


def classification_summary(actual: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Metrics computed once; `metrics` goes to the DVC metrics file as it is."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    metrics: dict = {"accuracy": round(float(accuracy_score(actual, predicted)), 4)}
    for average in ("macro", "weighted"):
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


def confident_errors(frame: pd.DataFrame, top: int, max_chars: int = 300) -> list[dict]:
    errors = frame[frame["actual"] != frame["predicted"]].sort_values("confidence", ascending=False).head(top)
    return [
        {"id": r.id, "source": f"{r.source_file}:{r.line}", "actual": r.actual, "predicted": r.predicted,
         "confidence": round(float(r.confidence), 4), "text": r.text[:max_chars]}
        for r in errors.itertuples()
    ]


def predict(model_dir, model: Model, dataset, labels: list[str], options: Evaluate, device: str) -> np.ndarray:
    """Class probabilities per row, batched over rows sorted by length so that little padding is computed."""
    import torch
    from transformers import DataCollatorWithPadding

    tokenizer = load_tokenizer(model_dir, model)
    classifier = load_classifier(model_dir, model, labels, tokenizer.pad_token_id).to(device).eval()
    collate = DataCollatorWithPadding(tokenizer)
    ids = dataset["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    probs = np.zeros((len(ids), len(labels)), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), options.batch_size):
            chunk = order[start:start + options.batch_size]
            batch = collate([{"input_ids": ids[i]} for i in chunk]).to(device)
            probs[chunk] = torch.softmax(classifier(**batch).logits.float(), dim=-1).cpu().numpy()
    return probs


def confusion_image(actual: list[str], predicted: list[str], labels: list[str], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ConfusionMatrixDisplay.from_predictions(actual, predicted, labels=labels, ax=ax, colorbar=False,
                                            xticks_rotation=45)
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_model(paths: Paths, params: Params):
    """Log the fine-tuned model as a pyfunc that takes raw texts, and register it; returns the version."""
    from pathlib import Path

    import mlflow
    import torch
    import transformers
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    here = Path(__file__).resolve().parent
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(here / "serving.py"),
        artifacts={"model_dir": str(paths.model_dir)},
        code_paths=[str(here)],  # the stages package: serving.py cleans texts with stages.clean
        model_config={"max_length": params.tokenize.max_length, "batch_size": params.evaluate.batch_size,
                      "lowercase": params.clean.lowercase, "remove_punctuation": params.clean.remove_punctuation},
        # One unnamed string column: a list of texts, a Series, or a one-column DataFrame (any name) all fit.
        signature=ModelSignature(inputs=Schema([ColSpec("string")]),
                                 outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")])),
        # Listed, not inferred: inference would load the model once more in a subprocess.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
                          f"mlflow=={mlflow.__version__}", "pandas", "pydantic", "pyyaml"],
        registered_model_name=params.mlflow.registered_model,
    )
    return str(info.registered_model_version)


def record(paths: Paths, params: Params, summary: dict, actual: list[str], predicted: list[str]) -> dict:
    """Complete the training's MLflow run: test metrics, reports, confusion matrix, model, registry decision."""
    import tempfile

    import mlflow

    from stages import tracking

    run_id = read_json(paths.mlflow_run)["run_id"]
    tracking.experiment_id(paths, params.mlflow)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(tracking.flat_test_metrics(summary["metrics"]))
        for report in (paths.clean_report, paths.validate_report, paths.validate_summary, paths.split_report,
                       paths.tokenize_report, paths.evaluation, paths.metrics):
            if report.is_file():  # always under dvc repro; a stage run by hand may lack upstream reports
                mlflow.log_artifact(str(report), artifact_path="reports")
            else:
                print(f"evaluate: {report} not found, not logged to MLflow")
        with tempfile.TemporaryDirectory() as tmp:
            image = f"{tmp}/confusion_matrix.png"
            confusion_image(actual, predicted, summary["confusion_matrix"]["labels"], image)
            mlflow.log_artifact(image)
        # Evaluating the same training again must not register a second copy of the same model.
        version = tracking.registered_version_of(run_id, params.mlflow) or log_model(paths, params)
        decision = tracking.promote(run_id, version, params.mlflow)
    decision["run_id"] = run_id
    write_json(paths.promotion, decision)
    print(f"evaluate: registered {decision['model']} v{version} as {decision['alias']}: {decision['reason']}")
    return decision


def run(paths: Paths, model: Model, options: Evaluate, track: Params | None = None) -> dict:
    from datasets import load_from_disk

    labels = read_json(paths.tokenized_dir / "label_map.json")["labels"]
    test = load_from_disk(str(paths.tokenized_dir / "data"))["test"]
    texts = pd.read_parquet(paths.split_dir / "test.parquet")
    if len(texts) != len(test):
        raise StageError(f"{paths.split_dir}/test.parquet has {len(texts)} rows but the tokenized test split has "
                         f"{len(test)}; run `dvc repro` so that both come from the same split")
    if not (paths.model_dir / "config.json").is_file():
        raise StageError(f"{paths.model_dir}: no trained model; run `dvc repro train` first")

    probs = predict(paths.model_dir, model, test, labels, options, pick_device("auto"))
    predicted = [labels[i] for i in probs.argmax(axis=1)]
    actual = [labels[i] for i in test["labels"]]
    frame = texts.assign(actual=actual, predicted=predicted, confidence=probs.max(axis=1))
    summary = classification_summary(actual, predicted, labels)
    evaluation = {**summary, "most_confident_errors": confident_errors(frame, options.top_errors)}

    write_json(paths.metrics, summary["metrics"])
    write_json(paths.evaluation, evaluation)
    write_frame(paths.predictions, frame[["id", "source_file", "line", "actual", "predicted", "confidence"]])
    if track is not None:
        record(paths, track, summary, actual, predicted)
    m = summary["metrics"]
    print(f"evaluate: test accuracy {m['accuracy']}, macro-F1 {m['macro']['f1']}, weighted-F1 {m['weighted']['f1']} "
          f"on {m['test_rows']} rows")
    return evaluation


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, lambda params: run(params.paths, params.model, params.evaluate, track=params))


if __name__ == "__main__":
    sys.exit(main())
