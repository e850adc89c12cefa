"""The MLflow pyfunc model: raw texts in, labels and scores out (logged by evaluate as "models from code").

    import mlflow
    model = mlflow.pyfunc.load_model("models:/sft-classifier@champion")
    model.predict(["Shares rose after the profit report", "The striker scored twice"])
    #            label     score
    # 0       business  0.98...
    # 1          sport  0.99...

Input: a list of strings, a pandas Series, or a one-column DataFrame (the signature is one unnamed string column;
over REST: {"inputs": ["text", ...]} or {"dataframe_records": [{"text": "..."}]}). Texts get the
same cleaning as training data (stages.clean.normalize_text, shipped with the model) and the same truncation.
Output: a DataFrame with `label` and `score` (the probability of that label).
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class TextClassifier(PythonModel):
    def load_context(self, context):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = context.artifacts["model_dir"]
        config = context.model_config or {}
        self.max_length = int(config.get("max_length", 512))
        self.batch_size = int(config.get("batch_size", 32))
        self.lowercase = bool(config.get("lowercase", False))
        self.remove_punctuation = bool(config.get("remove_punctuation", False))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    @staticmethod
    def texts_of(model_input) -> list[str]:
        if isinstance(model_input, str):
            return [model_input]
        if isinstance(model_input, pd.DataFrame):
            column = "text" if "text" in model_input.columns else model_input.columns[0]
            return model_input[column].astype(str).tolist()
        if isinstance(model_input, pd.Series):
            return model_input.astype(str).tolist()
        return [str(x) for x in model_input]

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch

        from stages.clean import normalize_text

        texts = [normalize_text(t, self.lowercase, self.remove_punctuation) for t in self.texts_of(model_input)]
        labels, scores = [], []
        id2label = self.model.config.id2label
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], truncation=True,
                                       max_length=self.max_length, padding=True, return_tensors="pt")
                probs = torch.softmax(self.model(**batch).logits.float(), dim=-1)
                best = probs.max(dim=-1)
                labels += [id2label[int(i)] for i in best.indices]
                scores += best.values.tolist()
        return pd.DataFrame({"label": labels, "score": scores})


mlflow.models.set_model(TextClassifier())
