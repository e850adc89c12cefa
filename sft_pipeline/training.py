"""The training loop for every task and strategy: Hugging Face's Trainer, with what a long run needs around it.

- AdamW, linear schedule with warmup, weight decay, gradient accumulation, dynamic padding per batch (batches of
  similar lengths in random order: LengthGroupedBatches), validation after every epoch, the best epoch (by the task's
  `best_metric`) restored at the end.
- Checkpoints every epoch, every `train.save_every_steps` optimizer steps and every `train.save_every_minutes`
  (by device when `auto`: sft_pipeline.modeling.device_defaults), resumed only when they were made from
  the same train and model params, the same base weights (a content hash of the model's files, not its name) and the
  same tokenized data (`fingerprint.json`); a checkpoint folder cut short by a kill is removed. Stale checkpoints are
  deleted only where train made them: a paths.checkpoints_dir holding files train did not make is refused, and
  nothing in it is deleted. Adapter strategies checkpoint the adapter and the optimizer state of its weights only.
- A progress bar for training and validation (steps, loss, learning rate, ETA), one line per epoch with the
  validation metrics, and any callbacks the caller adds (the MLflow run's live metrics, sft_pipeline.tracking).
- `freeze` with nothing below the head training: the backbone's output for each row is computed once, in eval mode,
  and the head alone is trained on it for every epoch (FrozenFeatures); the head is then the model's own head again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sft_pipeline import memo
from sft_pipeline.io import StageError, write_json
from sft_pipeline.modeling import fingerprint
from sft_pipeline.params import Model, Paths, Train

FINGERPRINT_FILE = "fingerprint.json"
RUN_ID_FILE = "mlflow_run_id"
# What train writes in paths.checkpoints_dir: the Trainer's checkpoint-<step> folders, the two files above, and the
# temporary siblings of an atomic write that a kill left.
_OURS = re.compile(rf"checkpoint-\d+|{re.escape(FINGERPRINT_FILE)}|{re.escape(RUN_ID_FILE)}|\..+\.tmp")
# The files from_pretrained reads at the top of a model folder (weights, config, tokenizer, chat template, remote
# code); READMEs, ONNX exports and other frameworks' weights beside them do not change what trains.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
STEP_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm"]
# Keys of an evaluation log entry that are not metrics of the model.
_EVAL_SPEED = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


# ------------------------------------------------------------------------------------------------ checkpoints


def model_folder(model: Model) -> Path | None:
    """The folder the base model's files are read from: model.name when it is a folder, else the hub snapshot of
    model.name at model.revision in the local Hugging Face cache (where loading the model put it); None if neither."""
    local = Path(model.name)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model.name, revision=model.revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a hub id, or not in the cache: the caller says so
        return None


def weights_fingerprint(model: Model, cache_dir: Path | None = None) -> dict:
    """{file name: sha256} of the base model's files (MODEL_FILE_SUFFIXES at the top of its folder): the same name
    with other weights is another model. Digests are remembered under `cache_dir` by (path, size, mtime, ctime,
    inode) (memo.file_digests), so a large model is read once, not at every run."""
    folder = model_folder(model)
    if folder is None:
        print(f"train: warning: the files of model {model.name!r} were not found (neither a folder nor in the Hugging "
              f"Face cache); checkpoints are matched by its name and revision only")
        return {"unresolved": model.name, "revision": model.revision}
    files = sorted(p for p in folder.iterdir()
                   if p.suffix in MODEL_FILE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    digests = memo.file_digests(files, None if cache_dir is None else Path(cache_dir) / "files.json")
    return {p.name: digests[p] for p in files}


def run_fingerprint(model: Model, options: Train, tokenized_dir: Path, cache_dir: Path | None = None) -> dict:
    return {
        "model": model.model_dump(mode="json"),
        "weights": weights_fingerprint(model, cache_dir),
        # Neither how long a stop may take, how many processes share the global batch, how often checkpoints are
        # made nor how many workers collate changes what trains: a run stopped with 2 processes resumes with 1.
        "train": options.model_dump(mode="json", exclude={"stop_grace_s", "processes", "save_every_steps",
                                                          "save_every_minutes", "dataloader_workers"}),
        "tokenized": fingerprint(tokenized_dir),
    }


def prepare_checkpoints(checkpoints_dir: Path, current: dict) -> str | None:
    """The checkpoint to resume from, if any; stale checkpoints (other params, base weights or data) are removed.

    Only what train made is ever deleted: the folder is train's when it holds FINGERPRINT_FILE (written when train
    first uses it) or is empty, and then holds nothing but checkpoint-<step> folders and train's own files. Anything
    else there is refused with a StageError that names it, before anything is deleted. The Trainer writes
    trainer_state.json last, so a checkpoint folder without it was cut short by a kill: it is removed, and the newest
    complete one is resumed.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    checkpoints_dir = Path(checkpoints_dir)
    marker = checkpoints_dir / FINGERPRINT_FILE
    if checkpoints_dir.exists() and not checkpoints_dir.is_dir():
        raise StageError(f"{checkpoints_dir}: paths.checkpoints_dir is a file; train keeps its checkpoints in a "
                         f"folder there. Move the file away or set paths.checkpoints_dir to another path")
    entries = sorted(checkpoints_dir.iterdir()) if checkpoints_dir.is_dir() else []
    foreign = [e.name for e in entries if not (_OURS.fullmatch(e.name) and (e.is_dir() == e.name.startswith(
        f"{PREFIX_CHECKPOINT_DIR}-")))]
    if entries and not marker.is_file():
        foreign = [e.name for e in entries]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise StageError(f"{checkpoints_dir}: paths.checkpoints_dir holds {shown}, which train did not make (train "
                         f"deletes stale checkpoints there, so it only uses a folder that is empty or its own, "
                         f"marked by {FINGERPRINT_FILE}). Move those files away, or set paths.checkpoints_dir to a "
                         f"folder of its own")
    try:
        previous = json.loads(marker.read_text()) if marker.is_file() else None
    except ValueError:
        previous = None  # unreadable: as if stale
    if previous != current:
        for entry in entries:
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry != marker:
                entry.unlink()
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, current)
    complete = []
    for folder in checkpoints_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        if not folder.name.rsplit("-", 1)[1].isdigit():
            continue
        if (folder / "trainer_state.json").is_file():
            complete.append(folder)
        else:
            shutil.rmtree(folder)
    if not complete:
        return None
    return str(max(complete, key=lambda f: int(f.name.rsplit("-", 1)[1])))


