"""MLflow: one run per training with params, history, tags and artifacts; registry, promotion gate, pyfunc, servers."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from stages import evaluate, tokenize, train
from sft_pipeline.params import Mlflow
from sft_pipeline.tracking import (CHALLENGER, CHAMPION, Comparison, Gate, flatten, promote, promotion_decision,
                                   use_store)
from tests.conftest import prepared_project


def test_the_store_choice_does_not_leak_into_the_environment(tmp_path):
    import os

    from sft_pipeline.params import parse
    from tests.conftest import project_params

    paths = parse(project_params(tmp_path)).paths
    assert use_store(paths) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_flatten_params():
    assert flatten({"train": {"epochs": 3, "device": "auto"}, "labels": {"a": ["x", "y"]}, "rev": None}) == {
        "train.epochs": "3", "train.device": "auto", "labels.a": '["x", "y"]', "rev": "null"}


@pytest.mark.parametrize(
    "new, champion, margin, alias",
    [(0.9, None, 0.0, CHAMPION), (0.9, 0.9, 0.0, CHAMPION), (0.91, 0.9, 0.02, CHALLENGER), (0.8, 0.9, 0.0, CHALLENGER)],
)
def test_promotion_decision(new, champion, margin, alias):
    got, reason = promotion_decision(new, champion, None if champion is None else "1",
                                     Mlflow(promotion_margin=margin))
    assert got == alias
    assert f"{new:.4f}" in reason


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_bert):
    """Tokenize, train and evaluate through each stage's main: one MLflow run in a temporary SQLite store."""
    tmp = tmp_path_factory.mktemp("tracked")
    params, params_file = prepared_project(tmp, tiny_bert, train__epochs=3)
    for stage in (tokenize, train, evaluate):
        assert stage.main(["--params", str(params_file)]) == 0
    uri = use_store(params.paths)
    run_id = json.loads(params.paths.mlflow_run.read_text())["run_id"]
    return params, MlflowClient(uri), run_id, uri


def test_one_run_holds_params_history_tags_and_artifacts(tracked):
    params, client, run_id, _ = tracked
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # no Trainer or autolog run beside ours
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3.0" and run.data.params["model.name"] == params.model.name
    assert run.data.tags["git.dirty"] in ("true", "false", "unknown") and run.data.tags["git.commit"]
    rows = json.loads(params.paths.split_report.read_text())["rows"]
    assert run.data.tags["data.rows.train"] == str(rows["train"])

    steps = pd.read_csv(params.paths.train_history)
    loss = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in loss] == steps["step"].tolist()
    assert len(client.get_metric_history(run_id, "val_macro_f1")) == 3

    metrics = json.loads(params.paths.metrics.read_text())
    assert run.data.metrics["test_macro_f1"] == metrics["macro"]["f1"]
    assert run.data.metrics["test_accuracy"] == metrics["accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "reports")}
    assert {"confusion_matrix.png", "reports/metrics.json", "reports/split.json",
            "reports/tokenize.json"} <= artifacts


def test_first_version_becomes_champion(tracked):
    params, client, run_id, _ = tracked
    decision = json.loads(params.paths.promotion.read_text())
    assert decision["alias"] == CHAMPION and decision["version"] == "1"
    assert decision["reason"].startswith("no champion yet")
    champion = client.get_model_version_by_alias(params.mlflow.registered_model, CHAMPION)
    assert str(champion.version) == "1" and champion.run_id == run_id
    assert client.get_run(run_id).data.tags["promotion.decision"] == CHAMPION


def test_promotion_gate_refuses_a_worse_model(tracked):
    # The gate decides on paired scores (tests/test_gate.py scores a real champion); here: the registry's side.
    params, client, run_id, _ = tracked
    name = params.mlflow.registered_model
    first = client.get_model_version(name, "1")

    def candidate(difference: float) -> tuple[str, str, Gate]:
        run = client.create_run(client.get_run(run_id).info.experiment_id)
        version = client.create_model_version(name, first.source, run.info.run_id)
        comparison = Comparison("test_macro_f1", 0.6 + difference, 0.6, difference - 0.1, difference + 0.1, 24,
                                1000, 0)
        return run.info.run_id, version.version, Gate("scored", comparison.new, "1", comparison)

    worse_run, worse, gate = candidate(-0.05)
    decision = promote(worse_run, worse, params.mlflow, gate)
    assert decision["alias"] == CHALLENGER and "champion stays v1" in decision["reason"]
    assert decision["comparison"]["champion"] == 0.6 and decision["comparison"]["rows"] == 24
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == str(worse)
    assert client.get_run(worse_run).data.tags["promotion.reason"] == decision["reason"]
    assert client.get_run(worse_run).data.metrics["champion_test_macro_f1"] == 0.6

    better_run, better, gate = candidate(0.01)
    assert promote(better_run, better, params.mlflow, gate)["alias"] == CHAMPION
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == str(better)
    client.set_registered_model_alias(name, CHAMPION, "1")  # leave the real model as champion for the next tests


def test_pyfunc_predicts_the_evaluated_labels_from_raw_texts(tracked):
    params, _, _, _ = tracked
    model = mlflow.pyfunc.load_model(f"models:/{params.mlflow.registered_model}@{CHAMPION}")
    test = pd.read_parquet(params.paths.split_dir / "test.parquet")
    expected = pd.read_csv(params.paths.predictions)["predicted"].tolist()
    out = model.predict(pd.DataFrame({"text": test["text"]}))
    assert list(out.columns) == ["label", "score"]
    assert out["label"].tolist() == expected
    assert out["score"].between(0, 1).all()
    as_list = model.predict(test["text"].head(3).tolist())
    assert as_list["label"].tolist() == expected[:3]
    # Raw text with markup is cleaned as the training data was: same answer as its clean form.
    raw = model.predict(pd.DataFrame({"text": [f"<p>{test['text'].iloc[0]}</p>"]}))
    assert raw["label"].iloc[0] == expected[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], url: str, env=None, seconds: float = 180) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"{url} did not answer in {seconds} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_tracking_server_rest_api_lists_the_runs(tracked):
    params, client, run_id, uri = tracked
    port = free_port()
    server = start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                    "--port", str(port), "--workers", "1"], f"http://127.0.0.1:{port}/health")
    try:
        experiment_id = client.get_experiment_by_name(params.mlflow.experiment).experiment_id
        found = post(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
        assert run_id in {r["info"]["run_id"] for r in found["runs"]}
    finally:
        stop(server)


def test_model_server_answers_a_post_of_texts(tracked):
    import os

    params, _, _, uri = tracked
    port = free_port()
    # mlflow starts the scoring server as `uvicorn` from PATH: the venv's bin must come first, as `make` arranges.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    server = start([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                    f"models:/{params.mlflow.registered_model}@{CHAMPION}", "--env-manager", "local",
                    "--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}/ping", env=env)
    try:
        test = pd.read_parquet(params.paths.split_dir / "test.parquet").head(5)
        expected = pd.read_csv(params.paths.predictions)["predicted"].head(5).tolist()
        answer = post(f"http://127.0.0.1:{port}/invocations",
                      {"dataframe_records": [{"text": t} for t in test["text"]]})
        assert [p["label"] for p in answer["predictions"]] == expected
        plain = post(f"http://127.0.0.1:{port}/invocations", {"inputs": test["text"].tolist()})
        assert [p["label"] for p in plain["predictions"]] == expected
    finally:
        stop(server)
