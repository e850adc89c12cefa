"""The project's MLflow store follows the project: copied or moved after runs were made, it logs into itself, never
into the original, and its runs, versions, champion and UI keep working after the original is deleted. The run's
params are params.yaml's keys once each; the experiment opens in the UI's machine-learning view, on a small server."""

import contextlib
import json
import os
import shutil
import sqlite3
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sft_pipeline import tasks
from sft_pipeline.params import load
from sft_pipeline.tracking import (CHAMPION, EXPERIMENT_KIND, LOCATIONS, ROOT_TABLE, experiment_id, flatten,
                                   follow_project, use_store)
from stages import evaluate, split, tokenize, train
from tests.conftest import project_params, synthetic_rows, write_params
from tests.test_tracking import free_port, serve, stop


def relative_project(root: Path, model: Path) -> None:
    """A project whose params.yaml paths are relative (as shipped), validated rows split and tokenized."""
    raw = project_params(root, model, train__epochs=1)
    raw["paths"] = {key: None if value is None else os.path.relpath(value, root) for key, value in raw["paths"].items()}
    root.mkdir(parents=True, exist_ok=True)
    write_params(root, raw)
    with contextlib.chdir(root):
        params = load(Path("params.yaml"))
        params.paths.validated.parent.mkdir(parents=True)
        pd.DataFrame(synthetic_rows(40)).assign(source_file="a.csv", line=range(2, 122), n_votes=1,
                                                agreement=1.0).to_parquet(params.paths.validated)
        split.run(params)
        assert tokenize.main(["--params", "params.yaml"]) == 0


def train_and_evaluate(root: Path) -> str:
    with contextlib.chdir(root):
        for stage in (train, evaluate):
            assert stage.main(["--params", "params.yaml"]) == 0
        return json.loads(Path("reports/mlflow_run.json").read_text())["run_id"]


