"""The MLflow pyfunc model, for every task and strategy (logged by evaluate as "models from code").

    import mlflow
    model = mlflow.pyfunc.load_model("models:/sft-classifier@champion")
    model.predict(["Shares rose after the profit report", "The striker scored twice"])
    #            label     score
    # 0       business  0.98...
    # 1          sport  0.99...

The model folder (artifact `model_dir`) is the train stage's output: full weights, or for lora and prompt_tuning an
adapter that is loaded onto its base model (`base_model` in artifact `serving_config`: a hub id, or the folder it was trained
from; it must be reachable where the model is served, or serve a merged copy made by `python -m sft_pipeline.merge`).
What the model takes and answers is the task's (`Task.predict`); a classifier takes a str, a list of strings, a
Series or a DataFrame with a `text` column (over REST: {"inputs": ["text", ...]} or {"dataframe_records":
[{"text": "..."}]}), cleans the texts as the training data was cleaned, and answers a DataFrame with `label` and
`score`. Input it cannot answer (no `text` field, a number or null for a text, a text empty after cleaning) raises an
MlflowException with error code INVALID_PARAMETER_VALUE and a message naming the row and the field
(`sft_pipeline.tasks.base.InputError`); an empty list gets an empty answer. The model has no input schema: the
checks are predict's (MLflow's would coerce 5 and null to text first). The REST server is
sft_pipeline/model_server.py (`make serve-model`).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class TrainedModel(PythonModel):
    def load_context(self, context):
        from sft_pipeline import tasks
        from sft_pipeline.strategies import load_trained

        # serving_config.json since the model's config left model_config (MLflow logs that as run params too).
        config_file = context.artifacts.get("serving_config")
        self.config = json.loads(Path(config_file).read_text()) if config_file else dict(context.model_config or {})
        self.model, self.tokenizer, info = load_trained(
            context.artifacts["model_dir"], base=self.config.get("base_model"),
            trust_remote_code=bool(self.config.get("trust_remote_code", False)))
        self.task = tasks.get(info["task"])

    def predict(self, context, model_input, params=None):
        from mlflow.exceptions import MlflowException

        from sft_pipeline.tasks.base import InputError

        try:
            return self.task.predict(self.model, self.tokenizer, model_input, self.config)
        except InputError as exc:
            # INVALID_PARAMETER_VALUE: a scoring server answers 400 with the message, not 500 with a traceback.
            raise MlflowException.invalid_parameter_value(str(exc)) from exc


mlflow.models.set_model(TrainedModel())
