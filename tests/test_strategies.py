"""Training strategies (train.strategy) on tiny random models: each trains exactly what it should, the saved model
reloads and predicts what evaluate saw, frozen features are computed once and give the model's own logits, adapters
merge, and the MLflow run holds metrics while training still runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sft_pipeline import strategies, tasks, training
from sft_pipeline.io import StageError
from sft_pipeline.modeling import load_pretrained, load_tokenizer
from sft_pipeline.params import parse
from stages import evaluate, tokenize, train
from tests.conftest import prepared_project, project_params

# (strategy, its options block): every strategy, and freeze with a trainable block and without the feature cache.
CASES = {
    "full": ("full", None),
    "freeze": ("freeze", None),
    "freeze-top-block": ("freeze", {"trainable_layers": 1}),
    "freeze-uncached": ("freeze", {"cache_features": False}),
    "lora": ("lora", {"r": 4, "alpha": 8, "dropout": 0.0}),
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 4}),
}
# Tiny models learn slowly at the auto rates of real ones; the rates here make two epochs move every trained weight.
RATES = {"full": 5e-3, "freeze": 5e-2, "lora": 1e-2, "prompt_tuning": 5e-2}


def strategy_params(tmp_path, model_dir, case: str, **overrides):
    strategy, options = CASES[case]
    extra = {"train__strategy": strategy, "train__learning_rate": RATES[strategy], "train__epochs": 2}
    if options is not None:
        extra[f"train__{strategy}"] = options
    return prepared_project(tmp_path, model_dir, **{**extra, **overrides})


def fresh_model(params):
    """What the train stage builds before training: the task's model with its new head, and the strategy applied."""
    task = tasks.get(params)
    tokenizer = load_tokenizer(params.paths.tokenized_dir / "tokenizer", params.model)
    meta = tasks.read_meta(params.paths.tokenized_dir, task)
    model, new = load_pretrained(params.model.name, params.model, task.auto_class, task.model_kwargs(meta, tokenizer))
    torch.manual_seed(params.train.seed)
    return task, tokenizer, strategies.prepare(model, new, params.train, task, params.paths.tokenized_dir / "tokenizer",
                                               params.tokenize.max_length)


def trained_names(case: str, names: list[str], head: list[str], blocks: list[str]) -> set[str]:
    """The parameters a strategy promises to train, by name."""
    strategy, options = CASES[case]
    if strategy == "full":
        return set(names)
    if strategy == "freeze":
        top = blocks[-options["trainable_layers"]:] if options and options.get("trainable_layers") else []
        return {n for n in names if any(n.startswith(p + ".") for p in head + top)}
    if strategy == "lora":
        return {n for n in names if "lora_" in n or ".modules_to_save." in n}
    return {n for n in names if n.startswith("prompt_encoder.") or ".modules_to_save." in n}