# ------------------------------------------------------------------------------------------------ history


def epoch_columns(log_history: list[dict]) -> list[str]:
    names = []
    for entry in log_history:
        if "eval_loss" in entry:
            names += [k for k in entry if k.startswith("eval_") and k not in _EVAL_SPEED and k not in names]
    return ["step", "epoch", *names]


def history_frames(log_history: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per logged optimizer step, one row per validation) from the Trainer's log history."""
    columns = epoch_columns(log_history)
    steps = [{k: e.get(k) for k in STEP_COLUMNS} for e in log_history if "loss" in e and "eval_loss" not in e]
    epochs = [{k: e.get(k) for k in columns} for e in log_history if "eval_loss" in e]
    return pd.DataFrame(steps, columns=STEP_COLUMNS), pd.DataFrame(epochs, columns=columns)


# ------------------------------------------------------------------------------------------------ sampler


class LengthGroupedBatches:
    """A train sampler whose batches hold rows of similar length, in random order.

    Rows are shuffled, cut into mega-batches of `mega_batch_mult` batches, sorted by length within each, and cut into
    batches; the full batches are then shuffled together (the one short batch, if any, comes last, so the DataLoader's
    batches are exactly these). Padding stays as low as with Hugging Face's LengthGroupedSampler, but that sampler
    also keeps each mega-batch's batches in order, longest first: on a small dataset every epoch then sweeps from
    long to short texts several times, and after a short budget validation macro-F1 was about a point below the seed
    recipe's on two seeds of three (bench/). The order depends only on the seed and the epoch, so a resumed run sees
    the same batches.
    """

    def __init__(self, lengths, batch_size: int, seed: int, mega_batch_mult: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def with_epoch(self, epoch: int) -> LengthGroupedBatches:
        self.epoch = epoch
        return self

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        mega = self.batch_size * self.mega_batch_mult
        full, short = [], []
        for start in range(0, len(order), mega):
            chunk = order[start:start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            for i in range(0, len(chunk), self.batch_size):
                (full if len(chunk[i:i + self.batch_size]) == self.batch_size else short).append(
                    chunk[i:i + self.batch_size])
        return [full[i] for i in rng.permutation(len(full))] + short

    def __iter__(self):
        return iter(int(i) for batch in self.batches() for i in batch)


def global_micro_batches(n_rows: int, lengths, batch_size: int, accumulation: int, processes: int, seed: int,
                         epoch: int) -> list[np.ndarray]:
    """The micro-batches of one epoch as one process with per-step batch `batch_size` takes them (the global
    batch): LengthGroupedBatches' order cut into `batch_size` rows (`lengths` None: a plain shuffle). A last
    micro-batch with fewer rows than `processes` joins the one before it, so every process gets at least a row."""
    if lengths is not None:
        order = np.concatenate(LengthGroupedBatches(lengths, batch_size * accumulation, seed).with_epoch(
            epoch).batches()) if n_rows else np.zeros(0, dtype=int)
    else:
        order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    batches = [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < processes:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


class RankBatches:
    """The train batches of one of `processes` DDP processes: each global micro-batch (global_micro_batches: the rows
    one process with the same global batch would take in that micro-step, length-grouped the same way) split into
    `processes` contiguous, near-equal parts, this process taking part `rank`. Every process gets the same number of
    micro-batches, and over an epoch the processes together see every row once: none dropped, none repeated (unlike
    a DistributedSampler, which pads with repeats, or BatchRebalanceSampler, which drops or pads the tail). The
    Trainer gets it as a BatchRebalanceSampler (trainer_class), which it passes to the DataLoader as its batch
    sampler without accelerate sharding it a second time; none of that class's balancing is used."""

    def __init__(self, n_rows: int, lengths, batch_size: int, accumulation: int, processes: int, rank: int,
                 seed: int):
        if n_rows < processes:
            raise StageError(f"the train split has {n_rows} rows, fewer than the {processes} training processes; "
                             f"use fewer processes (train.processes) or more data")
        self.n_rows, self.lengths = n_rows, None if lengths is None else np.asarray(lengths)
        self.batch_size, self.accumulation, self.processes, self.rank = batch_size, accumulation, processes, rank
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global(self) -> list[np.ndarray]:
        return global_micro_batches(self.n_rows, self.lengths, self.batch_size * self.processes, self.accumulation,
                                    self.processes, self.seed, self.epoch)

    def __iter__(self):
        return iter([int(i) for i in np.array_split(batch, self.processes)[self.rank]] for batch in self._global())

    def __len__(self) -> int:
        return len(self._global())


def trainer_class():
    """HF Trainer, with LengthGroupedBatches as its sampler when train_sampling_strategy is group_by_length, and
    RankBatches as each process's batch sampler under DDP."""
    from transformers import Trainer
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    class TrainerRankBatches(RankBatches, BatchRebalanceSampler):
        pass

    class GroupedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            # The DataLoader's copy has lost the `length` column (not a model input); the rows are the same.
            dataset = self.train_dataset if train_dataset is None else train_dataset
            grouped = self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "column_names")
            if not grouped and self.args.world_size == 1:
                return super()._get_train_sampler(train_dataset)
            lengths = None
            if grouped:
                if "length" in getattr(self.train_dataset, "column_names", ()) and \
                        len(self.train_dataset) == len(dataset):
                    lengths = self.train_dataset["length"]
                else:
                    lengths = [len(ids) for ids in dataset["input_ids"]]
            seed = self.args.data_seed or self.args.seed
            if self.args.world_size > 1:
                return TrainerRankBatches(len(dataset), lengths, self.args.per_device_train_batch_size,
                                          self.args.gradient_accumulation_steps, self.args.world_size,
                                          self.args.process_index, seed)
            return LengthGroupedBatches(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        seed)

        # Under DDP every process validates the whole validation split, in order, and keeps its own results (they
        # are the same on every process: same weights, same rows). Accelerate's sharding would pad the last batch
        # with repeated rows (even_batches) and, although the predictions are cut back afterwards, eval_loss is a
        # mean over the padded batches: 1.7e-3 off one process's on 12 rows here, and the instruction task picks its
        # best epoch by that loss. Validation then takes as long as on one process.
        def get_eval_dataloader(self, eval_dataset=None):
            if self.args.world_size == 1:
                return super().get_eval_dataloader(eval_dataset)
            import datasets
            from torch.utils.data import DataLoader, SequentialSampler

            dataset = self.eval_dataset if eval_dataset is None else eval_dataset
            collate = self.data_collator
            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="Evaluation")
            else:
                collate = self._get_collator_with_removed_columns(self.data_collator, description="Evaluation")
            return DataLoader(dataset, batch_size=self.args.eval_batch_size, sampler=SequentialSampler(dataset),
                              collate_fn=collate, num_workers=self.args.dataloader_num_workers,
                              pin_memory=self.args.dataloader_pin_memory)

        def evaluation_loop(self, *args, **kwargs):
            if self.args.world_size > 1:
                self.gather_function = lambda tensors: tensors  # each process has all rows (above)
            return super().evaluation_loop(*args, **kwargs)

    return GroupedTrainer


def training_arguments(paths: Paths, options: Train, device: str, best_metric: str, grouped: bool | None = None,
                       greater_is_better: bool = True):
    from transformers import TrainingArguments

    from sft_pipeline.strategies import learning_rate

    from sft_pipeline.modeling import pick_precision

    from sft_pipeline import distributed
    from sft_pipeline.modeling import device_defaults

    precision = pick_precision(options.precision, device)
    grouped = options.group_by_length if grouped is None else grouped
    processes = distributed.world_size()
    resolved = device_defaults(options, device, processes)
    args = TrainingArguments(
        output_dir=str(paths.checkpoints_dir),
        num_train_epochs=options.epochs,
        # train.batch_size is the global batch: under DDP each process takes its share (RankBatches).
        per_device_train_batch_size=distributed.per_process(options.batch_size, "train.batch_size"),
        per_device_eval_batch_size=options.eval_batch_size,  # each process validates every row (trainer_class)
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=learning_rate(options),
        weight_decay=options.weight_decay,
        warmup_steps=options.warmup,
        lr_scheduler_type="linear",
        max_grad_norm=options.max_grad_norm,
        optim="adamw_torch",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=best_metric,
        greater_is_better=greater_is_better,
        logging_strategy="steps",
        logging_steps=resolved["log_every_steps"],
        # The check for a NaN or infinite loss waits for the GPU at every step; without it, such a loss shows in the
        # logged mean instead of being left out of it.
        logging_nan_inf_filter=device != "cuda",
        seed=options.seed,
        data_seed=options.seed,
        train_sampling_strategy="group_by_length" if grouped else "random",
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        report_to="none",
        # The Trainer's own bar prints a dictionary per logged step; ProgressBar below replaces it.
        disable_tqdm=True,
        dataloader_num_workers=resolved["dataloader_workers"],
        ddp_backend=("gloo" if device == "cpu" else "nccl") if processes > 1 else None,
    )
    if device == "cuda" and "LOCAL_RANK" not in os.environ and args.n_gpu > 1:
        # Several visible GPUs and no launcher: the Trainer would wrap the model in DataParallel, which changes the
        # effective batch and copies the model every step. One device, unless torchrun or accelerate started
        # several processes (each then drives one).
        args._n_gpu = 1
    return args


# ------------------------------------------------------------------------------------------------ callbacks


def callbacks_base():
    from transformers import TrainerCallback

    return TrainerCallback


def mid_epoch_checkpoints(every_steps: int | None, every_minutes: float | None = None, device: str = "cpu",
                          clock=time.monotonic):
    """Ask for a checkpoint every `every_steps` optimizer steps and every `every_minutes` of training (from the start
    or the last checkpoint), on top of the one per epoch; None: not by that measure. Under DDP the minutes are
    process 0's and the others follow it (sft_pipeline.distributed.any_process), so all save at the same step."""
    from sft_pipeline import distributed

    class SaveEvery(callbacks_base()):
        def __init__(self):
            self.last = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = clock()

        def on_save(self, args, state, control, **kwargs):
            self.last = clock()

        def on_step_end(self, args, state, control, **kwargs):
            if every_steps is not None and state.global_step % every_steps == 0:
                control.should_save = True
            if every_minutes is not None:
                due = distributed.is_main() and clock() - self.last >= every_minutes * 60
                if distributed.any_process(due, device):
                    control.should_save = True
            return control

    return SaveEvery()


def progress_bar(stream=None):
    """Progress of the optimizer steps (loss, learning rate, rate, ETA) and of each validation pass, and one line per
    epoch with its validation metrics. On a terminal (`dvc repro` in a shell) these are tqdm bars redrawn in place;
    otherwise (a log file, CI, a Prefect task) a plain line at most every 30 s and at each epoch's end."""
    stream = sys.stderr if stream is None else stream
    interactive = hasattr(stream, "isatty") and stream.isatty()

    class ProgressBar(callbacks_base()):
        def __init__(self):
            self.train = self.validation = None
            self.started = self.last_line = 0.0
            self.first_step = self.last_step = 0
            self.postfix = ""

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = self.last_line = time.monotonic()
            self.first_step = state.global_step
            if interactive:
                from tqdm.auto import tqdm

                self.train = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                                  file=stream, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.train is not None:
                self.train.update(state.global_step - self.train.n)
            elif time.monotonic() - self.last_line >= 30:
                self._line(state)

        def _line(self, state):
            self.last_line = now = time.monotonic()
            self.last_step = state.global_step
            done = state.global_step - self.first_step
            rate = done / max(now - self.started, 1e-9)
            left = (state.max_steps - state.global_step) / rate if rate > 0 else float("nan")
            eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left == left else "?"
            print(f"train: step {state.global_step}/{state.max_steps} ({state.global_step / state.max_steps:.0%}), "
                  f"{rate:.2f} steps/s, ETA {eta}{self.postfix}", file=stream, flush=True)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if not interactive:
                return
            if self.validation is None and eval_dataloader is not None and hasattr(eval_dataloader, "__len__"):
                from tqdm.auto import tqdm

                self.validation = tqdm(total=len(eval_dataloader), desc="validation", unit="batch", leave=False,
                                       position=1, file=stream, dynamic_ncols=True)
            if self.validation is not None:
                self.validation.update(1)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.validation is not None:
                self.validation.close()
                self.validation = None
            if metrics:
                shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items()
                                  if k.startswith("eval_") and isinstance(v, float) and k not in _EVAL_SPEED)
                line = f"epoch {state.epoch:g}/{args.num_train_epochs:g}: validation {shown}"
                if self.train is not None:
                    self.train.write(line, file=stream)
                else:
                    print(line, file=stream, flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.postfix = f", loss {logs['loss']:.4f}, lr {logs.get('learning_rate', 0):.2e}"
                if self.train is not None:
                    self.train.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}",
                                           refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.train is not None:
                self.train.close()
                self.train = None
            elif self.last_step != state.global_step:
                self._line(state)

    return ProgressBar()


