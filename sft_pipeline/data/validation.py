"""Validation with row accounting, for any task: the task checks its rows (`Task.validate`, `Task.problems`); this
module counts what happened per reason and file, applies the reject-fraction threshold across clean and validate,
checks that rows in = kept + rejected, and writes the summary in Markdown.
"""

from __future__ import annotations

import pandas as pd

from sft_pipeline.io import REJECTED_COLUMNS

# Reasons that say nothing bad about the data: the row's information lives on in a kept row, or the annotation tool
# says the row is not annotated yet (a project exported mid-way is not a defective data set).
NOT_QUALITY = {"duplicate", "merged_vote", "unlabelled", "cancelled", "prediction_only", "ignored",
               "answer_reject"}


def rejected_rows(rows: pd.DataFrame, reason: str, detail: str) -> pd.DataFrame:
    """`rows` in the schema of the rejected-rows files, each with `reason` and `detail` and its original text."""
    return pd.DataFrame(
        {
            "source_file": rows["source_file"].to_numpy(),
            "line": rows["line"].to_numpy(),
            "id": rows["id"].to_numpy(),
            "reason": reason,
            "detail": detail,
            "text": rows["text_raw"].to_numpy(),
        },
        columns=REJECTED_COLUMNS,
    )


def validate_rows(task, clean: pd.DataFrame, options) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The task's validation of the cleaned rows, with the counts per reason and per file and the accounting check."""
    kept, rejected, task_report = task.validate(clean, options)
    if "split" in clean:
        # The user's split is the same for every copy of a text (clean resolved it), so it survives any merge the
        # task makes; the task keeps the index of the rows it keeps.
        if not kept.index.isin(clean.index).all() or kept.index.has_duplicates:
            raise AssertionError(f"{type(task).__name__}.validate must keep the index of the rows it keeps")
        kept = kept.assign(split=clean.loc[kept.index, "split"])
    rejected = rejected.sort_values(["source_file", "line"], kind="stable").reset_index(drop=True)
    kept = kept.reset_index(drop=True)
    reasons = {str(k): int(v) for k, v in rejected["reason"].value_counts().sort_index().items()}
    if len(clean) != len(kept) + len(rejected):
        raise AssertionError(f"row accounting broken: {len(clean)} in, {len(kept)} kept, {reasons}")
    files = {}
    for name in sorted(clean["source_file"].unique()):
        mine = rejected[rejected["source_file"] == name]
        files[name] = {
            "rows_in": int((clean["source_file"] == name).sum()),
            "kept": int((kept["source_file"] == name).sum()),
            "rejected": {str(k): int(v) for k, v in mine["reason"].value_counts().sort_index().items()},
        }
    report = {"task": task.name, "rows_in": len(clean), "kept": len(kept), "rejected": reasons, **task_report,
              "files": files}
    return kept, rejected, report


def check_reject_fraction(clean_report: dict, rejected: pd.DataFrame, options) -> tuple[float, list[str]]:
    """Share of rows read that were rejected for quality reasons, across clean and validate."""
    quality = rejected[~rejected["reason"].isin(NOT_QUALITY)]
    rows_read = clean_report["totals"]["rows_read"]
    if rows_read == 0:
        return 0.0, []
    fraction = len(quality) / rows_read
    if fraction <= options.max_reject_fraction:
        return fraction, []
    per_file = []
    for name, rows in quality.groupby("source_file"):
        read = clean_report["files"].get(name, {}).get("rows_read", 0)
        reasons = ", ".join(f"{r}: {n}" for r, n in rows["reason"].value_counts().items())
        per_file.append((len(rows), f"{name}: {len(rows)} of {read} rows ({reasons})"))
    worst = "; ".join(line for _, line in sorted(per_file, reverse=True)[:5])
    return fraction, [f"{len(quality)} of {rows_read} rows ({fraction:.1%}) were rejected, more than "
                      f"validate.max_reject_fraction = {options.max_reject_fraction:.1%}: {worst}; "
                      f"see reports/rejected/"]


def summary_markdown(report: dict, task_lines: list[str]) -> str:
    lines = [
        "# Validation summary",
        "",
        f"Status: **{'passed' if report['passed'] else 'FAILED'}**",
        "",
        f"- Rows read from raw files: {report['overall']['rows_read']}",
        f"- Rejected by clean: {report['overall']['rejected_by_clean']}",
        f"- Into validate: {report['rows_in']}; kept {report['kept']}; rejected {sum(report['rejected'].values())}",
        f"- Quality reject fraction: {report['overall']['quality_reject_fraction']:.2%} "
        f"(limit {report['overall']['max_reject_fraction']:.2%})",
        "",
        "| reason | clean | validate |",
        "|---|---:|---:|",
    ]
    reasons = sorted(set(report["overall"]["clean_rejected"]) | set(report["rejected"]))
    for reason in reasons:
        lines.append(f"| {reason} | {report['overall']['clean_rejected'].get(reason, 0)} "
                     f"| {report['rejected'].get(reason, 0)} |")
    lines += task_lines
    if report["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in report["problems"]]
    return "\n".join(lines) + "\n"
