"""The promotion gate: the champion scored on the same test rows as the new version, a paired bootstrap, the margin
rule, and champions that are gone (tracking.py, stages/evaluate.py, the tasks' gate_* methods)."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from sft_pipeline.params import Mlflow
from sft_pipeline.tasks.classification import Classification, flat_test_metrics, of_labels, resampled_label_metrics
from sft_pipeline.tasks.instruction import Evaluate as InstructionEvaluate
from sft_pipeline.tasks.instruction import Instruction, answer_scores
from sft_pipeline.tracking import CHALLENGER, CHAMPION, paired_bootstrap, promotion_decision
from tests.conftest import prepared_project, synthetic_rows

LABELS = ["business", "sport", "tech"]


def outputs(actual, predicted, labels=LABELS) -> pd.DataFrame:
    return pd.DataFrame({"actual": of_labels(actual, labels), "predicted": of_labels(predicted, labels)})


# ---------------------------------------------------------------------------------------------- pure: the numbers


def test_resampled_label_metrics_equal_scikit_learn_on_every_resample():
    rng = np.random.default_rng(1)
    n = 60
    actual = rng.choice(LABELS, n)
    # Some predictions name a label the data does not have (a champion trained on other classes): errors.
    predicted = np.where(rng.random(n) < 0.6, actual, rng.choice(LABELS + ["gone"], n))
    draws = rng.integers(0, n, size=(40, n))
    draws[0] = np.flatnonzero(actual != "tech")[0]  # one resample of a single row: classes absent, zero division
    weights = np.stack([np.bincount(d, minlength=n) for d in draws])
    got = flat_test_metrics(resampled_label_metrics(of_labels(actual, LABELS), of_labels(predicted, LABELS),
                                                    weights))
    for r, rows in enumerate(draws):
        a, p = actual[rows], predicted[rows]
        assert got["test_accuracy"][r] == pytest.approx(accuracy_score(a, p), abs=1e-12)
        for average in ("macro", "weighted"):
            want = precision_recall_fscore_support(a, p, labels=LABELS, average=average, zero_division=0)[:3]
            assert [got[f"test_{average}_{s}"][r] for s in ("precision", "recall", "f1")] == \
                pytest.approx(list(want), abs=1e-12)
        per_class = precision_recall_fscore_support(a, p, labels=LABELS, zero_division=0)
        for i, label in enumerate(LABELS):
            assert got[f"test_f1_{label}"][r] == pytest.approx(per_class[2][i], abs=1e-12)


def test_paired_bootstrap_reports_the_interval_of_the_difference():
    task = Classification()
    n = 200
    actual = np.array(LABELS * 70)[:n]
    wrong = np.roll(actual, 1)  # another label on every row
    # The new model is right on rows 0-139, the champion on rows 0-99: 40 rows better, none worse.
    new = outputs(actual, np.where(np.arange(n) < 140, actual, wrong))
    champion = outputs(actual, np.where(np.arange(n) < 100, actual, wrong))
    c = paired_bootstrap(task.gate_scores, new, champion, "test_accuracy", resamples=1000, seed=0)
    assert (c.new, c.champion, c.rows) == (0.7, 0.5, n)
    assert c.difference == pytest.approx(0.2)
    # Only the 40 differing rows move the difference: 40/200 per draw, so it is binomial(200, 0.2) / 200.
    assert 0.13 < c.low < 0.2 < c.high < 0.27
    assert paired_bootstrap(task.gate_scores, new, champion, "test_accuracy", resamples=1000, seed=0) == c
    # The same answers on the same rows: no difference on any resample, whatever the metric.
    same = paired_bootstrap(task.gate_scores, new, new, "test_macro_f1", resamples=200, seed=3)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_of_macro_f1_on_a_few_hundred_rows_is_fast():
    import time

    rng = np.random.default_rng(0)
    actual = rng.choice(LABELS, 400)
    new = outputs(actual, np.where(rng.random(400) < 0.8, actual, rng.choice(LABELS, 400)))
    champion = outputs(actual, np.where(rng.random(400) < 0.7, actual, rng.choice(LABELS, 400)))
    started = time.perf_counter()
    c = paired_bootstrap(Classification().gate_scores, new, champion, "test_macro_f1")
    print(f"paired bootstrap, macro-F1, 400 rows, {c.resamples} resamples: {time.perf_counter() - started:.3f} s")
    assert c.low < c.difference < c.high


@pytest.mark.parametrize("new, champion, interval, margin, alias, why", [
    (0.90, 0.90, (0.0, 0.0), 0.0, CHAMPION, ">= margin 0.0"),  # a tie promotes: at least as good on the same rows
    (0.80, 0.90, (-0.2, 0.0), 0.0, CHALLENGER, "champion stays v1"),
    (0.95, 0.90, (-0.01, 0.1), 0.0, CHAMPION, ">= margin"),  # margin 0: the interval is reported, not required
    (0.93, 0.90, (0.01, 0.05), 0.02, CHAMPION, "the interval is above 0"),
    (0.93, 0.90, (-0.01, 0.07), 0.02, CHALLENGER, "the interval reaches 0"),
    (0.91, 0.90, (0.005, 0.02), 0.02, CHALLENGER, "< margin 0.02"),
    (0.91, 0.90, (0.001, 0.02), 0.01, CHAMPION, "above 0"),  # 0.91 - 0.90 is 0.01 less a bit: still the margin
])
def test_the_margin_rule(new, champion, interval, margin, alias, why):
    got, reason = promotion_decision(new, champion, "1", Mlflow(promotion_metric="test_macro_f1",
                                                                promotion_margin=margin), interval)
    assert got == alias and why in reason
    assert f"{new:.4f}" in reason and f"{interval[0]:+.4f} to {interval[1]:+.4f}" in reason


def test_a_champion_trained_on_other_labels_is_said_so():
    model = SimpleNamespace(config=SimpleNamespace(id2label={0: "business", 1: "sport", 2: "weather"}))
    served = SimpleNamespace(unwrap_python_model=lambda: SimpleNamespace(model=model))
    note = Classification().gate_note(served, {"labels": LABELS})
    assert "['tech']" in note and "['weather']" in note and "current rows' labels" in note
    assert Classification().gate_note(served, {"labels": ["business", "sport", "weather"]}) is None


def test_instruction_outputs_score_as_evaluate_does_and_resample():
    task = Instruction()
    references = ["Paris is the capital of France.", "yes", "no", "积极的回答", "The sum is 4.", "no"] * 5
    answers = ["Paris, the capital", "yes", "yes", "积极", "the sum is 4", "no"] * 5
    rows = pd.DataFrame({"messages": [json.dumps([{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": f"question {i}"},
                                                  {"role": "assistant", "content": r}])
                                      for i, r in enumerate(references)]})
    given = task.gate_input(rows, InstructionEvaluate(max_rows=24))
    assert len(given) == 24 and given["messages"].iloc[2] == [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "question 2"}]
    per_row = task.gate_outputs(pd.DataFrame({"answer": answers[:24]}), rows, {})
    whole = {k: float(v[0]) for k, v in task.gate_scores(per_row, np.ones((1, 24))).items()}
    expected = answer_scores(answers[:24], references[:24])
    assert whole["test_rouge_l"] == pytest.approx(expected["rouge_l"], abs=1e-4)
    assert whole["test_chrf"] == pytest.approx(expected["chrf"], abs=1e-2)
    assert whole["test_exact_match"] == pytest.approx(expected["exact_match"], abs=1e-4)
    # Five distinct answers over 30 rows: scored as labels too; an answer that names no label is an error.
    assert whole["test_accuracy"] == pytest.approx(12 / 24)
    # chrF is a corpus score: a resample sums its rows' statistics, which equals scoring the resampled corpus.
    rows_drawn = np.array([0, 0, 3, 4, 4, 4, 7, 9, 9, 10, 11, 23, 23, 23, 1, 2, 5, 6, 8, 12, 13, 14, 15, 16])
    weights = np.bincount(rows_drawn, minlength=24)[None, :]
    resampled = answer_scores([answers[i] for i in rows_drawn], [references[i] for i in rows_drawn])
    assert task.gate_scores(per_row, weights)["test_chrf"][0] == pytest.approx(resampled["chrf"], abs=1e-2)
    assert task.gate_scores(per_row, weights)["test_rouge_l"][0] == pytest.approx(resampled["rouge_l"], abs=1e-4)
    c = paired_bootstrap(task.gate_scores, per_row, per_row.iloc[::-1].reset_index(drop=True), "test_rouge_l",
                         resamples=100)
    assert c.rows == 24 and c.low <= c.difference <= c.high


def test_gain_metrics_cannot_gate_an_assistant():
    from sft_pipeline.params import ParamsError, parse
    from tests.test_instruction import instruction_params

    with pytest.raises(ParamsError, match="gain_rouge_l"):
        parse(instruction_params(Path("."), "m", mlflow={"promotion_metric": "gain_rouge_l"}))


# ---------------------------------------------------------------------------------------------- the stage


def new_run(params) -> str:
    """A training's MLflow run, as train opens it, for evaluate to complete (the model folder stays as it is)."""
    from mlflow.tracking import MlflowClient

    from sft_pipeline.tracking import experiment_id

    run = MlflowClient().create_run(experiment_id(params.paths, params.mlflow))
    params.paths.mlflow_run.write_text(json.dumps({"run_id": run.info.run_id}))
    return run.info.run_id


