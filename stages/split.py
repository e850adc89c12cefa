"""Stage `split`: put each validated row in train, validation or test, exactly by the ratios within each class, where
the user said, and never moving a row once placed.

    python -m stages.split [--params params.yaml]

Reads  paths.validated
       paths.split_ledger   every key placed so far (key digest -> split), if it exists; the seed and ratios it used
       paths.clean_report   its `user_splits` section: the user's splits as clean resolved them, conflicts included
Writes paths.split_dir/{train,validation,test}.parquet   (the validated columns, without `split`)
       paths.split_ledger   the same, with the keys placed now
       paths.split_report   JSON: rows per split, per class and split, each class's deviation from the ratios (and
                            those beyond one row), how many rows the ledger kept, the ratios placed and the user
                            placed, and the user's conflicts

What a row's split depends on is in sft_pipeline/data/splitting.py: the user's word (split.column, split.files),
else the ledger, else the class's split that lacks a row. The stage fails if a class would miss a split entirely.
"""

from __future__ import annotations

import sys

import pandas as pd

from sft_pipeline import tasks
from sft_pipeline.data import splitting
from sft_pipeline.io import StageError, atomic_path, read_json, stage_main, write_json
from sft_pipeline.params import Params


def run(params: Params) -> dict:
    paths, options, task = params.paths, params.split, tasks.get(params)
    frame = pd.read_parquet(paths.validated)
    ledger, restarted = splitting.read_ledger(paths.split_ledger, options)
    if restarted:
        print(f"split: {restarted}")
    strata = task.strata(frame)
    user = frame["split"] if "split" in frame else None
    result = splitting.assign_splits(task.split_key(frame), strata, user, ledger, options)
    clean_report = read_json(paths.clean_report) if paths.clean_report.is_file() else {}
    report = splitting.split_report(result, strata, options, clean_report.get("user_splits"), restarted)
    empty = splitting.empty_strata(report)
    if empty:
        raise StageError("split: " + "; ".join(empty) + " (a class needs rows * ratio >= 1 for every split, and "
                         "reaches it unless rows held by the ledger or the user fill its other splits; add "
                         "annotations for it)")
    rows = frame.drop(columns=["split"], errors="ignore")
    with atomic_path(paths.split_dir, directory=True) as tmp:
        for name in splitting.SPLITS:
            rows[result.split == name].reset_index(drop=True).to_parquet(tmp / f"{name}.parquet", index=False)
    write_json(paths.split_report, report)
    # Last: a run killed before this point recomputes the same placement from the ledger it started with.
    splitting.write_ledger(paths.split_ledger, result.ledger)
    s = result.stats
    print(f"split: {report['rows']}; {s['rows_kept']} rows kept where the ledger has them, {s['rows_new']} placed by "
          f"the ratios, {s['rows_user']} by the user ({s['rows_moved_by_user']} moved there from the ledger's split)")
    for line in splitting.user_split_lines(report.get("user")):
        print(f"split: {line}")
    if report["beyond_one_row"]:
        print(f"split: warning: {len(report['beyond_one_row'])} class splits are more than one row off the ratios, "
              f"because rows held by the user or the ledger are never moved: "
              + "; ".join(report["beyond_one_row"][:5]))
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
