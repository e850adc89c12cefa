"""The instruction task: chat data in the shapes users have, the loss mask from the chat template, packing, every
strategy on a causal LM, evaluation against the base model, and one `dvc repro` through registration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from sft_pipeline import strategies, tasks
from sft_pipeline.data import cleaning, validation
from sft_pipeline.io import StageError
from sft_pipeline.params import ParamsError, parse
from sft_pipeline.tasks import instruction
from tests.conftest import DEFAULT_PARAMS, copy_code

TASK = tasks.get("instruction")
CAPITALS = {"France": "Paris", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid", "Portugal": "Lisbon",
            "Austria": "Vienna", "Norway": "Oslo", "Greece": "Athens"}


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer Llama with a ChatML template; pad = eos = <|im_end|> (as in SmolLM2)."""
    from bench.common import tiny_causal_lm

    return tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tokenizer(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_lm))


def conversations(n: int, seed: int = 0, prefix: str = "c") -> list[dict]:
    """Capital-city questions; every fifth conversation has a second turn."""
    names = list(CAPITALS)
    out = []
    for i in range(n):
        country = names[(i + seed) % len(names)]
        messages = [{"role": "user", "content": f"What is the capital of {country}? (question {prefix}{i})"},
                    {"role": "assistant", "content": CAPITALS[country]}]
        if i % 5 == 0:
            messages += [{"role": "user", "content": "Are you sure?"},
                         {"role": "assistant", "content": f"Yes, {CAPITALS[country]}."}]
        out.append({"id": f"{prefix}{i}", "messages": messages})
    return out


def instruction_params(work: Path, model: Path | str, **sections) -> dict:
    raw = yaml.safe_load((DEFAULT_PARAMS).read_text())
    params = {
        "paths": {k: None if v is None else str(work / v) for k, v in raw["paths"].items()},
        "task": {"type": "instruction"},
        # Every section dvc.yaml names must be in the file, even at its defaults: DVC checks.
        "clean": {},
        "validate": {"min_rows": 10},
        "split": raw["split"],
        "model": {"name": str(model)},
        "tokenize": {"max_length": 96},
        "train": {"strategy": "lora", "epochs": 2, "batch_size": 4, "learning_rate": 1e-2, "save_every_steps": 1000,
                  "packing": True},
        "evaluate": {"batch_size": 4, "max_new_tokens": 6, "max_rows": 8},
        "mlflow": {"experiment": "test"},
        "watch": raw["watch"],
    }
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    return params


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def clean_rows(raw_dir: Path, **clean):
    params = parse(instruction_params(raw_dir.parent, "m", clean=clean))
    files = cleaning.raw_files(raw_dir)
    return cleaning.clean(files, raw_dir, TASK, params.clean, None), params


def messages_of(kept: pd.DataFrame) -> list[list[dict]]:
    return [json.loads(m) for m in kept["messages"]]


# ---------------------------------------------------------------------------------------------- reading