@pytest.fixture(scope="module")
def gated(tmp_path_factory, tiny_bert):
    """v1 trained and registered; then the test split grows by rows v1 gets wrong and the same weights are
    evaluated as a new training, v2: on the same rows the two are equal, while v1's registered score is higher."""
    from mlflow.tracking import MlflowClient

    from sft_pipeline.tracking import use_store
    from stages import evaluate, tokenize, train

    tmp = tmp_path_factory.mktemp("gated")
    params, params_file = prepared_project(tmp, tiny_bert, train__epochs=3)
    for stage in (tokenize, train, evaluate):
        assert stage.main(["--params", str(params_file)]) == 0
    use_store(params.paths)
    first = json.loads(params.paths.promotion.read_text())
    registered_f1 = json.loads(params.paths.metrics.read_text())["macro"]["f1"]

    from sft_pipeline import strategies

    model, tokenizer, _ = strategies.load_trained(params.paths.model_dir)
    test_file = params.paths.split_dir / "test.parquet"
    test = pd.read_parquet(test_file)
    extra = pd.DataFrame(synthetic_rows(6, seed=99, prefix="grown"))
    predicted = Classification().predict(model, tokenizer, extra["text"].tolist(), {"max_length": 32})["label"]
    extra["label"] = [LABELS[(LABELS.index(p) + 1) % 3] for p in predicted]  # each row labelled against v1
    extra = extra.assign(source_file="grown.csv", line=range(2, 2 + len(extra)), n_votes=1, agreement=1.0)
    grown = pd.concat([test, extra[test.columns]], ignore_index=True)
    grown.to_parquet(test_file)
    assert tokenize.main(["--params", str(params_file)]) == 0
    second_run = new_run(params)
    assert evaluate.main(["--params", str(params_file)]) == 0
    second = json.loads(params.paths.promotion.read_text())
    champion = MlflowClient().get_model_version_by_alias(params.mlflow.registered_model, CHAMPION).version
    return SimpleNamespace(params=params, params_file=params_file, first=first, second=second,
                           registered_f1=registered_f1, rows=len(grown), second_run=second_run,
                           champion_after_second=str(champion), tmp=tmp)


