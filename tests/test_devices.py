"""Device and precision decisions, with torch.cuda faked (no GPU here): what `precision: auto` picks per compute
capability, fp16 on a CPU refused with a message, and evaluate following train.device.

    .venv/bin/python -m pytest tests/test_devices.py
"""

from __future__ import annotations

import pytest
import torch

from sft_pipeline.io import StageError
from sft_pipeline.modeling import device_info, pick_precision
from sft_pipeline.params import ParamsError, parse
from tests.conftest import project_params


def fake_gpu(monkeypatch, capability: tuple[int, int], name: str = "Fake GPU", count: int = 1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    # is_bf16_supported says yes on 7.x too (emulated bf16, slow): it must not decide.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"),
                                                  ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp32")])
def test_auto_precision_follows_the_compute_capability(monkeypatch, capability, expected):
    fake_gpu(monkeypatch, capability)
    assert pick_precision("auto", "cuda") == expected
    assert pick_precision("fp32", "cuda") == "fp32" and pick_precision("fp16", "cuda") == "fp16"


def test_on_a_cpu_auto_is_fp32_and_fp16_is_refused_with_what_to_do():
    assert pick_precision("auto", "cpu") == "fp32"
    assert pick_precision("bf16", "cpu") == "bf16"  # asked for: allowed, slow
    with pytest.raises(StageError, match=r"'fp16' but train runs on cpu: fp16 with loss scaling needs a CUDA GPU"):
        pick_precision("fp16", "cpu")
    with pytest.raises(ParamsError, match=r"train.precision: 'fp16' needs a CUDA GPU, but train.device is 'cpu'"):
        parse(project_params(__import__("pathlib").Path("/tmp"), train__device="cpu", train__precision="fp16"))


def test_the_training_arguments_carry_the_decision(monkeypatch, tmp_path):
    from sft_pipeline.training import training_arguments

    params = parse(project_params(tmp_path))
    args = training_arguments(params.paths, params.train, "cpu", "macro_f1")
    assert (args.bf16, args.fp16) == (False, False)


def test_device_info_names_the_gpu_and_its_capability(monkeypatch):
    fake_gpu(monkeypatch, (8, 9), name="NVIDIA L4", count=2)
    assert device_info("cuda", "bf16") == {"device": "cuda", "device_name": "NVIDIA L4", "device_count": 1,
                                           "visible_devices": 2, "compute_capability": "8.9", "precision": "bf16"}
    cpu = device_info("cpu", "fp32")
    assert cpu["device"] == "cpu" and cpu["precision"] == "fp32" and cpu["device_name"]


def test_several_visible_gpus_without_a_launcher_train_on_one(monkeypatch, tmp_path):
    from sft_pipeline.training import training_arguments

    fake_gpu(monkeypatch, (8, 0), count=4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a, **k: None)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    params = parse(project_params(tmp_path, train__precision="fp32"))
    args = training_arguments(params.paths, params.train, "cuda", "macro_f1")
    assert args.n_gpu == 1  # not 4: no DataParallel


@pytest.mark.parametrize("device, processes, cores, expected", [
    ("cpu", 1, 2, {"save_every_steps": 50, "save_every_minutes": None, "log_every_steps": 1, "dataloader_workers": 0}),
    ("cuda", 1, 16, {"save_every_steps": None, "save_every_minutes": 15.0, "log_every_steps": 10,
                     "dataloader_workers": 4}),
    ("cuda", 4, 8, {"save_every_steps": None, "save_every_minutes": 15.0, "log_every_steps": 10,
                    "dataloader_workers": 1}),
    ("cuda", 2, 2, {"save_every_steps": None, "save_every_minutes": 15.0, "log_every_steps": 10,
                    "dataloader_workers": 0}),
])
def test_auto_settings_follow_the_device(tmp_path, device, processes, cores, expected):
    from sft_pipeline.modeling import device_defaults

    options = parse(project_params(tmp_path, train__save_every_steps="auto")).train
    assert device_defaults(options, device, processes, cores) == expected


def test_the_params_own_values_win_over_the_device(tmp_path, monkeypatch):
    from sft_pipeline.modeling import device_defaults
    from sft_pipeline.training import training_arguments

    params = parse(project_params(tmp_path, train__save_every_steps=7, train__save_every_minutes=None,
                                  train__log_every_steps=3, train__dataloader_workers=2))
    assert device_defaults(params.train, "cuda", 1, 16) == {"save_every_steps": 7, "save_every_minutes": None,
                                                            "log_every_steps": 3, "dataloader_workers": 2}
    args = training_arguments(params.paths, params.train, "cpu", "macro_f1")
    assert (args.logging_steps, args.dataloader_num_workers, args.logging_nan_inf_filter) == (3, 2, True)
    with pytest.raises(ParamsError, match="dataloader_workers"):
        parse(project_params(tmp_path, train__dataloader_workers=-1))
    with pytest.raises(ParamsError, match="save_every_minutes"):
        parse(project_params(tmp_path, train__save_every_minutes=0))


def test_checkpoints_by_minutes_come_when_the_time_is_up_and_count_from_the_last_save():
    from types import SimpleNamespace

    from sft_pipeline.training import mid_epoch_checkpoints

    now = [0.0]
    callback = mid_epoch_checkpoints(None, 2.0, clock=lambda: now[0])
    state, control = SimpleNamespace(global_step=0), SimpleNamespace(should_save=False)
    callback.on_train_begin(None, state, control)
    saved_at = []
    for step in range(1, 11):  # a step every 30 s: 2 minutes is 4 steps
        now[0] += 30
        state.global_step = step
        control.should_save = False
        callback.on_step_end(None, state, control)
        if control.should_save:
            saved_at.append(step)
            callback.on_save(None, state, control)
        if step == 5:  # an epoch's own checkpoint restarts the count
            callback.on_save(None, state, control)
    assert saved_at == [4, 9]
    by_steps = mid_epoch_checkpoints(3, None)
    flags = []
    for step in range(1, 8):
        control.should_save = False
        by_steps.on_step_end(None, SimpleNamespace(global_step=step), control)
        flags.append(control.should_save)
    assert flags == [False, False, True, False, False, True, False]


def test_bench_on_a_gpu_that_is_not_there_is_refused_with_the_reason(capsys):
    from bench import run

    assert not torch.cuda.is_available()
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--device", "cuda", "--only", "train", "--quick"])
    assert exit_info.value.code == 2
    assert "--device is 'cuda' but no CUDA device is available" in capsys.readouterr().err


def test_bench_device_picks_the_precision_train_would(monkeypatch):
    import bench.common as common

    fake_gpu(monkeypatch, (8, 0))
    monkeypatch.setattr(common, "DEVICE", "cpu")
    assert common.set_device("auto") == "cuda" and common.precision() == "bf16"
    fake_gpu(monkeypatch, (7, 0))
    assert common.precision() == "fp16"
    assert common.set_device("cpu") == "cpu" and common.precision() == "fp32"