def test_every_chat_shape_reads_into_the_same_conversations(tmp_path):
    raw = tmp_path / "raw"
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"}]
    write_jsonl(raw / "openai.jsonl", [{"id": "a", "messages": expected}])
    # A JSON file holding one conversation as one object (as axolotl's fixtures are).
    (raw / "one.json").write_text(json.dumps({"id": "b", "messages": expected}))
    pd.DataFrame({"id": ["c"], "messages": [expected]}).to_parquet(raw / "chat.parquet")
    pd.DataFrame({"id": ["d"], "messages": [json.dumps(expected)]}).to_csv(raw / "chat.csv", index=False)
    (kept, rejected, report), _ = clean_rows(raw)
    assert report["totals"]["rows_read"] == 4
    # The four are the same conversation: one is kept, three are duplicates of it.
    assert len(kept) == 1 and messages_of(kept) == [expected]
    assert sorted(rejected["reason"]) == ["duplicate"] * 3

    raw2 = tmp_path / "raw2"
    (raw2).mkdir()
    # ShareGPT: `conversations` of from/value with human/gpt roles (mapped by the default clean.roles).
    (raw2 / "sharegpt.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]))
    (raw2 / "one.json").write_text(json.dumps({"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "HUMAN", "value": "Yo"}, {"from": "gpt", "value": "Hey"}]}))
    (kept, _, _), _ = clean_rows(raw2, columns={"messages": "conversations"},
                                 message_keys={"role": "from", "content": "value"})
    assert messages_of(kept) == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Yo"},
         {"role": "assistant", "content": "Hey"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]


def test_prompt_response_and_alpaca_columns_join_by_the_stated_rule(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "alpaca.json").write_text(json.dumps([
        {"instruction": "Translate to English", "input": "你好", "output": "Hello"},
        {"instruction": "Say hi", "input": "", "output": "Hi!", "system": "You are terse."},
    ], ensure_ascii=False), encoding="utf-8")
    (kept, _, _), _ = clean_rows(raw, columns={"prompt": "instruction", "response": "output"}, input_join="\n---\n")
    assert messages_of(kept) == [
        [{"role": "user", "content": "Translate to English\n---\n你好"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"},
         {"role": "assistant", "content": "Hi!"}],
    ]


def test_code_markup_and_newlines_in_answers_survive_clean(tmp_path):
    answer = "Use:\r\n\n```python\ndef f(x):\n    return x  # <b>not</b> HTML\n```\n"
    write_jsonl(tmp_path / "raw/a.jsonl", [{"messages": [{"role": "user", "content": "  Code?  "},
                                                          {"role": "assistant", "content": answer}]}])
    (kept, _, _), _ = clean_rows(tmp_path / "raw")
    assert messages_of(kept)[0][1]["content"] == "Use:\n\n```python\ndef f(x):\n    return x  # <b>not</b> HTML\n```"
    assert messages_of(kept)[0][0]["content"] == "Code?"
    (kept, _, _), _ = clean_rows(tmp_path / "raw", strip_html=True, collapse_whitespace=True)
    assert messages_of(kept)[0][1]["content"] == "Use: ```python def f(x): return x # not HTML ```"


def test_a_file_with_neither_messages_nor_prompt_columns_is_an_error_naming_it(tmp_path):
    write_jsonl(tmp_path / "raw/labels.jsonl", [{"text": "a", "label": "b"}])
    with pytest.raises(StageError, match=r"labels.jsonl: no 'messages' and no 'prompt'/'response'"):
        clean_rows(tmp_path / "raw")


def test_validate_rejects_each_bad_conversation_with_its_reason(tmp_path):
    good = conversations(12)
    bad = [
        {"id": "role", "messages": [{"role": "function_call", "content": "{}"}, {"role": "assistant", "content": "x"}]},
        {"id": "order", "messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"},
                                     {"role": "assistant", "content": "y"}]},
        {"id": "sys", "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                   {"role": "assistant", "content": "c"}]},
        {"id": "empty", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {"id": "open", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                    {"role": "user", "content": "And?"}]},
        {"id": "notalist", "messages": {"role": "user"}},
        {"id": "keys", "messages": [{"speaker": "user", "text": "hi"}]},
    ]
    write_jsonl(tmp_path / "raw/a.jsonl", good + bad)
    (kept, clean_rejected, _), params = clean_rows(tmp_path / "raw")
    assert clean_rejected.empty
    kept_rows, rejected, report = validation.validate_rows(TASK, kept, params.validate_)
    reasons = dict(zip(rejected["id"], rejected["reason"]))
    assert reasons == {"role": "unknown_role", "order": "bad_turn_order", "sys": "bad_turn_order",
                       "empty": "empty_turn", "open": "no_answer", "notalist": "invalid_messages",
                       "keys": "invalid_messages"}
    assert "map it in clean.roles" in rejected.set_index("id").loc["role", "detail"]
    assert len(kept_rows) == 12
    assert report["conversations"]["multi_turn"] == 3 and report["conversations"]["assistant_turns"] == 15


def test_template_placeholders_are_counted_and_named(tmp_path):
    rows = conversations(12)
    rows[0]["messages"][1]["content"] = "I am {{name}}, made by {{ author }}."
    rows[1]["messages"][1]["content"] = "Call me {{name}}."
    write_jsonl(tmp_path / "raw/a.jsonl", rows)
    (kept, _, _), params = clean_rows(tmp_path / "raw")
    _, _, report = validation.validate_rows(TASK, kept, params.validate_)
    assert report["template_placeholders"] == {"rows": 2, "names": {"name": 2, "author": 1}}
    assert TASK.warnings(report) == ["2 conversations hold template placeholders ({{name}}, {{author}}); they train "
                                     "as written. Fill them in before training if they are meant to be replaced."]


def test_prompts_asked_twice_with_different_answers_are_counted_and_kept(tmp_path):
    rows = conversations(12)
    rows += [{"id": "again", "messages": [rows[1]["messages"][0], {"role": "assistant", "content": "Not Paris"}]}]
    write_jsonl(tmp_path / "raw/a.jsonl", rows)
    (kept, _, _), params = clean_rows(tmp_path / "raw")
    kept_rows, rejected, report = validation.validate_rows(TASK, kept, params.validate_)
    assert len(kept_rows) == 13 and rejected.empty
    assert report["duplicate_prompts"]["prompts"] == 1 and report["duplicate_prompts"]["rows"] == 2
    # One prompt never lands in two splits: the key is the first user turn.
    key = TASK.split_key(kept_rows)
    assert (key == rows[1]["messages"][0]["content"]).sum() == 2


# ---------------------------------------------------------------------------------------------- the loss mask


def encode_one(tokenizer, *conversations, max_length=256, truncation="drop"):
    params = parse(instruction_params(Path("/tmp"), "m", tokenize={"max_length": max_length,
                                                                   "truncation": truncation}))
    frame = pd.DataFrame({"messages": [json.dumps(m) for m in conversations], "id": [f"x{i}" for i in
                                                                                    range(len(conversations))],
                          "source_file": "f", "line": range(1, len(conversations) + 1)})
    return TASK.encode({"train": frame, "validation": frame.iloc[:0], "test": frame.iloc[:0]}, tokenizer,
                       params.tokenize, None)


MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
              {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "你好?"},
              {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]


def test_only_the_assistant_turns_and_their_end_tokens_train(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case where an id-based mask loses the end token
    encoded = encode_one(tokenizer, MULTI_TURN)
    row = encoded.datasets["train"][0]
    ids, labels = row["input_ids"], row["labels"]
    trained = [t for t, label in zip(ids, labels) if label != -100]
    assert [label for label in labels if label != -100] == trained  # labels are the ids themselves, unshifted
    assert tokenizer.decode(trained) == "Paris.<|im_end|>def add(a, b):\n    return a + b<|im_end|>"
    # Each trained run of tokens is one answer and ends with the end-of-turn token (= eos = pad).
    runs, current = [], []
    for t, label in zip(ids, labels):
        if label != -100:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    assert [tokenizer.decode(r) for r in runs] == ["Paris.<|im_end|>", "def add(a, b):\n    return a + b<|im_end|>"]
    assert all(r[-1] == tokenizer.eos_token_id for r in runs)
    assert encoded.meta["end_token_ids"] == [tokenizer.eos_token_id]
    stats = encoded.report["splits"]["train"]
    assert stats["answer_tokens"] == len(trained)
    assert stats["trained_token_fraction"] == round(len(trained) / len(ids), 4)


def test_a_base_model_without_a_template_needs_one_named_and_zephyr_trains_its_eos(tmp_path):
    from bench.common import tiny_causal_lm
    from transformers import AutoTokenizer

    folder = tiny_causal_lm(tmp_path / "base", template=None)
    plain = AutoTokenizer.from_pretrained(str(folder))
    with pytest.raises(StageError, match="no chat template; set tokenize.chat_template"):
        TASK.prepare_tokenizer(plain, parse(instruction_params(tmp_path, "m")).tokenize)
    TASK.prepare_tokenizer(plain, parse(instruction_params(tmp_path, "m", tokenize={"chat_template": "zephyr"}))
                           .tokenize)
    row = encode_one(plain, MULTI_TURN[1:3]).datasets["train"][0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert plain.decode(trained) == "Paris.<|im_end|>"  # zephyr closes a turn with the eos token
    # A template whose answers end with no special token cannot teach the model to stop.
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                          "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(StageError, match="closes an assistant turn with no special token"):
        encode_one(plain, MULTI_TURN[1:3])


def test_rows_over_max_length_are_dropped_or_truncated_as_params_say(tokenizer):
    long = [{"role": "user", "content": "Capital of France? " * 6}, {"role": "assistant", "content": "Paris " * 20}]
    short = MULTI_TURN[1:3]
    full = len(encode_one(tokenizer, long).datasets["train"][0]["input_ids"])
    dropped = encode_one(tokenizer, long, short, max_length=full - 5)
    stats = dropped.report["splits"]["train"]
    assert stats["rows_dropped"] == 1 and stats["rows_kept"] == 1 and stats["dropped_first"][0]["id"] == "x0"
    assert dropped.datasets["train"]["row"] == [1]  # the kept row's place in the split's Parquet file
    with pytest.raises(StageError, match="no training row is left"):
        encode_one(tokenizer, long, max_length=full - 5)
    truncated = encode_one(tokenizer, long, short, max_length=full - 5, truncation="truncate")
    stats = truncated.report["splits"]["train"]
    assert stats["rows_truncated"] == 1 and stats["rows_dropped"] == 0 and stats["max"] == full
    assert len(truncated.datasets["train"][0]["input_ids"]) == full - 5
    # Cut so short that no answer token is left: dropped even under truncate.
    cut = encode_one(tokenizer, long, short, max_length=40, truncation="truncate").report["splits"]["train"]
    assert cut["rows_dropped"] == 1 and cut["dropped_first"][0]["why"] == "no answer token left after truncation"


def test_padded_batches_mask_the_padding_and_packing_gives_the_same_loss(tiny_lm, tokenizer):
    from transformers import AutoModelForCausalLM

    rows = []
    for messages in (MULTI_TURN, MULTI_TURN[1:3], [{"role": "user", "content": "Hello, how are you?"},
                                                   {"role": "assistant", "content": "I am fine."}]):
        rows.append(encode_one(tokenizer, messages).datasets["train"][0])
    padded = instruction.ChatCollator(tokenizer.pad_token_id)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert padded["input_ids"].shape == (3, max(lengths))
    assert padded["attention_mask"].sum(dim=1).tolist() == lengths
    assert (padded["labels"][padded["attention_mask"] == 0] == -100).all()
    packed = instruction.ChatCollator(tokenizer.pad_token_id, packing=True)(rows)
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm)).eval()
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
        # Without position ids the packed rows would attend to each other: the loss differs.
        crossing = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
    assert float(loss_packed) == pytest.approx(float(loss_padded), abs=1e-5)
    assert abs(float(crossing) - float(loss_padded)) > 1e-4


# ---------------------------------------------------------------------------------------------- strategies and training


def tokenized_project(tmp_path, model_dir, n=40, **sections):
    from stages import clean, split, tokenize, validate

    params = parse(instruction_params(tmp_path, model_dir, **sections))
    write_jsonl(params.paths.raw_dir / "chat.jsonl", conversations(n))
    for stage in (clean, validate, split, tokenize):
        stage.run(params)
    return params


STRATEGY_CASES = {"full": ({"learning_rate": 5e-3}, None), "freeze": ({"learning_rate": 5e-2},
                                                                     {"trainable_layers": 1}),
                  "lora": ({"learning_rate": 1e-2}, None), "prompt_tuning": ({"learning_rate": 5e-2,
                                                                               "packing": False}, None)}


@pytest.mark.parametrize("strategy", list(STRATEGY_CASES))
def test_each_strategy_trains_exactly_its_parameters_on_a_causal_lm(tmp_path, tiny_lm, strategy):
    from stages import train

    overrides, options = STRATEGY_CASES[strategy]
    section = {"strategy": strategy, **overrides, **({strategy: options} if options else {})}
    params = tokenized_project(tmp_path, tiny_lm, train=section)
    from sft_pipeline.modeling import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(params.paths.tokenized_dir / "tokenizer", params.model)
    model, new = load_pretrained(params.model.name, params.model, TASK.auto_class, TASK.model_kwargs({}, tokenizer))
    prepared = strategies.prepare(model, new, params.train, TASK, params.paths.tokenized_dir / "tokenizer", 96)
    assert prepared.head == []
    before = {n: p.detach().clone() for n, p in prepared.model.named_parameters()}
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    report = train.run(params, track=False)
    assert report["trainable_params"] == prepared.counts["trainable_params"] > 0
    trained, _, _ = strategies.load_trained(params.paths.model_dir)
    after = dict(trained.named_parameters())
    assert set(after) == set(before)  # the reloaded model has every parameter that trained, under the same name
    for name, value in before.items():
        same = torch.equal(after[name].detach().cpu(), value)
        assert same != (name in trainable), f"{strategy}: {name} {'changed' if not same else 'did not change'}"
    if strategy == "freeze":
        assert all(n.startswith("model.layers.1.") for n in trainable)
    assert report["best_metric"] == "loss" and report["best_validation_loss"] is not None


def test_freeze_with_no_block_and_packed_soft_prompts_are_refused_at_params_time(tmp_path):
    with pytest.raises(ParamsError, match="freeze with no trainable block trains nothing"):
        parse(instruction_params(tmp_path, "m", train={"strategy": "freeze", "packing": False}))
    with pytest.raises(ParamsError, match="peft ignores position ids under prompt_tuning"):
        parse(instruction_params(tmp_path, "m", train={"strategy": "prompt_tuning", "packing": True}))
    with pytest.raises(ParamsError, match="higher is better"):
        parse(instruction_params(tmp_path, "m", mlflow={"promotion_metric": "test_loss"}))
    with pytest.raises(ParamsError, match=r"validate.labels: unknown key .*'instruction'"):
        parse(instruction_params(tmp_path, "m", validate={"labels": {"a": []}}))
    with pytest.raises(ParamsError, match=r"train.packing: unknown key .*'classification'"):
        raw = yaml.safe_load((DEFAULT_PARAMS).read_text())
        raw["train"]["packing"] = True
        parse(raw)


# ---------------------------------------------------------------------------------------------- evaluation


def test_answer_scores_read_every_script_and_small_answer_sets_score_as_labels():
    scores = instruction.answer_scores(["正面", "Paris is nice", "x"], ["正面", "paris is NICE!", "y"])
    assert scores["exact_match"] == pytest.approx(2 / 3, abs=1e-4)
    assert scores["rouge_l"] == pytest.approx(2 / 3, abs=1e-4)  # 1, 1, 0
    assert instruction.answer_scores(["正面"], ["正面"])["rouge_l"] == 1.0  # rouge-score alone gives 0.0 here
    assert instruction.label_set(["积极", "消极", "积极 ", "消极", "积极"]) == ["消极", "积极"]  # sorted, one form each
    assert instruction.label_set(["a", "b", "c"]) is None  # each seen once: free text
    assert instruction.as_label(" Positive.", ["negative", "positive"]) == "positive"
    assert instruction.as_label("maybe", ["negative", "positive"]) == instruction.OTHER


def test_answers_from_a_small_set_are_scored_as_labels_for_tuned_and_base(tmp_path, tiny_lm, tokenizer):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Is review {i} positive? Answer yes or no."},
                                        {"role": "assistant", "content": "yes" if i % 2 else "no"}]}
            for i in range(60)]
    params = parse(instruction_params(tmp_path, tiny_lm, split={"ratios": {"train": 0.5, "validation": 0.1,
                                                                          "test": 0.4}},
                                      evaluate={"max_rows": None, "max_new_tokens": 3}))
    write_jsonl(params.paths.raw_dir / "chat.jsonl", rows)
    from stages import clean, split, tokenize, validate

    for stage in (clean, validate, split, tokenize):
        stage.run(params)
    test = load_from_disk(str(params.paths.tokenized_dir / "data"))["test"]
    frame = pd.read_parquet(params.paths.split_dir / "test.parquet")
    meta = tasks.read_meta(params.paths.tokenized_dir, TASK)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm)).eval()
    evaluation = TASK.evaluate(model, tokenizer, test, frame, meta, params.evaluate, "cpu",
                               base=lambda: AutoModelForCausalLM.from_pretrained(str(tiny_lm)).eval())
    metrics = evaluation.metrics
    assert metrics["classification_like"] is True and metrics["generated_rows"] == len(frame)
    # The tuned and the base model are the same weights here: the same answers, the same scores, zero gain.
    assert metrics["tuned"] == metrics["base"] and set(metrics["gain"].values()) == {0.0}
    assert {"accuracy", "macro_f1"} <= set(metrics["tuned"])
    assert evaluation.details["labels"] == ["no", "yes"]
    predicted = evaluation.predictions["predicted"]
    assert set(predicted) <= {"no", "yes", instruction.OTHER}
    assert metrics["tuned"]["accuracy"] == pytest.approx(
        float((predicted == evaluation.predictions["actual"]).mean()), abs=1e-4)
    assert list(evaluation.figures) == ["confusion_matrix.png"]
    assert {"test_accuracy", "base_test_macro_f1", "gain_chrf"} <= set(evaluation.mlflow_metrics)
    evaluation.figures["confusion_matrix.png"](str(tmp_path / "cm.png"))
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_the_served_model_takes_messages_prompts_and_frames():
    conv = [{"role": "user", "content": "Hi"}]
    assert instruction.conversations_of("Hi") == [conv]
    assert instruction.conversations_of(["Hi", "Yo"]) == [conv, [{"role": "user", "content": "Yo"}]]
    assert instruction.conversations_of(conv) == [conv]
    frame = pd.DataFrame({"messages": [conv, json.dumps(conv)]})
    assert instruction.conversations_of(frame) == [conv, conv]
    assert instruction.conversations_of(pd.DataFrame({"prompt": ["Hi"], "system": ["Be kind."]})) == \
        [[{"role": "system", "content": "Be kind."}, *conv]]
    with pytest.raises(ValueError, match="must end with a user message"):
        instruction.conversations_of([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])
    with pytest.raises(ValueError, match="needs `messages`"):
        instruction.conversations_of(pd.DataFrame({"text": ["Hi"]}))


