"""tokenize, train and evaluate on tiny data with tiny random models (a BERT and a GPT-2 without pad token)."""

import json

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open

from sft_pipeline.encoding import encode
from sft_pipeline.tasks.classification import classification_summary, confident_errors
from sft_pipeline.training import history_frames, prepare_checkpoints
from stages import evaluate, tokenize, train
from tests.conftest import minilm_dir, prepared_project


def test_encode_truncates_and_reports_full_length():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    texts = ["short one", "word " * 50, ""]
    ids, full = encode(tokenizer, texts, max_length=16)
    untruncated = tokenizer(texts)["input_ids"]
    assert full == [len(x) for x in untruncated] == [4, 52, 2]
    assert [len(x) for x in ids] == [4, 16, 2]
    assert ids[1][0] == tokenizer.cls_token_id and ids[1][-1] == tokenizer.sep_token_id
    assert ids[0] == untruncated[0]


def test_classification_summary_numbers():
    actual = ["a", "a", "b", "b", "c"]
    predicted = ["a", "b", "b", "b", "a"]
    summary = classification_summary(actual, predicted, ["a", "b", "c"])
    m = summary["metrics"]
    assert m["accuracy"] == 0.6
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.6667, abs=1e-4)
    assert m["macro"]["f1"] == pytest.approx((0.5 + 0.8 + 0) / 3, abs=1e-4)
    assert summary["confusion_matrix"]["rows_actual_columns_predicted"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_confident_errors_are_sorted_and_truncated():
    frame = pd.DataFrame({"id": ["1", "2", "3"], "source_file": "a.csv", "line": [2, 3, 4],
                          "text": ["x" * 500, "y", "z"], "actual": ["a", "b", "a"], "predicted": ["b", "b", "c"],
                          "confidence": [0.7, 0.99, 0.9]})
    errors = confident_errors(frame, top=5)
    assert [e["id"] for e in errors] == ["3", "1"]
    assert len(errors[1]["text"]) == 300 and errors[0]["source"] == "a.csv:4"


def test_history_frames_split_steps_and_epochs():
    log = [{"loss": 1.0, "learning_rate": 1e-3, "grad_norm": 2.0, "epoch": 0.5, "step": 1},
           {"eval_loss": 0.9, "eval_accuracy": 0.5, "eval_macro_f1": 0.4, "epoch": 1.0, "step": 2},
           {"train_runtime": 3.0, "train_loss": 0.8, "epoch": 1.0, "step": 2}]
    steps, epochs = history_frames(log)
    assert steps.to_dict("records") == [{"step": 1, "epoch": 0.5, "loss": 1.0, "learning_rate": 1e-3,
                                         "grad_norm": 2.0}]
    assert epochs["eval_macro_f1"].tolist() == [0.4]


def test_stale_checkpoints_are_cleared_and_matching_ones_resumed(tmp_path):
    folder = tmp_path / "ck"
    assert prepare_checkpoints(folder, {"train": 1}) is None
    (folder / "checkpoint-7").mkdir()
    (folder / "checkpoint-7" / "trainer_state.json").write_text("{}")
    assert prepare_checkpoints(folder, {"train": 1}).endswith("checkpoint-7")
    assert prepare_checkpoints(folder, {"train": 2}) is None
    assert not (folder / "checkpoint-7").exists()


def test_tokenize_main_writes_arrow_labels_and_report(tmp_path, tiny_bert):
    # max_length 14 cuts some of the synthetic texts (10 to 17 tokens) and not others: the report must count which.
    params, params_file = prepared_project(tmp_path, tiny_bert, tokenize__max_length=14)
    assert tokenize.main(["--params", str(params_file)]) == 0
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    data = load_from_disk(str(params.paths.tokenized_dir / "data"))
    sizes = json.loads(params.paths.split_report.read_text())["rows"]
    assert {name: len(data[name]) for name in data} == sizes
    assert data["train"].features["labels"].names == ["business", "sport", "tech"]
    assert (params.paths.tokenized_dir / "tokenizer" / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(params.paths.tokenized_dir / "tokenizer"))
    texts = pd.read_parquet(params.paths.split_dir / "train.parquet")["text"].tolist()
    full = np.array([len(ids) for ids in tokenizer(texts)["input_ids"]])
    assert data["train"]["length"] == np.minimum(full, 14).tolist()
    report = json.loads(params.paths.tokenize_report.read_text())
    assert report["splits"]["train"]["rows"] == sizes["train"]
    assert 0 < (full > 14).mean() < 1
    assert report["splits"]["train"]["truncated_fraction"] == round(float((full > 14).mean()), 4)
    assert report["splits"]["train"]["p50"] == int(np.percentile(full, 50))


@pytest.mark.parametrize("model_fixture", ["tiny_bert", "tiny_gpt2"])
def test_train_and_evaluate_main(tmp_path, request, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    params, params_file = prepared_project(tmp_path, model_dir, train__epochs=6)
    assert tokenize.main(["--params", str(params_file)]) == 0
    assert train.main(["--params", str(params_file)]) == 0

    out = params.paths.model_dir
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "business", "1": "sport", "2": "tech"}
    assert config["pad_token_id"] is not None
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert any("score" in k or "classifier" in k for k in weights.keys())
    steps = pd.read_csv(params.paths.train_history)
    epochs = pd.read_csv(params.paths.eval_history)
    assert steps["step"].is_monotonic_increasing and steps["loss"].notna().all()
    assert epochs["epoch"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    report = json.loads(params.paths.train_report.read_text())
    assert report["best_validation_macro_f1"] == pytest.approx(epochs["eval_macro_f1"].max(), abs=1e-4)
    assert steps["loss"].tail(3).mean() < steps["loss"].head(3).mean()

    assert evaluate.main(["--params", str(params_file)]) == 0
    metrics = json.loads(params.paths.metrics.read_text())
    predictions = pd.read_csv(params.paths.predictions)
    test_rows = json.loads(params.paths.split_report.read_text())["rows"]["test"]
    assert metrics["test_rows"] == len(predictions) == test_rows
    assert metrics["accuracy"] == pytest.approx((predictions["actual"] == predictions["predicted"]).mean(), abs=1e-4)
    # Three classes with separate vocabularies: even a tiny model beats chance (1/3) clearly.
    assert metrics["accuracy"] > 0.6, metrics
    assert np.all((predictions["confidence"] > 0) & (predictions["confidence"] <= 1))


def test_length_grouped_batches_cover_every_row_once_in_random_order():
    from sft_pipeline.training import LengthGroupedBatches

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, 1000)
    sampler = LengthGroupedBatches(lengths, batch_size=32, seed=7, mega_batch_mult=4)
    first = list(sampler)
    assert sorted(first) == list(range(1000)) and len(sampler) == 1000
    batches = [first[i:i + 32] for i in range(0, 1000, 32)]  # what a DataLoader with batch_size 32 makes of it
    assert [len(b) for b in batches] == [32] * 31 + [8]
    # Each batch comes from one mega-batch sorted by length: its spread is far below that of a random batch.
    spread = np.mean([np.ptp(lengths[b]) for b in batches[:-1]])
    shuffled = rng.permutation(1000)
    random_spread = np.mean([np.ptp(lengths[shuffled[i:i + 32]]) for i in range(0, 992, 32)])
    assert spread < 0.3 * random_spread
    # Batches are not ordered by length (HF's LengthGroupedSampler sweeps long to short within each mega-batch).
    longest = [lengths[b].max() for b in batches[:-1]]
    assert not (np.all(np.diff(longest) <= 0) or np.all(np.diff(longest) >= 0))
    assert list(LengthGroupedBatches(lengths, 32, seed=7, mega_batch_mult=4)) == first  # same seed and epoch
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new order each epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # and the same again for a resumed epoch


def tiny_classifier(params):
    from sft_pipeline import tasks
    from sft_pipeline.modeling import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(params.paths.tokenized_dir / "tokenizer", params.model)
    task = tasks.get(params)
    kwargs = task.model_kwargs({"labels": ["business", "sport", "tech"]}, tokenizer)
    return tokenizer, load_pretrained(params.model.name, params.model, task.auto_class, kwargs)[0]


def test_train_stage_draws_its_batches_from_length_grouped_batches(tmp_path, tiny_bert):
    from datasets import load_from_disk
    from transformers import DataCollatorWithPadding

    from sft_pipeline.training import LengthGroupedBatches, trainer_class, training_arguments

    params, _ = prepared_project(tmp_path, tiny_bert)
    tokenize.run(params)
    data = load_from_disk(str(params.paths.tokenized_dir / "data"))
    tokenizer, model = tiny_classifier(params)
    trainer = trainer_class()(model=model, args=training_arguments(params.paths, params.train, "cpu", "macro_f1"),
                              train_dataset=data["train"], eval_dataset=data["validation"],
                              data_collator=DataCollatorWithPadding(tokenizer))
    loader = trainer.get_train_dataloader()
    sampler = loader.batch_sampler.sampler  # accelerate wraps the DataLoader; the batch sampler holds ours
    assert isinstance(sampler, LengthGroupedBatches)
    assert list(sampler.lengths) == data["train"]["length"]
    # The DataLoader's batches are the sampler's batches, padded to their longest row.
    batches = sampler.batches()
    for batch, indices in zip(loader, batches):
        assert batch["input_ids"].shape == (len(indices), max(sampler.lengths[indices]))


def test_sampler_lengths_come_from_the_ids_when_there_is_no_length_column(tmp_path, tiny_bert):
    from datasets import load_from_disk
    from transformers import DataCollatorWithPadding

    from sft_pipeline.training import trainer_class, training_arguments

    params, _ = prepared_project(tmp_path, tiny_bert)
    tokenize.run(params)
    data = load_from_disk(str(params.paths.tokenized_dir / "data"))
    train = data["train"].remove_columns(["length"]).select(range(len(data["train"]) - 1, -1, -1))  # reversed
    tokenizer, model = tiny_classifier(params)
    trainer = trainer_class()(model=model, args=training_arguments(params.paths, params.train, "cpu", "macro_f1"),
                              train_dataset=train, eval_dataset=data["validation"],
                              data_collator=DataCollatorWithPadding(tokenizer))
    sampler = trainer.get_train_dataloader().batch_sampler.sampler
    assert list(sampler.lengths) == list(reversed(data["train"]["length"]))