@pytest.mark.parametrize("model_fixture", ["tiny_bert", "tiny_gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_strategy_trains_exactly_its_parameters(tmp_path, request, model_fixture, case):
    model_dir = request.getfixturevalue(model_fixture)
    params, _ = strategy_params(tmp_path, model_dir, case)
    tokenize.run(params)
    from datasets import load_from_disk

    data = load_from_disk(str(params.paths.tokenized_dir / "data"))
    task, tokenizer, prepared = fresh_model_or_refusal(params, model_fixture, case)
    if prepared is None:
        return
    model = prepared.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blocks = strategies.transformer_blocks(model)
    expected = trained_names(case, list(before), prepared.head, blocks)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert prepared.counts["trainable_params"] == sum(before[n].numel() for n in expected)

    training.prepare_checkpoints(params.paths.checkpoints_dir, {"case": case})
    training.fit(prepared, task, data, tokenizer, params.paths, params.train, "cpu", [], None)
    after = dict(model.named_parameters())
    unchanged = sorted(n for n in expected if torch.equal(before[n], after[n].detach()))
    moved = sorted(n for n in set(before) - expected if not torch.equal(before[n], after[n].detach()))
    assert unchanged == [], f"{case}: trainable parameters that did not change: {unchanged}"
    assert moved == [], f"{case}: frozen parameters that changed: {moved}"


def fresh_model_or_refusal(params, model_fixture, case):
    if model_fixture == "tiny_gpt2" and case == "prompt_tuning":
        # GPT-2's classifier pools its last real token, which it finds from token ids; a soft prompt hides them.
        with pytest.raises(StageError, match="pools its last real token"):
            fresh_model(params)
        return None, None, None
    return fresh_model(params)


@pytest.mark.parametrize("case", ["full", "freeze", "lora", "prompt_tuning"])
def test_saved_model_reloads_and_predicts_what_evaluate_saw(tmp_path, tiny_bert, case):
    params, params_file = strategy_params(tmp_path, tiny_bert, case)
    tokenize.run(params)
    report = train.run(params, track=False)
    evaluation = evaluate.run(params, track=False)

    out = params.paths.model_dir
    files = {p.name for p in out.iterdir()}
    assert strategies.MODEL_INFO in files and "tokenizer.json" in files
    assert not {f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))}
    if case in strategies.ADAPTERS:
        # The adapter alone: no copy of the base weights.
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
        adapter_bytes = (out / "adapter_model.safetensors").stat().st_size
        base_bytes = (tiny_bert / "model.safetensors").stat().st_size
        assert adapter_bytes < base_bytes / 5, (adapter_bytes, base_bytes)
    else:
        assert "model.safetensors" in files
    assert report["strategy"] == CASES[case][0]
    assert 0 < report["trainable_params"] <= report["total_params"]
    assert len(report["epoch_seconds"]) == 2

    model, tokenizer, info = strategies.load_trained(out)
    assert info["strategy"] == CASES[case][0]
    task = tasks.get(params)
    rows = pd.read_parquet(params.paths.split_dir / "test.parquet")
    served = task.predict(model, tokenizer, rows["text"].tolist(), task.serving_config(params))
    predicted = pd.read_csv(params.paths.predictions)["predicted"].tolist()
    assert served["label"].tolist() == predicted
    assert evaluation.metrics["test_rows"] == len(predicted)


