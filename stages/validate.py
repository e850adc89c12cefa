"""Stage `validate`: map labels to the declared set, reject bad rows, resolve conflicting annotations, check the data.

    python -m stages.validate [--params params.yaml]

Reads  paths.clean, paths.clean_report
Writes paths.validated          Parquet: text, label, source_file, line, id, n_votes, agreement
       paths.validate_rejected  CSV: source_file, line, id, reason, detail, text (original)
       paths.validate_report    JSON: counts per reason and file, classes, conflicts, annotator agreement, checks
       paths.validate_summary   the same in a few lines of Markdown

Exits with status 1 (and `dvc repro` stops) when a class has fewer than `min_per_class` rows or when more than
`max_reject_fraction` of the rows read were rejected for quality reasons; the reports are still written, so the
message and `reports/validation.md` say which class, file and counts.
"""

from __future__ import annotations

import math
import sys
import unicodedata
from collections import Counter

import pandas as pd

from stages.io import REJECTED_COLUMNS, StageError, read_json, stage_main, write_frame, write_json, write_text
from stages.params import Paths, Validate

# Reasons that say nothing bad about the data: the row's information lives on in a kept row.
NOT_QUALITY = {"duplicate", "merged_vote"}
VALIDATED_COLUMNS = ["text", "label", "source_file", "line", "id", "n_votes", "agreement"]


def label_key(label: str) -> str:
    return unicodedata.normalize("NFKC", label).strip().casefold()


def synonym_map(labels: dict[str, list[str]]) -> dict[str, str]:
    """Lookup key -> canonical label, for every canonical label and synonym."""
    mapping: dict[str, str] = {}
    for canonical, synonyms in labels.items():
        for name in [canonical, *synonyms]:
            key = label_key(name)
            if mapping.get(key, canonical) != canonical:
                raise StageError(f"validate.labels: {name!r} is listed under both {mapping[key]!r} and {canonical!r}")
            mapping[key] = canonical
    return mapping


def row_reasons(frame: pd.DataFrame, options: Validate) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Per row: canonical label (or NA), first failing reason (or NA) and its detail."""
    mapping = synonym_map(options.labels)
    keys = frame["label"].fillna("").map(label_key)
    canonical = keys.map(mapping).astype("string")
    length = frame["text"].fillna("").str.len()
    checks = [
        (keys == "", "missing_label", lambda r: "the label is empty"),
        (canonical.isna(), "unknown_label",
         lambda r: f"label {r.label!r} is not in validate.labels (add it, or add it as a synonym)"),
        (length == 0, "empty_text", lambda r: "the text is empty after cleaning"),
        (length < options.min_chars, "too_short", lambda r: f"{len(r.text)} characters < min_chars {options.min_chars}"),
        (length > options.max_chars, "too_long", lambda r: f"{len(r.text)} characters > max_chars {options.max_chars}"),
    ]
    reason = pd.Series(pd.NA, index=frame.index, dtype="string")
    detail = pd.Series(pd.NA, index=frame.index, dtype="string")
    for mask, name, describe in checks:
        hit = mask & reason.isna()
        if hit.any():
            reason[hit] = name
            detail[hit] = [describe(r) for r in frame[hit].itertuples()]
    return canonical, reason, detail


def resolve_votes(frame: pd.DataFrame, options: Validate) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Collapse rows that share a text into one row per text.

    `frame` has only rows that passed the row checks, with canonical labels. Same text, label and annotator is a
    duplicate. Otherwise every row of a text is a vote: with `majority`, the label with the most votes wins if its share
    is at least `min_agreement` and no other label has as many; with `drop`, a text with two labels is dropped.
    Returns (kept rows with n_votes and agreement, dropped rows with reason and detail, conflict statistics).
    """
    frame = frame.copy()
    annot = frame["annotator"].astype("string").fillna("\x00")
    dup = pd.DataFrame({"t": frame["text"], "l": frame["label"], "a": annot}).duplicated(keep="first")
    dropped = [_dropped(frame[dup], "duplicate", "same text, label and annotator as a row kept earlier")]
    frame = frame[~dup]

    group_size = frame.groupby("text", sort=False)["label"].transform("size")
    single = frame[group_size == 1].assign(n_votes=1, agreement=1.0)
    multi = frame[group_size > 1]
    kept = [single]
    stats = {"texts_with_several_rows": 0, "conflicting_texts": 0, "resolved": 0, "unresolved": 0}
    for text, rows in multi.groupby("text", sort=False):
        stats["texts_with_several_rows"] += 1
        ranked = Counter(rows["label"]).most_common()
        winner, top = ranked[0]
        share = top / len(rows)
        conflicting = len(ranked) > 1
        stats["conflicting_texts"] += conflicting
        tally = ", ".join(f"{label}: {n}" for label, n in ranked)
        if conflicting and (options.conflict_policy == "drop"
                            or share < options.min_agreement or ranked[1][1] == top):
            stats["unresolved"] += 1
            why = "policy drop" if options.conflict_policy == "drop" else (
                f"no label has a majority of at least {options.min_agreement:.0%}")
            reason = "conflict" if options.conflict_policy == "drop" else "conflict_unresolved"
            dropped.append(_dropped(rows, reason, f"conflicting labels ({tally}); {why}"))
            continue
        stats["resolved"] += conflicting
        winners = rows[rows["label"] == winner]
        kept.append(winners.iloc[:1].assign(n_votes=len(rows), agreement=share))
        dropped.append(_dropped(winners.iloc[1:], "merged_vote", f"vote for {winner!r} merged into one row ({tally})"))
        dropped.append(_dropped(rows[rows["label"] != winner], "outvoted", f"outvoted by {winner!r} ({tally})"))
    kept_frame = pd.concat(kept).sort_index() if kept else frame.iloc[:0]
    dropped_frame = pd.concat([d for d in dropped if len(d)] or [_dropped(frame.iloc[:0], "", "")])
    return kept_frame, dropped_frame, stats


