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
