"""Shared fixtures: tiny params, tiny annotation files and tiny randomly initialised models (no network)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The classification default: params.yaml as shipped, and what the tests build on whichever example params.yaml is now.
DEFAULT_PARAMS = ROOT / "examples" / "classification.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
# Tests keep their MLflow stores in temporary folders (params paths), never in a store named by the environment.
os.environ.pop("MLFLOW_TRACKING_URI", None)

# Three classes with their own vocabulary, so that even a tiny model learns them in a few steps.
TOPICS = {
    "sport": ["match", "goal", "team", "coach", "league", "player", "season", "score", "cup", "stadium"],
    "business": ["market", "shares", "profit", "bank", "economy", "company", "investor", "price", "trade", "sales"],
    "tech": ["software", "computer", "internet", "phone", "chip", "data", "network", "robot", "code", "device"],
}
FILLER = ["the", "a", "today", "after", "with", "new", "big", "said", "report", "week", "and", "in"]


def synthetic_rows(n_per_class: int, seed: int = 0, prefix: str = "r") -> list[dict]:
    """Unique texts: each draws 8-14 words from its topic and from filler words."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for label, words in TOPICS.items():
        made = 0
        while made < n_per_class:
            n = rng.randint(8, 14)
            text = " ".join(rng.choice(words) if rng.random() < 0.6 else rng.choice(FILLER) for _ in range(n))
            if text in seen:
                continue
            seen.add(text)
            rows.append({"id": f"{prefix}{label}{made}", "text": text.capitalize() + ".", "label": label})
            made += 1
    rng.shuffle(rows)
    return rows


def minilm_dir() -> Path:
    from sft_pipeline.defaults import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with the real MiniLM tokenizer, randomly initialised, saved as safetensors."""
    from bench.common import tiny_bert as build

    return build(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE tokenizer trained here; like GPT-2, it has no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-gpt2")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([r["text"] for r in synthetic_rows(40, seed=3)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    assert tokenizer.pad_token is None
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    assert config.pad_token_id is None
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def project_params(tmp: Path, model: Path | str = "unused", **overrides) -> dict:
    """The project's params.yaml with every path moved under `tmp` and small settings for tiny data."""
    raw = yaml.safe_load((DEFAULT_PARAMS).read_text())
    raw["paths"] = {key: None if value is None else str(tmp / value) for key, value in raw["paths"].items()}
    raw["validate"]["labels"] = {"sport": ["sports"], "business": ["biz"], "tech": []}
    raw["validate"]["min_chars"] = 5
    raw["validate"]["min_per_class"] = 10
    raw["model"]["name"] = str(model)
    raw["tokenize"]["max_length"] = 32
    raw["train"].update({"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 5e-3,
                         "save_every_steps": 5, "warmup": 0.0})
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return raw


def write_params(tmp: Path, raw: dict) -> Path:
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_csv(path: Path, rows: list[dict], columns=("id", "text", "label")) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_project(root: Path, tiny_model: Path, rows: list[dict] | None = None, **train) -> Path:
    """A runnable copy of the project (dvc.yaml, stages, the library, params) with tiny data and a tiny model, git
    and DVC set."""
    import shutil
    import subprocess
    import sys

    copy_code(root)
    params = yaml.safe_load((DEFAULT_PARAMS).read_text())
    params["validate"]["labels"] = {"sport": ["sports"], "business": [], "tech": []}
    params["validate"]["min_per_class"] = 10
    params["model"]["name"] = "models/pretrained/tiny-model"
    params["tokenize"]["max_length"] = 32
    params["train"].update({"epochs": 2, "batch_size": 16, "learning_rate": 5e-3, "save_every_steps": 5, **train})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(tiny_model, root / "models/pretrained/tiny-model")
    write_csv(root / "data/raw/batch1.csv", synthetic_rows(30, seed=11) if rows is None else rows)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True, env=env)
    return root


def copy_code(root: Path) -> None:
    """dvc.yaml, .dvcignore, the stages and the library into a project copy (its stages import the copy)."""
    from bench.common import copy_code as copy

    copy(root)


def prepared_project(tmp_path, model_dir, **overrides):
    """params.yaml for tmp_path and a validated file made of synthetic rows, split and tokenized."""
    import pandas as pd

    from sft_pipeline.params import parse
    from stages import split

    raw = project_params(tmp_path, model=model_dir, **overrides)
    params = parse(raw)
    rows = pd.DataFrame(synthetic_rows(40)).assign(source_file="a.csv", line=range(2, 122), n_votes=1,
                                                   agreement=1.0)
    params.paths.validated.parent.mkdir(parents=True)
    rows.to_parquet(params.paths.validated)
    split.run(params)
    return params, write_params(tmp_path, raw)
