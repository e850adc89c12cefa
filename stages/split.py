"""Stage `split`: assign each validated row to train, validation or test by a stable hash of its text.

    python -m stages.split [--params params.yaml]

Reads  paths.validated
Writes paths.split_dir/{train,validation,test}.parquet   (same columns as the validated file)
       paths.split_report                               JSON: rows and class counts per split

A row's split is a function of its text and the seed only: blake2b of the seed and the case- and space-folded text
gives a number in [0, 1), and the cumulative ratios cut that interval. Adding annotations never moves an existing row,
and two rows whose texts differ only in case or spacing always land together. The same cut applies within every class,
so each class is split by the ratios up to sampling noise (about sqrt(n) rows); the report gives the exact counts,
and the stage fails if a class would miss a split entirely.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pandas as pd

from stages.io import StageError, atomic_path, stage_main, write_json
from stages.params import Paths, Split


def split_key(text: str) -> str:
    return " ".join(text.casefold().split())


def hash_unit(texts: pd.Series, seed: int) -> np.ndarray:
    """A number in [0, 1) per text, stable across runs, machines and library versions."""
    salt = f"{seed}\x1f".encode()
    out = np.empty(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):
        digest = hashlib.blake2b(salt + split_key(text).encode("utf-8"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2**64
    return out


def assign_splits(frame: pd.DataFrame, options: Split) -> pd.Series:
    names = list(options.ratios)
    edges = np.cumsum(list(options.ratios.values()))[:-1]
    index = np.searchsorted(edges, hash_unit(frame["text"], options.seed), side="right")
    return pd.Series(pd.Categorical.from_codes(index, categories=names), index=frame.index, name="split")


def split_report(frame: pd.DataFrame, split: pd.Series, options: Split) -> dict:
    counts = pd.crosstab(frame["label"], split).reindex(columns=list(options.ratios), fill_value=0)
    return {
        "seed": options.seed,
        "ratios": options.ratios,
        "rows": {name: int((split == name).sum()) for name in options.ratios},
        "classes": {str(label): {name: int(n) for name, n in row.items()} for label, row in counts.iterrows()},
        "class_share": {
            name: {str(label): round(float(n) / max(int(counts[name].sum()), 1), 4) for label, n in counts[name].items()}
            for name in options.ratios
        },
    }


def run(paths: Paths, options: Split) -> dict:
    frame = pd.read_parquet(paths.validated)
    split = assign_splits(frame, options)
    report = split_report(frame, split, options)
    empty = [f"class {label!r} has no row in {name}" for label, row in report["classes"].items()
             for name, n in row.items() if n == 0]
    if empty:
        raise StageError("split: " + "; ".join(empty) + " (add annotations for it, or change split.seed)")
    with atomic_path(paths.split_dir, directory=True) as tmp:
        for name in options.ratios:
            frame[split == name].reset_index(drop=True).to_parquet(tmp / f"{name}.parquet", index=False)
    write_json(paths.split_report, report)
    print(f"split: {report['rows']}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, lambda params: run(params.paths, params.split))


if __name__ == "__main__":
    sys.exit(main())
