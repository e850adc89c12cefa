"""Bad input, one fixture file per defect (tests/fixtures/bad_input/): the exact outcome of clean and validate.

Each fixture goes into a raw folder next to a file of good rows, and the two stages run as `dvc repro` runs them.
A row with a defect is either kept (cleaned), or quarantined in reports/rejected/ with a reason and its line; a file
that cannot be read stops the stage with a message naming the file and the line. Rows read = kept + rejected holds
for every fixture, per file and overall.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from stages import clean, validate
from sft_pipeline.io import StageError
from sft_pipeline.params import parse
from tests.conftest import project_params, synthetic_rows, write_csv

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bad_input"
GOOD_TEXT = "A plain sentence about the new software release"


@dataclass
class Kept:
    """Rows of the fixture that reach validated.parquet: {line: (cleaned text, canonical label)}."""

    rows: dict[int, tuple[str, str]]
    rejected: dict[int, str] = field(default_factory=dict)  # line -> reason (clean or validate)
    fallback_lines: int = 0


GOOD = (GOOD_TEXT, "tech")
OUTCOMES = {
    "bom.csv": Kept({2: ("The team won the cup final", "sport"), 3: GOOD}),
    "latin1.csv": Kept({2: ("Café owners say prices and profit rise", "business"), 3: GOOD}, fallback_lines=1),
    "malformed_quotes.csv": Kept({3: GOOD}, {2: "malformed_line"}),
    "too_many_fields.csv": Kept({3: GOOD}, {2: "malformed_line"}),
    "empty_text.csv": Kept({3: GOOD}, {2: "empty_text"}),
    # A literal NaN in a CSV is text (three characters), not a missing value; a JSON NaN or null is missing.
    "nan.csv": Kept({4: GOOD}, {2: "too_short", 3: "unknown_label"}),
    "nan.jsonl": Kept({3: GOOD}, {1: "empty_text", 2: "missing_label"}),
    "whitespace_only.csv": Kept({3: GOOD}, {2: "empty_text"}),
    "unknown_label.csv": Kept({3: GOOD}, {2: "unknown_label"}),
    "label_synonyms.csv": Kept({2: ("The striker scored twice in the match", "sport"),
                                3: ("Bank shares rose after the results", "business"),
                                4: ("A faster chip for the new phone", "tech")}),
    # Line 3 repeats line 2 byte for byte; line 4 differs only in whitespace.
    "duplicates.csv": Kept({2: ("The coach praised the young team", "sport"), 5: GOOD},
                           {3: "duplicate", 4: "duplicate"}),
    # A 1:1 tie stays out; a 2:1 majority keeps one row with its votes counted.
    "conflicting_labels.csv": Kept({4: ("The bank invests in a new stadium", "business")},
                                   {2: "conflict_unresolved", 3: "conflict_unresolved", 5: "merged_vote",
                                    6: "outvoted"}),
    "html.csv": Kept({2: ("Match report : Leeds 2 & Hull 1", "sport"), 3: GOOD}),
    "control_zero_width.csv": Kept({2: ("Goal in the last minute of the match", "sport"), 3: GOOD}),
    "long_text.csv": Kept({3: GOOD}, {2: "too_long"}),
    "broken_line.jsonl": Kept({1: ("The team won the cup final", "sport"),
                               3: ("Shares rose after the results", "business")}, {2: "invalid_json"}),
    # Nothing to read: listed in the clean report with 0 rows (and a warning), never an error on its own.
    "empty.csv": Kept({}),
    "header_only.csv": Kept({}),
}
# Files that cannot be read at all: the clean stage exits with status 1 and this message, and writes nothing.
FAILURES = {
    "missing_label_column.csv": r"missing_label_column.csv: no column 'label' \(found: 'id', 'text', 'category'\) "
                                r"in the header, line 1",
    "binary.csv": r"binary.csv: contains NUL bytes \(the first at line 3, byte 8\)",
    "wrong_type.parquet": r"wrong_type.parquet: column 'text' has type int64, expected string",
}


def test_every_fixture_has_a_stated_outcome():
    files = {p.name for p in FIXTURES.iterdir() if p.suffix != ".py" and not p.name.startswith(".")}
    assert files == set(OUTCOMES) | set(FAILURES)


def project(tmp_path: Path, fixture: str, **overrides):
    raw = project_params(tmp_path, validate__max_reject_fraction=1.0, **overrides)
    params = parse(raw)
    write_csv(params.paths.raw_dir / "good.csv", synthetic_rows(12, seed=5))
    shutil.copy(FIXTURES / fixture, params.paths.raw_dir / fixture)
    return params


def run_clean_and_validate(params) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    clean.run(params)
    validate.run(params)
    rejected = pd.concat([pd.read_csv(params.paths.clean_rejected, dtype={"id": "string"}),
                          pd.read_csv(params.paths.validate_rejected, dtype={"id": "string"})], ignore_index=True)
    kept = pd.read_parquet(params.paths.validated)
    return kept, rejected, json.loads(params.paths.clean_report.read_text()), \
        json.loads(params.paths.validate_report.read_text())


def assert_row_accounting(kept: pd.DataFrame, rejected: pd.DataFrame, clean_report: dict, validation: dict) -> None:
    # Votes merged into a kept row are rejected rows of their own (merged_vote), so every row read is counted once.
    for name, entry in clean_report["files"].items():
        mine = (kept["source_file"] == name).sum() + (rejected["source_file"] == name).sum()
        assert entry["rows_read"] == mine, name
        assert entry["rows_read"] == entry["kept"] + sum(entry["rejected"].values()), name
    assert clean_report["totals"]["rows_read"] == len(kept) + len(rejected)
    assert validation["rows_in"] == validation["kept"] + sum(validation["rejected"].values())
    assert validation["overall"]["rows_read"] == clean_report["totals"]["rows_read"]


@pytest.mark.parametrize("fixture", sorted(OUTCOMES))
def test_fixture_rows_are_kept_or_quarantined_with_a_reason(tmp_path, fixture, capsys):
    expected = OUTCOMES[fixture]
    kept, rejected, clean_report, validation = run_clean_and_validate(project(tmp_path, fixture))

    mine = kept[kept["source_file"] == fixture]
    assert {int(r.line): (r.text, r.label) for r in mine.itertuples()} == expected.rows
    quarantined = rejected[rejected["source_file"] == fixture]
    assert {int(r.line): r.reason for r in quarantined.itertuples()} == expected.rejected
    # Every quarantined row says why in words and keeps its original text (or its raw line) for the reader.
    assert quarantined["detail"].notna().all()
    entry = clean_report["files"][fixture]
    assert entry["decoded_with_fallback"]["count"] == expected.fallback_lines
    assert_row_accounting(kept, rejected, clean_report, validation)
    if not expected.rows and not expected.rejected:
        assert entry["rows_read"] == 0
        assert f"warning: {fixture} has no rows" in capsys.readouterr().out


def test_latin1_without_fallback_is_quarantined_as_undecodable(tmp_path):
    params = project(tmp_path, "latin1.csv", clean__fallback_encoding=None)
    kept, rejected, clean_report, validation = run_clean_and_validate(params)
    mine = rejected[rejected["source_file"] == "latin1.csv"]
    assert mine[["line", "reason"]].values.tolist() == [[2, "undecodable"]]
    assert "b'\\xe9' at offset 3 is not valid UTF-8" in mine["detail"].iloc[0]
    assert "\\xe9" in mine["text"].iloc[0]  # the original bytes, escaped, so the CSV stays valid UTF-8
    assert_row_accounting(kept, rejected, clean_report, validation)


def test_conflict_policy_drop_rejects_every_vote_of_a_conflicting_text(tmp_path):
    params = project(tmp_path, "conflicting_labels.csv", validate__conflict_policy="drop")
    kept, rejected, clean_report, validation = run_clean_and_validate(params)
    mine = rejected[rejected["source_file"] == "conflicting_labels.csv"]
    assert dict(zip(mine["line"], mine["reason"])) == {2: "conflict", 3: "conflict", 4: "conflict", 5: "conflict",
                                                       6: "conflict"}
    assert (kept["source_file"] != "conflicting_labels.csv").all()
    assert_row_accounting(kept, rejected, clean_report, validation)


def test_conflicting_votes_are_counted_on_the_kept_row(tmp_path):
    kept, *_ = run_clean_and_validate(project(tmp_path, "conflicting_labels.csv"))
    row = kept[kept["source_file"] == "conflicting_labels.csv"].iloc[0]
    assert (row["n_votes"], round(row["agreement"], 4)) == (3, 0.6667)


@pytest.mark.parametrize("fixture", sorted(FAILURES))
def test_unreadable_file_stops_clean_naming_file_and_line(tmp_path, fixture, capsys):
    import re

    params = project(tmp_path, fixture)
    from tests.conftest import write_params

    params_file = write_params(tmp_path, project_params(tmp_path, validate__max_reject_fraction=1.0))
    assert clean.main(["--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert re.search(FAILURES[fixture], err), err
    assert str(params.paths.raw_dir / fixture) in err
    # Nothing half-made: no output of the stage exists, so no later stage can take one as complete.
    assert not params.paths.clean.exists() and not params.paths.clean_report.exists()
    with pytest.raises(StageError):
        clean.run(params)


# Defects of files that an annotation tool or a hand edit produces, written here (a few lines each) rather than kept
# as fixture files: {file: (content, kept {line: (text, label)}, rejected [(line, reason)])}.
INLINE = {
    # The example: a stray quote on line 2 would swallow lines 3-5 into one text labelled sport.
    "stray_quote.csv": ('id,text,label\n1,"Bad quote one,sport\n2,row two of the file,tech\n'
                        '3,row three of the file,tech\n4,"Bad quote four,sport\n',
                        {3: ("row two of the file", "tech"), 4: ("row three of the file", "tech")},
                        [(2, "malformed_line"), (5, "malformed_line")]),
    # Unquoted TSV: the quotes are text, and the stray one joins nothing.
    "quotes.tsv": ('id\ttext\tlabel\n1\t"Great" match for the team\tsport\n2\t"Stray quote in a text\ttech\n',
                   {2: ('"Great" match for the team', "sport"), 3: ('"Stray quote in a text', "tech")}, []),
    # Label Studio: two annotators of task 1 (votes of one text), a skipped annotation, a task nobody annotated.
    "export.json": (json.dumps([
        {"id": 7, "data": {"text": "The striker scored twice"}, "annotations": [
            {"completed_by": 1, "result": [{"from_name": "topic", "value": {"choices": ["sport"]}}]},
            {"completed_by": 2, "result": [{"from_name": "topic", "value": {"choices": ["sports"]}}]},
            {"completed_by": 3, "was_cancelled": True, "result": []}]},
        {"id": 8, "data": {"text": "Nobody looked at this one"}, "annotations": []}]),
        {1: ("The striker scored twice", "sport")}, [(1, "cancelled"), (1, "merged_vote"), (2, "unlabelled")]),
}


@pytest.mark.parametrize("name", sorted(INLINE))
def test_inline_defect_rows_are_kept_or_quarantined_with_a_reason(tmp_path, name):
    content, expected_rows, expected_rejected = INLINE[name]
    params = parse(project_params(tmp_path, validate__max_reject_fraction=1.0))
    write_csv(params.paths.raw_dir / "good.csv", synthetic_rows(12, seed=5))
    (params.paths.raw_dir / name).write_text(content, encoding="utf-8")
    kept, rejected, clean_report, validation = run_clean_and_validate(params)

    mine = kept[kept["source_file"] == name]
    assert {int(r.line): (r.text, r.label) for r in mine.itertuples()} == expected_rows
    quarantined = rejected[rejected["source_file"] == name].sort_values(["line", "reason"])
    assert [(int(r.line), r.reason) for r in quarantined.itertuples()] == expected_rejected
    assert quarantined["detail"].notna().all()
    assert_row_accounting(kept, rejected, clean_report, validation)
