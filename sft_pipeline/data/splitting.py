"""The split: exactly stratified, stable, and the user's own where the user says so.

A row's split depends on its key (the task's: a classifier's text, an instruction's first user turn), folded for case
and spacing, and on nothing else about the row:

1. the user's word, where given (`split.column` in the row, or `split.files` globs on its raw file): resolved per
   key in clean (:func:`resolve_user_splits`), so that every copy of a text carries it through duplicates and votes;
2. else the ledger (`paths.split_ledger`): once a key is assigned it stays where it is, in every later run, even if
   its rows leave the data for a while and come back;
3. else the ratios: each new key goes to the split whose share of its class (the whole set, for a task without
   classes) lacks a whole row, the split the seeded hash cut would give it first (blake2b of the seed and the folded
   key, a number in [0, 1) cut by the cumulative ratios: the rule before the ledger), otherwise the split that lacks
   the most rows. New keys are taken by size (a key with many rows first, so single rows can even out what it
   leaves) and then by the seeded hash, so a run without a ledger is a function of the set of rows only, not of
   file or row order.

With no rows held in place, each class's count in each split is its ratio times the class's rows rounded up or
down (within one row). Rows the user or the ledger holds are never moved: where they already exceed a split's
share of a class, that split takes no new rows of the class and the others share the rest by their ratios; the
report gives each class's deviation from the ratios and lists those beyond one row.

The ledger records the seed and ratios it was made with. Changing either asks for a different split: the stage then
starts a new ledger and says so (the old one stays in DVC's cache under the previous `dvc.lock`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sft_pipeline.io import StageError, atomic_path

SPLITS = ("train", "validation", "test")
# A text given two splits goes to the more held-out one: a text seen in training must not be scored as unseen, and a
# hand-made test set is the user's reference.
HELD_OUT = {name: rank for rank, name in enumerate(SPLITS)}
INVALID_SPLIT = "invalid_split"
LEDGER_VERSION = 1
EXAMPLES = 10
# Targets are ratio * rows, floats: counts are compared with them at this tolerance.
EPS = 1e-9


def fold(text: str) -> str:
    return " ".join(text.casefold().split())


def hash_unit(keys: pd.Series, seed: int) -> np.ndarray:
    """A number in [0, 1) per key, stable across runs, machines and library versions."""
    return _hashes([fold(key) for key in keys], seed)[1]


def _hashes(folded: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the seeded 64-bit blake2b of each folded key, the same number in [0, 1)). The first names the key in the
    ledger: no text is stored there, and a seed change starts a new ledger anyway."""
    salt = f"{seed}\x1f".encode()
    ints = np.empty(len(folded), dtype=np.uint64)
    units = np.empty(len(folded), dtype=np.float64)
    for i, key in enumerate(folded):
        value = int.from_bytes(hashlib.blake2b(salt + key.encode("utf-8"), digest_size=8).digest(), "big")
        ints[i] = value
        units[i] = value / 2**64
    return ints, units


def hash_cut(u: np.ndarray, ratios: dict[str, float]) -> np.ndarray:
    """The split (index into SPLITS) that the cumulative ratios give each hash value."""
    edges = np.cumsum(list(ratios.values()))[:-1]
    return np.searchsorted(edges, u, side="right")


# ------------------------------------------------------------------------------------------------ the user's splits


