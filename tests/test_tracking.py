"""MLflow: one run per training with params, history, tags and artifacts; registry, promotion gate, pyfunc, servers."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from stages import evaluate, tokenize, train
from sft_pipeline.params import Mlflow
from sft_pipeline.tracking import (CHALLENGER, CHAMPION, Comparison, Gate, flatten, git_tags, promote,
                                   promotion_decision, use_store)
from tests.conftest import ROOT, prepared_project


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


def git(root: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args]
    return subprocess.run(command, cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_git_tags_name_the_commit_and_whether_tracked_files_differ_from_it(tmp_path):
    repo, plain = tmp_path / "repo", tmp_path / "plain"
    (repo / "stages").mkdir(parents=True)
    plain.mkdir()
    git(repo, "init", "-q")
    (repo / "params.yaml").write_text("train: {epochs: 3}\n")
    (repo / "stages" / "train.py").write_text("print('train')\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "first")
    first = git(repo, "rev-parse", "HEAD")
    assert len(first) == 40
    assert git_tags(repo) == {"git.commit": first, "git.dirty": "false"}

    # What every repro writes (dvc.lock) and files git does not track leave the tree clean.
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "notes.txt").write_text("not tracked")
    assert git_tags(repo) == {"git.commit": first, "git.dirty": "false"}
    # An edit of tracked code or params makes it dirty, wherever the file is.
    (repo / "stages" / "train.py").write_text("print('edited')\n")
    assert git_tags(repo) == {"git.commit": first, "git.dirty": "true"}
    git(repo, "commit", "-qam", "second")
    second = git(repo, "rev-parse", "HEAD")
    assert second != first and git_tags(repo) == {"git.commit": second, "git.dirty": "false"}
    (repo / "params.yaml").write_text("train: {epochs: 4}\n")
    assert git_tags(repo) == {"git.commit": second, "git.dirty": "true"}

    # Outside a repository there is nothing to name: said so, not guessed.
    assert git_tags(plain) == {"git.commit": "unknown", "git.dirty": "unknown"}


@pytest.fixture(scope="module")
def tracked_root(tmp_path_factory) -> Path:
    """The tracked project's folder: a git repository with an edit of a tracked file after its commit."""
    root = tmp_path_factory.mktemp("tracked")
    git(root, "init", "-q")
    (root / "notes.md").write_text("first\n")
    git(root, "add", "notes.md")
    git(root, "commit", "-qm", "notes")
    (root / "notes.md").write_text("edited after the commit\n")
    return root


@pytest.fixture(scope="module")
def tracked(tracked_root, tiny_bert):
    """Tokenize, train and evaluate through each stage's main, from the project folder as `dvc repro` runs them: one
    MLflow run in a temporary SQLite store."""
    params, params_file = prepared_project(tracked_root, tiny_bert, train__epochs=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tracked_root)
        for stage in (tokenize, train, evaluate):
            assert stage.main(["--params", str(params_file)]) == 0
    uri = use_store(params.paths)
    run_id = json.loads(params.paths.mlflow_run.read_text())["run_id"]
    return params, MlflowClient(uri), run_id, uri


def test_one_run_holds_params_history_tags_and_artifacts(tracked, tracked_root):
    params, client, run_id, _ = tracked
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # no Trainer or autolog run beside ours
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3.0" and run.data.params["model.name"] == params.model.name
    commit = git(tracked_root, "rev-parse", "HEAD")
    assert (run.data.tags["git.commit"], run.data.tags["git.dirty"]) == (commit, "true")  # notes.md was edited
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


def serve(root: Path, service: str, port: int, answers: str, seconds: float = 180) -> subprocess.Popen:
    """`python -m flows.serve <service>` (what `make ui` and `make serve-model` run), once `answers` answers."""
    # Its own session: the server it starts is its child, and stop() ends both.
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", service, "--root", str(root), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"flows.serve {service} exited ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{answers}", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise AssertionError(f"flows.serve {service} did not answer {answers} in {seconds} s:\n{proc.stdout.read()}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_the_mlflow_ui_shows_the_projects_runs_and_model(tracked, tracked_root):
    params, client, run_id, _ = tracked
    port = free_port()
    server = serve(tracked_root, "mlflow-ui", port, "/health")
    try:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        experiment_id = client.get_experiment_by_name(params.mlflow.experiment).experiment_id
        found = post(f"{api}/runs/search", {"experiment_ids": [experiment_id]})
        # Every run of the project's store, whatever other tests added to it: the UI reads that store, not another.
        listed = {r["info"]["run_id"] for r in found["runs"]}
        assert run_id in listed and listed == {r.info.run_id for r in client.search_runs([experiment_id])}
        with urllib.request.urlopen(f"{api}/registered-models/alias?name={params.mlflow.registered_model}"
                                    f"&alias={CHAMPION}", timeout=30) as response:
            assert json.loads(response.read())["model_version"]["run_id"] == run_id
    finally:
        stop(server)


def test_model_server_answers_a_post_of_texts(tracked, tracked_root):
    params, _, _, _ = tracked
    port = free_port()
    server = serve(tracked_root, "model", port, "/ping")
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
