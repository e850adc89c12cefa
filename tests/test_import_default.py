"""The embedded defaults: BBC News imported byte for byte, and every article accounted for by clean and validate;
chatterbot-corpus conversations as read, SmolLM2 converted once; the example switch of params.yaml."""

import json
import shutil

import pandas as pd
import pytest
import yaml

from stages import clean, validate
from sft_pipeline.defaults import CHAT_CATEGORIES, import_chat_data, import_data, import_smollm2, smollm2_gguf, use_example
from sft_pipeline.defaults import main as defaults_main
from sft_pipeline.io import StageError
from sft_pipeline.params import parse
from tests.conftest import ROOT, project_params


def test_bbc_import_keeps_the_real_defects_and_every_article_is_accounted_for(tmp_path):
    raw = project_params(tmp_path)
    real = parse({**raw, "validate": {**raw["validate"], **_project_validate()}})
    target = import_data(real.paths.raw_dir)
    data = target.read_bytes()
    assert data.count(b"\n") >= 2226 and b"\xa315.8m" in data  # the Windows-1252 pound sign, not re-encoded

    report = clean.run(real)
    assert report["totals"]["rows_read"] == 2225
    assert report["totals"]["rejected"] == {"duplicate": 100}
    assert report["totals"]["kept"] == 2125
    fallback = report["files"]["bbc_news.csv"]["decoded_with_fallback"]
    assert fallback["count"] == 1 and fallback["first_rows"][0]["id"] == "sports/199"
    kept = pd.read_parquet(real.paths.clean)
    assert "£15.8m" in kept.loc[kept["id"] == "sports/199", "text"].iloc[0]

    result = validate.run(real)
    assert result["overall"]["rows_read"] == result["kept"] + report["totals"]["rejected"]["duplicate"] \
        + sum(result["rejected"].values()) == 2225
    assert result["classes"] == {"business": 503, "entertainment": 369, "politics": 403, "sport": 503, "tech": 347}
    assert result["labels_mapped"] == {"sports -> sport": 503}


def _project_validate() -> dict:
    return yaml.safe_load((ROOT / "examples" / "classification.yaml").read_text())["validate"]