def test_the_champion_is_scored_again_on_the_grown_test_split(gated):
    from mlflow.tracking import MlflowClient

    params, second = gated.params, gated.second
    assert gated.first["version"] == "1" and gated.first["champion_status"] == "none"
    grown_f1 = json.loads(params.paths.metrics.read_text())["macro"]["f1"]
    # The old gate's comparison (v2 on the grown rows against v1's registered score) would keep v1.
    assert grown_f1 < gated.registered_f1
    c = second["comparison"]
    assert second["version"] == "2" and second["champion_before"] == "1" and second["champion_status"] == "scored"
    assert c["rows"] == gated.rows
    assert c["champion_when_registered"] == gated.registered_f1
    # v1, loaded from the registry and predicting on the grown rows, scores what the same weights score here.
    assert c["champion"] == pytest.approx(grown_f1, abs=1e-4) and c["new"] == pytest.approx(grown_f1, abs=1e-4)
    assert c["difference"] == 0.0 and c["interval_95"] == [0.0, 0.0] and c["resamples"] == 1000
    assert second["alias"] == CHAMPION and "on the same rows" in second["reason"]
    assert gated.champion_after_second == "2"
    run = MlflowClient().get_run(gated.second_run)
    assert run.data.metrics["champion_test_macro_f1"] == pytest.approx(grown_f1, abs=1e-4)
    assert run.data.metrics["promotion_rows"] == gated.rows
    assert run.data.tags["promotion.champion_version"] == "1"


