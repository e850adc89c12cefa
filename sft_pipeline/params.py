"""Typed, frozen view of `params.yaml`: the sections every task shares, and one variant per task.

Every section is a pydantic model with ``extra="forbid"``: a typo such as ``trian.epochs`` or ``clean.lowercse`` is an
error that names the key, never a silently ignored setting. The file is a discriminated union on ``task.type``: each
task (``sft_pipeline.tasks``) declares its own variant of the sections whose settings depend on it (what columns
clean reads, what validate checks, ...), so a setting of another task is an error too. ``train.strategy`` chooses how
the model is adapted; the options block of a strategy other than the chosen one is an error. Only a stage's ``main``
calls :func:`load`; ``run`` takes the typed object.

    python -m sft_pipeline.params                    # check params.yaml and print it back, defaults filled in
    python -m sft_pipeline.params --params my.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")
DEFAULT_TASK = "classification"
STRATEGIES = ("full", "freeze", "lora", "prompt_tuning")


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
    # Which split each text went to (a hash of its folded key -> split), kept between runs so that no row ever moves:
    # a persistent DVC output of split (sft_pipeline/data/splitting.py).
    split_ledger: Path
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
    # Held by evaluate while it compares with the champion and moves the alias: experiments that finish at once
    # decide one after the other (in a DVC experiment copy, the project's own file).
    registry_lock: Path = Path(".registry.lock")
    # Memo of per-file (clean) and per-text (tokenize) results between runs; null turns it off (sft_pipeline/memo.py).
    cache_dir: Path | None = None


class Task(Section):
    """Which task the pipeline learns; each task narrows `type` to its own name and may add settings."""

    type: str = DEFAULT_TASK


class Clean(Section):
    # Tried only for a line (CSV/TSV/JSONL) or value (Parquet) that is not valid UTF-8; null rejects such rows.
    fallback_encoding: str | None = None
    # TSV files are read without quote processing: most TSV exports do not quote, and quotes are text (`"Great" movie`
    # keeps them; a stray quote cannot join lines). true reads them as CSV quoting (a quoted field may hold tabs and
    # line breaks), for a TSV written with quotes.
    tsv_quoting: bool = False

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
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(50_000, ge=1)
    # Share of the rows read that may be rejected for quality reasons (duplicates and merged votes do not count).
    max_reject_fraction: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _lengths(self) -> "Validate":
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})")
        return self


class Split(Section):
    seed: int = 42
    ratios: dict[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}
    # A column of the raw files (every task reads it when present) whose value, train, validation or test, puts the
    # row in that split; an empty cell leaves the row to the ratios, any other value rejects the row (invalid_split).
    column: str | None = None
    # split -> globs of raw files (paths relative to paths.raw_dir; `*` also matches `/`), e.g. {test: ["test*.csv"]}:
    # every row of a matching file goes to that split. Where the column, a glob or a text's other copies disagree,
    # the more held-out split wins (test over validation over train) and every copy of the text goes there.
    files: dict[str, list[str]] = {}

    @model_validator(mode="after")
    def _three_splits(self) -> "Split":
        names = list(self.ratios)
        if names != ["train", "validation", "test"]:
            raise ValueError(f"ratios: expected keys train, validation, test in that order, got {names}")
        if any(r <= 0 for r in self.ratios.values()) or abs(sum(self.ratios.values()) - 1) > 1e-9:
            raise ValueError(f"ratios: each must be > 0 and they must sum to 1, got {self.ratios}")
        return self

    @model_validator(mode="after")
    def _files_name_splits(self) -> "Split":
        for name, globs in self.files.items():
            if name not in self.ratios:
                raise ValueError(f"split.files: {name!r} is not a split; use train, validation or test")
            if not globs or any(not g.strip() for g in globs):
                raise ValueError(f"split.files.{name}: give at least one glob, none of them blank")
        if self.column is not None and not self.column.strip():
            raise ValueError("split.column: is blank; give a column name or null")
        return self


class Model(Section):
    # A Hugging Face hub id or a local folder; `make run` places the packaged default under paths.pretrained_dir.
    name: str
    revision: str | None = None
    trust_remote_code: bool = False


class Tokenize(Section):
    max_length: int = Field(128, ge=8)
    batch_size: int = Field(1000, ge=1)
    # tokenize fails when more than this share of a split's tokens is the unknown token: the model cannot read the
    # text (Chinese reviews with MiniLM: 0.63). English measured 0 (BBC News), 0.0001 (Reddit comments) and 0.011
    # (GitHub issue titles with emoji and CJK); 0.05 leaves that room. null: measure and report only.
    max_unknown_fraction: float | None = Field(0.05, ge=0, le=1)


class Freeze(Section):
    """`freeze`: the pretrained model stays as it is; the new head trains, and the top `trainable_layers` blocks."""

    trainable_layers: int = Field(0, ge=0)
    # With nothing below the head training, the backbone's output for a row never changes: compute it once (in eval
    # mode, so without dropout) and train the head on it for every epoch. false: run the frozen backbone every step.
    cache_features: bool = True


class Lora(Section):
    """`lora`: peft LoRA adapters on `target_modules`; the new head (if the task has one) trains in full."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    # Dropout on each adapted layer's input costs a copy of that input: on BBC News with MiniLM, 0.1 made an epoch
    # slower than full fine-tuning, with no gain in validation macro-F1 (README "Training strategies").
    dropout: float = Field(0.0, ge=0, lt=1)
    # "all-linear" (peft: every linear layer but the output head) or a list of module names, e.g. [query, value].
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module, or use 'all-linear'")
        return value


