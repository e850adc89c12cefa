"""Loading tokenizers and classifiers the same way in tokenize, train and evaluate.

Remote code runs only when `model.trust_remote_code` is true in params.yaml. A decoder-only model without a pad token
(GPT-2 and most causal LMs) gets its end-of-sequence token as pad token, and the model config learns its id, so it
can classify padded batches.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from stages.io import StageError
from stages.params import Model

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


def load_classifier(name_or_path: str | Path, model: Model, labels: list[str], pad_token_id: int, dtype=None):
    """A sequence classifier with a fresh head for `labels` (or the trained one, when loading our own output)."""
    from transformers import AutoModelForSequenceClassification

    try:
        classifier = AutoModelForSequenceClassification.from_pretrained(
            str(name_or_path),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            pad_token_id=pad_token_id,
            dtype=dtype,
            **source_kwargs(model),
        )
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot load {name_or_path!r} as a sequence classifier: {exc}".strip()) from None
    classifier.config.pad_token_id = pad_token_id
    return classifier


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