def parse_split_values(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(split named by each value, or NA; True where a value is given but names no split). Case and surrounding
    spaces are ignored; an empty value names none and is not an error."""
    text = values.astype("string").str.strip()
    empty = text.isna() | (text == "")
    named = text.str.casefold()
    valid = named.isin(SPLITS) & ~empty
    return named.where(valid, pd.NA).astype("string"), (~empty & ~valid).astype(bool)


def file_splits(names, files: dict[str, list[str]]) -> dict[str, str | None]:
    """The split `split.files` gives each raw file (its path relative to the raw folder), or None."""
    out = {}
    for name in names:
        hits = {}
        for split, globs in files.items():
            for glob in globs:
                if fnmatch.fnmatchcase(name, glob):
                    hits.setdefault(split, glob)
        if len(hits) > 1:
            which = ", ".join(f"{split} ({glob!r})" for split, glob in hits.items())
            raise StageError(f"{name}: matched by the split.files globs of {which}; a file goes to one split only, "
                             f"so narrow the globs")
        out[name] = next(iter(hits), None)
    return out


def _more_held_out(a: pd.Series, b: pd.Series) -> pd.Series:
    rank = pd.concat([a.map(HELD_OUT), b.map(HELD_OUT)], axis=1).max(axis=1)
    return rank.map(dict(enumerate(SPLITS))).astype("string")


def resolve_user_splits(rows: pd.DataFrame, keys: pd.Series, by_column: pd.Series,
                        by_file: pd.Series) -> tuple[pd.Series, dict]:
    """Every row's split by the user's word, or NA; and what was resolved, for the reports.

    `rows` (source_file, line, id) are all rows read, before duplicates collapse and votes merge, so that no copy of
    a text is lost; `keys` their split keys. A row's own word is its column value or its file's split (the more
    held-out if the two differ); then every row whose folded key is that of a row given a split goes to the most
    held-out split given to any row of the key: a copy with another split moves with it, a copy with none joins it.
    """
    own = _more_held_out(by_column, by_file)
    folded = keys.map(lambda k: fold(k) if isinstance(k, str) else None)
    folded = folded.where(folded.astype("string").fillna("") != "", None)
    rank = own.map(HELD_OUT)
    group_rank = rank.groupby(folded, dropna=True).transform("max").reindex(rank.index)
    resolved_rank = group_rank.where(folded.notna(), rank)
    resolved = resolved_rank.map(dict(enumerate(SPLITS))).astype("string")

    both = by_column.notna() & by_file.notna() & (by_column != by_file)
    two = (own.groupby(folded, dropna=True).nunique() > 1) | both.groupby(folded, dropna=True).any()
    moved = own.notna() & (own != resolved).fillna(False)
    joined = own.isna() & resolved.notna()
    # Where each key's winning split was given first, to name it in the examples.
    giver = {}
    for i, k, own_split, won in zip(rows.index, folded, own, resolved):
        if k is not None and own_split is not pd.NA and own_split == won:
            giver.setdefault(k, i)
    examples = []
    for i in rows.index[(moved | joined | both).to_numpy()][:EXAMPLES]:
        source = giver.get(folded[i])
        examples.append({
            "source_file": rows.at[i, "source_file"], "line": int(rows.at[i, "line"]),
            "id": None if pd.isna(rows.at[i, "id"]) else rows.at[i, "id"],
            "given": None if pd.isna(own[i]) else own[i], "split": resolved[i],
            "because": "its column and its file disagree" if both[i] and source == i else
            f"same text as {rows.at[source, 'source_file']}:{int(rows.at[source, 'line'])}",
        })
    report = {
        "rows": {name: int((resolved == name).sum()) for name in SPLITS},
        "by_column": int(by_column.notna().sum()),
        "by_file": int(by_file.notna().sum()),
        "rule": "a text given two splits goes, with every copy, to the more held-out one (test, then validation)",
        "conflicts": {
            "texts_given_two_splits": int(two.sum() + (both & folded.isna()).sum()),
            "rows_moved_to_a_more_held_out_split": int(moved.sum()),
            "rows_joining_their_text": int(joined.sum()),
            "examples": examples,
        },
    }
    return resolved, report


def user_split_lines(report: dict | None) -> list[str]:
    """What the stages print about the user's splits (nothing when there are none)."""
    if not report:
        return []
    c = report["conflicts"]
    lines = [f"user-assigned rows {report['rows']} ({report['by_column']} by split.column, {report['by_file']} by "
             f"split.files)"]
    if c["texts_given_two_splits"] or c["rows_moved_to_a_more_held_out_split"] or c["rows_joining_their_text"]:
        lines.append(f"{c['texts_given_two_splits']} texts were given two splits and "
                     f"{c['rows_moved_to_a_more_held_out_split']} rows moved to the more held-out one; "
                     f"{c['rows_joining_their_text']} rows without a split joined a copy of their text that has one")
        lines += [f"  {e['source_file']}:{e['line']} (id {e['id']}): {e['given'] or 'no split'} -> {e['split']}, "
                  f"{e['because']}" for e in c["examples"][:5]]
    return lines


# ------------------------------------------------------------------------------------------------ the ledger


@dataclass
class Ledger:
    """Key -> split (index into SPLITS) of every key ever placed with this seed and these ratios; the key is the
    seeded 64-bit hash of the folded key. `user`: the keys the user placed (by column or file), not the ratios."""

    seed: int
    ratios: dict[str, float]
    splits: dict[int, int] = field(default_factory=dict)
    user: set[int] = field(default_factory=set)


LEDGER_META = b"sft_pipeline.split_ledger"


def read_ledger(path: Path, options) -> tuple[Ledger, str | None]:
    """The ledger at `path` (an empty one if there is none), and why an existing one was set aside, if it was."""
    import pyarrow.parquet as pq

    fresh = Ledger(options.seed, dict(options.ratios))
    path = Path(path)
    if not path.is_file():
        return fresh, None
    fix = f"restore it (`dvc checkout {path}`) or delete it to assign every row anew"
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[LEDGER_META])
        if meta.get("version") != LEDGER_VERSION:
            raise ValueError(f"version {meta.get('version')!r}, expected {LEDGER_VERSION}")
        seed, ratios = meta["seed"], meta["ratios"]
        keys = table.column("key").to_pylist()
        codes = table.column("split").to_pylist()
        user = table.column("user").to_pylist()
        if any(c not in (0, 1, 2) for c in set(codes)):
            raise ValueError("a split code other than 0, 1, 2")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{path}: not a split ledger ({exc}); {fix}") from None
    if len(set(keys)) != len(keys):
        raise StageError(f"{path}: {len(keys) - len(set(keys))} keys are listed twice; {fix}")
    if seed != options.seed or ratios != dict(options.ratios):
        return fresh, (f"split.seed or split.ratios changed since {path} was written (it has seed {seed}, ratios "
                       f"{ratios}; params have seed {options.seed}, ratios {dict(options.ratios)}): every row is "
                       f"assigned anew, into a new ledger (the old one stays in DVC's cache, under the previous "
                       f"commit's dvc.lock)")
    return Ledger(seed, ratios, dict(zip(keys, codes)), {k for k, u in zip(keys, user) if u}), None