def _dropped(rows: pd.DataFrame, reason: str, detail: str) -> pd.DataFrame:
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


def annotator_agreement(frame: pd.DataFrame) -> dict | None:
    """Cohen's kappa for two annotators, Fleiss' kappa for more, over texts labelled by at least two of them."""
    rated = frame.dropna(subset=["annotator"]).drop_duplicates(["text", "annotator"])
    annotators = sorted(rated["annotator"].unique())
    if len(annotators) < 2:
        return None
    shared = rated.groupby("text")["annotator"].transform("nunique") >= 2
    rated = rated[shared]
    result: dict = {"annotators": len(annotators), "texts_rated_twice_or_more": int(rated["text"].nunique())}
    if rated.empty:
        result["note"] = "no text was labelled by two annotators"
        return result
    from sklearn.metrics import cohen_kappa_score

    pairs = []
    for i, a in enumerate(annotators):
        for b in annotators[i + 1:]:
            both = rated[rated["annotator"].isin([a, b])].pivot(index="text", columns="annotator", values="label")
            both = both.dropna()
            if len(both) >= 2:
                kappa = cohen_kappa_score(both[a], both[b])
                pairs.append({"a": a, "b": b, "texts": len(both), "cohen_kappa": _finite(kappa)})
    if len(annotators) == 2:
        result["method"] = "cohen"
        result["kappa"] = pairs[0]["cohen_kappa"] if pairs else None
    else:
        from statsmodels.stats.inter_rater import fleiss_kappa

        # Fleiss' kappa needs the same number of ratings per text: use the texts with the most common count.
        per_text = rated.groupby("text")["label"].agg(list)
        modal = Counter(per_text.map(len)).most_common(1)[0][0]
        table = pd.DataFrame([Counter(v) for v in per_text if len(v) == modal]).fillna(0)
        result["method"] = "fleiss"
        result["ratings_per_text"] = modal
        result["texts_used"] = len(table)
        result["kappa"] = _finite(fleiss_kappa(table.to_numpy())) if len(table) >= 2 else None
    result["pairs"] = pairs
    return result


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def check_classes(kept: pd.DataFrame, options: Validate) -> list[str]:
    problems = []
    for label in options.labels:
        rows = kept[kept["label"] == label]
        if len(rows) < options.min_per_class:
            by_file = ", ".join(f"{n} from {f}" for f, n in rows["source_file"].value_counts().items()) or "none"
            problems.append(f"class {label!r} has {len(rows)} rows, fewer than validate.min_per_class "
                            f"= {options.min_per_class} ({by_file}); add annotations or lower the threshold")
    return problems


