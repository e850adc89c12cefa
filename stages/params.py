"""Typed, frozen view of `params.yaml`.

Every section is a pydantic model with ``extra="forbid"``: a typo such as ``trian.epochs`` or ``clean.lowercse`` is an
error that names the key, never a silently ignored setting. Only a stage's ``main`` calls :func:`load`; ``run`` takes
the typed object.

    python -m stages.params            # validate params.yaml and print it back
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    """Every file and folder the pipeline reads or writes; `dvc.yaml` templates the same values."""

    raw_dir: Path
    clean: Path
    clean_rejected: Path
    clean_report: Path
    validated: Path
    validate_rejected: Path
    validate_report: Path
    validate_summary: Path
    split_dir: Path
    split_report: Path
    tokenized_dir: Path
    tokenize_report: Path
    pretrained_dir: Path
    checkpoints_dir: Path
    model_dir: Path
    train_history: Path
    eval_history: Path
    train_report: Path
    metrics: Path
    evaluation: Path
    predictions: Path
    mlflow_db: Path
    mlflow_artifacts: Path
    mlflow_run: Path
    promotion: Path
    watch_state: Path
    pipeline_lock: Path
    # Memo of per-file (clean) and per-text (tokenize) results between runs; null turns it off (stages/memo.py).
    cache_dir: Path | None = None


class Columns(Section):
    """Column (or JSON key) names in the annotation files. `id` and `annotator` are optional in the files."""

    text: str = "text"
    label: str = "label"
    id: str = "id"
    annotator: str = "annotator"


class Clean(Section):
    columns: Columns = Columns()
    # Tried only for a line (CSV/TSV/JSONL) or value (Parquet) that is not valid UTF-8; null rejects such rows.
    fallback_encoding: str | None = None
    lowercase: bool = False
    remove_punctuation: bool = False

    @field_validator("fallback_encoding")
    @classmethod
    def _known_encoding(cls, value: str | None) -> str | None:
        if value is not None:
            import codecs

            try:
                codecs.lookup(value)
            except LookupError as exc:
                raise ValueError(f"unknown encoding {value!r}") from exc
        return value


class Validate(Section):
    # canonical label -> synonyms; matching is case-insensitive after NFKC and whitespace trimming.
    labels: dict[str, list[str]]
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(50_000, ge=1)
    conflict_policy: Literal["majority", "drop"] = "majority"
    # Share of the votes the winning label needs; ties never win.
    min_agreement: float = Field(0.5, gt=0, le=1)
    min_per_class: int = Field(10, ge=1)
    # Share of the rows read that may be rejected for quality reasons (duplicates and merged votes do not count).
    max_reject_fraction: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _labels_well_formed(self) -> "Validate":
        if len(self.labels) < 2:
            raise ValueError("labels: declare at least two classes")
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})")
        return self


class Split(Section):
    seed: int = 42
    ratios: dict[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}

    @model_validator(mode="after")
    def _three_splits(self) -> "Split":
        names = list(self.ratios)
        if names != ["train", "validation", "test"]:
            raise ValueError(f"ratios: expected keys train, validation, test in that order, got {names}")
        if any(r <= 0 for r in self.ratios.values()) or abs(sum(self.ratios.values()) - 1) > 1e-9:
            raise ValueError(f"ratios: each must be > 0 and they must sum to 1, got {self.ratios}")
        return self


class Model(Section):
    # A Hugging Face hub id or a local folder; `make run` places the packaged default under paths.pretrained_dir.
    name: str
    revision: str | None = None
    trust_remote_code: bool = False


class Tokenize(Section):
    max_length: int = Field(128, ge=8)
    batch_size: int = Field(1000, ge=1)


class Train(Section):
    seed: int = 42
    epochs: float = Field(3, gt=0)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    # < 1: fraction of the optimizer steps; >= 1: a number of steps.
    warmup: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # Mid-epoch checkpoint interval in optimizer steps, so a killed run loses at most this many steps.
    save_every_steps: int = Field(50, ge=1)
    # Batches of similar lengths waste less compute on padding.
    group_by_length: bool = True
    log_every_steps: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on a GPU that supports it, fp32 otherwise.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class Evaluate(Section):
    batch_size: int = Field(64, ge=1)
    top_errors: int = Field(20, ge=0)


class Mlflow(Section):
    experiment: str = "sft-pipeline"
    registered_model: str = "sft-classifier"
    # A new version becomes `champion` when its metric >= the champion's + margin; otherwise it is `challenger`.
    promotion_metric: str = "test_macro_f1"
    promotion_margin: float = 0.0


class Watch(Section):
    # When the deployment of the watch flow looks for new annotations (cron syntax, server time zone).
    cron: str = "*/10 * * * *"
    # How long a run waits for another one to finish before it gives up and says so.
    lock_timeout_s: float = Field(0, ge=0)


class Params(Section):
    paths: Paths
    clean: Clean = Clean()
    validate_: Validate = Field(alias="validate")
    split: Split = Split()
    model: Model
    tokenize: Tokenize = Tokenize()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    mlflow: Mlflow = Mlflow()
    watch: Watch = Watch()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=())

    @model_validator(mode="after")
    def _enough_per_class_for_every_split(self) -> "Params":
        smallest = min(self.split.ratios.values())
        needed = math.ceil(1 / smallest - 1e-9)
        if self.validate_.min_per_class < needed:
            raise ValueError(
                f"validate.min_per_class = {self.validate_.min_per_class} is too small for the split ratio "
                f"{smallest}: a class needs about {needed} rows to reach every split"
            )
        return self


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


def parse(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"])
            lines.append(f"  {key}: {err['msg']}")
        raise ParamsError(f"{source}: invalid parameters\n" + "\n".join(lines)) from None


def load(path: Path | str = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found (run from the project root or pass --params)")
    with path.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return parse(raw, str(path))


def add_params_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_argument(parser)
    args = parser.parse_args(argv)
    try:
        params = load(args.params)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