def locations(db: Path) -> list[str]:
    """Every artifact location the store holds (the columns follow_project rewrites)."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        return [value for table, column, where in LOCATIONS
                for (value,) in con.execute(f"SELECT {column} FROM {table} WHERE {where} AND {column} IS NOT NULL")]


def files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def open_store(root: Path) -> tuple:
    """In `root`: (params, client) on its store, as every stage opens it."""
    with contextlib.chdir(root):
        params = load(Path("params.yaml"))
        return params, MlflowClient(use_store(params.paths))


@pytest.fixture(scope="module")
def original(tmp_path_factory, tiny_bert):
    """One training evaluated, registered and champion, in a project with relative paths."""
    root = tmp_path_factory.mktemp("store") / "original"
    relative_project(root, tiny_bert)
    run_id = train_and_evaluate(root)
    return root, run_id


def test_a_new_store_records_its_root_and_the_view_of_its_experiment(original):
    root, run_id = original
    with contextlib.closing(sqlite3.connect(root / "mlflow.db")) as con:
        assert con.execute(f"SELECT value FROM {ROOT_TABLE} WHERE key = 'root'").fetchone() == (str(root.resolve()),)
    params, client = open_store(root)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    assert experiment.tags["mlflow.experimentKind"] == EXPERIMENT_KIND["mlflow.experimentKind"]
    # Every location the pipeline wrote lies under the project, except MLflow's own Default experiment (cwd's mlruns).
    written = [loc for loc in locations(root / "mlflow.db") if "/mlruns/0" not in loc]
    assert len(written) >= 5 and all(loc.startswith(root.resolve().as_uri() + "/") or loc.startswith("models:/")
                                     for loc in written), written


def test_the_run_logs_each_params_key_once_under_its_section(original):
    root, run_id = original
    params, client = open_store(root)
    logged = client.get_run(run_id).data.params
    ours = flatten(params.model_dump(mode="json", by_alias=True))
    assert set(ours) <= set(logged)
    extra = set(logged) - set(ours)
    assert extra and all(key.startswith("resolved.") for key in extra), extra  # what train resolved, nothing else
    assert "batch_size" not in logged and "max_length" not in logged and "task" not in logged
    # The served model's config is in the model, read by the pyfunc: it cleans and truncates as evaluate did.
    version = client.get_model_version_by_alias(params.mlflow.registered_model, CHAMPION)
    with contextlib.chdir(root):
        config = json.loads(Path(mlflow.artifacts.download_artifacts(
            f"models:/{params.mlflow.registered_model}/{version.version}/artifacts/serving_config.json")).read_text())
    task = tasks.get(params)
    assert config == {**task.serving_config(params), "task": task.name, "trust_remote_code": False,
                      "strategy": "full"}


def test_an_experiment_made_before_gets_the_view_unless_the_user_chose_one(original, tmp_path):
    root, _ = original
    shutil.copytree(root, tmp_path / "p")
    params, client = open_store(tmp_path / "p")
    experiment = client.get_experiment_by_name(params.mlflow.experiment).experiment_id
    client.delete_experiment_tag(experiment, "mlflow.experimentKind")
    with contextlib.chdir(tmp_path / "p"):
        assert experiment_id(params.paths, params.mlflow) == experiment
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(experiment, "mlflow.experimentKind", "genai_development")
    with contextlib.chdir(tmp_path / "p"):
        experiment_id(params.paths, params.mlflow)
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "genai_development"


def test_a_copy_logs_into_itself_and_leaves_the_original_as_it_was(original, tmp_path, capsys):
    root, first_run = original
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    before = files(root)
    raw = yaml.safe_load((copy / "params.yaml").read_text())
    raw["train"]["seed"] = 43  # another training, not a resume of the copied checkpoints
    write_params(copy, raw)
    capsys.readouterr()
    new_run = train_and_evaluate(copy)
    assert new_run != first_run
    assert f"was made in {root.resolve()}" in capsys.readouterr().out
    assert files(root) == before  # not one file of the original written, added or removed

    params, client = open_store(copy)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    runs = {r.info.run_id: r.info.artifact_uri for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {first_run, new_run}
    assert all(uri.startswith((copy.resolve() / "mlartifacts").as_uri() + "/") for uri in runs.values())
    assert not any(str(root.resolve()) in loc for loc in locations(copy / "mlflow.db"))
    versions = client.search_model_versions(f"name='{params.mlflow.registered_model}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert all(client.get_model_version_download_uri(v.name, v.version).startswith(
        (copy.resolve() / "mlartifacts").as_uri() + "/") for v in versions)
    assert {a.path for a in client.list_artifacts(new_run, "reports")} >= {"reports/metrics.json"}

    # The original still works, in its own folder, with its one run.
    params, client = open_store(root)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [first_run]
    assert all(loc.startswith(root.resolve().as_uri()) or loc.startswith("models:/")
               for loc in locations(root / "mlflow.db") if "/mlruns/0" not in loc)
    assert files(root) == before


def test_a_moved_project_loads_its_champion_after_the_original_is_deleted(original, tmp_path, capsys):
    root, _ = original
    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "moved"
    shutil.copytree(root, first)
    open_store(first)  # the copy is used once where it was made
    moved.parent.mkdir()
    shutil.move(first, moved)
    assert not first.exists()

    capsys.readouterr()
    params, client = open_store(moved)
    assert f"was made in {first.resolve()}" in capsys.readouterr().out
    assert not any(str(first.resolve()) in loc for loc in locations(moved / "mlflow.db"))
    with contextlib.chdir(moved):
        model = mlflow.pyfunc.load_model(f"models:/{params.mlflow.registered_model}@{CHAMPION}")
        test = pd.read_parquet(params.paths.split_dir / "test.parquet")
        expected = pd.read_csv(params.paths.predictions)["predicted"].tolist()
    assert model.predict(pd.DataFrame({"text": test["text"]}))["label"].tolist() == expected
    assert follow_project(params.paths, moved) is None  # opened again where it is: nothing to move


def test_a_store_made_before_the_root_was_recorded_follows_too(original, tmp_path):
    root, first_run = original
    shutil.copytree(root, tmp_path / "old")
    with contextlib.closing(sqlite3.connect(tmp_path / "old" / "mlflow.db")) as con:
        con.execute(f"DROP TABLE {ROOT_TABLE}")
        con.commit()
    params, client = open_store(tmp_path / "old")
    assert client.get_run(first_run).info.artifact_uri.startswith((tmp_path / "old").resolve().as_uri() + "/")
    assert not any(str(root.resolve()) in loc for loc in locations(tmp_path / "old" / "mlflow.db"))


def process_tree(pid: int) -> list[str]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            found.append((Path("/proc") / str(current) / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
        todo += children.get(current, [])
    return found


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process tree from /proc")
def test_the_ui_of_a_moved_project_is_one_small_server_over_its_own_artifacts(original, tmp_path):
    root, first_run = original
    moved = tmp_path / "moved"
    shutil.copytree(root, tmp_path / "gone")
    open_store(tmp_path / "gone")
    shutil.move(tmp_path / "gone", moved)
    port = free_port()
    server = serve(moved, "mlflow-ui", port, "/health")
    base = f"http://127.0.0.1:{port}"
    try:
        tree = process_tree(server.pid)
        assert len(tree) == 2 and "mlflow ui" in tree[0] and "--workers 1" in tree[0], tree  # the launcher, uvicorn
        assert not any("huey" in p or "_job_runner" in p for p in tree), tree
        listed = get(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_uuid={first_run}&path=reports")
        assert "reports/metrics.json" in {f["path"] for f in listed["files"]}
        with urllib.request.urlopen(f"{base}/get-artifact?path=reports/metrics.json&run_uuid={first_run}") as r:
            assert json.loads(r.read()) == json.loads((moved / "reports/metrics.json").read_text())
        params = load(moved / "params.yaml")
        version = get(f"{base}/ajax-api/2.0/mlflow/model-versions/get-download-uri?name="
                      f"{params.mlflow.registered_model}&version=1")
        assert version["artifact_uri"].startswith((moved.resolve() / "mlartifacts").as_uri() + "/"), version
        with urllib.request.urlopen(f"{base}/model-versions/get-artifact?path=MLmodel&name="
                                    f"{params.mlflow.registered_model}&version=1") as r:
            assert yaml.safe_load(r.read())["flavors"]["python_function"]["artifacts"]["serving_config"]

        # With MLFLOW_TRACKING_URI naming a server, a new experiment's artifacts are where the server puts them.
        elsewhere = tmp_path / "client"
        elsewhere.mkdir()
        with contextlib.chdir(elsewhere), pytest.MonkeyPatch.context() as env:
            env.setenv("MLFLOW_TRACKING_URI", base)
            made = experiment_id(params.paths, params.mlflow.model_copy(update={"experiment": "remote"}))
            location = MlflowClient(base).get_experiment(made).artifact_location
        assert location.startswith((moved.resolve() / "mlartifacts").as_uri()), location
        assert not (elsewhere / "mlartifacts").exists() and not (elsewhere / "mlflow.db").exists()
    finally:
        stop(server)
    out = server.stdout.read()
    assert f"was made in {(tmp_path / 'gone').resolve()}" in out
    _, client = open_store(moved)
    experiment = client.get_experiment_by_name(params.mlflow.experiment).experiment_id
    assert f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning" in out, out
