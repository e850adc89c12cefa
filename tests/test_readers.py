"""Readers: stray quotes in CSV, TSV without quoting, columns named twice, and annotation-tool exports (Label Studio
JSON, doccano JSONL) read unchanged. Each fixture is a few lines written here, in the shape of the real file; each test
states the exact rows kept, the rows rejected (line and reason) and that every line or record is counted once.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sft_pipeline.data.readers import read_file
from sft_pipeline.io import StageError
from sft_pipeline.params import parse
from sft_pipeline.tasks.classification import Classification, Clean
from sft_pipeline.tasks.instruction import Clean as InstructionClean
from sft_pipeline.tasks.instruction import Instruction
from stages import clean
from tests.conftest import project_params

FIELDS = Classification().fields(Clean())


def read(path, content, **options):
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return read_file(path, FIELDS, None, **options)


def kept(result):
    """{line: (text, label)} of the records kept, for files with one record per line."""
    assert len({r["line"] for r in result.records}) == len(result.records)
    return {r["line"]: (r["text"], r["label"]) for r in result.records}


def kept_rows(result, *keys):
    """[(line, *values)] of the records kept, for files where a line (a Label Studio task) yields several."""
    return [(r["line"], *(r[k] for k in keys)) for r in result.records]


def reasons(result):
    return [(r["line"], r["reason"]) for r in result.rejected]


def assert_every_row_counted(result, expected_rows):
    assert len(result.records) + len(result.rejected) == expected_rows


# ------------------------------------------------------------------------------------------------ CSV quotes


def test_csv_stray_quote_rejects_its_line_and_reads_the_swallowed_rows(tmp_path):
    # The example: the quote opened on line 2 pairs with the one on line 5, making four rows one text.
    result = read(tmp_path / "q.csv", 'id,text,label\n1,"Bad quote one,sport\n2,row two,tech\n3,row three,tech\n'
                                      '4,"Bad quote four,sport\n')
    assert kept(result) == {3: ("row two", "tech"), 4: ("row three", "tech")}
    assert reasons(result) == [(2, "malformed_line"), (5, "malformed_line")]
    first, last = (r["detail"] for r in result.rejected)
    assert first.startswith("unbalanced quote: a quoted field opened on this line closes at line 5 in the middle of "
                            "text") and "taking in lines 3-4, which read as rows of their own" in first
    assert "never closes (the file ends inside it, at line 5)" in last
    assert [r["text"] for r in result.rejected] == ['1,"Bad quote one,sport', '4,"Bad quote four,sport']
    assert_every_row_counted(result, 4)


def test_csv_quote_that_closes_cleanly_further_down_is_still_caught_by_the_rows_inside(tmp_path):
    # The stray quote on line 2 meets a quote that ends a field (12" then a comma): one well-formed record of
    # 3 fields over lines 2-4, but line 3 inside it is a row of the file, so line 2's quote is the defect.
    result = read(tmp_path / "q.csv", 'id,text,label\n1,"stray,sport\n2,row two,tech\n3,size 12",tech\n4,ok,tech\n')
    assert kept(result) == {3: ("row two", "tech"), 4: ('size 12"', "tech"), 5: ("ok", "tech")}
    assert reasons(result) == [(2, "malformed_line")]
    assert "runs to line 4 and takes in line 3, which read as rows of their own" in result.rejected[0]["detail"]
    assert_every_row_counted(result, 4)


def test_csv_quoted_text_over_several_lines_is_one_record(tmp_path):
    result = read(tmp_path / "m.csv", 'id,text,label\n1,"First paragraph.\nSecond, with a comma.",sport\n'
                                      '2,"He said ""hi""\n\nand left",tech\n3,last,tech\n')
    assert kept(result) == {2: ("First paragraph.\nSecond, with a comma.", "sport"),
                            4: ('He said "hi"\n\nand left', "tech"), 7: ("last", "tech")}
    assert result.rejected == []


def test_csv_prose_with_as_many_commas_as_the_header_stays_one_text(tmp_path):
    # BBC News articles: paragraphs inside a quoted text often hold two commas, as a row of this file does; their
    # first field is prose, not shaped like the ids (a/9), so the text stays whole. A rule on the share of such lines
    # rejected 242 of 2,225 articles.
    text = "Shares rose, traders said, on Monday.\n\nThe bank, which lost money, said more.\nIt ended there."
    result = read(tmp_path / "bbc.csv", f'id,text,label\nbusiness/001,"{text}",business\ntech/002,short,tech\n')
    assert kept(result) == {2: (text, "business"), 6: ("short", "tech")}
    assert result.rejected == []
    # Without an id column, every line inside must read as a row for the quote to be taken for the defect.
    result = read(tmp_path / "noid.csv", f'text,label\n"{text}",business\nshort,tech\n')
    assert kept(result) == {2: (text, "business"), 6: ("short", "tech")}


def test_csv_quote_closing_inside_a_field_is_rejected_not_dropped(tmp_path):
    # The lenient parser read this as `Great movie`: the quotes lost without a word.
    result = read(tmp_path / "g.csv", 'id,text,label\n1,"Great" movie,film\n2,fine,tech\n')
    assert kept(result) == {3: ("fine", "tech")}
    assert reasons(result) == [(2, "malformed_line")]
    assert "closes on this line in the middle of text, not before ','" in result.rejected[0]["detail"]
    assert_every_row_counted(result, 2)


# ------------------------------------------------------------------------------------------------ TSV


def test_tsv_is_read_without_quoting_by_default(tmp_path):
    result = read(tmp_path / "a.tsv", 'id\ttext\tlabel\n1\t"Great" movie\tfilm\n2\t"stray quote\ttech\n'
                                      '3\tnext\ttech\n')
    assert kept(result) == {2: ('"Great" movie', "film"), 3: ('"stray quote', "tech"), 4: ("next", "tech")}
    assert result.rejected == []


def test_tsv_quoting_on_reads_quoted_fields_across_lines(tmp_path):
    content = "\ufeffid\ttext\tlabel\n1\t\"two\nlines\"\tsport\n2\tnext\ttech\n"
    result = read(tmp_path / "a.tsv", content, tsv_quoting=True)
    assert kept(result) == {2: ("two\nlines", "sport"), 4: ("next", "tech")}
    # Off (the default), the quote is text and each physical line is a record: both halves are short a field.
    plain = read(tmp_path / "a.tsv", content)
    assert kept(plain) == {4: ("next", "tech")}
    assert reasons(plain) == [(2, "malformed_line"), (3, "malformed_line")]


def test_tsv_quoting_is_a_clean_param(tmp_path):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "a.tsv").write_text('id\ttext\tlabel\n1\t"Quoted" text here\tsport\n', encoding="utf-8")
    report = clean.run(parse(project_params(tmp_path)))
    assert report["files"]["a.tsv"]["kept"] == 1
    with_quoting = parse(project_params(tmp_path, clean__tsv_quoting=True))
    assert with_quoting.clean.tsv_quoting is True
    report = clean.run(with_quoting)
    assert (report["files"]["a.tsv"]["kept"], report["files"]["a.tsv"]["rejected"]) == (0, {"malformed_line": 1})


def test_quoted_tsv_header_without_quoting_says_which_setting(tmp_path):
    with pytest.raises(StageError, match=r'found: \'"id"\', \'"text"\', \'"label"\'\) in the header, line 1 \(the '
                                         r"names are in quotes: a TSV written with quoting\? set clean.tsv_quoting"):
        read(tmp_path / "a.tsv", '"id"\t"text"\t"label"\n"1"\t"x"\t"sport"\n')


def test_tab_separated_file_named_csv_is_named_as_such(tmp_path):
    with pytest.raises(StageError, match=r"t.csv: no column .* \(the header holds more tabs than commas: a "
                                         r"tab-separated file named .csv\? rename it .tsv\)"):
        read(tmp_path / "t.csv", "id\ttext\tlabel\n1\tx\tsport\n")


# ------------------------------------------------------------------------------------------------ duplicate columns


@pytest.mark.parametrize("name, header", [("d.csv", "id,text,label,label"), ("d.tsv", "id\ttext\tlabel\tlabel")])
def test_a_column_read_that_is_named_twice_is_an_error(tmp_path, name, header):
    sep = "\t" if name.endswith(".tsv") else ","
    with pytest.raises(StageError, match=rf"{name}: column 'label' appears more than once in the header, line 1 "
                                         r"\('label' at columns 3, 4\); rename or remove the extra column"):
        read(tmp_path / name, header + "\n" + sep.join(["1", "x", "sport", "tech"]) + "\n")


def test_a_column_not_read_may_be_named_twice(tmp_path):
    result = read(tmp_path / "d.csv", "id,text,label,note,note\n1,x,sport,a,b\n")
    assert kept(result) == {2: ("x", "sport")}


def test_parquet_column_named_twice_is_an_error(tmp_path):
    path = tmp_path / "d.parquet"
    arrays = [pa.array(["x"]), pa.array(["sport"]), pa.array(["tech"])]
    pq.write_table(pa.Table.from_arrays(arrays, names=["text", "label", "label"]), path)
    with pytest.raises(StageError, match=r"d.parquet: column 'label' appears more than once in the schema "
                                         r"\('label' at columns 2, 3\)"):
        read_file(path, FIELDS, None)
    other = tmp_path / "e.parquet"
    pq.write_table(pa.Table.from_arrays(arrays + [pa.array(["n"])], names=["text", "label", "note", "note"]), other)
    assert kept(read_file(other, FIELDS, None)) == {1: ("x", "sport")}


def test_json_key_given_twice_rejects_the_record(tmp_path):
    result = read(tmp_path / "d.jsonl", '{"text": "x", "label": "sport", "label": "tech"}\n'
                                        '{"text": "y", "label": "tech", "meta": 1, "meta": 2}\n')
    assert kept(result) == {2: ("y", "tech")}
    assert reasons(result) == [(1, "duplicate_key")]
    assert "the object gives key 'label' 2 times" in result.rejected[0]["detail"]
    assert_every_row_counted(result, 2)


# ------------------------------------------------------------------------------------------------ Label Studio


def annotation(choices, by=None, control="sentiment", **extra):
    result = [{"from_name": control, "to_name": "text", "type": "choices", "value": {"choices": choices}}]
    return {"completed_by": by, "result": result, **extra}


LABEL_STUDIO = [
    # 1: two annotators (an id, and a user object as Enterprise writes it): two rows of the same text.
    {"id": 11, "data": {"text": "The striker scored twice"},
     "annotations": [annotation(["sport"], by=1, id=101),
                     annotation(["sport"], by={"id": 2, "email": "b@example.com"}, id=102)]},
    # 2: one annotation skipped, one kept.
    {"id": 12, "data": {"text": "Chip prices fall"},
     "annotations": [annotation([], by=1, id=103, was_cancelled=True), annotation(["tech"], by=2, id=104)]},
    # 3: in the export but not annotated; 4: a model's prediction only.
    {"id": 13, "data": {"text": "Not yet seen"}, "annotations": []},
    {"id": 14, "data": {"text": "Only a model"}, "predictions": [annotation(["tech"])]},
    # 5: a multi-select; 6: submitted without a choice.
    {"id": 15, "data": {"text": "Bank buys a club"}, "annotations": [annotation(["business", "sport"], by=1)]},
    {"id": 16, "data": {"text": "Empty result"}, "annotations": [{"completed_by": 1, "result": [], "id": 105}]},
    # 7: a flat task (no data wrapper), as Label Studio imports them.
    {"text": "Flat task"},
    # 8: an id column in data wins over the task id.
    {"id": 18, "data": {"text": "Shares rose", "id": "row-8"}, "annotations": [annotation(["business"], by=3)]},
]


def test_label_studio_export_one_row_per_annotation(tmp_path):
    result = read(tmp_path / "ls.json", json.dumps(LABEL_STUDIO, indent=2))
    assert result.format == "labelstudio"
    assert kept_rows(result, "id", "text", "label", "annotator") == [
        (1, "11", "The striker scored twice", "sport", "1"),
        (1, "11", "The striker scored twice", "sport", "b@example.com"),
        (2, "12", "Chip prices fall", "tech", "2"),
        (8, "row-8", "Shares rose", "business", "3"),
    ]
    assert [(r["line"], r["id"], r["reason"]) for r in result.rejected] == [
        (2, "12", "cancelled"), (3, "13", "unlabelled"), (4, "14", "prediction_only"), (5, "15", "multi_label"),
        (6, "16", "unlabelled"), (7, None, "unlabelled")]
    details = [r["detail"] for r in result.rejected]
    assert details[0].startswith("task 2 (id 12), annotation 1 (id 103): skipped in Label Studio (was_cancelled)")
    assert details[1].startswith("task 3 (id 13): no annotation")
    assert details[2].startswith("task 4 (id 14): 1 model prediction(s) and no annotation")
    assert details[3].startswith("task 5 (id 15), annotation 1: 2 choices ['business', 'sport'] in the Choices "
                                 "control 'sentiment' (a multi-select)")
    assert details[4].startswith("task 6 (id 16), annotation 1 (id 105): no choice in the Choices control "
                                 "'sentiment' (its result is empty)")
    assert details[5].startswith("task 7 (a flat task, with no 'data' wrapper): no annotation")
    assert [r["text"] for r in result.rejected][:2] == ["Chip prices fall", "Not yet seen"]
    # Every annotation is a row, and so is every task without one: 7 annotations + 3 such tasks.
    assert_every_row_counted(result, 10)


def test_label_studio_choices_control_named_like_the_data_field(tmp_path):
    # Label Studio's own fixture shape: the control is `text`, as is the data field; no clash, label from results.
    tasks = [{"id": 1, "data": {"text": "Annotated task"},
              "annotations": [annotation(["positive"], by=1, control="text")]},
             {"id": 2, "data": {"text": "Unannotated task"}, "annotations": []}]
    result = read(tmp_path / "ls.json", json.dumps(tasks))
    assert kept(result) == {1: ("Annotated task", "positive")}
    assert reasons(result) == [(2, "unlabelled")]


def test_label_studio_control_is_chosen_by_the_label_column_else_the_only_one(tmp_path):
    two = {"id": 1, "data": {"text": "Goal"},
           "annotations": [{"completed_by": 1, "result": [
               annotation(["yes"], control="is_news")["result"][0], annotation(["sport"], control="label")["result"][0],
               {"from_name": "note", "type": "textarea", "value": {"text": ["free text"]}}]}]}
    assert kept(read(tmp_path / "a.json", json.dumps([two]))) == {1: ("Goal", "sport")}

    two["annotations"][0]["result"][1]["from_name"] = "topic"
    with pytest.raises(StageError, match=r"b.json: a Label Studio export whose annotations use 2 Choices controls "
                                         r"\('is_news', 'topic'\) and none is named 'label'; set clean.columns.label"):
        read(tmp_path / "b.json", json.dumps([two]))


@pytest.mark.parametrize("task, message", [
    ({"data": {"question": "Why?"}, "annotations": [{"result": [{"from_name": "answer", "type": "textarea",
                                                                   "value": {"text": ["Because."]}}]}]},
     r"no data key 'text' in any task \(found: 'question'\); set clean.columns"),
    ({"data": {"text": "Why?"}, "annotations": [{"result": [{"from_name": "answer", "type": "textarea",
                                                               "value": {"text": ["Because."]}}]}]},
     r"no Choices result in any annotation \(found: textarea 'answer'\), so it holds no class label"),
])
def test_label_studio_export_without_text_or_labels_stops_clean(tmp_path, task, message):
    with pytest.raises(StageError, match=r"ls.json: a Label Studio export with " + message):
        read(tmp_path / "ls.json", json.dumps([task]))


def test_label_studio_export_through_clean_is_accounted(tmp_path):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "ls.json").write_text(json.dumps(LABEL_STUDIO), encoding="utf-8")
    report = clean.run(parse(project_params(tmp_path)))
    assert report["files"]["ls.json"] == {
        "format": "labelstudio", "rows_read": 10, "kept": 4,
        "rejected": {"cancelled": 1, "multi_label": 1, "prediction_only": 1, "unlabelled": 3},
        "decoded_with_fallback": {"count": 0, "first_rows": []}}


def test_instruction_task_reads_label_studio_shaped_json_as_plain_json(tmp_path):
    # No class label to read, so no Label Studio handling: the objects are records as in any JSON array.
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(LABEL_STUDIO[:2]), encoding="utf-8")
    result = read_file(path, Instruction().fields(InstructionClean()), None)
    assert (result.format, [r["line"] for r in result.records], result.rejected) == ("json", [1, 2], [])


# ------------------------------------------------------------------------------------------------ doccano


def test_doccano_jsonl_label_lists(tmp_path):
    result = read(tmp_path / "d.jsonl", "\n".join(json.dumps(row) for row in [
        {"id": 1, "text": "Great price.", "label": ["positive"], "Comments": []},
        {"text": "exampleA", "labels": ["positive"], "meta": {"wikiPageID": 1}},   # the import spelling
        {"text": "exampleB", "labels": ["positive", "negative"]},
        {"text": "exampleC", "labels": []},
        {"text": "EU rejects German call", "label": [[0, 2, "ORG"], [11, 17, "MISC"]]},
        {"text": "Plain", "label": "negative"},
    ]) + "\n")
    assert kept(result) == {1: ("Great price.", "positive"), 2: ("exampleA", "positive"), 6: ("Plain", "negative")}
    assert reasons(result) == [(3, "multi_label"), (4, "unlabelled"), (5, "span_labels")]
    assert [r["detail"] for r in result.rejected] == [
        "labels: 2 labels ['positive', 'negative']; the classifier takes one label per text, so keep one in the "
        "annotation tool and export again",
        "labels: an empty list, so the text has no label; label it and export again",
        "label: 2 spans such as [0, 2, 'ORG'], from sequence labelling, not one class for the text; export a "
        "text-classification project instead"]
    assert_every_row_counted(result, 6)


def test_doccano_json_array(tmp_path):
    result = read(tmp_path / "d.json", json.dumps([{"text": "Terrible service.", "label": ["negative"]},
                                                   {"text": "Great price.", "label": ["positive"]}]))
    assert (result.format, kept(result)) == ("json", {1: ("Terrible service.", "negative"),
                                                      2: ("Great price.", "positive")})


def test_pretty_printed_json_in_a_jsonl_file_says_so(tmp_path):
    with pytest.raises(StageError, match=r"p.jsonl: no line is a JSON object \(line 1: not valid JSON: .*\); JSON "
                                         r"Lines holds one object per line"):
        read(tmp_path / "p.jsonl", json.dumps({"text": "x", "label": ["a"]}, indent=4) + "\n")


def test_rows_a_tool_marks_as_not_annotated_do_not_count_as_quality_rejects():
    import pandas as pd

    from sft_pipeline.data.validation import check_reject_fraction
    from sft_pipeline.params import Validate

    report = {"totals": {"rows_read": 100}, "files": {"ls.json": {"rows_read": 100}}}
    not_annotated = pd.DataFrame({"source_file": "ls.json",
                                  "reason": ["unlabelled"] * 40 + ["cancelled"] * 5 + ["prediction_only"] * 5})
    assert check_reject_fraction(report, not_annotated, Validate()) == (0.0, [])
    defective = pd.concat([not_annotated, pd.DataFrame({"source_file": "ls.json", "reason": ["multi_label"] * 6})])
    fraction, problems = check_reject_fraction(report, defective, Validate())
    assert fraction == 0.06 and "multi_label: 6" in problems[0]


def prodigy(text, label, answer, **extra):
    return json.dumps({"text": text, "_input_hash": hash(text) % 10**9, "_task_hash": hash((text, label)) % 10**9,
                       "label": label, "answer": answer, "meta": {"score": 0.5}, "spans": [], **extra})


def test_prodigy_binary_decisions_become_the_label_or_not_the_label_and_ignore_is_rejected(tmp_path):
    lines = [prodigy("you are an idiot", "INSULT", "accept"), prodigy("nice weather today", "INSULT", "reject"),
             prodigy("what is this even", "INSULT", "ignore"), prodigy("thanks a lot", "INSULT", "reject")]
    result = read(tmp_path / "insult.jsonl", "\n".join(lines) + "\n")
    assert kept(result) == {1: ("you are an idiot", "INSULT"), 2: ("nice weather today", "not INSULT"),
                            4: ("thanks a lot", "not INSULT")}
    assert [(r["line"], r["reason"]) for r in result.rejected] == [(3, "ignored")]
    assert len(result.records) + len(result.rejected) == len(lines)

    strict = read_file(tmp_path / "insult.jsonl",
                       Classification().fields(Clean(prodigy_rejected=None)), None)
    assert kept(strict) == {1: ("you are an idiot", "INSULT")}
    assert [(r["line"], r["reason"]) for r in strict.rejected] == [(2, "answer_reject"), (3, "ignored"),
                                                                   (4, "answer_reject")]


def test_prodigy_choice_records_take_the_accepted_option(tmp_path):
    options = [{"id": "POSITIVE", "text": "positive"}, {"id": "NEGATIVE", "text": "negative"}]
    lines = [prodigy("loved it", None, "accept", options=options, accept=["POSITIVE"]),
             prodigy("meh", None, "accept", options=options, accept=[]),
             prodigy("both?", None, "accept", options=options, accept=["POSITIVE", "NEGATIVE"]),
             prodigy("spam spam", None, "reject", options=options, accept=[])]
    result = read(tmp_path / "choice.jsonl", "\n".join(line.replace('"label": null, ', "") for line in lines))
    assert kept(result) == {1: ("loved it", "POSITIVE")}
    assert [(r["line"], r["reason"]) for r in result.rejected] == [(2, "unlabelled"), (3, "multi_label"),
                                                                   (4, "answer_reject")]


def test_a_plain_jsonl_with_an_answer_column_is_not_taken_for_prodigy(tmp_path):
    # No Prodigy hashes: `answer` is the user's own column, and the label is read as it is.
    line = json.dumps({"text": "is this ok", "label": "question", "answer": "reject"})
    assert kept(read(tmp_path / "plain.jsonl", line)) == {1: ("is this ok", "question")}


def test_prodigy_rejected_template_must_make_another_label(tmp_path):
    raw = project_params(tmp_path)
    raw["clean"]["prodigy_rejected"] = "{label}"
    with pytest.raises(ValueError, match="prodigy_rejected: '{label}' would make"):
        parse(raw)
