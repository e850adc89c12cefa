"""Stage `evaluate`: score the trained model on the test split, record the run in MLflow, register the model.

    python -m stages.evaluate [--params params.yaml]

Reads  paths.model_dir (any strategy: an adapter is loaded onto its base model), paths.tokenized_dir (test split,
       task.json), paths.split_dir/test.parquet (the same rows as text)
Writes paths.metrics      JSON, the DVC metrics file (classification: accuracy, macro and weighted
                          precision/recall/F1, per class)
       paths.evaluation   JSON: the same plus the task's details (classification: support per class, the confusion
                          matrix and the most confident errors)
       paths.predictions  CSV per test row (classification: id, actual, predicted, confidence; the confusion-matrix
                          plot reads it)
       paths.promotion    JSON: the registered model version, the alias it got (champion or challenger) and why

What is measured is the task's (sft_pipeline/tasks/). Into the MLflow run that train opened (paths.mlflow_run) it logs
the same test metrics, the data and evaluation reports, the task's figures (a confusion matrix), and the model as a
pyfunc (sft_pipeline/serving.py, tokenizer inside; for adapter strategies the adapter, with the base model's
location), which it registers under mlflow.registered_model; the promotion gate in sft_pipeline/tracking.py then
sets the alias.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

from sft_pipeline import strategies, tasks
from sft_pipeline.io import StageError, read_json, stage_main, write_frame, write_json
from sft_pipeline.modeling import pick_device
from sft_pipeline.params import Params


def log_model(params: Params, task, info: dict):
    """Log the trained model as a pyfunc that takes raw input, and register it; returns the version."""
    import mlflow
    import torch
    import transformers

    package = Path(strategies.__file__).resolve().parent
    serving, extra_requirements = strategies.serving_needs(info)
    config = {**task.serving_config(params), "task": task.name, "trust_remote_code": params.model.trust_remote_code,
              **serving}
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
                    f"mlflow=={mlflow.__version__}", "pandas", "pydantic", "pyyaml", *extra_requirements]
    with tempfile.TemporaryDirectory() as tmp:
        # A file in the model rather than model_config, which MLflow would also log as run params: `batch_size`,
        # `max_length` unprefixed beside params.yaml's own `evaluate.batch_size`, `tokenize.max_length`.
        config_file = Path(tmp) / "serving_config.json"
        config_file.write_text(json.dumps(config, indent=2))
        model_info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(package / "serving.py"),
            artifacts={"model_dir": str(params.paths.model_dir), "serving_config": str(config_file)},
            code_paths=[str(package)],  # the sft_pipeline package: the task's predict, cleaning, the loader
            signature=task.signature(),
            # Listed, not inferred: inference would load the model once more in a subprocess.
            pip_requirements=requirements,
            registered_model_name=params.mlflow.registered_model,
        )
    return str(model_info.registered_model_version)


def record(params: Params, task, info: dict, evaluation) -> dict:
    """Complete the training's MLflow run: test metrics, reports, figures, model, registry decision."""
    import mlflow

    from sft_pipeline import tracking

    paths = params.paths
    run_id = read_json(paths.mlflow_run)["run_id"]
    tracking.experiment_id(paths, params.mlflow)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(evaluation.mlflow_metrics)
        for report in (paths.clean_report, paths.validate_report, paths.validate_summary, paths.split_report,
                       paths.tokenize_report, paths.evaluation, paths.metrics):
            if report.is_file():  # always under dvc repro; a stage run by hand may lack upstream reports
                mlflow.log_artifact(str(report), artifact_path="reports")
            else:
                print(f"evaluate: {report} not found, not logged to MLflow")
        with tempfile.TemporaryDirectory() as tmp:
            for name, draw in evaluation.figures.items():
                draw(f"{tmp}/{name}")
                mlflow.log_artifact(f"{tmp}/{name}")
        for name, table in evaluation.tables.items():
            mlflow.log_table(data=table, artifact_file=name)
        # Evaluating the same training again must not register a second copy of the same model.
        version = tracking.registered_version_of(run_id, params.mlflow) or log_model(params, task, info)
        decision = tracking.promote(run_id, version, params.mlflow)
    decision["run_id"] = run_id
    write_json(paths.promotion, decision)
    print(f"evaluate: registered {decision['model']} v{version} as {decision['alias']}: {decision['reason']}")
    return decision


def run(params: Params, track: bool = True):
    from datasets import load_from_disk

    paths, options, task = params.paths, params.evaluate, tasks.get(params)
    meta = tasks.read_meta(paths.tokenized_dir, task)
    test = load_from_disk(str(paths.tokenized_dir / "data"))["test"]
    rows = pd.read_parquet(paths.split_dir / "test.parquet")
    if len(rows) != len(test) and "row" not in test.column_names:
        raise StageError(f"{paths.split_dir}/test.parquet has {len(rows)} rows but the tokenized test split has "
                         f"{len(test)}; run `dvc repro` so that both come from the same split")
    if not (paths.model_dir / strategies.MODEL_INFO).is_file():
        raise StageError(f"{paths.model_dir}: no trained model; run `dvc repro train` first")

    device = pick_device("auto")
    model, tokenizer, info = strategies.load_trained(paths.model_dir, trust_remote_code=params.model.trust_remote_code,
                                                     device=device)
    evaluation = task.evaluate(model, tokenizer, test, rows, meta, options, device,
                               base=lambda: strategies.load_base(paths.model_dir, device=device,
                                                                 trust_remote_code=params.model.trust_remote_code))
    evaluation = task.add_baselines(evaluation, pd.read_parquet(paths.split_dir / "train.parquet"), rows)
    write_json(paths.metrics, evaluation.metrics)
    write_json(paths.evaluation, evaluation.details)
    write_frame(paths.predictions, evaluation.predictions)
    if track:
        record(params, task, info, evaluation)
    print(f"evaluate: {evaluation.summary}")
    return evaluation


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
