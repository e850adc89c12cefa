"""Loading tokenizers and pretrained models the same way in tokenize, train, evaluate and serving.

Remote code runs only when `model.trust_remote_code` is true in params.yaml. A decoder-only model without a pad token
(GPT-2 and most causal LMs) gets its end-of-sequence token as pad token, and the model config learns its id, so it
can work on padded batches.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sft_pipeline.io import StageError
from sft_pipeline.params import Model

# No usage reports to the hub; model downloads still work for hub ids (set HF_HUB_OFFLINE=1 to forbid them).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def source_kwargs(model: Model) -> dict:
    return {"revision": model.revision, "trust_remote_code": model.trust_remote_code}


def load_tokenizer(name_or_path: str | Path, model: Model):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **source_kwargs(model))
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot load the tokenizer of {name_or_path!r}: {exc}".strip()) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise StageError(f"{name_or_path}: the tokenizer has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def auto_class(name: str):
    import transformers

    return getattr(transformers, name)


def load_pretrained(name_or_path: str | Path, model: Model, auto: str, kwargs: dict, dtype=None):
    """(model, the names of its parameters that were not in the checkpoint): `auto` is a transformers Auto class
    name, `kwargs` the task's shape (labels, pad token). Parameters whose shape changed (another number of labels)
    are initialised anew and count as new."""
    cls = auto_class(auto)
    try:
        loaded, info = cls.from_pretrained(str(name_or_path), dtype=dtype, output_loading_info=True,
                                           ignore_mismatched_sizes=True, **kwargs, **source_kwargs(model))
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot load {name_or_path!r} as {auto.removeprefix('AutoModelFor')}: {exc}".strip()) \
            from None
    if "pad_token_id" in kwargs:
        loaded.config.pad_token_id = kwargs["pad_token_id"]
    new = set(info.get("missing_keys", ())) | {key for key, *_ in info.get("mismatched_keys", ())}
    return loaded, sorted(new)


def fingerprint(folder: Path) -> str:
    """Content hash of the files in a folder (a saved tokenizer), to tell two tokenizers apart in reports."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def pick_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def pick_precision(choice: str, device: str) -> str:
    """The precision train runs at (fp32, bf16 or fp16) for train.precision on `device`.

    auto: bf16 on a GPU of compute capability 8.0 or newer (native bf16; `torch.cuda.is_bf16_supported()` also says
    yes where bf16 is emulated, which is slow), fp16 with loss scaling on 7.x (tensor cores), fp32 below and on a CPU
    (bf16 autocast on a CPU without native support is about 20x slower than fp32). fp16 needs a GPU: on a CPU it is
    a StageError, not a traceback from inside the Trainer.
    """
    import torch

    if device != "cuda":
        if choice == "fp16":
            raise StageError(f"train.precision is 'fp16' but train runs on {device}: fp16 with loss scaling needs a "
                             f"CUDA GPU. Use 'auto' or 'fp32' (or 'bf16', slow on most CPUs)")
        return "bf16" if choice == "bf16" else "fp32"
    if choice != "auto":
        return choice
    capability = torch.cuda.get_device_capability()
    return "bf16" if capability >= (8, 0) else "fp16" if capability >= (7, 0) else "fp32"


# What `auto` becomes for the settings whose right value depends on the device (train.save_every_steps,
# save_every_minutes, log_every_steps, dataloader_workers). On a CPU a step takes long, a checkpoint of a small model
# is cheap and every core computes; on a GPU a step takes milliseconds, so a device sync per logged step, a full
# optimizer state written every 50 steps and padding in the training process (9-15 ms per batch of 32 at 256
# tokens, measured here) are what it waits for.
DEVICE_DEFAULTS = {
    "cpu": {"save_every_steps": 50, "save_every_minutes": None, "log_every_steps": 1},
    "cuda": {"save_every_steps": None, "save_every_minutes": 15.0, "log_every_steps": 10},
}


def device_defaults(options, device: str, processes: int = 1, cores: int | None = None) -> dict:
    """train's save_every_steps, save_every_minutes, log_every_steps and dataloader_workers for `device`: the
    params' own values, and DEVICE_DEFAULTS where they say auto. DataLoader workers: none on a CPU, on a GPU
    min(4, cores per training process - 1) so that batches are padded while the GPU computes."""
    import os

    cores = (os.cpu_count() or 1) if cores is None else cores
    table = DEVICE_DEFAULTS["cuda" if device == "cuda" else "cpu"]
    resolved = {name: table[name] if getattr(options, name) == "auto" else getattr(options, name) for name in table}
    workers = options.dataloader_workers
    if workers == "auto":
        workers = max(0, min(4, cores // max(1, processes) - 1)) if device == "cuda" else 0
    resolved["dataloader_workers"] = workers
    return resolved


def device_info(device: str, precision: str) -> dict:
    """What train.json and MLflow record of where the model trained."""
    import platform

    import torch

    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return {"device": device, "device_name": torch.cuda.get_device_name(), "device_count": 1,
                "visible_devices": torch.cuda.device_count(), "compute_capability": f"{major}.{minor}",
                "precision": precision}
    return {"device": device, "device_name": platform.processor() or platform.machine(), "device_count": 1,
            "precision": precision}


def parameter_counts(model) -> dict:
    """Trainable and total parameters (a parameter shared by two modules counts once)."""
    seen, trainable, total = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total,
            "trainable_fraction": round(trainable / total, 6) if total else 0.0}
