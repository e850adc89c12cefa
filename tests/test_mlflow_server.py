"""A team's MLflow tracking server on PostgreSQL: the pipeline's stages log to it through MLFLOW_TRACKING_URI.

    .venv/bin/python -m pytest tests/test_mlflow_server.py

A throwaway PostgreSQL cluster (initdb in a temporary folder, the server on a free port of 127.0.0.1), `mlflow server`
on a database of it with its own artifact root, then tokenize, train and evaluate as `dvc repro` runs them, twice:
the second evaluate loads the champion back from the server to score it (README "A team's tracking server").

PostgreSQL: Debian's package (`apt-get install postgresql`; .ci/run installs it), whose programs are in
/usr/lib/postgresql/<version>/bin, or initdb on PATH. Without it the test skips with that reason, except under
CI=true, where it fails. PostgreSQL refuses to run as root: as root, its server runs as `nobody`.
"""

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import psycopg2
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sft_pipeline.tracking import CHAMPION
from stages import evaluate, tokenize, train
from tests.conftest import prepared_project
from tests.test_tracking import free_port, stop

USER, PASSWORD, DATABASE = "mlflow", "test-only-password", "mlflow"


def postgres_bin() -> Path | None:
    """The folder of initdb and postgres: Debian's newest /usr/lib/postgresql/<version>/bin, else PATH's."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else -1)
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def require_postgres() -> Path:
    found = postgres_bin()
    if found is None or not (found / "postgres").is_file():
        reason = "no PostgreSQL: `apt-get install postgresql` (Debian's package; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI must run the team's tracking server")
        pytest.skip(reason)
    return found


def unprivileged() -> tuple[dict, tuple[int, int] | None]:
    """Popen arguments that run PostgreSQL's programs as `nobody` when this is root, and that (uid, gid)."""
    if os.geteuid() != 0:
        return {}, None
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}, (nobody.pw_uid, nobody.pw_gid)


