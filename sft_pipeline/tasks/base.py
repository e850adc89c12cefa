"""The task interface: everything the six stages ask of a task, in the order they ask it.

A task decides what a row is and how it is learnt: which fields clean reads and how it normalises them, what validate
checks, what split hashes, how tokenize encodes a row, which model class train builds and how it collates and scores
batches, what evaluate measures, and what the served model takes and answers. Everything else (reading files, row
accounting, quarantine, the split, caches, the training loop and strategies, MLflow, the registry) is the same for
every task and lives outside it. The stages hold no `if task == ...`: they call these methods.

Adding a task is adding a module with a subclass of :class:`Task` and its params variant, and listing it in
``sft_pipeline.tasks.TASKS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import pandas as pd

    from sft_pipeline import memo
    from sft_pipeline.data.readers import Field
    from sft_pipeline.params import Params


@dataclass
class Encoded:
    """What tokenize writes for a task: one `datasets.Dataset` per split (`input_ids`, `labels`, `length`, ...),
    the task's metadata (``task.json``: what train and evaluate need to rebuild the model, e.g. the label names),
    and the task's part of ``reports/tokenize.json``; how many texts were encoded now and how many rows the cache
    served (printed, not reported: the reports must not depend on the cache)."""

    datasets: dict[str, Any]
    meta: dict
    report: dict
    texts_encoded: int = 0
    rows_from_cache: int = 0


@dataclass
class Evaluation:
    """What evaluate writes for a task: `metrics` is the DVC metrics file as it is, `details` the evaluation report,
    `predictions` one row per test row, `mlflow_metrics` the same numbers under flat MLflow names, and `figures`
    image files for the MLflow run (file name -> function that draws it at a path)."""

    metrics: dict
    details: dict
    predictions: "pd.DataFrame"
    mlflow_metrics: dict[str, float]
    figures: dict[str, Callable[[str], None]] = field(default_factory=dict)
    summary: str = ""
    #: tables for the MLflow run (`mlflow.log_table`): artifact file name -> frame
    tables: dict[str, "pd.DataFrame"] = field(default_factory=dict)
    #: the trained model's answers to the rows of `Task.gate_input`, in the served model's form (what `Task.predict`
    #: returns), so that the promotion gate reads the new model and the champion the same way
    answers: "pd.DataFrame | None" = None


def scalar(value):
    """A 0-d numpy array (what MLflow's JSON parsing hands a model for one value) as its Python value."""
    import numpy as np

    return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


class InputError(ValueError):
    """Input the served model cannot answer: a field missing, a value that is not text, a text empty after cleaning.
    The message says which row, which field and what is expected; the pyfunc (sft_pipeline/serving.py) hands it to
    MLflow as INVALID_PARAMETER_VALUE, which the model server answers with 400 and this message."""

    @classmethod
    def of_rows(cls, problems: list[tuple[int, str]], rows: int, expected: str) -> "InputError":
        shown = "; ".join(f"row {i}: {why}" for i, why in problems[:5])
        more = f"; and {len(problems) - 5} more rows" if len(problems) > 5 else ""
        return cls(f"{len(problems)} of {rows} rows cannot be answered (rows count from 0): {shown}{more}. "
                   f"{expected}")


def describe(value) -> str | None:
    """What a value that should have been a string is, for an InputError; None when it is a non-blank string."""
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType":
        return "null or missing"
    if isinstance(value, str):
        return None if value.strip() else f"empty ({value!r})"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return f"{str(value).lower()} (a boolean), not a string"
    if isinstance(value, (int, float)) or hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        return f"{value} (a number), not a string"
    if isinstance(value, dict):
        return "an object, not a string"
    if hasattr(value, "__len__"):
        return "a list, not a string"
    return f"a {type(value).__name__}, not a string"


class Task(ABC):
    """One task: a recipe for rows, a model class, metrics and a served model."""

    #: ``task.type`` in params.yaml
    name: ClassVar[str]
    #: the task's params variant (a subclass of sft_pipeline.params.Params)
    params: ClassVar[type["Params"]]
    #: the transformers Auto class train builds, e.g. "AutoModelForSequenceClassification"
    auto_class: ClassVar[str]
    #: peft's TaskType for the adapter strategies, e.g. "SEQ_CLS"
    peft_task_type: ClassVar[str]
    #: the validation metric (a key of compute_metrics, or "loss") that picks the best epoch
    best_metric: ClassVar[str]
    #: whether a higher best_metric is better (False for a loss)
    greater_is_better: ClassVar[bool] = True
    #: whether the model's loss is a mean over its own batch that ignores the Trainer's `num_items_in_batch`
    #: (transformers' sequence-classification heads take **kwargs but compute a plain mean); the Trainer is then
    #: told so (training.fit), or it would skip dividing by the gradient accumulation steps and, under DDP, multiply
    #: the loss by the number of processes
    loss_is_batch_mean: ClassVar[bool] = False
    #: modules besides the task's own that shape its cleaned rows (part of clean's cache key)
    clean_modules: ClassVar[tuple[str, ...]] = ()
    #: whether the task's model class adds a new head to the pretrained model (a classifier does; a causal LM's
    #: output layer is pretrained), which every strategy then trains
    new_head: ClassVar[bool] = True

    # ------------------------------------------------------------------------------------------- clean

    @abstractmethod
    def fields(self, options) -> list["Field"]:
        """The values clean reads from each record of a raw file (an `id` field is optional for every task)."""

    @abstractmethod
    def normalize(self, records: "pd.DataFrame", options) -> "pd.DataFrame":
        """Clean one file's records. In: `source_file`, `line` and the fields as read (strings, optional ones may be
        NA). Out, one row per record in the same order: `source_file`, `line`, `id`, the task's payload columns, and
        `text_raw`, the record's text as read (what the quarantine files show)."""

    @abstractmethod
    def duplicate_key(self, rows: "pd.DataFrame") -> tuple["pd.DataFrame", "pd.Series"]:
        """(columns whose equality makes two cleaned rows exact duplicates, rows that may collapse at all)."""

    # ------------------------------------------------------------------------------------------- validate

    @abstractmethod
    def validate(self, rows: "pd.DataFrame", options) -> tuple["pd.DataFrame", "pd.DataFrame", dict]:
        """(rows kept, rows rejected with their reasons, report). Kept + rejected = rows, checked by the stage. A
        kept row keeps the index of the row it comes from (validation.validate_rows carries the `split` over)."""

    @abstractmethod
    def problems(self, kept: "pd.DataFrame", options) -> list[str]:
        """Reasons the data as a whole is not fit to train on (the stage fails with them), e.g. a class too small."""

    def summary_lines(self, report: dict) -> list[str]:
        """The task's own lines of `reports/validation.md`."""
        return []

    def warnings(self, report: dict) -> list[str]:
        """What the data holds that trains but may not be meant to (validate prints each; the run goes on)."""
        return []

    # ------------------------------------------------------------------------------------------- split

    @abstractmethod
    def split_key(self, rows: "pd.DataFrame") -> "pd.Series":
        """The text that places a row in train, validation or test (data/splitting.py): equal keys (after folding
        case and spaces) always land together. Asked of cleaned rows too, to give every copy the user's split."""

    def strata(self, rows: "pd.DataFrame") -> "pd.Series | None":
        """Groups that must each reach every split (a classifier's classes), or None."""
        return None

    # ------------------------------------------------------------------------------------------- tokenize

    def texts(self, rows: "pd.DataFrame") -> list[str]:
        """What the model reads of each row, as text (tokenize measures the vocabulary's coverage of it)."""
        return rows[self.text_column].tolist()

    #: the column `texts` reads by default
    text_column: ClassVar[str] = "text"

    def prepare_tokenizer(self, tokenizer, options):
        """Set up the tokenizer before tokenize saves it for train, evaluate and serving (e.g. a chat template)."""
        return tokenizer

    @abstractmethod
    def encode(self, splits: dict[str, "pd.DataFrame"], tokenizer, options, cache: "memo.TokenCache") -> Encoded:
        """Token ids and training targets for every split, unpadded; `cache` serves texts encoded before."""

    # ------------------------------------------------------------------------------------------- train

    @abstractmethod
    def model_kwargs(self, meta: dict, tokenizer) -> dict:
        """Extra `from_pretrained` arguments that shape the model for this task (e.g. the classifier's labels)."""

    @abstractmethod
    def collator(self, tokenizer, device: str, options=None):
        """Pads a list of dataset rows into a batch (`options`: the train section)."""

    #: Validation metrics from the Trainer's (predictions, label_ids), holding `best_metric`; None: the validation
    #: loss alone (the Trainer then keeps no logits, which for a language model would be rows x tokens x vocabulary)
    compute_metrics: ClassVar[Callable | None] = None

    # ------------------------------------------------------------------------------------------- evaluate

    @abstractmethod
    def evaluate(self, model, tokenizer, test, rows: "pd.DataFrame", meta: dict, options, device: str,
                 base: Callable[[], Any] | None = None) -> Evaluation:
        """Score the trained model on the tokenized test split; `rows` are the same rows as text (the split's
        Parquet file; a tokenized row's `row`, where the task drops rows, is its position there). `base` loads the
        untuned base model, for a task that compares against it."""

    def add_baselines(self, evaluation: Evaluation, train: "pd.DataFrame", test: "pd.DataFrame") -> Evaluation:
        """The evaluation with simple models trained and scored on the same train and test rows beside it (in its
        metrics, details, MLflow metrics and summary), so that a score is never read alone. A task whose evaluation
        already compares against a reference (the instruction task's base model) keeps it as it is."""
        return evaluation

    def metrics_lines(self, metrics: dict) -> list[str]:
        """The test metrics (the DVC metrics file) in a few lines, for `python -m sft_pipeline.summary`."""
        return [f"Test metrics: {metrics}"]

    @abstractmethod
    def metric_names(self, params: "Params") -> set[str]:
        """The MLflow metric names evaluate logs (what `mlflow.promotion_metric` may name)."""

    # ------------------------------------------------------------------------------------------- promotion gate
    # evaluate scores the registry's champion on the same test rows as the new model (sft_pipeline/tracking.py):
    # both models' answers become per-row outputs, and a paired bootstrap resamples the same rows of both.

    @abstractmethod
    def gate_input(self, rows: "pd.DataFrame", options) -> Any:
        """The served model's input for the test rows the gate compares on (`rows`: the split's test file;
        `options`: the evaluate section): raw input as `predict` takes it, one item per compared row, for the first
        rows of the file (all of them, or as many as evaluate scores)."""

    @abstractmethod
    def gate_outputs(self, answers: "pd.DataFrame", rows: "pd.DataFrame", meta: dict) -> "pd.DataFrame":
        """Per-row outputs of a model on the compared rows, from its served answers (what `predict` returned for
        `gate_input`): what each row contributes to the metrics, scored against the current rows' references."""

    @abstractmethod
    def gate_scores(self, outputs: "pd.DataFrame", weights) -> dict[str, Any]:
        """Each metric the gate can compare, under its MLflow name, as an array over the rows of `weights`
        (resamples x compared rows: how often each row is drawn; a row of ones is the rows as they are)."""

    def gate_note(self, served, meta: dict) -> str | None:
        """What a reader must know about scoring this served model (an `mlflow.pyfunc` model) on the current rows,
        e.g. a champion trained on other labels; None when nothing."""
        return None

    # ------------------------------------------------------------------------------------------- serving

    @abstractmethod
    def serving_config(self, params: "Params") -> dict:
        """What the served model needs from params (JSON values), e.g. the cleaning options and max_length."""

    @abstractmethod
    def signature(self):
        """The MLflow signature of the served model."""

    @abstractmethod
    def predict(self, model, tokenizer, model_input, config: dict) -> "pd.DataFrame":
        """The served model's answer to raw input (texts as users send them)."""
