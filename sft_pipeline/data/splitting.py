"""The stable split: each row goes to train, validation or test by a seeded hash of its key (the task says which
text that is), so adding annotations never moves an existing row and rows with equal keys always land together.

blake2b of the seed and the case- and space-folded key gives a number in [0, 1), and the cumulative ratios cut that
interval. The same cut applies within every stratum (a classifier's classes), so each is split by the ratios up to
sampling noise (about sqrt(n) rows); the report gives the exact counts.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def fold(text: str) -> str:
    return " ".join(text.casefold().split())


def hash_unit(keys: pd.Series, seed: int) -> np.ndarray:
    """A number in [0, 1) per key, stable across runs, machines and library versions."""
    salt = f"{seed}\x1f".encode()
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(salt + fold(key).encode("utf-8"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2**64
    return out


def assign_splits(keys: pd.Series, options) -> pd.Series:
    names = list(options.ratios)
    edges = np.cumsum(list(options.ratios.values()))[:-1]
    index = np.searchsorted(edges, hash_unit(keys, options.seed), side="right")
    return pd.Series(pd.Categorical.from_codes(index, categories=names), index=keys.index, name="split")


def split_report(split: pd.Series, strata: pd.Series | None, options) -> dict:
    report = {"seed": options.seed, "ratios": options.ratios,
              "rows": {name: int((split == name).sum()) for name in options.ratios}}
    if strata is None:
        return report
    counts = pd.crosstab(strata, split).reindex(columns=list(options.ratios), fill_value=0)
    report["classes"] = {str(label): {name: int(n) for name, n in row.items()} for label, row in counts.iterrows()}
    report["class_share"] = {
        name: {str(label): round(float(n) / max(int(counts[name].sum()), 1), 4) for label, n in counts[name].items()}
        for name in options.ratios
    }
    return report


def empty_strata(report: dict) -> list[str]:
    """A stratum that has no row in some split: training or scoring it would silently fail there."""
    return [f"class {label!r} has no row in {name}" for label, row in report.get("classes", {}).items()
            for name, n in row.items() if n == 0]
