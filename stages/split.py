"""Stage `split`: assign each validated row to train, validation or test by a stable hash of its key.

    python -m stages.split [--params params.yaml]

Reads  paths.validated
Writes paths.split_dir/{train,validation,test}.parquet   (same columns as the validated file)
       paths.split_report                               JSON: rows per split, and rows per class and split

A row's split is a function of its key and the seed only (the key is the task's: a classifier's text): blake2b of the
seed and the case- and space-folded key gives a number in [0, 1), and the cumulative ratios cut that interval.
Adding annotations never moves an existing row, and two rows whose keys differ only in case or spacing always land
together. Each class is split by the ratios up to sampling noise (about sqrt(n) rows); the report gives the exact
counts, and the stage fails if a class would miss a split entirely (sft_pipeline/data/splitting.py).
"""

from __future__ import annotations

import sys

import pandas as pd

from sft_pipeline import tasks
from sft_pipeline.data import splitting
from sft_pipeline.io import StageError, atomic_path, stage_main, write_json
from sft_pipeline.params import Params


def run(params: Params) -> dict:
    paths, options, task = params.paths, params.split, tasks.get(params)
    frame = pd.read_parquet(paths.validated)
    split = splitting.assign_splits(task.split_key(frame), options)
    report = splitting.split_report(split, task.strata(frame), options)
    empty = splitting.empty_strata(report)
    if empty:
        raise StageError("split: " + "; ".join(empty) + " (add annotations for it, or change split.seed)")
    with atomic_path(paths.split_dir, directory=True) as tmp:
        for name in options.ratios:
            frame[split == name].reset_index(drop=True).to_parquet(tmp / f"{name}.parquet", index=False)
    write_json(paths.split_report, report)
    print(f"split: {report['rows']}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
