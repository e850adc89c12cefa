"""Stage `validate`: check every cleaned row by the task's rules, resolve conflicting annotations, check the data.

    python -m stages.validate [--params params.yaml]

Reads  paths.clean, paths.clean_rejected, paths.clean_report
Writes paths.validated          Parquet: the rows kept (classification: text, label, source_file, line, id, n_votes,
                                agreement), and split (the user's split, NA for none)
       paths.validate_rejected  CSV: source_file, line, id, reason, detail, text (original)
       paths.validate_report    JSON: counts per reason and file, and the task's part (classification: classes,
                                label synonyms mapped, conflicts, annotator agreement)
       paths.validate_summary   the same in a few lines of Markdown

Exits with status 1 (and `dvc repro` stops) when the task finds the data unfit (classification: a class has fewer
than `min_per_class` rows) or when more than `max_reject_fraction` of the rows read were rejected for quality
reasons; the reports are still written, so the message and `reports/validation.md` say which class, file and counts.
"""

from __future__ import annotations

import sys

import pandas as pd

from sft_pipeline import tasks
from sft_pipeline.data import validation
from sft_pipeline.io import StageError, read_json, stage_main, write_frame, write_json, write_text
from sft_pipeline.params import Params


def run(params: Params) -> dict:
    paths, options, task = params.paths, params.validate_, tasks.get(params)
    clean = pd.read_parquet(paths.clean)
    clean_report = read_json(paths.clean_report)
    kept, rejected, report = validation.validate_rows(task, clean, options)

    clean_rejected = pd.read_csv(paths.clean_rejected, usecols=["source_file", "reason"], dtype="string")
    all_rejected = pd.concat([clean_rejected, rejected[["source_file", "reason"]]], ignore_index=True)
    fraction, problems = validation.check_reject_fraction(clean_report, all_rejected, options)
    problems = task.problems(kept, options) + problems
    totals = clean_report["totals"]
    if totals["rows_read"] != len(kept) + len(all_rejected):
        raise AssertionError(f"row accounting broken: {totals['rows_read']} read, {len(kept)} kept, "
                             f"{len(all_rejected)} rejected")
    report["overall"] = {
        "rows_read": totals["rows_read"],
        "rejected_by_clean": sum(totals["rejected"].values()),
        "clean_rejected": totals["rejected"],
        "kept": len(kept),
        "quality_reject_fraction": round(fraction, 6),
        "max_reject_fraction": options.max_reject_fraction,
    }
    report["passed"] = not problems
    report["problems"] = problems

    write_frame(paths.validate_rejected, rejected)
    write_json(paths.validate_report, report)
    write_text(paths.validate_summary, validation.summary_markdown(report, task.summary_lines(report)))
    if problems:
        raise StageError("validation failed:\n  " + "\n  ".join(problems))
    write_frame(paths.validated, kept)
    extra = f"; classes {report['classes']}" if "classes" in report else ""
    print(f"validate: {report['rows_in']} rows in, {report['kept']} kept, rejected {report['rejected']}{extra}")
    for warning in task.warnings(report):
        print(f"validate: warning: {warning}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