def champion_version(params) -> str:
    from mlflow.tracking import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(params.mlflow.registered_model, CHAMPION).version)


def test_a_margin_refuses_a_model_that_is_only_as_good(gated, capsys, tmp_path):
    from stages import evaluate
    from tests.conftest import write_params

    params = gated.params
    raw = yaml.safe_load(gated.params_file.read_text())
    raw["mlflow"]["promotion_margin"] = 0.01
    champion = champion_version(params)
    new_run(params)
    # Every version here holds v1's weights: on the same rows the difference is 0, short of the margin.
    assert evaluate.main(["--params", str(write_params(tmp_path, raw))]) == 0
    decision = json.loads(params.paths.promotion.read_text())
    assert decision["version"] != champion and decision["alias"] == CHALLENGER
    assert "< margin 0.01" in decision["reason"] and f"champion stays v{champion}" in decision["reason"]
    assert "95% paired bootstrap interval [+0.0000, +0.0000]" in capsys.readouterr().out
    assert champion_version(params) == champion


def test_a_champion_whose_artifacts_are_gone_is_reported_and_replaced(gated, capsys):
    from urllib.parse import urlparse

    from mlflow.tracking import MlflowClient

    from stages import evaluate

    params = gated.params
    client = MlflowClient()
    name = params.mlflow.registered_model
    champion = client.get_model_version_by_alias(name, CHAMPION)
    old = str(champion.version)
    # The model's files (artifact `model_dir`, the MLmodel, the code) deleted, as a cleanup of the store would.
    logged = client.get_logged_model(champion.source.removeprefix("models:/"))
    artifacts = Path(urlparse(logged.artifact_location).path)
    assert (artifacts / "MLmodel").is_file()
    shutil.rmtree(artifacts)
    run_id = new_run(params)
    assert evaluate.main(["--params", str(gated.params_file)]) == 0
    decision = json.loads(params.paths.promotion.read_text())
    assert f"WARNING: champion v{old}" in capsys.readouterr().out
    assert decision["champion_status"] == "unloadable" and decision["alias"] == CHAMPION
    assert decision["reason"].startswith(f"champion v{old} could not be scored") and "replaced" in decision["reason"]
    new = decision["version"]
    assert champion_version(params) == new != old
    assert client.get_run(run_id).data.tags["promotion.champion_status"] == "unloadable"
    assert client.get_model_version(name, old).tags["promotion.unloadable"].startswith(f"replaced by v{new}")

    # evaluate again on the same training: its own version is the champion, nothing is scored, nothing changes.
    assert evaluate.main(["--params", str(gated.params_file)]) == 0
    again = json.loads(params.paths.promotion.read_text())
    assert again["version"] == new and again["alias"] == CHAMPION and again["champion_status"] == "self"
    assert again["reason"] == decision["reason"]
    assert champion_version(params) == new
