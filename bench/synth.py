"""Synthetic annotation files for the scale and incremental benchmarks: unique texts, five BBC-like topics.

Each text draws 10-24 words from its topic's vocabulary and from filler words, and ends with a serial number, so
every text is unique (and stays unique after the clean stage's normalisation) however many rows are made.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

TOPICS = {
    "business": "market shares profit bank economy company investor price trade sales growth firm deal".split(),
    "entertainment": "film music star award actor singer album show festival band movie comedy stage".split(),
    "politics": "minister election party government vote labour tory policy parliament campaign law".split(),
    "sport": "match goal team coach league player season score cup stadium champion race injury".split(),
    "tech": "software computer internet phone chip data network robot code device online users game".split(),
}
FILLER = "the a today after with new big said report week and in on for its over more than this".split()


def rows(n: int, seed: int = 0, start: int = 0) -> dict[str, list[str]]:
    """`n` rows (id, text, label) numbered from `start`; the same arguments always give the same rows."""
    rng = np.random.default_rng(seed)
    labels = list(TOPICS)
    label_idx = rng.integers(0, len(labels), n)
    lengths = rng.integers(10, 25, n)
    topic_pick = rng.random((n, 24)) < 0.6
    word_idx = rng.integers(0, 1 << 30, (n, 24))
    out_text, out_label, out_id = [], [], []
    for i in range(n):
        words = TOPICS[labels[label_idx[i]]]
        picked = [words[w % len(words)] if t else FILLER[w % len(FILLER)]
                  for w, t in zip(word_idx[i, :lengths[i]], topic_pick[i, :lengths[i]])]
        serial = start + i
        out_text.append(" ".join(picked).capitalize() + f", item {serial}.")
        out_label.append(labels[label_idx[i]])
        out_id.append(f"s{serial}")
    return {"id": out_id, "text": out_text, "label": out_label}


def write_csv(path: Path, n: int, seed: int = 0, start: int = 0) -> Path:
    data = rows(n, seed=seed, start=start)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["id", "text", "label"])
        writer.writerows(zip(data["id"], data["text"], data["label"]))
    return path
