"""Several training processes (DDP under torchrun, gloo on this CPU): the batches each process takes, and train run
as 2 processes against the same train as 1, through the stage's own entry point (`train.processes: 2`).

    .venv/bin/python -m pytest tests/test_distributed.py
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sft_pipeline.params import ParamsError, parse
from sft_pipeline.training import LengthGroupedBatches, RankBatches, global_micro_batches
from stages import tokenize
from tests.conftest import ROOT, prepared_project, project_params
from tests.test_faults import SLOW_STEPS, client, complete_checkpoints

# Two processes against one, same global batch, same rows in each step, dropout off: the losses differ only through
# the order of float sums (gloo's all-reduce of two half batches' gradients). Measured here over 12 steps: at most
# 1.2e-7, per step and per epoch's validation. AdamW's first updates (about lr * sign(gradient), even for a gradient
# near 0) can amplify such differences, hence a tolerance well above that.
STEP_TOLERANCE = VALIDATION_TOLERANCE = 1e-4


def one_process_batches(lengths, batch_size, accumulation, seed, epoch):
    """What one process's DataLoader takes: LengthGroupedBatches' rows, cut into batches of `batch_size`."""
    order = list(LengthGroupedBatches(lengths, batch_size * accumulation, seed).with_epoch(epoch))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.parametrize("rows,per_process,processes,accumulation", [
    (96, 8, 2, 1),     # 6 full global micro-batches of 16
    (101, 8, 2, 1),    # a last micro-batch of 5 rows: 3 and 2
    (97, 8, 2, 1),     # a last one of 1 row, fewer than the processes: it joins the one before (17 rows, 9 and 8)
    (50, 4, 3, 2),     # 3 processes, accumulation 2, 50 = 4 * 12 + 2: the 2 rows join the last micro-batch
    (7, 8, 4, 1),      # fewer rows than one global batch: one micro-batch, 2/2/2/1
])
def test_each_process_takes_its_part_of_the_rows_one_process_would_take(rows, per_process, processes, accumulation):
    lengths = np.random.default_rng(rows).integers(3, 60, rows)
    for epoch in (0, 1):
        samplers = [RankBatches(rows, lengths, per_process, accumulation, processes, r, seed=5) for r in
                    range(processes)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        taken = [list(s) for s in samplers]
        # Every process the same number of micro-batches (a DDP step waits for all), as its len says, each non-empty.
        assert {len(t) for t in taken} == {len(samplers[0])}
        assert all(len(batch) >= 1 for t in taken for batch in t)
        # Together: each row once per epoch.
        every = sorted(i for t in taken for batch in t for i in batch)
        assert every == list(range(rows))
        # Micro-batch k of all processes, side by side, is the k-th batch of one process with the global batch
        # (the last two merged when the last has fewer rows than processes), its parts near-equal.
        expected = one_process_batches(lengths, per_process * processes, accumulation, 5, epoch)
        if len(expected) > 1 and len(expected[-1]) < processes:
            expected[-2:] = [expected[-2] + expected[-1]]
        joined = [[i for t in taken for i in t[k]] for k in range(len(taken[0]))]
        assert joined == [[int(i) for i in batch] for batch in expected]
        assert all(max(map(len, parts)) - min(map(len, parts)) <= 1 for parts in zip(*taken))


def test_without_length_grouping_the_processes_share_a_shuffle_the_same_way():
    samplers = [RankBatches(50, None, 4, 1, 2, r, seed=1) for r in range(2)]
    taken = [list(s) for s in samplers]
    assert len(taken[0]) == len(taken[1]) == 7
    assert sorted(i for t in taken for b in t for i in b) == list(range(50))


@pytest.mark.parametrize("lengths", [None, np.arange(96) % 40 + 3])
def test_the_batches_change_with_the_epoch(lengths):
    first, second = (np.concatenate(global_micro_batches(96, lengths, 16, 1, 2, 5, epoch)) for epoch in (0, 1))
    assert sorted(first) == sorted(second) == list(range(96)) and first.tolist() != second.tolist()


def test_fewer_rows_than_processes_is_an_error_not_a_hang():
    from sft_pipeline.io import StageError

    with pytest.raises(StageError, match="the train split has 3 rows, fewer than the 4 training processes"):
        RankBatches(3, None, 2, 1, 4, 0, seed=1)


def test_a_global_batch_the_processes_cannot_share_is_refused_when_params_load(tmp_path):
    raw = project_params(tmp_path)
    raw["train"].update(processes=3, batch_size=16)
    with pytest.raises(ParamsError, match="16 is the global batch, which train.processes = 3 cannot share evenly"):
        parse(raw)


def test_more_processes_than_gpus_is_an_error_before_anything_starts(monkeypatch):
    import torch

    from sft_pipeline import distributed
    from sft_pipeline.io import StageError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(StageError, match="train.processes is 4 but 2 CUDA device"):
        distributed.launch("stages.train", 4, [], "cuda")


def no_dropout(tiny_bert: Path, folder: Path) -> Path:
    """tiny_bert with dropout off, so one and two processes compute the same loss from the same rows."""
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def trained(tmp_path: Path, model: Path, processes: int):
    params, params_file = prepared_project(tmp_path / f"p{processes}", model, train__processes=processes,
                                           train__epochs=2)
    assert tokenize.main(["--params", str(params_file)]) == 0
    run = subprocess.run([sys.executable, "-m", "stages.train", "--params", str(params_file)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return params, run.stdout + run.stderr


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_the_same_global_batch(tmp_path, tiny_bert):
    model = no_dropout(tiny_bert, tmp_path / "model")
    one, _ = trained(tmp_path, model, 1)
    two, output = trained(tmp_path, model, 2)
    assert "train: 2 processes (gloo, 1 threads each)" in output

    report = json.loads(two.paths.train_report.read_text())
    assert (report["processes"], report["backend"], report["batch_size_per_process"]) == (2, "gloo", 8)
    assert report["torch_threads"] == 1
    alone = json.loads(one.paths.train_report.read_text())
    assert (alone["processes"], alone["backend"], alone["batch_size_per_process"]) == (1, "none", 16)
    assert report["global_steps"] == alone["global_steps"] == 12  # 96 rows, batch 16, 2 epochs

    steps_two, steps_one = pd.read_csv(two.paths.train_history), pd.read_csv(one.paths.train_history)
    epochs_two, epochs_one = pd.read_csv(two.paths.eval_history), pd.read_csv(one.paths.eval_history)
    assert steps_two["step"].tolist() == steps_one["step"].tolist()
    difference = (steps_two["loss"] - steps_one["loss"]).abs().max()
    print(f"largest loss difference, 2 processes vs 1: per step {difference:.2e}, per epoch "
          f"{(epochs_two['eval_loss'] - epochs_one['eval_loss']).abs().max():.2e}")
    assert difference < STEP_TOLERANCE
    assert epochs_two["eval_loss"].tolist() == pytest.approx(epochs_one["eval_loss"].tolist(),
                                                                 abs=VALIDATION_TOLERANCE)

    # One MLflow run, finished, recording the processes; one model.
    runs = client(two).search_runs([client(two).get_experiment_by_name(two.mlflow.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["resolved.processes"] == "2" and runs[0].data.params["resolved.backend"] == "gloo"
    assert json.loads(two.paths.mlflow_run.read_text())["run_id"] == runs[0].info.run_id
    assert sorted(p.name for p in two.paths.model_dir.iterdir() if p.suffix == ".safetensors") == \
        ["model.safetensors"]


@pytest.mark.slow
def test_sigterm_stops_both_processes_at_one_step_and_one_process_resumes(tmp_path, tiny_bert):
    params, params_file = prepared_project(tmp_path / "p", tiny_bert, train__processes=2, train__epochs=2,
                                           train__save_every_steps=1000)
    assert tokenize.main(["--params", str(params_file)]) == 0
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_STEPS)
    step_log = tmp_path / "steps.log"
    env = {**__import__("os").environ, "PYTHONPATH": f"{hook}:{ROOT}", "STEP_LOG": str(step_log),
           "STEP_SLEEP": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", "--params", str(params_file)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (step_log.is_file() and len(step_log.read_text().split()) >= 4):  # both processes, 2 steps each
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "train made no step within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    stopped = [line for line in output.splitlines() if line.startswith("train: stopped by SIGTERM at step ")]
    assert len(stopped) == 1, output  # process 0 says it, once
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert 1 <= step < 12
    # Both processes stopped after the same step (the flag is all-reduced): each logged the same steps.
    logged = step_log.read_text().split()  # global_step before each step's increment: 0 .. step - 1
    assert sorted(logged) == sorted([str(s) for s in range(step)] * 2), logged
    assert complete_checkpoints(params.paths.checkpoints_dir) == [step]
    run_id = (params.paths.checkpoints_dir / "mlflow_run_id").read_text().strip()
    assert client(params).get_run(run_id).info.status == "KILLED"

    # The same params with one process resume the checkpoint (processes is not in its fingerprint) and the run.
    raw = params_file.read_text().replace("processes: 2", "processes: 1")
    params_file.write_text(raw)
    rerun = subprocess.run([sys.executable, "-m", "stages.train", "--params", str(params_file)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    report = json.loads(params.paths.train_report.read_text())
    assert report["resumed_from"].endswith(f"checkpoint-{step}") and report["global_steps"] == 12
    assert client(params).get_run(run_id).info.status == "FINISHED"


def launcher_environment(config: Path) -> dict:
    """The environment `accelerate launch --config_file <config>` gives the training processes (accelerate's own
    parser and launcher code, without starting anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "stages.train"])
    args, _, _ = _validate_launch_command(args)
    return {**prepare_multi_gpu_env(args), "NUM_PROCESSES": str(args.num_processes)}


