"""Frozen features for `train.strategy: freeze` with nothing below the head training.

The frozen backbone maps a row to the same vector in every epoch, so the expensive part (a forward pass of the whole
model) is done once per row, in eval mode, and each epoch then trains the head alone on those vectors. The vectors
are what the head module receives in the model's own forward pass (caught with a forward hook), so the trained head
drops back into the model unchanged: the saved model is the ordinary model, and its logits on a row equal the head's
logits on the row's cached vector (tests/test_strategies.py checks this).

The loss is the one Hugging Face's sequence classifiers compute from `config.problem_type` (cross-entropy for one
label per row). A head that is more than one module, or that receives more than one vector per row (a causal LM's
`score` sees every position), is not cached: training then runs the frozen backbone every step.
"""

from __future__ import annotations

import numpy as np


class NotCacheable(Exception):
    pass


def extract(model, head, data, collate, batch_size: int, device: str) -> np.ndarray:
    """The input of `head` for every row of `data` (in row order), from forward passes in eval mode."""
    import torch

    captured = []

    def catch(module, args):
        if len(args) != 1 or args[0].dim() != 2:
            raise NotCacheable(f"{type(module).__name__} receives {[tuple(a.shape) for a in args]}")
        captured.append(args[0].detach().float().cpu())

    ids = data["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = None
    hook = head.register_forward_pre_hook(catch)
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                model(**collate([{"input_ids": ids[i]} for i in chunk]).to(device))
                vectors = captured.pop().numpy()
                if out is None:
                    out = np.zeros((len(ids), vectors.shape[1]), dtype=np.float32)
                out[chunk] = vectors
    finally:
        hook.remove()
        model.train(was_training)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def extract_all(model, head, dataset, collate, batch_size: int, device: str) -> dict | None:
    """{split: {"features", "labels"}} for train and validation, or None when the head's input is not cacheable."""
    try:
        return {name: {"features": extract(model, head, dataset[name], collate, batch_size, device),
                       "labels": np.asarray(dataset[name]["labels"])}
                for name in ("train", "validation")}
    except NotCacheable as exc:
        print(f"train: the head's input is not one vector per row ({exc}); the frozen backbone runs every step")
        return None


class _Split:
    """A map-style dataset over cached vectors (what the DataLoader draws from)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"features": self.features[i], "labels": self.labels[i]}


def as_dataset(split: dict) -> _Split:
    return _Split(split["features"], split["labels"])


def collate(rows: list[dict]) -> dict:
    import torch

    return {"features": torch.from_numpy(np.stack([r["features"] for r in rows])),
            "labels": torch.as_tensor(np.asarray([r["labels"] for r in rows]))}


def head_loss(logits, labels, config):
    """The loss a Hugging Face sequence classifier computes from its config (problem_type)."""
    import torch.nn.functional as F

    problem = config.problem_type
    if problem is None:
        problem = "regression" if config.num_labels == 1 else (
            "single_label_classification" if not labels.is_floating_point() else "multi_label_classification")
    if problem == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze().float())
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))


def head_only(head, config):
    """A module that trains `head` (shared with the full model, so training it trains the model's head)."""
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    class HeadOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head
            self.config = config

        def forward(self, features, labels=None):
            logits = self.head(features)
            loss = None if labels is None else head_loss(logits, labels, self.config)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return HeadOnly()