class PromptTuning(Section):
    """`prompt_tuning`: peft soft prompt of `num_virtual_tokens` in front of every input; the model stays frozen
    (a classifier's new head trains too, since it starts random)."""

    num_virtual_tokens: int = Field(20, ge=1)
    # Text whose token embeddings start the prompt (repeated or cut to num_virtual_tokens); null: random.
    init_text: str | None = None

    @field_validator("init_text")
    @classmethod
    def _not_blank(cls, value):
        if value is not None and not value.strip():
            raise ValueError("is blank; give a text or null")
        return value


class Train(Section):
    seed: int = 42
    # How the model is adapted: full | freeze | lora | prompt_tuning. Options go in the block of the same name.
    strategy: Literal["full", "freeze", "lora", "prompt_tuning"] = "full"
    freeze: Freeze | None = None
    lora: Lora | None = None
    prompt_tuning: PromptTuning | None = None
    epochs: float = Field(3, gt=0)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    # auto: the strategy's own (sft_pipeline.strategies.AUTO_LEARNING_RATE): a new head alone or a soft prompt needs
    # a rate 100x that of full fine-tuning. A number applies to any strategy.
    learning_rate: float | Literal["auto"] = "auto"
    weight_decay: float = Field(0.01, ge=0)
    # < 1: fraction of the optimizer steps; >= 1: a number of steps.
    warmup: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # Mid-epoch checkpoints, so a killed run loses at most this much: every save_every_steps optimizer steps and/or
    # every save_every_minutes of training (null: never by that measure). auto follows the device
    # (sft_pipeline.modeling.device_defaults): on a CPU every 50 steps; on a GPU, where a step is short and a
    # checkpoint of the full optimizer state is heavy, every 15 minutes. Neither is part of the checkpoints'
    # fingerprint.
    save_every_steps: int | Literal["auto"] | None = "auto"
    save_every_minutes: float | Literal["auto"] | None = "auto"
    # On SIGTERM or SIGINT train saves a checkpoint at the end of the current step and exits (143, 130); a step and
    # save that take longer than this are cut short, as by kill -9. Keep it under the grace period of whatever sends
    # the signal (Kubernetes and Prefect's process worker: 30 s). Not part of the checkpoints' fingerprint.
    stop_grace_s: float = Field(25, gt=0)
    # Batches of similar lengths waste less compute on padding.
    group_by_length: bool = True
    # Loss, learning rate and gradient norm logged every this many optimizer steps (a GPU waits for each logged
    # value). auto: 1 on a CPU, 10 on a GPU.
    log_every_steps: int | Literal["auto"] = "auto"
    # DataLoader worker processes that collate (pad) batches beside the training process. auto: 0 on a CPU (workers
    # would take cores from the step itself), on a GPU min(4, CPU cores per training process - 1).
    dataloader_workers: int | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Training processes on this machine (DDP, started with torchrun; on GPUs one per GPU, on a CPU sharing its
    # cores). batch_size stays the global batch, so it must be a multiple of this. Not part of the checkpoints'
    # fingerprint. Under a launcher of your own (torchrun, accelerate launch) its WORLD_SIZE decides instead.
    processes: int = Field(1, ge=1)
    # auto: bf16 on a GPU of compute capability >= 8.0, fp16 (loss scaling) on 7.x, fp32 otherwise and on a CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    @field_validator("learning_rate", "save_every_minutes")
    @classmethod
    def _positive(cls, value):
        if value not in ("auto", None) and value <= 0:
            raise ValueError("must be > 0, or auto" + (" or null" if value is not None else ""))
        return value

    @field_validator("save_every_steps", "log_every_steps")
    @classmethod
    def _at_least_one(cls, value):
        if value not in ("auto", None) and value < 1:
            raise ValueError("must be >= 1, or auto")
        return value

    @field_validator("dataloader_workers")
    @classmethod
    def _not_negative(cls, value):
        if value != "auto" and value < 0:
            raise ValueError("must be >= 0 (0: collate in the training process), or auto")
        return value

    @model_validator(mode="after")
    def _batch_shared_by_the_processes(self) -> "Train":
        if self.batch_size % self.processes:
            raise ValueError(f"train.batch_size: {self.batch_size} is the global batch, which train.processes = "
                             f"{self.processes} cannot share evenly; make it a multiple of {self.processes}")
        return self

    @model_validator(mode="after")
    def _fp16_needs_a_gpu(self) -> "Train":
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("train.precision: 'fp16' needs a CUDA GPU, but train.device is 'cpu'; use 'auto' or "
                             "'fp32'")
        return self

    @model_validator(mode="after")
    def _options_of_the_chosen_strategy_only(self) -> "Train":
        for name in STRATEGIES:
            if name != self.strategy and getattr(self, name, None) is not None:
                raise ValueError(f"train.{name}: options of strategy {name!r}, but train.strategy is "
                                 f"{self.strategy!r}; remove the block or set train.strategy: {name}")
        return self

    def options(self) -> Section | None:
        """The chosen strategy's options, its defaults where the block is absent (full has none)."""
        defaults = {"freeze": Freeze, "lora": Lora, "prompt_tuning": PromptTuning}
        if self.strategy not in defaults:
            return None
        return getattr(self, self.strategy) or defaults[self.strategy]()


class Evaluate(Section):
    batch_size: int = Field(64, ge=1)


class Mlflow(Section):
    experiment: str = "sft-pipeline"
    registered_model: str = "sft-model"
    # evaluate scores the champion again on the new version's test rows (sft_pipeline/tracking.py). margin <= 0: the
    # new version becomes `champion` when its metric >= the champion's + margin on those rows; m > 0: when it is
    # higher by m or more and the 95% paired bootstrap interval of the difference is above 0. Else `challenger`.
    promotion_metric: str = "test_loss"
    promotion_margin: float = 0.0


class Watch(Section):
    # When the deployment of the watch flow looks for new annotations (cron syntax, server time zone).
    cron: str = "*/10 * * * *"
    # How long a run waits for another one to finish before it gives up and says so.
    lock_timeout_s: float = Field(0, ge=0)
    # After a successful retrain, commit what pins it (raw and base-model .dvc files, dvc.lock, params.yaml, reports
    # and metrics; nothing else) and `dvc push` when a DVC remote is set: each registered version then has a commit
    # that rebuilds it (README, "Versions of your data and models").
    commit: bool = True


class Serve(Section):
    # How often the model server (`make serve-model`) asks the registry which version holds the alias it serves; a
    # move is picked up within this many seconds, and the new version answers once it has loaded.
    model_poll_s: float = Field(10, gt=0)


class Params(Section):
    """What every task's params have; a task's variant (``tasks.<name>.Params``) narrows the sections it shapes."""

    paths: Paths
    task: Task = Task()
    clean: Clean = Clean()
    validate_: Validate = Field(Validate(), alias="validate")
    split: Split = Split()
    model: Model
    tokenize: Tokenize = Tokenize()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    mlflow: Mlflow = Mlflow()
    watch: Watch = Watch()
    serve: Serve = Serve()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=())


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