def test_the_fsdp_config_shards_by_transformer_block_and_saves_sharded_checkpoints(monkeypatch, tiny_bert, tiny_gpt2):
    from accelerate import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    env = launcher_environment(ROOT / "configs/accelerate/fsdp.yaml")
    ddp = launcher_environment(ROOT / "configs/accelerate/ddp.yaml")
    assert "ACCELERATE_USE_FSDP" not in ddp and ddp["NUM_PROCESSES"] == "2"
    assert ddp["ACCELERATE_MIXED_PRECISION"] == "no"
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["NUM_PROCESSES"]) == ("true", "2", "2")
    # train.precision decides the precision, not the launcher (which would otherwise override the Trainer's).
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and plugin.cpu_ram_efficient_loading is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    # That policy wraps the blocks a model names in _no_split_modules: the task's model classes name theirs.
    for folder, auto in ((tiny_bert, AutoModelForSequenceClassification), (tiny_gpt2, AutoModelForCausalLM)):
        model = auto.from_pretrained(folder)
        blocks = set(model._no_split_modules or ())
        assert blocks and blocks & {type(m).__name__ for m in model.modules()}, (folder, blocks)



def test_under_fsdp_the_model_saved_is_the_one_gathered_from_the_shards(tmp_path, tiny_bert):
    from types import SimpleNamespace

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sft_pipeline import strategies, training

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    # What accelerate's get_state_dict gathers under FSDP: here made recognisable (every weight 0.5).
    gathered = {name: torch.full_like(value, 0.5) for name, value in model.state_dict().items()}
    asked = []
    trainer = SimpleNamespace(is_fsdp_enabled=True, model=model,
                              accelerator=SimpleNamespace(get_state_dict=lambda m: asked.append(m) or gathered))
    weights = training.full_state_dict(trainer)
    assert asked == [model] and weights is gathered
    assert training.full_state_dict(SimpleNamespace(is_fsdp_enabled=False)) is None

    out = tmp_path / "model"
    out.mkdir()
    prepared = SimpleNamespace(model=model, strategy="full", head=["classifier"])
    strategies.save(prepared, AutoTokenizer.from_pretrained(tiny_bert), out, {"task": "classification"}, weights)
    saved = load_file(str(out / "model.safetensors"))
    assert saved and all(bool((tensor == 0.5).all()) for tensor in saved.values())
    assert not (model.classifier.weight == 0.5).all()  # the model's own weights were not what was saved


