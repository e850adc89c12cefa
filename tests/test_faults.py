"""Faults a long run meets: a stop signal during train, a disk that fills up, a tracking store that cannot be written.

The signal test runs `python -m stages.train` as a process on a tiny random BERT and sends it SIGTERM; each of its
optimizer steps is slowed down (a `sitecustomize` of the test's own, on PYTHONPATH) so that the signal lands mid-run
and not after the last step. The disk tests inject the errors a full disk raises into the save calls, in process.

    .venv/bin/python -m pytest tests/test_faults.py
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from sft_pipeline import faults, tracking
from sft_pipeline.io import StageError
from sft_pipeline.params import parse
from stages import clean, split, tokenize, train, validate
from tests.conftest import ROOT, project_params, synthetic_rows, write_csv, write_params
from tests.test_reliability import RESUME_TOLERANCE, complete_checkpoints

# No mid-epoch checkpoints but the one the stop asks for: the checkpoint at the stopped step is the stop's own.
SETTINGS = {"train__epochs": 2, "train__batch_size": 8, "train__save_every_steps": 1000, "train__warmup": 0.0}

SLOW_STEPS = """
import os, time
from transformers import trainer as _trainer

_step = _trainer.Trainer.training_step


def training_step(self, *args, **kwargs):
    out = _step(self, *args, **kwargs)
    with open(os.environ["STEP_LOG"], "a") as fh:
        fh.write(f"{self.state.global_step}\\n")
    time.sleep(float(os.environ["STEP_SLEEP"]))
    return out


_trainer.Trainer.training_step = training_step
_save = _trainer.Trainer._save_checkpoint


def _save_checkpoint(self, model, trial):
    # SAVE_SLEEP: a save from step SAVE_SLOW_FROM on takes that long, its folder half written meanwhile (a large
    # model on a slow disk).
    if float(os.environ.get("SAVE_SLEEP", "0")) and self.state.global_step >= int(os.environ["SAVE_SLOW_FROM"]):
        folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.safetensors"), "wb") as fh:
            fh.write(b"partial")
        time.sleep(float(os.environ["SAVE_SLEEP"]))
    return _save(self, model, trial)


_trainer.Trainer._save_checkpoint = _save_checkpoint
"""


def data_ready(root: Path, model: Path, rows: list[dict], **overrides):
    """params.yaml under `root` (absolute paths) and the data stages run: train is next."""
    root.mkdir(parents=True, exist_ok=True)
    raw = project_params(root, model=model, **{**SETTINGS, **overrides})
    params_file = write_params(root, raw)
    params = parse(raw)
    write_csv(params.paths.raw_dir / "batch1.csv", rows)
    for stage in (clean, validate, split, tokenize):
        stage.run(params)
    return params, params_file


def client(params):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{params.paths.mlflow_db}")


def train_process(params_file: Path, hook: Path | None = None, sleep: float = 0.0, step_log: Path | None = None,
                  save_sleep: float = 0.0, save_slow_from: int = 0):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if hook is not None:
        env.update(PYTHONPATH=os.pathsep.join([str(hook), str(ROOT)]), STEP_LOG=str(step_log), STEP_SLEEP=str(sleep),
                   SAVE_SLEEP=str(save_sleep), SAVE_SLOW_FROM=str(save_slow_from))
    return subprocess.Popen([sys.executable, "-m", "stages.train", "--params", str(params_file)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def safetensors_max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def stop_after_steps(tmp_path: Path, params_file: Path, steps: int, **slow) -> tuple[str, subprocess.Popen]:
    """Start train with slowed steps, send SIGTERM once `steps` steps ran, return its output once it exits."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SLOW_STEPS)
    step_log = tmp_path / "steps.log"
    step_log.unlink(missing_ok=True)
    proc = train_process(params_file, hook, step_log=step_log, **slow)
    deadline = time.monotonic() + 300
    while not (step_log.is_file() and len(step_log.read_text().split()) >= steps):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "train made no step within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    return output, proc