def test_your_own_annotations_are_not_mixed_with_the_default(tmp_path):
    (tmp_path / "mine.csv").write_text("id,text,label\n1,hello there,sport\n", encoding="utf-8")
    assert import_data(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.csv"]


# -- the instruction example: chatterbot-corpus conversations and SmolLM2 ---------------------------------------------

def _chat_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_chat_import_writes_every_english_conversation_as_read(tmp_path, capsys):
    [target] = import_chat_data(tmp_path / "raw", categories=None)
    assert target == tmp_path / "raw" / "chatterbot_english.jsonl"
    rows = _chat_rows(target)
    assert len(rows) == 2026 and sum(len(row["messages"]) for row in rows) == 4332
    assert len({row["id"] for row in rows}) == 2026 and rows[0]["id"] == "english/ai/0"
    for row in rows:
        assert set(row) == {"id", "messages"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * (len(row["messages"]) // 2) \
            + ["user"] * (len(row["messages"]) % 2)
    # Conversations that end with a user turn stay (validate rejects them); one of them is the YAML slip in trivia.yml
    # whose question and answer are one string.
    odd = [row["id"] for row in rows if len(row["messages"]) % 2]
    assert len(odd) == 44 and sum(i.startswith("english/emotion/") for i in odd) == 27
    folded = next(row for row in rows if row["id"] == "english/trivia/13")
    assert folded["messages"] == [{"role": "user", "content": 'In a game of bingo, which number is represented by '
                                                              'the phrase "two little ducks"? - \'22\''}]
    # Duplicates too: tech_support repeats 10 questions and answers 1050 times.
    tech = [json.dumps(row["messages"]) for row in rows if row["id"].startswith("english/tech_support/")]
    assert len(tech) == 1050 and len(set(tech)) == 10
    assert len({json.dumps(row["messages"]) for row in rows}) == 899
    data = target.read_bytes()
    assert "it’s".encode() in data and b"\\u2019" not in data  # UTF-8, not JSON escapes
    assert "wrote 2026 conversations, 4332 turns, 44 ending with a user turn" in capsys.readouterr().out

    before = target.stat()
    assert import_chat_data(tmp_path / "raw", categories=None) == [target]
    assert "up to date" in capsys.readouterr().out
    assert (target.stat().st_ino, target.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_the_example_takes_its_categories_only(tmp_path):
    [target] = import_chat_data(tmp_path / "raw")
    rows = _chat_rows(target)
    categories = {row["id"].split("/")[1] for row in rows}
    assert categories == set(CHAT_CATEGORIES) and len(rows) == 422
    assert sum(len(row["messages"]) % 2 for row in rows) == 8  # 7 in conversations.yml, 1 in psychology.yml


def test_chat_import_of_simplified_chinese(tmp_path):
    [target] = import_chat_data(tmp_path, languages=("chinese",), categories=None)
    rows = _chat_rows(target)
    assert target.name == "chatterbot_chinese.jsonl" and len(rows) == 467
    assert sum(len(row["messages"]) for row in rows) == 1019 and sum(len(row["messages"]) % 2 for row in rows) == 7
    assert rows[0]["messages"][0] == {"role": "user", "content": "什么是ai"}
    assert "什么是ai".encode() in target.read_bytes()


def test_chat_import_leaves_your_own_conversations_alone(tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    assert import_chat_data(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.jsonl"]
    with pytest.raises(StageError, match="chatterbot-corpus has .*english"):
        import_chat_data(tmp_path / "other", languages=("klingon",))


def test_the_other_examples_data_leaves_the_raw_folder_while_unchanged(tmp_path, capsys):
    raw = tmp_path / "raw"
    bbc = import_data(raw)
    [chat] = import_chat_data(raw)
    assert sorted(p.name for p in raw.iterdir()) == ["chatterbot_english.jsonl"]
    assert "bbc_news.csv: removed (the classification example's data, unchanged" in capsys.readouterr().out
    assert import_data(raw) == bbc and sorted(p.name for p in raw.iterdir()) == ["bbc_news.csv"]

    # Changed by you, it is yours: neither removed nor mixed with the conversations.
    bbc.write_bytes(bbc.read_bytes().replace(b"sport", b"sports", 1))
    assert import_chat_data(raw) is None
    assert sorted(p.name for p in raw.iterdir()) == ["bbc_news.csv"]
    assert "holds 1 annotation file(s) of yours" in capsys.readouterr().out


def _examples(tmp_path):
    """A params.yaml and examples/ folder like the project's, in tmp_path."""
    (tmp_path / "examples").mkdir()
    for name in ("classification", "instruction"):
        shutil.copy(ROOT / "examples" / f"{name}.yaml", tmp_path / "examples" / f"{name}.yaml")
    shutil.copy(ROOT / "examples" / "classification.yaml", tmp_path / "params.yaml")
    return tmp_path / "params.yaml"


def test_example_switch_replaces_only_an_unedited_example(tmp_path, capsys):
    params = _examples(tmp_path)
    instruction = (ROOT / "examples" / "instruction.yaml").read_bytes()
    use_example("instruction", params)
    assert params.read_bytes() == instruction
    assert capsys.readouterr().out == f"{params}: now {tmp_path}/examples/instruction.yaml " \
                                      f"(was {tmp_path}/examples/classification.yaml)\n"

    before = params.stat()
    use_example("instruction", params)  # already it: untouched
    assert (params.stat().st_ino, params.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert capsys.readouterr().out == f"{params}: is {tmp_path}/examples/instruction.yaml\n"

    edited = instruction + b"# an edit of yours\n"
    params.write_bytes(edited)
    with pytest.raises(StageError, match=r"holds edits of yours .*`cp .*examples/classification.yaml .*params.yaml`"
                                         r".*`dvc repro`"):
        use_example("classification", params)
    assert params.read_bytes() == edited

    params.unlink()
    use_example("classification", params)
    assert params.read_bytes() == (ROOT / "examples" / "classification.yaml").read_bytes()
    with pytest.raises(StageError, match="not found; the examples are"):
        use_example("translation", params)


def test_defaults_main_switches_params_and_imports_that_examples_data(tmp_path, monkeypatch, capsys):
    # Both examples with their paths under tmp_path, as `make run EXAMPLE=instruction` would see them there.
    (tmp_path / "examples").mkdir()
    for name in ("classification", "instruction"):
        raw = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
        raw["paths"] = {key: None if value is None else str(tmp_path / value) for key, value in raw["paths"].items()}
        (tmp_path / "examples" / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = tmp_path / "params.yaml"
    shutil.copy(tmp_path / "examples" / "classification.yaml", params)
    import_data(tmp_path / "data" / "raw")

    assert defaults_main(["--params", str(params), "--example", "instruction", "--only", "data"]) == 0
    assert params.read_bytes() == (tmp_path / "examples" / "instruction.yaml").read_bytes()
    assert sorted(p.name for p in (tmp_path / "data" / "raw").iterdir()) == ["chatterbot_english.jsonl"]
    # Without --example, params.yaml stays and its task.type picks the example; your edits are not an error.
    params.write_text(params.read_text() + "# an edit of yours\n")
    assert defaults_main(["--params", str(params), "--only", "data"]) == 0
    assert "chatterbot_english.jsonl: up to date (422 conversations" in capsys.readouterr().out
    assert defaults_main(["--params", str(params), "--example", "classification", "--only", "data"]) == 1
    assert "holds edits of yours" in capsys.readouterr().err


def test_params_yaml_is_one_of_the_examples_byte_for_byte():
    # DVC reads params.yaml only; the examples are what `--example` copies over it. A change to params.yaml that is
    # not made in its example too (or the other way round) fails here. The project ships classification.
    examples = {p.name: p.read_bytes() for p in sorted((ROOT / "examples").glob("*.yaml"))}
    assert sorted(examples) == ["chinese.yaml", "classification.yaml", "instruction.yaml"]
    assert (ROOT / "params.yaml").read_bytes() in examples.values()
    classification, instruction, chinese = (yaml.safe_load(examples[f"{n}.yaml"])
                                            for n in ("classification", "instruction", "chinese"))
    # one paths section for every task: dvc.yaml's
    assert classification["paths"] == instruction["paths"] == chinese["paths"]
    assert parse(classification).task.type == parse(chinese).task.type == "classification"
    from sft_pipeline import tasks

    if "instruction" in tasks.TASKS:
        assert parse(instruction).task.type == "instruction"


@pytest.mark.slow
def test_smollm2_conversion_matches_the_gguf_model_and_runs_once(tmp_path, capsys):
    # 47 s on 2 idle cores, 85 s on busy ones: the conversion (30-45 s) and a second GGUF load as the reference.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = import_smollm2(tmp_path)
    assert target == tmp_path / "SmolLM2-135M-Instruct"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "converted_from.json"} <= {p.name for p in target.iterdir()}
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    stamp = json.loads((target / "converted_from.json").read_text())
    assert stamp["source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and stamp["source"]["size"] == 98362432
    assert (target / "model.safetensors").stat().st_size > 530e6  # fp32: 134.5M parameters, tied head

    weights = (target / "model.safetensors").stat()
    assert import_smollm2(tmp_path) == target and "up to date" in capsys.readouterr().out.splitlines()[-1]
    assert (target / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns

    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target)
    assert model.dtype == torch.float32 and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192
    chat = _chat_rows(import_chat_data(tmp_path / "raw")[0])[0]["messages"]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is AI?<|im_end|>\n<|im_start|>assistant\nArtificial "
                    "Intelligence is the branch of engineering and science devoted to constructing machines that "
                    "think.<|im_end|>\n")
    assert tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) \
        .endswith("<|im_start|>user\nWhat is AI?<|im_end|>\n<|im_start|>assistant\n")

    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits, atol=1e-4, rtol=0)