def test_frozen_features_are_computed_once_and_give_the_models_own_logits(tmp_path, tiny_bert):
    params, _ = strategy_params(tmp_path, tiny_bert, "freeze", train__epochs=3)
    tokenize.run(params)
    from datasets import load_from_disk

    from sft_pipeline import features

    data = load_from_disk(str(params.paths.tokenized_dir / "data"))
    task, tokenizer, prepared = fresh_model(params)
    assert prepared.cache_features
    backbone = prepared.model.bert
    calls = []
    hook = backbone.register_forward_hook(lambda *args: calls.append(1))
    training.prepare_checkpoints(params.paths.checkpoints_dir, {"freeze": 1})
    fitted = training.fit(prepared, task, data, tokenizer, params.paths, params.train, "cpu", [], None)
    hook.remove()
    batches = sum(-(-len(data[s]) // params.train.eval_batch_size) for s in ("train", "validation"))
    assert len(calls) == batches  # one pass over train and validation, whatever the number of epochs
    assert fitted.features["rows"] == len(data["train"]) + len(data["validation"])
    assert fitted.trainer.state.global_step == 3 * -(-len(data["train"]) // params.train.batch_size)

    # The head trained on cached vectors is the model's head: the whole model gives the same logits.
    head = prepared.model.classifier
    collate = task.collator(tokenizer, "cpu")
    vectors = features.extract(prepared.model, head, data["validation"], collate, 16, "cpu")
    with torch.inference_mode():
        from_cache = head(torch.from_numpy(vectors)).numpy()
        batch = collate([{"input_ids": ids} for ids in data["validation"]["input_ids"]])
        whole = prepared.model.eval()(**batch).logits.numpy()
    np.testing.assert_allclose(from_cache, whole, atol=1e-5)


def test_without_the_feature_cache_the_frozen_backbone_runs_every_step(tmp_path, tiny_bert):
    """freeze.cache_features: false, the counterpart of the test above: backbone passes grow with the steps."""
    params, _ = strategy_params(tmp_path, tiny_bert, "freeze-uncached")
    tokenize.run(params)
    from datasets import load_from_disk

    data = load_from_disk(str(params.paths.tokenized_dir / "data"))
    task, tokenizer, prepared = fresh_model(params)
    assert not prepared.cache_features
    calls = []
    hook = prepared.model.bert.register_forward_hook(lambda *args: calls.append(1))
    training.prepare_checkpoints(params.paths.checkpoints_dir, {"uncached": 1})
    training.fit(prepared, task, data, tokenizer, params.paths, params.train, "cpu", [], None)
    hook.remove()
    steps = 2 * -(-len(data["train"]) // params.train.batch_size)
    evaluations = 2 * -(-len(data["validation"]) // params.train.eval_batch_size)
    # Without the cache, every training step and every validation batch of each epoch runs the backbone.
    assert len(calls) == steps + evaluations, (len(calls), steps, evaluations)


def test_lora_merges_into_a_standalone_model_that_predicts_the_same(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from sft_pipeline import merge

    params, params_file = strategy_params(tmp_path, tiny_bert, "lora")
    tokenize.run(params)
    train.run(params, track=False)
    assert merge.main(["--params", str(params_file)]) == 0
    merged_dir = params.paths.model_dir.with_name(params.paths.model_dir.name + "-merged")
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir)).eval()
    adapter, tokenizer, _ = strategies.load_trained(params.paths.model_dir)
    batch = tokenizer(["match goal team", "market shares profit", "chip data network"], return_tensors="pt",
                      padding=True)
    with torch.inference_mode():
        np.testing.assert_allclose(merged(**batch).logits.numpy(), adapter(**batch).logits.numpy(), atol=1e-4)
    assert json.loads((merged_dir / strategies.MODEL_INFO).read_text())["merged_from"]["strategy"] == "lora"
    assert not any(p.name.startswith("adapter_") for p in merged_dir.iterdir())


@pytest.mark.parametrize("case, message", [("prompt_tuning", "cannot be merged"), ("full", "full model already")])
def test_merge_refuses_what_cannot_be_merged(tmp_path, tiny_bert, capsys, case, message):
    from sft_pipeline import merge

    params, params_file = strategy_params(tmp_path, tiny_bert, case, train__epochs=1)
    tokenize.run(params)
    train.run(params, track=False)
    assert merge.main(["--params", str(params_file)]) == 1
    assert message in capsys.readouterr().err


def test_lora_model_is_served_by_mlflow_from_its_adapter(tmp_path, tiny_bert):
    import mlflow

    from sft_pipeline.tracking import CHAMPION, use_store

    params, params_file = strategy_params(tmp_path, tiny_bert, "lora")
    for stage in (tokenize, train, evaluate):
        assert stage.main(["--params", str(params_file)]) == 0
    use_store(params.paths)
    run = mlflow.get_run(json.loads(params.paths.mlflow_run.read_text())["run_id"])
    # What `auto` and the options block became, beside params.yaml as written.
    assert run.data.params["resolved.lora.r"] == "4" and run.data.params["resolved.lora.dropout"] == "0.0"
    assert run.data.params["resolved.learning_rate"] == str(RATES["lora"])
    model = mlflow.pyfunc.load_model(f"models:/{params.mlflow.registered_model}@{CHAMPION}")
    rows = pd.read_parquet(params.paths.split_dir / "test.parquet")
    assert model.predict(rows["text"].tolist())["label"].tolist() == \
        pd.read_csv(params.paths.predictions)["predicted"].tolist()
    logged = mlflow.artifacts.download_artifacts(f"models:/{params.mlflow.registered_model}@{CHAMPION}")
    weights = [p.name for p in Path(logged).rglob("*.safetensors")]
    assert weights == ["adapter_model.safetensors"]  # the adapter travels, not a copy of the base


def test_the_mlflow_run_holds_metric_points_while_training_runs(tmp_path, tiny_bert):
    from mlflow.tracking import MlflowClient
    from transformers import TrainerCallback

    from sft_pipeline import tracking

    params, _ = strategy_params(tmp_path, tiny_bert, "full", train__epochs=2)
    tokenize.run(params)
    from datasets import load_from_disk

    data = load_from_disk(str(params.paths.tokenized_dir / "data"))
    task, tokenizer, prepared = fresh_model(params)
    run_id = tracking.start_training_run(params, None)
    uri = tracking.tracking_uri(params.paths)
    seen = {}

    class Probe(TrainerCallback):
        """Looks at the store from another client in the middle of training, as the MLflow UI would."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps - 2 and not seen:
                import mlflow

                mlflow.flush_async_logging()  # what was queued so far reaches the store
                client = MlflowClient(uri)
                seen["status"] = client.get_run(run_id).info.status
                seen["train_loss"] = [m.step for m in client.get_metric_history(run_id, "train_loss")]
                seen["val"] = len(client.get_metric_history(run_id, "val_macro_f1"))
                seen["step"] = state.global_step

    live = tracking.live_metrics(run_id)
    training.prepare_checkpoints(params.paths.checkpoints_dir, {"live": 1})
    try:
        training.fit(prepared, task, data, tokenizer, params.paths, params.train, "cpu", [live, Probe()], None)
    finally:
        import mlflow

        mlflow.end_run()
    assert seen["status"] == "RUNNING"
    # Every step before this one (this step's loss is logged just after on_step_end), while the run goes on.
    assert seen["train_loss"] == list(range(1, seen["step"]))
    assert seen["val"] == 1  # the first epoch's validation
    client = MlflowClient(uri)
    assert len(client.get_metric_history(run_id, "train_loss")) == seen["step"] + 2
    # Every point of training in the run came through the callback, each once (the data_* metrics, the tokenizer's
    # coverage of each split, are logged when the run opens).
    metrics = client.get_run(run_id).data.metrics
    assert {k for k in metrics if k.startswith("data_")} == {
        f"data_{name}_{split}" for name in ("unknown_token_fraction", "mostly_unknown_text_fraction",
                                            "tokens_per_character") for split in ("train", "validation", "test")}
    points = sum(len(client.get_metric_history(run_id, key)) for key in metrics if not key.startswith("data_"))
    assert live.logged == points


def test_the_train_stage_shows_progress_not_a_dictionary_per_step(tmp_path, tiny_bert, capfd):
    params, params_file = strategy_params(tmp_path, tiny_bert, "full")
    tokenize.run(params)
    capfd.readouterr()
    assert train.main(["--params", str(params_file)]) == 0
    out, err = capfd.readouterr()
    assert "{'loss'" not in out + err and "'learning_rate'" not in out + err
    assert "epoch 1/2: validation loss" in err and "epoch 2/2: validation loss" in err
    assert "train: step" in err and "ETA" in err  # not a terminal here: plain progress lines
    assert "strategy full:" in out


@pytest.mark.parametrize("options, message", [
    ({"train__strategy": "freeze", "train__freeze": {"trainable_layers": 9}}, "trainable_layers = 9"),
    ({"train__strategy": "lora", "train__lora": {"target_modules": ["no_such_layer"]}}, "train.lora.target_modules"),
])
def test_strategy_settings_the_model_cannot_take_fail_with_the_key(tmp_path, tiny_bert, options, message):
    params, _ = prepared_project(tmp_path, tiny_bert, **options)
    tokenize.run(params)
    with pytest.raises(StageError, match=message):
        train.run(params, track=False)


def test_prompt_and_inputs_must_fit_the_models_positions(tmp_path, tiny_bert):
    params, _ = prepared_project(tmp_path, tiny_bert, train__strategy="prompt_tuning",
                                 train__prompt_tuning={"num_virtual_tokens": 100})
    tokenize.run(params)
    with pytest.raises(StageError, match="num_virtual_tokens 100 > the model's 128 positions"):
        train.run(params, track=False)


def test_auto_learning_rate_follows_the_strategy(tmp_path):
    def rate(**train):
        raw = project_params(tmp_path, **{f"train__{k}": v for k, v in train.items()})
        return strategies.learning_rate(parse(raw).train)

    assert {s: rate(strategy=s, learning_rate="auto") for s in strategies.AUTO_LEARNING_RATE} == \
        {"full": 1e-4, "freeze": 1e-1, "lora": 2e-3, "prompt_tuning": 3e-2}
    # Blocks of the pretrained model training again: a rate for pretrained weights, not for a head alone.
    assert rate(strategy="freeze", learning_rate="auto", freeze={"trainable_layers": 2}) == 1e-3
    assert rate(strategy="lora", learning_rate=2e-4) == 2e-4


@pytest.mark.parametrize("case", ["full", "freeze", "lora", "prompt_tuning"])
def test_every_strategy_resumes_from_a_checkpoint_and_ends_where_an_uninterrupted_run_does(tmp_path, tiny_bert, case):
    """The last checkpoint is removed after a complete run, as if the run had been killed before writing it: train
    resumes from the one before and ends with the uninterrupted run's validation losses."""
    import shutil

    params, _ = strategy_params(tmp_path, tiny_bert, case, train__save_every_steps=4)
    tokenize.run(params)
    first = train.run(params, track=False)
    losses = pd.read_csv(params.paths.eval_history)["eval_loss"].tolist()
    kept = sorted(params.paths.checkpoints_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(kept) == 2
    shutil.rmtree(kept[-1])
    saved = {p.name for p in kept[0].iterdir()}
    if case in strategies.ADAPTERS:
        assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    resumed = train.run(params, track=False)
    assert resumed["resumed_from"] == str(kept[0])
    assert resumed["global_steps"] == first["global_steps"]
    again = pd.read_csv(params.paths.eval_history)["eval_loss"].tolist()
    assert again == pytest.approx(losses, abs=0.02)
    assert resumed["best_validation_macro_f1"] == pytest.approx(first["best_validation_macro_f1"], abs=0.02)


def test_a_soft_prompt_can_start_from_a_text(tmp_path, tiny_bert):
    """init_text reaches peft with the pipeline's own tokenizer: the prompt starts as that text's embeddings."""
    params, _ = prepared_project(tmp_path, tiny_bert, train__strategy="prompt_tuning",
                                 train__prompt_tuning={"num_virtual_tokens": 6, "init_text": "sport business tech"})
    tokenize.run(params)
    task, tokenizer, prepared = fresh_model(params)
    ids = tokenizer("sport business tech")["input_ids"]  # [CLS] sport business tech [SEP], then again from the start
    assert len(ids) == 5
    ids = (ids * 2)[:6]
    prompt = prepared.model.prompt_encoder["default"].embedding.weight.detach()
    words = prepared.model.get_input_embeddings().weight.detach()[ids]
    torch.testing.assert_close(prompt, words)


def test_the_head_is_what_loading_had_to_initialise(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3)
    assert strategies.head_modules(model, ["classifier.weight", "classifier.bias"]) == ["classifier"]
    # A head and a new pooler below it: both, not their parameters one by one.
    assert strategies.head_modules(model, ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.bias"]) \
        == ["bert.pooler.dense", "classifier"]
    # A checkpoint that is a classifier already (nothing new): its head by name.
    assert strategies.head_modules(model, []) == ["classifier"]
    bare = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert strategies.head_modules(bare, [], required=False) == []
    with pytest.raises(StageError, match="cannot tell which modules"):
        strategies.head_modules(bare, [])
