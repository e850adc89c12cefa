"""Stage `train`: fine-tune model.name as a sequence classifier on the tokenized train split.

    python -m stages.train [--params params.yaml]

Reads  paths.tokenized_dir (data/, tokenizer/, label_map.json), the weights of model.name
Writes paths.model_dir        the best epoch's model (safetensors) and the tokenizer, ready for `from_pretrained`
       paths.checkpoints_dir  Trainer checkpoints, kept across runs (dvc.yaml: persist) so a killed run resumes
       paths.train_history    CSV per logged optimizer step: step, epoch, loss, learning_rate, grad_norm
       paths.eval_history     CSV per epoch: validation loss, accuracy, macro-F1
       paths.train_report     JSON: best epoch, runtime, throughput, whether and where the run resumed
       paths.mlflow_run       JSON: the MLflow run opened here (params, tags, loss per step, validation per epoch);
                              evaluate logs into the same run

The loop is Hugging Face's Trainer: AdamW, linear schedule with warmup, weight decay, gradient accumulation, dynamic
padding per batch (batches of similar lengths in random order, see LengthGroupedBatches), validation macro-F1 after
every epoch and the best epoch restored at the end. A checkpoint is also written every `train.save_every_steps`
optimizer steps. Checkpoints are only resumed when they were made from the same train and model params and the same
tokenized data (`fingerprint.json`); otherwise they are cleared first. A resumed run continues the MLflow run of the
interrupted one, so one training is one MLflow run.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages.io import StageError, atomic_path, read_json, stage_main, write_frame, write_json
from stages.modeling import fingerprint, load_classifier, load_tokenizer, pick_device
from stages.params import Model, Params, Paths, Train

FINGERPRINT_FILE = "fingerprint.json"
RUN_ID_FILE = "mlflow_run_id"
STEP_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm"]
EPOCH_COLUMNS = ["step", "epoch", "eval_loss", "eval_accuracy", "eval_macro_f1"]


def classification_metrics(eval_pred) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred
    predictions = np.asarray(logits).argmax(axis=-1)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }


def run_fingerprint(model: Model, options: Train, tokenized_dir: Path) -> dict:
    return {
        "model": model.model_dump(mode="json"),
        "train": options.model_dump(mode="json"),
        "tokenized": fingerprint(tokenized_dir),
    }


def prepare_checkpoints(checkpoints_dir: Path, current: dict) -> str | None:
    """The checkpoint to resume from, if any; stale checkpoints (other params or data) are removed.

    The Trainer writes trainer_state.json last, so a checkpoint folder without it was cut short by a kill: it is
    removed, and the newest complete one is resumed.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    marker = checkpoints_dir / FINGERPRINT_FILE
    if checkpoints_dir.is_dir():
        previous = json.loads(marker.read_text()) if marker.is_file() else None
        if previous != current:
            shutil.rmtree(checkpoints_dir)
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