# ---------------------------------------------------------------------------------------------- end to end


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.e2e
def test_dvc_repro_trains_an_assistant_registers_it_and_serves_messages(tmp_path, tiny_lm):
    import os
    import shutil

    import mlflow

    from sft_pipeline.tracking import CHAMPION, use_store

    root = tmp_path / "project"
    copy_code(root)
    shutil.copytree(tiny_lm, root / "models/pretrained/tiny-lm")
    raw = instruction_params(Path("."), "models/pretrained/tiny-lm")
    raw["paths"] = yaml.safe_load((DEFAULT_PARAMS).read_text())["paths"]
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    rows = conversations(48) + [{"id": "bad", "messages": [{"role": "user", "content": "no answer"}]}]
    write_jsonl(root / "data/raw/chat.jsonl", rows)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, env=env)
    out = dvc(root, "repro").stdout
    assert "Running stage 'evaluate'" in out
    validation_report = json.loads((root / "reports/validation.json").read_text())
    assert validation_report["rejected"] == {"no_answer": 1} and validation_report["kept"] == 48
    tokenize_report = json.loads((root / "reports/tokenize.json").read_text())
    assert tokenize_report["end_tokens"] == ["<|im_end|>"]
    assert 0 < tokenize_report["splits"]["train"]["trained_token_fraction"] < 0.5
    metrics = json.loads((root / "reports/metrics.json").read_text())
    split_rows = json.loads((root / "reports/split.json").read_text())["rows"]
    assert metrics["test_rows"] == split_rows["test"] and metrics["generated_rows"] == min(8, split_rows["test"])
    for who in ("tuned", "base"):
        assert set(metrics[who]) >= {"loss", "perplexity", "rouge_l", "chrf", "exact_match"}
    assert metrics["gain"]["loss"] == pytest.approx(metrics["tuned"]["loss"] - metrics["base"]["loss"], abs=1e-3)
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]  # two epochs at 1e-2 teach the tiny model something
    table = pd.read_csv(root / "reports/test_predictions.csv")
    assert list(table.columns[:6]) == ["id", "source", "prompt", "reference", "base_answer", "tuned_answer"]
    assert len(table) == metrics["generated_rows"]
    promotion = json.loads((root / "reports/promotion.json").read_text())
    assert promotion["alias"] == CHAMPION and promotion["metric"] == "test_rouge_l"

    params = parse(yaml.safe_load((root / "params.yaml").read_text()))
    paths = params.paths.model_copy(update={k: root / v for k, v in params.paths.model_dump().items()
                                            if v is not None})
    use_store(paths)
    run = mlflow.get_run(promotion["run_id"])
    assert run.data.metrics["base_test_loss"] == pytest.approx(metrics["base"]["loss"], abs=1e-4)
    assert "generations.json" in [a.path for a in mlflow.MlflowClient().list_artifacts(promotion["run_id"])]
    model = mlflow.pyfunc.load_model(f"models:/{params.mlflow.registered_model}@{CHAMPION}")
    first = json.loads(pd.read_parquet(root / "data/split/test.parquet")["messages"].iloc[0])
    answers = model.predict(pd.DataFrame({"messages": [first[:-1]]}))
    assert list(answers.columns) == ["answer"]
    assert answers["answer"].iloc[0] == table["tuned_answer"].fillna("").iloc[0]
    assert len(model.predict(pd.DataFrame({"prompt": ["Capital of Spain?"], "system": ["Be brief."]}))) == 1
    again = dvc(root, "repro").stdout
    assert "Running stage" not in again
