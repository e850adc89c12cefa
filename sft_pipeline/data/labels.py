"""Labels and annotator votes, for tasks whose rows carry a label: synonyms, row checks, conflicting votes, agreement
and class sizes. Pure functions over DataFrames (the classification task calls them from validate).
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter

import pandas as pd

from sft_pipeline.io import StageError
from sft_pipeline.data.validation import rejected_rows


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


def found_labels(labels: pd.Series) -> dict[str, list[str]]:
    """Without `validate.labels`: the label set found in the data, as canonical label -> other spellings.

    Spellings that differ only in case, Unicode form or surrounding space (`Sport`, `sport `, `ＳＰＯＲＴ`) are one
    label, as they are with declared labels; its name is the spelling used most (ties: the first in sorted order).
    validate reports every spelling it mapped, so that nothing is merged silently.
    """
    spellings: dict[str, Counter] = {}
    for label in labels.dropna():
        key = label_key(label)
        if key:
            spellings.setdefault(key, Counter())[label.strip()] += 1
    found = {}
    for counts in spellings.values():
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        found[ranked[0][0]] = [name for name, _ in ranked[1:]]
    return dict(sorted(found.items()))


def label_set(frame: pd.DataFrame, options) -> dict[str, list[str]]:
    """The declared labels, or (validate.labels omitted) those found in the rows."""
    return options.labels if options.labels is not None else found_labels(frame["label"])


def row_reasons(frame: pd.DataFrame, options) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Per row: canonical label (or NA), first failing reason (or NA) and its detail."""
    mapping = synonym_map(label_set(frame, options))
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


def resolve_votes(frame: pd.DataFrame, options) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Collapse rows that share a text into one row per text.

    `frame` has only rows that passed the row checks, with canonical labels. Same text, label and annotator is a
    duplicate. Otherwise every row of a text is a vote: with `majority`, the label with the most votes wins if its share
    is at least `min_agreement` and no other label has as many; with `drop`, a text with two labels is dropped.
    Returns (kept rows with n_votes and agreement, dropped rows with reason and detail, conflict statistics).
    """
    frame = frame.copy()
    annot = frame["annotator"].astype("string").fillna("\x00")
    dup = pd.DataFrame({"t": frame["text"], "l": frame["label"], "a": annot}).duplicated(keep="first")
    dropped = [rejected_rows(frame[dup], "duplicate", "same text, label and annotator as a row kept earlier")]
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
            dropped.append(rejected_rows(rows, reason, f"conflicting labels ({tally}); {why}"))
            continue
        stats["resolved"] += conflicting
        winners = rows[rows["label"] == winner]
        kept.append(winners.iloc[:1].assign(n_votes=len(rows), agreement=share))
        dropped.append(rejected_rows(winners.iloc[1:], "merged_vote", f"vote for {winner!r} merged into one row ({tally})"))
        dropped.append(rejected_rows(rows[rows["label"] != winner], "outvoted", f"outvoted by {winner!r} ({tally})"))
    kept_frame = pd.concat(kept).sort_index() if kept else frame.iloc[:0]
    dropped_frame = pd.concat([d for d in dropped if len(d)] or [rejected_rows(frame.iloc[:0], "", "")])
    return kept_frame, dropped_frame, stats


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


def check_classes(kept: pd.DataFrame, options) -> list[str]:
    problems = []
    labels = options.labels if options.labels is not None else sorted(kept["label"].unique())
    if options.labels is None and len(labels) < 2:
        problems.append(f"the data holds {len(labels)} label(s) ({', '.join(map(repr, labels)) or 'none'}); "
                        "a classifier needs at least two")
    for label in labels:
        rows = kept[kept["label"] == label]
        if len(rows) < options.min_per_class:
            by_file = ", ".join(f"{n} from {f}" for f, n in rows["source_file"].value_counts().items()) or "none"
            problems.append(f"class {label!r} has {len(rows)} rows, fewer than validate.min_per_class "
                            f"= {options.min_per_class} ({by_file}); add annotations or lower the threshold")
    return problems
