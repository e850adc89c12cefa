"""Stage `train`: fine-tune model.name for the task, with the strategy of train.strategy, on the tokenized train split.

    python -m stages.train [--params params.yaml]

Reads  paths.tokenized_dir (data/, tokenizer/, task.json), the weights of model.name
Writes paths.model_dir        the best epoch's model, ready for `sft_pipeline.strategies.load_trained`: full weights
                              (full, freeze) or the adapter alone (lora, prompt_tuning), as safetensors, with the
                              tokenizer and sft_model.json (task, strategy, base model)
       paths.checkpoints_dir  Trainer checkpoints, kept across runs (dvc.yaml: persist) so a killed run resumes
       paths.train_history    CSV per logged optimizer step: step, epoch, loss, learning_rate, grad_norm
       paths.eval_history     CSV per epoch: validation loss and the task's metrics (classification: accuracy,
                              macro-F1)
       paths.train_report     JSON: strategy, trainable and total parameters, best epoch, time per epoch,
                              throughput, peak memory, whether and where the run resumed
       paths.mlflow_run       JSON: the MLflow run opened here; the loss per step and validation metrics per epoch
                              reach it while training runs, and evaluate logs into the same run

The task (sft_pipeline/tasks/) builds the model (classification: AutoModelForSequenceClassification with a new
head for the labels), collates batches and computes validation metrics; the strategy (sft_pipeline/strategies.py)
decides what trains; the loop is Hugging Face's Trainer with checkpoints, resume and a progress bar
(sft_pipeline/training.py). A resumed run continues the MLflow run of the interrupted one, so one training is one
MLflow run; an earlier training's run that a kill left RUNNING (its id in the checkpoints folder or in
paths.mlflow_run) and that this training does not continue is ended as KILLED, tagged with the run that superseded it.

Faults (sft_pipeline/faults.py): before anything trains or is deleted, train checks that the volumes can hold its
checkpoints and model and that the MLflow store can be written. SIGTERM or SIGINT saves a checkpoint at the end of
the current step, ends the MLflow run as KILLED (tags stopped.by, stopped.at_step, stopped.checkpoint) and exits
with 143 or 130 within train.stop_grace_s; the next run resumes from it. A failure ends the run as FAILED, best
effort; a full disk also removes the checkpoint it cut short.
"""

from __future__ import annotations

import resource
import signal
import sys
import time

from sft_pipeline import distributed, faults, strategies, tasks, training
from sft_pipeline.io import StageError, atomic_path, read_json, stage_main, write_frame, write_json, write_text
from sft_pipeline.modeling import (device_defaults, device_info, load_pretrained, load_tokenizer, pick_device,
                                   pick_precision)
from sft_pipeline.params import Params