@pytest.mark.slow
def test_sigterm_during_train_saves_the_step_ends_the_run_killed_and_the_rerun_matches(tmp_path, tiny_bert):
    rows = synthetic_rows(60, seed=5)
    params, params_file = data_ready(tmp_path / "project", tiny_bert, rows)
    output, proc = stop_after_steps(tmp_path, params_file, 2, sleep=0.5)
    assert proc.returncode == 143, output

    stopped = [line for line in output.splitlines() if line.startswith("train: stopped by SIGTERM at step ")]
    assert len(stopped) == 1, output
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    train_rows = json.loads(params.paths.split_report.read_text())["rows"]["train"]
    total = 2 * -(-train_rows // 8)
    assert 1 <= step < total
    assert f"checkpoint-{step} saved; `dvc repro` resumes" in stopped[0]
    # The checkpoint of the stopped step is complete, and it is the only one: no epoch ended, save_every_steps is 1000.
    assert complete_checkpoints(params.paths.checkpoints_dir) == [step]
    assert not params.paths.train_report.exists() and not params.paths.model_dir.exists()
    run_id = (params.paths.checkpoints_dir / "mlflow_run_id").read_text().strip()
    run = client(params).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["stopped.by"] == "SIGTERM"
    assert run.data.tags["stopped.at_step"] == str(step)
    assert run.data.tags["stopped.checkpoint"] == f"checkpoint-{step}"
    assert f"MLflow run {run_id} ended as KILLED" in stopped[0]

    rerun = train_process(params_file)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    report = json.loads(params.paths.train_report.read_text())
    assert report["resumed_from"] == str(params.paths.checkpoints_dir / f"checkpoint-{step}")
    assert report["global_steps"] == total
    assert client(params).get_run(run_id).info.status == "FINISHED"  # the same run, continued

    reference, _ = data_ready(tmp_path / "reference", tiny_bert, rows)
    train.run(reference, track=False)
    difference = safetensors_max_difference(params.paths.model_dir / "model.safetensors",
                                            reference.paths.model_dir / "model.safetensors")
    losses = pd.read_csv(params.paths.eval_history)["eval_loss"].tolist()
    expected = pd.read_csv(reference.paths.eval_history)["eval_loss"].tolist()
    print(f"stopped at step {step} of {total}; resumed; largest weight difference from the uninterrupted run "
          f"{difference:.2e}; validation loss per epoch {losses} vs {expected}")
    assert losses == pytest.approx(expected, abs=RESUME_TOLERANCE)
    assert difference < 1e-3


@pytest.mark.slow
def test_a_stop_whose_save_outlasts_the_grace_period_exits_without_a_half_checkpoint(tmp_path, tiny_bert):
    params, params_file = data_ready(tmp_path / "project", tiny_bert, synthetic_rows(30, seed=5),
                                     train__stop_grace_s=1.0, train__save_every_steps=2)
    # Checkpoint-2 is saved as usual; the SIGTERM comes after step 3, and the save it asks for takes 30 s.
    output, proc = stop_after_steps(tmp_path, params_file, 3, sleep=0.3, save_sleep=30, save_slow_from=3)
    assert proc.returncode == 143, output
    assert "did not finish within train.stop_grace_s = 1 s; exiting without them" in output
    step = int(re.search(r"removed the unfinished checkpoint-(\d+)", output).group(1))
    assert step >= 3 and f"`dvc repro` resumes from checkpoint-{step - step % 2}" in output
    assert complete_checkpoints(params.paths.checkpoints_dir) == [step - step % 2]
    assert [p.name for p in params.paths.checkpoints_dir.glob("checkpoint-*")] == [f"checkpoint-{step - step % 2}"]
    run_id = (params.paths.checkpoints_dir / "mlflow_run_id").read_text().strip()
    run = client(params).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["stopped.by"] == "SIGTERM"


# ---------------------------------------------------------------------------------------------- a full disk


def test_no_space_is_recognised_through_the_errors_that_do_not_say_so():
    assert faults.no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert faults.no_space(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 24640 vs 24532"))
    assert faults.no_space(RuntimeError("basic_ios::clear: iostream error"))
    import sqlite3

    assert faults.no_space(sqlite3.OperationalError("database or disk is full"))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert faults.no_space(outer)
    assert not faults.no_space(RuntimeError("CUDA out of memory"))
    assert not faults.no_space(OSError(errno.EACCES, "Permission denied"))


def fail_on_save(monkeypatch, folder_name: str):
    """torch.save raises what a full disk made it raise, for the optimizer state of checkpoint `folder_name`."""
    import torch

    save = torch.save
    calls = []

    def full_disk(obj, f, *args, **kwargs):
        if folder_name in str(f) and str(f).endswith("optimizer.pt"):
            calls.append(str(f))
            Path(f).write_bytes(b"PK\x03\x04 cut short")  # what was written before the disk filled up
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 24640 vs 24532")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    return calls


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_is_named_in_one_line_and_the_rerun_resumes(
        tmp_path, tiny_bert, monkeypatch, capsys):
    params, params_file = data_ready(tmp_path, tiny_bert, synthetic_rows(30, seed=4), train__save_every_steps=4)
    calls = fail_on_save(monkeypatch, "checkpoint-8")
    assert train.main(["--params", str(params_file)]) == 1
    assert calls, "the fault was not injected"
    err = capsys.readouterr().err.strip().splitlines()
    message = [line for line in err if "no space left on the device" in line]
    assert len(message) == 2, err  # before the traceback and as the very last line
    assert err[-1] == message[1] and message[0].startswith(message[1])
    assert message[1].startswith("error: train: no space left on the device while writing under ")
    assert "free on its volume" in message[1] and "resumes from its last complete checkpoint" in message[1]
    assert err.index(message[0]) < err.index("Traceback (most recent call last):")
    # The cut-short checkpoint is gone, the one before is intact, and the run is not left RUNNING.
    assert complete_checkpoints(params.paths.checkpoints_dir) == [4]
    assert not (params.paths.checkpoints_dir / "checkpoint-8").exists()
    run_id = (params.paths.checkpoints_dir / "mlflow_run_id").read_text().strip()
    run = client(params).get_run(run_id)
    assert run.info.status == "FAILED" and "unexpected pos" in run.data.tags["failed.error"]

    monkeypatch.undo()
    report = train.run(parse(project_params(tmp_path, model=tiny_bert, **{**SETTINGS, "train__save_every_steps": 4})))
    assert report["resumed_from"].endswith("checkpoint-4")
    assert report["global_steps"] > 8


def test_a_store_on_the_full_disk_does_not_mask_the_error(tmp_path, tiny_bert, monkeypatch, capsys):
    """Ending the run as FAILED fails too (SQLite on the same full disk): a warning, and the original error stays."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    params, params_file = data_ready(tmp_path, tiny_bert, synthetic_rows(20, seed=6), train__epochs=1,
                                     train__save_every_steps=2)
    fail_on_save(monkeypatch, "checkpoint-2")

    def disk_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(MlflowClient, "set_terminated", disk_full)
    assert train.main(["--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert "could not be ended as FAILED (OperationalError: database or disk is full)" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: train: no space left on the device")
    assert "RuntimeError: [enforce fail at inline_container.cc:664] . unexpected pos" in err


def test_every_stage_names_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    raw = project_params(tmp_path)
    params_file = write_params(tmp_path, raw)
    write_csv(tmp_path / raw["paths"]["raw_dir"] / "a.csv", synthetic_rows(20))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data/interim/.clean.parquet.x.tmp"))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    assert clean.main(["--params", str(params_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"error: clean: no space left on the device while writing "
                             f"{tmp_path / 'data/interim/.clean.parquet.x.tmp'}; ")
    assert "free on its volume" in err[0] and err[-1] == err[0].split(". The original error")[0]


def test_other_failures_keep_their_traceback_and_are_not_called_no_space(tmp_path, monkeypatch):
    raw = project_params(tmp_path)
    params_file = write_params(tmp_path, raw)
    write_csv(tmp_path / raw["paths"]["raw_dir"] / "a.csv", synthetic_rows(20))

    def broken(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(PermissionError):
        clean.main(["--params", str(params_file)])


# ---------------------------------------------------------------------------------------------- preflight


class FakeModel:
    """What checkpoint_estimate reads of a model: its parameters and buffers."""

    def __init__(self, trainable: int, frozen: int):
        import torch

        self.params = [torch.nn.Parameter(torch.zeros(trainable)),
                       torch.nn.Parameter(torch.zeros(frozen), requires_grad=False)]

    def parameters(self):
        return iter(self.params)

    def buffers(self):
        return iter(())


def test_the_estimate_counts_weights_optimizer_state_and_the_checkpoints_kept():
    full = faults.checkpoint_estimate(FakeModel(trainable=1000, frozen=3000), adapter_only=False)
    assert (full.weights, full.optimizer) == (16_000, 8_000)  # fp32: 4 bytes each; AdamW: two moments per trainable
    assert full.checkpoint == 16_000 + 8_000 + faults.CHECKPOINT_OVERHEAD
    assert full.checkpoints == 3 * full.checkpoint
    adapter = faults.checkpoint_estimate(FakeModel(trainable=1000, frozen=3000), adapter_only=True)
    assert (adapter.weights, adapter.optimizer) == (4_000, 8_000)


def test_train_refuses_to_start_when_the_volume_cannot_hold_its_checkpoints(tmp_path, tiny_bert, monkeypatch,
                                                                            capsys):
    params, params_file = data_ready(tmp_path, tiny_bert, synthetic_rows(20, seed=6))
    monkeypatch.setattr(faults, "free_bytes", lambda path: 20 * 2**20)  # 20 MB free
    assert train.main(["--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert "error: not enough disk space to train: about " in err
    # tiny BERT: weights W, AdamW 2W, three checkpoints of 3W + 8 MB, and the model W + 8 MB; all on one volume
    estimate = faults.checkpoint_estimate(train_model(params), adapter_only=False)
    assert f"about {faults.human(estimate.checkpoints + estimate.model)} needed" in err
    assert f"3 checkpoints of {faults.human(estimate.checkpoint)}" in err and "20.0 MB free" in err
    assert not params.paths.checkpoints_dir.exists() and not params.paths.mlflow_db.exists()


def train_model(params):
    from sft_pipeline import strategies, tasks
    from sft_pipeline.modeling import load_pretrained, load_tokenizer

    task = tasks.get(params)
    meta = tasks.read_meta(params.paths.tokenized_dir, task)
    tokenizer = load_tokenizer(params.paths.tokenized_dir / "tokenizer", params.model)
    model, new = load_pretrained(params.model.name, params.model, task.auto_class, task.model_kwargs(meta, tokenizer))
    return strategies.prepare(model, new, params.train, task, params.paths.tokenized_dir / "tokenizer",
                              params.tokenize.max_length).model


def test_checkpoints_already_there_count_as_space_that_comes_back(tmp_path, monkeypatch):
    estimate = faults.Estimate(weights=100 * 2**20, optimizer=200 * 2**20, model=108 * 2**20)
    monkeypatch.setattr(faults, "free_bytes", lambda path: 500 * 2**20)
    with pytest.raises(StageError, match="not enough disk space"):
        faults.check_space(estimate, tmp_path / "ck", tmp_path / "model")
    needs = faults.check_space(estimate, tmp_path / "ck", tmp_path / "model", on_disk=600 * 2**20)
    assert list(needs.values()) == [(estimate.checkpoints - 600 * 2**20 + estimate.model, 500 * 2**20)]


# ---------------------------------------------------------------------------------------------- the store


def test_a_store_that_cannot_be_written_stops_train_before_it_trains(tmp_path, tiny_bert, capsys):
    params, params_file = data_ready(tmp_path, tiny_bert, synthetic_rows(20, seed=6))
    params.paths.mlflow_db.mkdir()  # a folder where the SQLite file should be
    assert train.main(["--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert f"error: the MLflow store sqlite:///{params.paths.mlflow_db} cannot be written (" in err
    assert "nothing was trained" in err
    assert not params.paths.checkpoints_dir.exists() and not params.paths.train_report.exists()


class FlakyClient:
    """An MLflow client whose store fails for the first `failures` calls, in the background and when called."""

    def __init__(self, failures: int):
        self.failures = failures
        self.logged: list = []

    def log_batch(self, run_id, metrics, synchronous=True):
        if self.failures > 0:
            self.failures -= 1
            if synchronous:
                raise RuntimeError("database is locked")
            return Failed()
        self.logged.extend(metrics)
        return None if synchronous else Done()


class Failed:
    def wait(self):
        raise RuntimeError("database is locked")


class Done:
    def wait(self):
        return None


def log_steps(live, steps: int) -> None:
    state = type("State", (), {})()
    for step in range(1, steps + 1):
        state.global_step = step
        live.on_log(None, state, None, logs={"loss": 1.0 / step, "learning_rate": 1e-3})
    live.flush()


def test_metrics_the_store_refused_are_retried_and_what_is_lost_is_counted(capsys):
    flaky = FlakyClient(failures=3)  # three steps fail in the background, then the store answers again
    live = tracking.live_metrics("run", client=flaky, retries=3, backoff_s=0)
    log_steps(live, 5)
    assert (live.logged, live.lost) == (10, 0)
    assert sorted((m.key, m.step) for m in flaky.logged) == sorted(
        (key, step) for step in range(1, 6) for key in ("train_loss", "learning_rate"))

    gone = FlakyClient(failures=10**6)  # the store never answers again
    live = tracking.live_metrics("run", client=gone, retries=2, backoff_s=0)
    log_steps(live, 4)
    assert (live.logged, live.lost) == (0, 8)
    assert live.error == "RuntimeError: database is locked"
    assert "8 metric points could not be logged to MLflow run run after 2 tries" in capsys.readouterr().err


def test_a_store_another_program_holds_locked_is_named_before_training(tmp_path, tiny_bert):
    import sqlite3

    raw = project_params(tmp_path, model=tiny_bert)
    params = parse(raw)
    tracking.check_store(params)  # creates the store
    holder = sqlite3.connect(params.paths.mlflow_db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StageError, match=r"cannot be written \(OperationalError: database is locked\)"):
            tracking.check_store(params, lock_timeout_s=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert tracking.check_store(params, lock_timeout_s=0.2)


# ---------------------------------------------------------------------------------------------- the flow's side

STOPS_ON_SIGTERM = """
import signal, sys, time
def stop(signum, frame):
    print("child: saving", flush=True)
    time.sleep(0.3)
    print("train: stopped by SIGTERM at step 3; checkpoint-3 saved", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
sys.exit(0)
"""


def test_run_command_passes_a_stop_signal_to_the_stage_and_waits_for_it(tmp_path):
    from flows.pipeline import run_command

    before = signal.getsignal(signal.SIGTERM)
    lines = []

    def on_line(line):
        lines.append(line)
        if line == "ready":
            os.kill(os.getpid(), signal.SIGTERM)  # this process; the handler run_command set passes it on

    started = time.monotonic()
    code, stopped_by = run_command([sys.executable, "-c", STOPS_ON_SIGTERM], str(tmp_path), on_line)
    assert (code, stopped_by) == (143, signal.SIGTERM)
    assert lines == ["ready", "child: saving", "train: stopped by SIGTERM at step 3; checkpoint-3 saved"]
    assert time.monotonic() - started < 30  # not the child's 60 s sleep: it was stopped
    assert signal.getsignal(signal.SIGTERM) is before

    code, stopped_by = run_command([sys.executable, "-c", "print('done')"], str(tmp_path), lines.append)
    assert (code, stopped_by) == (0, None) and lines[-1] == "done"