def _describe(err: dict, task: str) -> str:
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"  {key}: unknown key (a typo, or not a setting of task.type {task!r})"
    message = err["msg"].removeprefix("Value error, ")
    # A check across keys names them itself ("train.lora: ..."); a check of one value gets its key in front.
    return f"  {message}" if not key or message.startswith(f"{key}.") else f"  {key}: {message}"


def parse(raw: dict, source: str = "params.yaml") -> Params:
    """The task's params variant for `raw`; every problem, each with its key, in one ParamsError."""
    from sft_pipeline import tasks

    section = raw.get("task", {}) if isinstance(raw, dict) else {}
    task = section.get("type", DEFAULT_TASK) if isinstance(section, dict) else None
    if task not in tasks.TASKS:
        raise ParamsError(f"{source}: invalid parameters\n  task.type: {task!r} is not a task; choose one of "
                          f"{', '.join(sorted(tasks.TASKS))}")
    try:
        return tasks.TASKS[task].params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err, task) for err in exc.errors()]
        raise ParamsError(f"{source}: invalid parameters\n" + "\n".join(lines)) from None


def load(path: Path | str = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found (run from the project root or pass --params)")
    with path.open(encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ParamsError(f"{path}: not valid YAML ({exc})") from None
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
    print(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False, allow_unicode=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