def write_ledger(path: Path, ledger: Ledger) -> None:
    """Parquet (key uint64, split 0/1/2 = train/validation/test, user), sorted by key; seed and ratios in the
    file's metadata. About 10 bytes a key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = np.fromiter(ledger.splits, dtype=np.uint64, count=len(ledger.splits))
    order = np.argsort(keys, kind="stable")
    codes = np.fromiter(ledger.splits.values(), dtype=np.int8, count=len(keys))
    user = np.fromiter((k in ledger.user for k in ledger.splits), dtype=bool, count=len(keys))
    meta = {"version": LEDGER_VERSION, "seed": ledger.seed, "ratios": ledger.ratios, "splits": list(SPLITS),
            "key": "seeded blake2b-64 of the case- and space-folded split key (sft_pipeline.data.splitting)"}
    table = pa.table({"key": keys[order], "split": codes[order], "user": user[order]})
    table = table.replace_schema_metadata({LEDGER_META: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# ------------------------------------------------------------------------------------------------ assignment


def targets(rows: int, held: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """What each split should hold of a class of `rows` rows, `held` of them fixed in place per split: ratio * rows,
    except that a split already holding more keeps what it holds and takes nothing new, the others sharing the rest
    by their ratios."""
    over = np.zeros(len(ratios), dtype=bool)
    while True:
        rest = rows - held[over].sum()
        share = np.where(over, 0.0, ratios) / ratios[~over].sum()
        target = np.where(over, held, share * rest)
        newly = ~over & (held > target + EPS)
        if not newly.any():
            return target
        over |= newly


@dataclass
class Assignment:
    split: pd.Series
    ledger: Ledger
    stats: dict


def assign_splits(keys: pd.Series, strata: pd.Series | None, user: pd.Series | None, ledger: Ledger,
                  options) -> Assignment:
    """Each row's split: the user's (`user`, NA where none), else the ledger's, else by the ratios (module doc).
    Returns the splits, the ledger with every key of `keys` in it, and counts of how each row got its split."""
    n = len(keys)
    ratios = [options.ratios[name] for name in SPLITS]
    digests, u = _hashes([fold(key) for key in keys], options.seed)
    preferred = hash_cut(u, options.ratios)
    if strata is None:
        classes, k = np.zeros(n, dtype=np.int64), 1
    else:
        classes, names = pd.factorize(strata.to_numpy(), sort=True)
        k = len(names)
    user_code = (np.full(n, -1, dtype=np.int64) if user is None
                 else user.map(HELD_OUT).fillna(-1).astype(np.int64).to_numpy())

    # One group per key; a group's rows share its digest, hash value and preferred split.
    group, unique = pd.factorize(digests)
    groups = len(unique)
    size = np.bincount(group, minlength=groups)
    first = np.full(groups, n, dtype=np.int64)
    np.minimum.at(first, group, np.arange(n))
    given = np.full(groups, -1, dtype=np.int64)
    np.maximum.at(given, group, user_code)
    unique = unique.tolist()
    known = np.array([ledger.splits.get(d, -1) for d in unique], dtype=np.int64)
    choice = np.where(given >= 0, given, known)

    stats = {"rows_kept": int(size[(given < 0) & (known >= 0)].sum()),
             "rows_user": int(size[given >= 0].sum()),
             "rows_moved_by_user": int(size[(given >= 0) & (known >= 0) & (given != known)].sum())}
    for g in np.flatnonzero(given >= 0).tolist():
        ledger.splits[unique[g]] = int(given[g])
        ledger.user.add(unique[g])

    held = np.zeros((k, len(SPLITS)), dtype=np.int64)
    placed = choice[group] >= 0
    np.add.at(held, (classes[placed], choice[group][placed]), 1)
    per_class = np.bincount(classes, minlength=k)
    deficit = [[t - h for t, h in zip(targets(int(per_class[c]), held[c], np.array(ratios)), held[c])]
               for c in range(k)]

    new = np.flatnonzero(choice < 0)
    new = new[np.lexsort((u[first[new]], -size[new]))]
    several = {}
    if (size[new] > 1).any():
        multi = np.flatnonzero(size[group] > 1)
        for g, r in zip(group[multi], multi):
            several.setdefault(int(g), []).append(int(r))
    classes_list, preferred_list, u_list = classes.tolist(), preferred.tolist(), u.tolist()
    for g in new.tolist():
        r = int(first[g])
        want = preferred_list[r]
        if size[g] == 1:
            row = deficit[classes_list[r]]
            pick = want if row[want] >= 1 - EPS else _largest(row, u_list[r])
            row[pick] -= 1
        else:
            count = Counter(classes_list[i] for i in several[g])
            if all(deficit[c][want] >= m - EPS for c, m in count.items()):
                pick = want
            else:
                pick = _largest([sum(m * deficit[c][s] for c, m in count.items()) for s in range(len(SPLITS))],
                                u_list[r])
            for c, m in count.items():
                deficit[c][pick] -= m
        choice[g] = pick
        ledger.splits[unique[g]] = pick
    stats.update(rows_new=int(size[new].sum()), keys_new=len(new), keys_in_ledger=len(ledger.splits),
                 keys_not_in_data=len(ledger.splits) - groups)
    out = pd.Series(pd.Categorical.from_codes(choice[group], categories=list(SPLITS)), index=keys.index,
                    name="split")
    return Assignment(out, ledger, stats)


def _largest(score: list[float], u: float) -> int:
    """The split with the largest score; a tie goes by the key's seeded hash (its low bits, which the hash cut does
    not use)."""
    best = max(score)
    tied = [s for s, value in enumerate(score) if value >= best - EPS]
    return tied[int(u * 2**32) % len(tied)]


# ------------------------------------------------------------------------------------------------ the report


def split_report(assignment: Assignment, strata: pd.Series | None, options, user: dict | None = None,
                 restarted: str | None = None) -> dict:
    split = assignment.split
    report = {"seed": options.seed, "ratios": options.ratios,
              "rows": {name: int((split == name).sum()) for name in SPLITS},
              "ledger": {**assignment.stats, "restarted": restarted}}
    if user:
        # As clean resolved them, over every row read (the rows validate rejected or merged included).
        report["user"] = user
    groups = strata if strata is not None else pd.Series("all rows", index=split.index)
    counts = pd.crosstab(groups, split).reindex(columns=list(SPLITS), fill_value=0)
    sizes = counts.sum(axis=1)
    deviation = {str(label): {name: round(float(row[name] - options.ratios[name] * sizes[label]), 4)
                              for name in SPLITS} for label, row in counts.iterrows()}
    beyond = [f"{'class ' + repr(str(label)) if strata is not None else 'the data'}: {name} has "
              f"{int(counts.at[label, name])} rows, {options.ratios[name] * sizes[label]:.2f} by the ratios"
              for label in counts.index for name in SPLITS if abs(deviation[str(label)][name]) >= 1 - EPS]
    report["beyond_one_row"] = beyond
    if strata is None:
        report["deviation"] = next(iter(deviation.values()), {name: 0.0 for name in SPLITS})
        return report
    report["classes"] = {str(label): {name: int(n) for name, n in row.items()} for label, row in counts.iterrows()}
    report["deviation"] = deviation
    report["class_share"] = {
        name: {str(label): round(float(n) / max(int(counts[name].sum()), 1), 4) for label, n in counts[name].items()}
        for name in SPLITS
    }
    return report


def empty_strata(report: dict) -> list[str]:
    """A stratum that has no row in some split: training or scoring it would silently fail there."""
    return [f"class {label!r} has no row in {name}" for label, row in report.get("classes", {}).items()
            for name, n in row.items() if n == 0]