def check_reject_fraction(clean_report: dict, rejected: pd.DataFrame, options: Validate) -> tuple[float, list[str]]:
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


def validate_frame(clean: pd.DataFrame, options: Validate) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Pure core of the stage: (validated rows, rejected rows, report without the checks)."""
    canonical, reason, detail = row_reasons(clean, options)
    failed = reason.notna()
    row_rejected = _dropped(clean[failed], "", "")
    row_rejected["reason"] = reason[failed].to_numpy()
    row_rejected["detail"] = detail[failed].to_numpy()
    passing = clean[~failed].assign(label=canonical[~failed])
    agreement = annotator_agreement(passing)
    kept, dropped, conflicts = resolve_votes(passing, options)
    rejected = pd.concat([row_rejected, dropped], ignore_index=True)
    rejected = rejected.sort_values(["source_file", "line"], kind="stable").reset_index(drop=True)
    kept = kept[VALIDATED_COLUMNS].reset_index(drop=True)

    reasons = {str(k): int(v) for k, v in rejected["reason"].value_counts().sort_index().items()}
    if len(clean) != len(kept) + len(rejected):
        raise AssertionError(f"row accounting broken: {len(clean)} in, {len(kept)} kept, {reasons}")
    raw_labels = clean.loc[~failed, "label"]
    mapped = Counter(f"{r} -> {c}" for r, c in zip(raw_labels, canonical[~failed]) if r != c)
    files = {}
    for name in sorted(clean["source_file"].unique()):
        mine = rejected[rejected["source_file"] == name]
        files[name] = {
            "rows_in": int((clean["source_file"] == name).sum()),
            "kept": int((kept["source_file"] == name).sum()),
            "rejected": {str(k): int(v) for k, v in mine["reason"].value_counts().sort_index().items()},
        }
    report = {
        "rows_in": len(clean),
        "kept": len(kept),
        "rejected": reasons,
        "classes": {label: int((kept["label"] == label).sum()) for label in options.labels},
        "labels_mapped": dict(sorted(mapped.items())),
        "conflicts": conflicts,
        "annotator_agreement": agreement,
        "files": files,
    }
    return kept, rejected, report


def summary_markdown(report: dict) -> str:
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
    lines += ["", "| class | rows |", "|---|---:|"]
    lines += [f"| {label} | {n} |" for label, n in report["classes"].items()]
    conflicts = report["conflicts"]
    lines += ["", f"Texts with conflicting labels: {conflicts['conflicting_texts']} "
                  f"(resolved {conflicts['resolved']}, unresolved {conflicts['unresolved']})."]
    agreement = report["annotator_agreement"]
    if agreement and agreement.get("kappa") is not None:
        lines.append(f"Annotator agreement: {agreement['method']} kappa = {agreement['kappa']} "
                     f"over {agreement['texts_rated_twice_or_more']} texts.")
    if report["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in report["problems"]]
    return "\n".join(lines) + "\n"


def run(paths: Paths, options: Validate) -> dict:
    clean = pd.read_parquet(paths.clean)
    clean_report = read_json(paths.clean_report)
    kept, rejected, report = validate_frame(clean, options)

    clean_rejected = pd.read_csv(paths.clean_rejected, usecols=["source_file", "reason"], dtype="string")
    all_rejected = pd.concat([clean_rejected, rejected[["source_file", "reason"]]], ignore_index=True)
    fraction, problems = check_reject_fraction(clean_report, all_rejected, options)
    problems = check_classes(kept, options) + problems
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
    write_text(paths.validate_summary, summary_markdown(report))
    if problems:
        raise StageError("validation failed:\n  " + "\n  ".join(problems))
    write_frame(paths.validated, kept)
    print(f"validate: {report['rows_in']} rows in, {report['kept']} kept, rejected {report['rejected']}; "
          f"classes {report['classes']}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, lambda params: run(params.paths, params.validate_))


if __name__ == "__main__":
    sys.exit(main())
