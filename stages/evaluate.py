"""Stage `evaluate`: score the trained model on the test split, record the run in MLflow, register the model, and
decide on the `champion` alias by scoring the champion on the same test rows.

    python -m stages.evaluate [--params params.yaml]

Reads  paths.model_dir (any strategy: an adapter is loaded onto its base model), paths.tokenized_dir (test split,
       task.json), paths.split_dir/test.parquet (the same rows as text); the registry's champion
       (mlflow.registered_model, alias `champion`)
Writes paths.metrics      JSON, the DVC metrics file (classification: accuracy, macro and weighted
                          precision/recall/F1, per class)
       paths.evaluation   JSON: the same plus the task's details (classification: support per class, the confusion
                          matrix and the most confident errors)
       paths.predictions  CSV per test row (classification: id, actual, predicted, confidence; the confusion-matrix
                          plot reads it)
       paths.promotion    JSON: the registered model version, the alias it got (champion or challenger) and why;
                          `champion_status` (none, scored, unloadable, self) and, when scored, `comparison`: both
                          versions' mlflow.promotion_metric on the same rows, their difference and its 95% paired
                          bootstrap interval, the rows, and what the champion logged when it was registered

What is measured is the task's (sft_pipeline/tasks/). Into the MLflow run that train opened (paths.mlflow_run) it logs
the same test metrics, the data and evaluation reports, the task's figures (a confusion matrix), and the model as a
pyfunc (sft_pipeline/serving.py, tokenizer inside; for adapter strategies the adapter, with the base model's
location), which it registers under mlflow.registered_model.

The promotion gate: the champion (a version other than this run's) is loaded as it is served, the pyfunc, whatever
its base model, tokenizer, max_length or labels, and answers the test rows' inputs (`Task.gate_input`: every test
text; for an assistant the prompts evaluate generated for, evaluate.max_rows of them). Both models' answers become
per-row outputs (`Task.gate_outputs`, against the current rows' references: a champion trained on other labels is
scored against today's, and the reason says so); `tracking.paired_bootstrap` scores both on 1000 seeded resamples
of the same rows, and `tracking.promotion_decision` applies mlflow.promotion_margin to the paired difference and
its interval. The run gets `champion_<metric>`, `paired_<metric>`, `promotion_difference`, `promotion_interval_low`/
`_high` and `promotion_rows`. A champion that cannot be loaded or does not answer is reported (a warning, the reason,
the `promotion.champion_status` tag, `promotion.unloadable` on its version) and replaced; when the champion is this
run's own version (evaluate ran again without a new training), nothing is scored and its decision stands.
"""

from __future__ import annotations

import json
import sys
import time
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from sft_pipeline import strategies, tasks
from sft_pipeline.io import StageError, read_json, stage_main, write_frame, write_json
from sft_pipeline.modeling import pick_device
from sft_pipeline.params import Params

if TYPE_CHECKING:
    from sft_pipeline import tracking


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


def load_served(name: str, version: str, device: str):
    """A registered version as it is served: the pyfunc, on `device`."""
    import mlflow

    path = list(sys.path)
    try:
        served = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    finally:
        sys.path[:] = path  # the model's code_paths were put first; this process keeps its own sft_pipeline
    inner = getattr(served.unwrap_python_model(), "model", None)
    if inner is not None and device != "cpu":
        inner.to(device)
    return served


def judge(params: Params, task, evaluation, rows: pd.DataFrame, meta: dict, version: str,
          device: str) -> tracking.Gate:
    """Find the champion and score it on the new model's test rows; what promote decides on."""
    import numpy as np

    from sft_pipeline import tracking

    settings = params.mlflow
    metric = settings.promotion_metric
    if metric not in evaluation.mlflow_metrics:
        raise StageError(f"mlflow.promotion_metric {metric!r} was not computed on this test split (computed: "
                         f"{', '.join(sorted(evaluation.mlflow_metrics))}); choose one of those")
    logged = float(evaluation.mlflow_metrics[metric])
    champion = tracking.current_champion(settings)
    if champion is None:
        return tracking.Gate("none", logged)
    champion_version = str(champion.version)
    if champion_version == str(version):
        return tracking.Gate("self", logged, champion_version,
                             note=f"evaluate ran again on the same training: v{version} is already the champion, "
                                  f"not scored again")
    new_outputs = task.gate_outputs(evaluation.answers, rows, meta)
    if metric not in task.gate_scores(new_outputs, np.ones((1, len(new_outputs)))):
        raise StageError(f"mlflow.promotion_metric {metric!r} cannot be compared with the champion by task "
                         f"{task.name}")
    model_input = task.gate_input(rows, params.evaluate)
    started = time.perf_counter()
    served = None
    try:
        served = load_served(settings.registered_model, champion_version, device)
        answers = served.predict(model_input)
        if len(answers) != len(model_input):
            raise ValueError(f"it answered {len(answers)} of {len(model_input)} test rows")
        note = task.gate_note(served, meta)
    # Whatever breaks in the champion's own artifacts (files deleted, a base model gone, a format this code no
    # longer reads) must not block the new version: the champion is reported and replaced. Our scoring is outside.
    except Exception as exc:  # noqa: BLE001
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        print(f"evaluate: WARNING: champion v{champion_version} of {settings.registered_model} could not be loaded "
              f"or scored ({why}); v{version} replaces it")
        return tracking.Gate("unloadable", logged, champion_version, note=why)
    finally:
        del served
    champion_outputs = task.gate_outputs(answers, rows, meta)
    answered = time.perf_counter()
    comparison = tracking.paired_bootstrap(task.gate_scores, new_outputs, champion_outputs, metric)
    print(f"evaluate: champion v{champion_version} loaded and answered in {answered - started:.1f} s, bootstrap "
          f"{time.perf_counter() - answered:.2f} s")
    print(f"evaluate: champion v{champion_version} scored on the same {comparison.rows} test rows: {metric} "
          f"{comparison.new:.4f} (new) vs {comparison.champion:.4f} (champion), difference "
          f"{comparison.difference:+.4f}, 95% paired bootstrap interval [{comparison.low:+.4f}, "
          f"{comparison.high:+.4f}] over {comparison.resamples} resamples" + (f"; {note}" if note else ""))
    return tracking.Gate("scored", comparison.new, champion_version, comparison, note)


def record(params: Params, task, info: dict, evaluation, rows: pd.DataFrame, meta: dict,
           device: str = "cpu") -> dict:
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
        # The champion compared with must still be the champion when the alias moves: two evaluations finishing at
        # once (queued experiments) take turns from scoring it to moving the alias.
        from filelock import FileLock

        from sft_pipeline.versions import project_home

        with FileLock(str(project_home() / paths.registry_lock)):
            gate = judge(params, task, evaluation, rows, meta, version, device)
            decision = tracking.promote(run_id, version, params.mlflow, gate)
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

    device = pick_device(params.train.device)  # where train ran: `cpu` keeps evaluate off a GPU too
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
        record(params, task, info, evaluation, rows, meta, device)
    print(f"evaluate: {evaluation.summary}")
    return evaluation


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
