"""tokenize reads the Rust encodings directly: its ids and lengths must equal those of `tokenizer(...)`."""

import pytest

from sft_pipeline.encoding import _encode_via_call, encode
from tests.conftest import minilm_dir

TEXTS = ["short one", "word " * 300, "", " ", "[CLS] [SEP] [PAD] special tokens as text", "日本語のテキスト、句読点。",
         "emoji 🙂 and accents: café naïve", "x" * 2000, "Exactly enough words to fill a few tokens here."]


@pytest.mark.parametrize("model", ["minilm", "tiny_gpt2"])
@pytest.mark.parametrize("max_length", [8, 16, 64])
def test_direct_encoding_matches_the_tokenizer_call(request, model, max_length):
    from transformers import AutoTokenizer

    folder = minilm_dir() if model == "minilm" else request.getfixturevalue("tiny_gpt2")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids, full = encode(tokenizer, TEXTS, max_length)
    assert ids == tokenizer(TEXTS, truncation=True, max_length=max_length)["input_ids"]
    assert full == [len(x) for x in tokenizer(TEXTS)["input_ids"]]
    assert (ids, full) == _encode_via_call(tokenizer, TEXTS, max_length)