def epoch_clock():
    """Wall time of each epoch's optimizer steps (validation and checkpoints excluded), in `.seconds`."""

    class EpochClock(callbacks_base()):
        def __init__(self):
            self.seconds: list[float] = []
            self.started = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            if self.started is not None:
                self.seconds.append(round(time.perf_counter() - self.started, 2))
                self.started = None

    return EpochClock()


# ------------------------------------------------------------------------------------------------ fit


class Fitted:
    """The trainer after `train()`, its output, and what the report needs of the run."""

    def __init__(self, trainer, output, clock, features: dict | None):
        self.trainer, self.output, self.clock, self.features = trainer, output, clock, features


def fit(prepared, task, dataset, tokenizer, paths: Paths, options: Train, device: str, callbacks: list,
        resume: str | None) -> Fitted:
    """Train `prepared.model` (sft_pipeline.strategies.Prepared) on the tokenized train split, validating on the
    validation split after every epoch; the best epoch is in the model afterwards."""
    clock = epoch_clock()
    features = None
    if prepared.cache_features:
        from sft_pipeline import features as frozen

        started = time.perf_counter()
        head = dict(prepared.model.named_modules())[prepared.head[0]] if len(prepared.head) == 1 else None
        collate = task.collator(tokenizer, device, options)
        cached = frozen.extract_all(prepared.model, head, dataset, collate, options.eval_batch_size, device) \
            if head is not None else None
        if cached is None:
            prepared.notes.append("features not cached: the new head is not one module fed by one vector per row")
        else:
            seconds = round(time.perf_counter() - started, 2)
            features = {"rows": sum(len(d["labels"]) for d in cached.values()),
                        "dim": int(cached["train"]["features"].shape[1]), "seconds": seconds}
            print(f"train: backbone features of {features['rows']} rows computed once in {seconds:.1f} s; the head "
                  f"trains on them")
            model = frozen.head_only(head, prepared.model.config)
            train_set, eval_set = frozen.as_dataset(cached["train"]), frozen.as_dataset(cached["validation"])
            trainer = trainer_class()(
                model=model, args=training_arguments(paths, options, device, task.best_metric, grouped=False),
                train_dataset=train_set, eval_dataset=eval_set, data_collator=frozen.collate,
                compute_metrics=task.compute_metrics, callbacks=[clock, *callbacks])
            return _train(trainer, resume, clock, features, task)
    trainer = trainer_class()(
        model=prepared.model,
        args=training_arguments(paths, options, device, task.best_metric, greater_is_better=task.greater_is_better),
        train_dataset=dataset["train"],
        eval_dataset=dataset["validation"],
        processing_class=tokenizer,
        data_collator=task.collator(tokenizer, device, options),
        compute_metrics=task.compute_metrics,
        callbacks=[clock, *callbacks],
    )
    return _train(trainer, resume, clock, features, task)


def full_state_dict(trainer) -> dict | None:
    """The trained model's full weights, gathered from their shards onto process 0's CPU memory, where the Trainer
    runs under FSDP (`accelerate launch --config_file configs/accelerate/fsdp.yaml`): a collective, so every process
    calls it. None otherwise: the model's own weights are whole."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


def _train(trainer, resume, clock, features, task) -> Fitted:
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging

    if task.loss_is_batch_mean:
        # Its loss is a mean over the batch, whatever num_items_in_batch says: the Trainer then divides it by the
        # accumulation steps, and under DDP does not multiply it by the number of processes (tasks.base.Task).
        trainer.model_accepts_loss_kwargs = False

    # Each checkpoint write would draw a bar of its own ("Writing model shards") through the training bar.
    hf_logging.disable_progress_bar()
    trainer.remove_callback(PrinterCallback)
    if trainer.is_world_process_zero():
        trainer.add_callback(progress_bar())
    output = trainer.train(resume_from_checkpoint=resume)
    return Fitted(trainer, output, clock, features)