@pytest.mark.slow
def test_a_chat_model_trains_on_two_processes_as_on_one_with_its_loss_weighted_by_tokens(tmp_path):
    """The instruction task's loss is per answer token over the whole global batch (the Trainer counts the tokens
    across processes); packed batches, each process packing its own rows."""
    import yaml

    from bench.common import tiny_causal_lm
    from tests.test_instruction import instruction_params, tokenized_project

    model = tiny_causal_lm(tmp_path / "model")
    histories = {}
    for processes in (1, 2):
        project = tmp_path / f"p{processes}"
        project.mkdir()
        settings = {"processes": processes, "packing": True, "batch_size": 4}
        params = tokenized_project(project, model, train=settings)
        params_file = project / "params.yaml"
        params_file.write_text(yaml.safe_dump(instruction_params(project, model, train=settings), sort_keys=False))
        run = subprocess.run([sys.executable, "-m", "stages.train", "--params", str(params_file)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        histories[processes] = (pd.read_csv(params.paths.train_history), pd.read_csv(params.paths.eval_history))
    (steps_one, epochs_one), (steps_two, epochs_two) = histories[1], histories[2]
    assert steps_two["step"].tolist() == steps_one["step"].tolist() and len(steps_one) == 16
    # Measured here: 4.8e-7 per step, 9.5e-7 per epoch's validation loss.
    assert (steps_two["loss"] - steps_one["loss"]).abs().max() < STEP_TOLERANCE
    assert epochs_two["eval_loss"].tolist() == pytest.approx(epochs_one["eval_loss"].tolist(),
                                                             abs=VALIDATION_TOLERANCE)