def connect(port: int, database: str = DATABASE):
    return psycopg2.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname=database,
                            connect_timeout=5)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster of its own with a password-protected superuser and an empty database; yields its port."""
    bin_dir = require_postgres()
    as_user, owner = unprivileged()
    # Not under pytest's tmp_path: root's is closed to other users (0700), and `nobody` must reach the cluster.
    home = Path(tempfile.mkdtemp(prefix="sft-postgres-"))
    (home / "password").write_text(PASSWORD)
    if owner:
        for path in (home, home / "password"):
            os.chown(path, *owner)
    subprocess.run([bin_dir / "initdb", "-D", home / "data", "-U", USER, "--pwfile", home / "password",
                    "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C"],
                   cwd=home, check=True, capture_output=True, **as_user)
    port = free_port()
    log = (home / "postgres.log").open("w")
    # TCP on loopback only, its socket in its own folder (not /var/run/postgresql); fsync off: a cluster thrown away
    # at the end need not survive a power cut, and MLflow's schema migrations run several times faster without it.
    server = subprocess.Popen([bin_dir / "postgres", "-D", home / "data", "-p", str(port), "-k", home,
                               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_user)
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                raise AssertionError(f"postgres exited ({server.returncode}):\n{(home / 'postgres.log').read_text()}")
            try:
                connect(port, "postgres").close()
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"postgres did not answer in 30 s:\n{(home / 'postgres.log').read_text()}")
                time.sleep(0.2)
        # As the README does it: createdb, a client, with the password in the environment.
        subprocess.run([bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE],
                       env={**os.environ, "PGPASSWORD": PASSWORD}, check=True, capture_output=True)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGINT)  # postgres's fast shutdown: ends the sessions, then stops
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory):
    """`mlflow server` on the database, artifacts proxied to a folder of its own; yields (URL, artifact folder)."""
    artifacts = tmp_path_factory.mktemp("server-artifacts")
    log_file = tmp_path_factory.mktemp("server-log") / "mlflow-server.log"
    port = free_port()
    # As the README starts it: the password from libpq's environment, not in the URI (nor in `ps` and the logs);
    # no job runner (GenAI scorers, unused here; flows/serve.py).
    env = {**os.environ, "PGPASSWORD": PASSWORD, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"postgresql://{USER}@127.0.0.1:{postgres}/{DATABASE}",
               "--artifacts-destination", str(artifacts), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log_file.open("w") as log:
        # Its own session, stopped with its process group (the launcher and uvicorn).
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90  # the first start creates MLflow's schema in the database
        while True:
            if server.poll() is not None:
                raise AssertionError(f"mlflow server exited ({server.returncode}):\n{log_file.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    assert answer.read() == b"OK"
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"mlflow server did not answer /health:\n{log_file.read_text()[-5000:]}")
                time.sleep(0.5)
        yield url, artifacts
    finally:
        stop(server)


def test_the_pipeline_logs_to_a_team_server_on_postgresql(tracking_server, postgres, tiny_bert, tmp_path):
    url, artifacts = tracking_server
    params, params_file = prepared_project(tmp_path, tiny_bert)
    trainings = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        patch.setenv("MLFLOW_TRACKING_URI", url)
        for seed in (42, 7):  # a second training (another seed) registers v2, gated against v1 from the server
            raw = yaml.safe_load(params_file.read_text())
            raw["train"]["seed"] = seed
            params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
            stages = (tokenize, train, evaluate) if seed == 42 else (train, evaluate)
            for stage in stages:
                assert stage.main(["--params", str(params_file)]) == 0
            trainings.append({
                "seed": seed, "run_id": json.loads(params.paths.mlflow_run.read_text())["run_id"],
                "metrics": params.paths.metrics.read_bytes(),
                "steps": pd.read_csv(params.paths.train_history)["step"].tolist(),
                "predicted": pd.read_csv(params.paths.predictions)["predicted"].tolist(),
                "promotion": json.loads(params.paths.promotion.read_text())})
        assert json.loads(params.paths.mlflow_run.read_text())["tracking_uri"] == url

        client = MlflowClient(url)
        experiment = client.get_experiment_by_name(params.mlflow.experiment)
        # Made without a location of ours: the server's artifact store holds the artifacts, the project none.
        assert experiment.artifact_location.startswith("mlflow-artifacts:/"), experiment.artifact_location
        assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
        runs = client.search_runs([experiment.experiment_id])
        assert {r.info.run_id for r in runs} == {t["run_id"] for t in trainings}

        for training in trainings:
            run_id = training["run_id"]
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED"
            assert run.data.params["train.seed"] == str(training["seed"])
            assert run.data.tags["pipeline.stage"] == "train"
            metrics = json.loads(training["metrics"])
            assert run.data.metrics["test_macro_f1"] == metrics["macro"]["f1"]
            assert run.data.metrics["test_accuracy"] == metrics["accuracy"]
            assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == training["steps"]
            # The report, downloaded through the server, is the file evaluate wrote; on disk it is in the
            # server's artifact root, under the run.
            downloaded = Path(client.download_artifacts(run_id, "reports/metrics.json", str(tmp_path)))
            assert downloaded.read_bytes() == training["metrics"]
            stored = [p for p in artifacts.rglob("metrics.json") if run_id in p.parts]
            assert [p.read_bytes() for p in stored] == [training["metrics"]], stored

        # The registry and the gate's aliases live on the server too.
        name = params.mlflow.registered_model
        first, second = (t["promotion"] for t in trainings)
        assert (first["version"], first["alias"], first["champion_status"]) == ("1", CHAMPION, "none")
        # The second evaluate loaded champion v1 from the server and scored it on the same test rows.
        assert (second["version"], second["champion_status"], second["champion_before"]) == ("2", "scored", "1")
        assert second["comparison"]["rows"] == len(trainings[1]["predicted"])
        assert str(client.get_model_version_by_alias(name, second["alias"]).version) == "2"
        champion = client.get_model_version_by_alias(name, CHAMPION)
        assert str(champion.version) == ("2" if second["alias"] == CHAMPION else "1")
        assert champion.tags["promotion.decision"] == CHAMPION
        by_version = {t["promotion"]["version"]: t for t in trainings}
        assert champion.run_id == by_version[str(champion.version)]["run_id"]

        # The champion, as a client of the team loads it, answers what evaluate saw.
        test = pd.read_parquet(params.paths.split_dir / "test.parquet")
        mlflow.set_tracking_uri(url)
        served = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
        assert served.predict(test["text"].tolist())["label"].tolist() == by_version[str(champion.version)]["predicted"]

    # What the server holds is rows of PostgreSQL.
    with contextlib.closing(connect(postgres)) as con, con.cursor() as cur:
        cur.execute("SELECT run_uuid, status FROM runs")
        assert set(cur.fetchall()) == {(t["run_id"], "FINISHED") for t in trainings}
        cur.execute("SELECT run_uuid, count(*) FROM metrics WHERE key = 'train_loss' GROUP BY run_uuid")
        assert dict(cur.fetchall()) == {t["run_id"]: len(t["steps"]) for t in trainings}
        cur.execute("SELECT version, run_id FROM model_versions WHERE name = %s", (name,))
        assert dict(cur.fetchall()) == {int(t["promotion"]["version"]): t["run_id"] for t in trainings}
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (name,))
        assert dict(cur.fetchall())[CHAMPION] == int(champion.version)
