"""The MLflow pyfunc model, for every task and strategy (logged by evaluate as "models from code").

    import mlflow
    model = mlflow.pyfunc.load_model("models:/sft-classifier@champion")
    model.predict(["Shares rose after the profit report", "The striker scored twice"])
    #            label     score
    # 0       business  0.98...
    # 1          sport  0.99...

The model folder (artifact `model_dir`) is the train stage's output: full weights, or for lora and prompt_tuning an
adapter that is loaded onto its base model (`base_model` in artifact `serving_config`: a hub id, or the folder it was
trained from; it must be reachable where the model is served, or serve a merged copy made by `python -m
sft_pipeline.merge`).
What the model takes and answers is the task's (`Task.predict`); a classifier takes a list of strings, a Series or a
one-column DataFrame (over REST: {"inputs": ["text", ...]} or {"dataframe_records": [{"text": "..."}]}), cleans the
texts as the training data was cleaned, and answers a DataFrame with `label` and `score`.
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
        return self.task.predict(self.model, self.tokenizer, model_input, self.config)


mlflow.models.set_model(TrainedModel())