def history_frames(log_history: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    steps = [{k: e.get(k) for k in STEP_COLUMNS} for e in log_history if "loss" in e and "eval_loss" not in e]
    epochs = [{k: e.get(k) for k in EPOCH_COLUMNS} for e in log_history if "eval_loss" in e]
    return pd.DataFrame(steps, columns=STEP_COLUMNS), pd.DataFrame(epochs, columns=EPOCH_COLUMNS)


def mid_epoch_checkpoints(every: int):
    from transformers import TrainerCallback

    class SaveEvery(TrainerCallback):
        """Ask for a checkpoint every `every` optimizer steps, on top of the one per epoch."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                control.should_save = True
            return control

    return SaveEvery()


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


def trainer_class():
    """HF Trainer, with LengthGroupedBatches as its sampler when train_sampling_strategy is group_by_length."""
    from transformers import Trainer

    class GroupedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            # The DataLoader's copy has lost the `length` column (not a model input); the rows are the same.
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or not hasattr(dataset, "column_names"):
                return super()._get_train_sampler(train_dataset)
            if "length" in getattr(self.train_dataset, "column_names", ()) and len(self.train_dataset) == len(dataset):
                lengths = self.train_dataset["length"]
            else:
                lengths = [len(ids) for ids in dataset["input_ids"]]
            return LengthGroupedBatches(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        self.args.data_seed or self.args.seed)

    return GroupedTrainer


def training_arguments(paths: Paths, options: Train, device: str):
    import torch
    from transformers import TrainingArguments

    bf16 = options.precision == "bf16" or (
        options.precision == "auto" and device == "cuda" and torch.cuda.is_bf16_supported()
    )
    return TrainingArguments(
        output_dir=str(paths.checkpoints_dir),
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.eval_batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=options.learning_rate,
        weight_decay=options.weight_decay,
        warmup_steps=options.warmup,
        lr_scheduler_type="linear",
        max_grad_norm=options.max_grad_norm,
        optim="adamw_torch",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=options.log_every_steps,
        seed=options.seed,
        data_seed=options.seed,
        train_sampling_strategy="group_by_length" if options.group_by_length else "random",
        use_cpu=device == "cpu",
        bf16=bf16,
        fp16=options.precision == "fp16",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run(paths: Paths, model: Model, options: Train, track: Params | None = None) -> dict:
    """Train and write the model and reports; with `track` (the whole params), record it all in MLflow too."""
    import torch
    from datasets import load_from_disk
    from transformers import DataCollatorWithPadding, set_seed

    data_dir = paths.tokenized_dir / "data"
    if not data_dir.is_dir():
        raise StageError(f"{data_dir}: no tokenized data; run `dvc repro tokenize` first")
    labels = read_json(paths.tokenized_dir / "label_map.json")["labels"]
    dataset = load_from_disk(str(data_dir))
    device = pick_device(options.device)

    set_seed(options.seed)
    tokenizer = load_tokenizer(paths.tokenized_dir / "tokenizer", model)
    classifier = load_classifier(model.name, model, labels, tokenizer.pad_token_id)
    resume = prepare_checkpoints(paths.checkpoints_dir, run_fingerprint(model, options, paths.tokenized_dir))
    if resume:
        print(f"train: resuming from {resume}")
    run_id = None
    if track is not None:
        from stages import tracking

        id_file = paths.checkpoints_dir / RUN_ID_FILE
        run_id = tracking.start_training_run(track, id_file.read_text().strip() if resume and id_file.is_file() else None)
        id_file.write_text(run_id)

    try:
        trainer = trainer_class()(
            model=classifier,
            args=training_arguments(paths, options, device),
            train_dataset=dataset["train"],
            eval_dataset=dataset["validation"],
            processing_class=tokenizer,
            # Pad each batch to its longest row; multiples of 8 suit tensor cores and cost nothing on a CPU.
            data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if device == "cuda" else None),
            compute_metrics=classification_metrics,
            callbacks=[mid_epoch_checkpoints(options.save_every_steps)],
        )
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=resume)
    except BaseException:
        if run_id:  # a killed process leaves the run RUNNING instead, and the resumed run continues it
            import mlflow

            mlflow.end_run(status="FAILED")
        raise
    elapsed = time.perf_counter() - started

    with atomic_path(paths.model_dir, directory=True) as tmp:
        # The best epoch (load_best_model_at_end restored it), weights as safetensors; unlike
        # trainer.save_model, no pickled training_args.bin beside them.
        trainer.model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    steps, epochs = history_frames(trainer.state.log_history)
    write_frame(paths.train_history, steps)
    write_frame(paths.eval_history, epochs)
    best = epochs.loc[epochs["eval_macro_f1"].idxmax()] if len(epochs) else None
    report = {
        "model": model.name,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "resumed_from": resume,
        "global_steps": trainer.state.global_step,
        "epochs": options.epochs,
        "train_rows": len(dataset["train"]),
        "runtime_s": round(elapsed, 1),
        "train_samples_per_second": output.metrics.get("train_samples_per_second"),
        "train_loss": output.metrics.get("train_loss"),
        "best_epoch": None if best is None else float(best["epoch"]),
        "best_validation_macro_f1": None if best is None else round(float(best["eval_macro_f1"]), 4),
        "best_checkpoint": trainer.state.best_model_checkpoint,
    }
    write_json(paths.train_report, report)
    if run_id:
        import mlflow

        logged = tracking.log_history(run_id, trainer.state.log_history)
        mlflow.log_metrics({"train_runtime_s": report["runtime_s"],
                            "train_samples_per_second": report["train_samples_per_second"] or 0.0,
                            "best_val_macro_f1": report["best_validation_macro_f1"] or 0.0})
        mlflow.log_artifact(str(paths.train_report))
        mlflow.end_run()
        write_json(paths.mlflow_run, {"run_id": run_id, "tracking_uri": tracking.tracking_uri(paths),
                                      "experiment": track.mlflow.experiment, "metrics_logged": logged})
        print(f"train: MLflow run {run_id} ({logged} metric points)")
    print(f"train: {report['global_steps']} steps in {elapsed:.0f} s, best validation macro-F1 "
          f"{report['best_validation_macro_f1']} at epoch {report['best_epoch']}; model in {paths.model_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, lambda params: run(params.paths, params.model, params.train, track=params))


if __name__ == "__main__":
    sys.exit(main())