def peak_memory_mb(device: str) -> dict:
    """Peak resident memory of this process and, on a GPU, the peak of memory allocated by torch."""
    import torch

    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        peak["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def previous_run_id(mlflow_run) -> str | None:
    """The run id in paths.mlflow_run (the last training's run, which evaluate completes), if it can be read."""
    try:
        return str(read_json(mlflow_run)["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stop_tags(signum: int, step: int | None, checkpoints_dir) -> dict:
    last = faults.newest_complete(checkpoints_dir)
    return {"stopped.by": faults.signal_name(signum), "stopped.at_step": "unknown" if step is None else str(step),
            "stopped.checkpoint": last.name if last else "none"}


def stopped(stop: faults.GracefulStop, step: int, paths, run_id: str | None) -> None:
    """Training stopped on a signal with a checkpoint at `step`: end the MLflow run as KILLED, say so, exit."""
    tags = stop_tags(stop.signum or signal.SIGTERM, step, paths.checkpoints_dir)
    ended = ""
    if run_id:
        from sft_pipeline import tracking

        error = tracking.end_run_best_effort(run_id, "KILLED", tags)
        ended = f" (MLflow run {run_id} {'ended as KILLED' if error is None else 'left RUNNING: ' + error})"
    saved = f"{tags['stopped.checkpoint']} saved" if tags["stopped.checkpoint"] != "none" else "no checkpoint saved"
    if distributed.is_main():
        print(f"train: stopped by {tags['stopped.by']} at step {step}; {saved}; `dvc repro` resumes{ended}",
              flush=True)
    raise faults.Stopped(stop.exit_code)


def run(params: Params, track: bool = True) -> dict:
    """Train and write the model and reports; with `track`, record it all in MLflow too."""
    import torch
    from datasets import load_from_disk
    from transformers import set_seed

    paths, options, task = params.paths, params.train, tasks.get(params)
    data_dir = paths.tokenized_dir / "data"
    if not data_dir.is_dir():
        raise StageError(f"{data_dir}: no tokenized data; run `dvc repro tokenize` first")
    meta = tasks.read_meta(paths.tokenized_dir, task)
    dataset = load_from_disk(str(data_dir))
    device = pick_device(options.device)
    # Before the model loads: fp16 on a CPU is a message, not a Trainer traceback minutes later.
    where = device_info(device, pick_precision(options.precision, device))
    # Under DDP (sft_pipeline.distributed) process 0 alone touches the disks, the checkpoints and MLflow.
    distributed.init(device)
    main_process = distributed.is_main()
    where.update(distributed.describe(), batch_size_per_process=distributed.per_process(options.batch_size,
                                                                                         "train.batch_size"))
    if device == "cuda":
        where["device_count"] = where["processes"]
    if where["processes"] != options.processes and main_process:
        print(f"train: {where['processes']} processes, as the launcher started them (train.processes is "
              f"{options.processes})")

    set_seed(options.seed)
    tokenizer = load_tokenizer(paths.tokenized_dir / "tokenizer", params.model)
    kwargs = task.model_kwargs(meta, tokenizer)
    model, new = load_pretrained(params.model.name, params.model, task.auto_class, kwargs)
    prepared = strategies.prepare(model, new, options, task, paths.tokenized_dir / "tokenizer",
                                  params.tokenize.max_length)
    counts = prepared.counts
    if main_process:
        print(f"train: strategy {prepared.strategy}: {counts['trainable_params']:,} of {counts['total_params']:,} "
              f"parameters train ({counts['trainable_fraction']:.2%}); new head "
              f"{', '.join(prepared.head) or 'none'}" + "".join(f"; {note}" for note in prepared.notes))
    # Read before prepare_checkpoints, which deletes stale checkpoints and this file with them.
    id_file = paths.checkpoints_dir / training.RUN_ID_FILE
    checkpoint_run = id_file.read_text().strip() if id_file.is_file() else None
    # Before any checkpoint is touched or deleted: room for the checkpoints and the model, a store that can be written.
    # The checkpoints there now are resumed and rotated away, or deleted as stale: either way their space comes back.
    resume = None
    if track:
        from sft_pipeline import tracking
    if main_process:
        on_disk = sum(faults.folder_bytes(p) for p in faults.checkpoint_folders(paths.checkpoints_dir))
        faults.check_space(faults.checkpoint_estimate(prepared.model, prepared.is_adapter), paths.checkpoints_dir,
                           paths.model_dir, on_disk)
        if track:
            tracking.check_store(params)
        resume = training.prepare_checkpoints(
            paths.checkpoints_dir,
            training.run_fingerprint(params.model, options, paths.tokenized_dir, paths.cache_dir))
        if resume:
            print(f"train: resuming from {resume}")
    # The others wait here until process 0 has kept or deleted the checkpoints, then resume from the same one.
    resume = distributed.from_main(resume)
    defaults = device_defaults(options, device, where["processes"])
    callbacks = [training.mid_epoch_checkpoints(defaults["save_every_steps"], defaults["save_every_minutes"], device)]
    run_id = live = None
    stop = faults.GracefulStop(options.stop_grace_s, paths.checkpoints_dir,
                               on_timeout=lambda signum: run_id and tracking.end_run_best_effort(
                                   run_id, "KILLED", stop_tags(signum, None, paths.checkpoints_dir)),
                               tidies=main_process)
    callbacks.append(stop.callback(lambda flag: distributed.any_process(flag, device)))
    started = time.perf_counter()
    try:
        with stop:
            if track and main_process:
                # The runs of earlier trainings: one left RUNNING by a kill that this training does not continue is
                # ended.
                earlier = [checkpoint_run, previous_run_id(paths.mlflow_run)]
                run_id = tracking.start_training_run(
                    params, checkpoint_run if resume else None, supersedes=[r for r in earlier if r],
                    reason="a later training, resumed here, replaced it" if resume else
                    "its checkpoints were not resumed (none complete, or made from other params, base weights or "
                    "data)")
                write_text(id_file, run_id)
                live = tracking.live_metrics(run_id)
                callbacks.append(live)
            fitted = training.fit(prepared, task, dataset, tokenizer, paths, options, device, callbacks, resume)
    except BaseException as exc:
        if isinstance(exc, Exception) and faults.no_space(exc) and main_process:
            removed = faults.remove_incomplete(paths.checkpoints_dir)
            if removed:
                print(f"train: removed the checkpoint cut short by the full disk: {', '.join(removed)}",
                      file=sys.stderr)
        if run_id:  # best effort: a store on the same full disk must not replace the error being reported
            tracking.end_run_best_effort(run_id, "FAILED", {"failed.error": f"{type(exc).__name__}: {exc}"[:500]})
        raise
    if stop.stopping:
        stopped(stop, fitted.trainer.state.global_step, paths, run_id)
    elapsed = time.perf_counter() - started
    state = fitted.trainer.state
    # Under FSDP every process holds a shard of the weights: all take part in gathering them onto process 0.
    weights = training.full_state_dict(fitted.trainer)
    if not main_process:
        return {"process": distributed.rank(), "global_steps": state.global_step}

    info = {"task": task.name, "base": strategies.base_reference(params.model), "meta": meta}
    with atomic_path(paths.model_dir, directory=True) as tmp:
        # The best epoch (load_best_model_at_end restored it), weights as safetensors; unlike trainer.save_model, no
        # pickled training_args.bin beside them.
        strategies.save(prepared, tokenizer, tmp, info, weights)
    steps, epochs = training.history_frames(state.log_history)
    write_frame(paths.train_history, steps)
    write_frame(paths.eval_history, epochs)
    best_column = f"eval_{task.best_metric}"
    if len(epochs) and best_column in epochs:
        column = epochs[best_column]
        best = epochs.loc[column.idxmax() if task.greater_is_better else column.idxmin()]
    else:
        best = None
    report = {
        "task": task.name,
        "model": params.model.name,
        "strategy": prepared.strategy,
        "strategy_options": None if options.options() is None else options.options().model_dump(mode="json"),
        **counts,
        "head": prepared.head,
        "learning_rate": strategies.learning_rate(options),
        **where,
        # What `auto` became on this device (train.save_every_steps, save_every_minutes, log_every_steps,
        # dataloader_workers).
        "device_defaults": defaults,
        "torch_threads": torch.get_num_threads(),
        "resumed_from": resume,
        "global_steps": state.global_step,
        "epochs": options.epochs,
        "train_rows": len(dataset["train"]),
        "runtime_s": round(elapsed, 1),
        # Optimizer steps only, per epoch (validation and checkpoints excluded); an epoch cut by a kill is partial.
        "epoch_seconds": fitted.clock.seconds,
        "features_cached": fitted.features,
        "train_samples_per_second": fitted.output.metrics.get("train_samples_per_second"),
        "train_loss": fitted.output.metrics.get("train_loss"),
        "best_metric": task.best_metric,
        "best_epoch": None if best is None else float(best["epoch"]),
        f"best_validation_{task.best_metric}": None if best is None else round(float(best[best_column]), 4),
        "best_checkpoint": state.best_model_checkpoint,
        **peak_memory_mb(device),
    }
    write_json(paths.train_report, report)
    if run_id:
        import mlflow

        from sft_pipeline import tracking

        mlflow.log_metrics({
            "train_runtime_s": report["runtime_s"],
            "train_samples_per_second": report["train_samples_per_second"] or 0.0,
            f"best_val_{task.best_metric}": report[f"best_validation_{task.best_metric}"] or 0.0,
            "trainable_params": counts["trainable_params"], "total_params": counts["total_params"],
            "trainable_fraction": counts["trainable_fraction"], "peak_rss_mb": report["peak_rss_mb"],
        })
        # params.yaml as written is logged already; what `auto` and an absent options block became is logged here.
        resolved = {"learning_rate": report["learning_rate"], "head": ",".join(prepared.head), **where, **defaults,
                    options.strategy: report["strategy_options"]}
        mlflow.log_params(tracking.flatten(resolved, "resolved."))
        mlflow.log_artifact(str(paths.train_report))
        mlflow.end_run()
        write_json(paths.mlflow_run, {"run_id": run_id, "tracking_uri": tracking.tracking_uri(paths),
                                      "experiment": params.mlflow.experiment, "metrics_logged": live.logged,
                                      "metrics_not_logged": live.lost, "logging_error": live.error})
        print(f"train: MLflow run {run_id} ({live.logged} metric points logged while training)")
    print(f"train: {report['global_steps']} steps in {elapsed:.0f} s, best validation {task.best_metric} "
          f"{report[f'best_validation_{task.best_metric}']} at epoch {report['best_epoch']}; model in "
          f"{paths.model_dir}")
    return report


def processes_to_launch(argv: list[str] | None) -> tuple[int, str] | None:
    """(train.processes, the device) when this process is to start them under torchrun: train.processes > 1 and no
    launcher started this one. None otherwise, and when the params cannot be read (stage_main then says why)."""
    if distributed.launched():
        return None
    import argparse

    from sft_pipeline.params import add_params_argument, load

    parser = argparse.ArgumentParser(add_help=False)
    add_params_argument(parser)
    known, _ = parser.parse_known_args(argv)
    try:
        options = load(known.params).train
        if options.processes == 1:
            return None
        return options.processes, pick_device(options.device)
    except Exception:  # noqa: BLE001 - the stage itself reports bad params, with their file and key
        return None


def main(argv: list[str] | None = None) -> int:
    launch = processes_to_launch(argv)
    if launch is not None:
        from sft_pipeline.io import run_main

        codes = []
        run_main(lambda: codes.append(distributed.launch("stages.train", launch[0],
                                                         list(sys.argv[1:] if argv is None else argv), launch[1])),
                 "train", lambda: [])
        return codes[0] if codes else 1
    return stage_main(argv, __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
