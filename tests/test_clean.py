"""clean: normalisation, per-line rejection in every format, duplicates, and the row accounting."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sft_pipeline.data.cleaning import drop_duplicates
from sft_pipeline.data.readers import read_file
from sft_pipeline.data.text import normalize_text
from sft_pipeline.io import StageError
from sft_pipeline.params import parse
from sft_pipeline.tasks.classification import Classification, Clean
from stages import clean
from tests.conftest import project_params, write_params

TASK = Classification()
COLUMNS = TASK.fields(Clean())


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("<p>Hello&nbsp;<b>world</b></p>", "Hello world"),
        ("Fish &amp; chips &lt;3", "Fish & chips <3"),
        ("a < b and c > d", "a < b and c > d"),
        ("ｆｕｌｌｗｉｄｔｈ １２３", "fullwidth 123"),
        ("zero\u200bwidth\ufeff joiner\u200d", "zerowidth joiner"),
        ("tab\tnew\nline\r\x07bell\x00", "tab new line bell"),
        ("  many    spaces  ", "many spaces"),
        ("<!-- note -->kept", "kept"),
    ],
)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected
    assert normalize_text(expected) == expected  # idempotent


def test_lowercase_and_punctuation_are_options():
    assert normalize_text("Hello, World!") == "Hello, World!"
    assert normalize_text("Hello, World!", lowercase=True) == "hello, world!"
    assert normalize_text("Hello, World! «Quoted»", remove_punctuation=True) == "Hello World Quoted"


def test_csv_bad_lines_are_rejected_alone(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(
        b"id,text,label\n"
        b"1,good text,sport\n"
        b"2,too,many,fields\n"
        b"3,caf\xe9 latin1,tech\n"
        b'4,"quoted, with comma",biz\n'
        b"\n"
        b"5,last,tech\n"
    )
    strict = read_file(path, COLUMNS, fallback=None)
    assert [r["line"] for r in strict.records] == [2, 5, 7]
    assert [(r["line"], r["reason"]) for r in strict.rejected] == [(3, "malformed_line"), (4, "undecodable")]
    assert "expected 3 fields, found 4" in strict.rejected[0]["detail"]
    assert "\\xe9" in strict.rejected[1]["text"]

    lenient = read_file(path, COLUMNS, fallback="cp1252")
    assert [r["text"] for r in lenient.records] == ["good text", "café latin1", "quoted, with comma", "last"]
    assert lenient.fallback_lines == [4]


def test_unbalanced_quote_rejects_one_line_and_keeps_the_rest(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('id,text,label\n1,"never closed,sport\n2,fine,tech\n3,also fine,sport\n', encoding="utf-8")
    read = read_file(path, COLUMNS, fallback=None)
    assert [(r["line"], r["reason"]) for r in read.rejected] == [(2, "malformed_line")]
    assert [r["id"] for r in read.records] == ["2", "3"]


def test_tsv_bom_and_multiline_quoted_field_with_quoting_on(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_bytes("\ufeffid\ttext\tlabel\n1\t\"two\nlines\"\tsport\n2\tnext\ttech\n".encode())
    read = read_file(path, COLUMNS, fallback=None, tsv_quoting=True)
    assert [(r["line"], r["text"]) for r in read.records] == [(2, "two\nlines"), (4, "next")]


def test_jsonl_broken_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok", "label": "sport"}\n{"text": "broken", \n[1, 2]\n{"text": "no label"}\n'
                    '{"text": "fine", "label": "tech", "annotator": "ann1"}\n', encoding="utf-8")
    read = read_file(path, COLUMNS, fallback=None)
    assert [(r["line"], r["reason"]) for r in read.rejected] == [
        (2, "invalid_json"), (3, "invalid_json"), (4, "missing_field")]
    assert [(r["line"], r["annotator"]) for r in read.records] == [(1, None), (5, "ann1")]


def test_json_array_and_unparseable_json(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(json.dumps([{"text": "one", "label": "sport"}, {"text": "two", "label": 3}]), encoding="utf-8")
    read = read_file(good, COLUMNS, fallback=None)
    assert [(r["line"], r["label"]) for r in read.records] == [(1, "sport"), (2, "3")]
    bad = tmp_path / "b.json"
    bad.write_text('[{"text": "one", "label": "sport"},\n {"text": }]', encoding="utf-8")
    with pytest.raises(StageError, match=r"b.json: line 2 column"):
        read_file(bad, COLUMNS, fallback=None)


def test_parquet_types(tmp_path):
    path = tmp_path / "a.parquet"
    table = pa.table({"text": pa.array([b"ok", b"caf\xe9", None], pa.binary()), "label": pa.array([1, 2, 1])})
    pq.write_table(table, path)
    read = read_file(path, COLUMNS, fallback=None)
    assert [(r["line"], r["text"], r["label"]) for r in read.records] == [(1, "ok", "1"), (3, "", "1")]
    assert [(r["line"], r["reason"]) for r in read.rejected] == [(2, "undecodable")]
    wrong = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": [1.5, 2.5], "label": ["a", "b"]}), wrong)
    with pytest.raises(StageError, match=r"b.parquet: column 'text' has type double"):
        read_file(wrong, COLUMNS, fallback=None)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("nolabel.csv", b"id,text,category\n1,x,y\n", r"nolabel.csv: no column 'label' \(found: 'id', 'text', 'category'\)"),
        ("binary.csv", b"PK\x03\x04\x00\x00\x01", r"binary.csv: contains NUL bytes"),
        ("notes.xlsx", b"whatever", r"notes.xlsx: unsupported file type '.xlsx'"),
    ],
)
def test_unreadable_files_stop_with_the_file_name(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(StageError, match=message):
        read_file(path, COLUMNS, fallback=None)


def test_drop_duplicates_keeps_first_and_points_to_it():
    frame = pd.DataFrame({
        "source_file": ["a.csv"] * 5, "line": [2, 3, 4, 5, 6], "id": ["1", "2", "3", "4", "5"],
        "text": ["same", "same", "same", "", ""], "text_raw": ["same", "same ", "same", "", ""],
        "label": ["x", "x", "y", "x", "x"], "annotator": [None] * 5,
    })
    kept, rejected = drop_duplicates(frame, *TASK.duplicate_key(frame))
    assert kept["line"].tolist() == [2, 4, 5, 6]  # empty texts are left for validate to reject each
    assert rejected[["line", "reason"]].values.tolist() == [[3, "duplicate"]]
    assert rejected["detail"].iloc[0] == "same text, label and annotator as a.csv:2"


def test_run_accounts_for_every_row(tmp_path):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "a.csv").write_bytes(
        b"id,text,label\n1,<b>Goal</b> for the team,sport\n2,Goal for the  team,sport\n3,bad,line,here\n"
        b"4,caf\xe9 prices rise,biz\n"
    )
    (raw / "b.jsonl").write_text('{"text": "Chip sales", "label": "tech"}\n{oops\n', encoding="utf-8")
    (raw / ".gitkeep").write_text("")
    params = parse(project_params(tmp_path, clean__fallback_encoding=None))
    report = clean.run(params)

    assert report["totals"] == {"files": 2, "rows_read": 6, "kept": 2,
                                "rejected": {"duplicate": 1, "invalid_json": 1, "malformed_line": 1,
                                             "undecodable": 1},
                                "decoded_with_fallback": 0}
    assert report["files"]["a.csv"]["rows_read"] == 4
    kept = pd.read_parquet(params.paths.clean)
    assert kept["text"].tolist() == ["Goal for the team", "Chip sales"]
    assert kept["text_raw"].tolist() == ["<b>Goal</b> for the team", "Chip sales"]
    rejected = pd.read_csv(params.paths.clean_rejected)
    assert rejected[["source_file", "line", "reason"]].values.tolist() == [
        ["a.csv", 3, "duplicate"], ["a.csv", 4, "malformed_line"], ["a.csv", 5, "undecodable"],
        ["b.jsonl", 2, "invalid_json"]]


def test_main_exit_code_and_message(tmp_path, capsys):
    params_file = write_params(tmp_path, project_params(tmp_path))
    assert clean.main(["--params", str(params_file)]) == 1
    assert "raw folder not found" in capsys.readouterr().err
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "a.csv").write_text("id,text,label\n1,hello there,sport\n", encoding="utf-8")
    assert clean.main(["--params", str(params_file)]) == 0
    assert json.loads((tmp_path / "reports" / "clean.json").read_text())["totals"]["kept"] == 1


def test_clean_params_have_defaults():
    assert Clean().fallback_encoding is None and Clean().lowercase is False
