"""Versions of data and models: raw annotations as DVC-tracked data, a commit per retrain, rebuilding an old version,
and DVC experiments (temporary and queued) that log into the project's own MLflow store.

Each test builds a tiny project (tiny random BERT, git, DVC, a local folder as the DVC remote) and runs the real
commands; they are marked `slow`.

    .venv/bin/python -m pytest tests/test_versions.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.pipeline import watch_flow
from sft_pipeline import versions
from tests.conftest import ROOT, make_project, synthetic_rows, write_csv
from tests.test_flows import prefect_api  # noqa: F401 - the module's Prefect test server (autouse)
from tests.test_pipeline import dvc


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def lock_md5(lock_text: str, stage: str, path: str) -> str:
    lock = yaml.safe_load(lock_text)["stages"][stage]
    return next(o["md5"] for o in lock["outs"] + lock.get("deps", []) if o["path"] == path)


def mlflow_client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


@pytest.mark.slow
def test_each_retrain_is_a_commit_that_rebuilds_its_model_from_a_fresh_clone(tmp_path, tiny_bert, monkeypatch):
    root = make_project(tmp_path / "project", tiny_bert, synthetic_rows(30, seed=11))
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project")
    remote = tmp_path / "remote"
    dvc(root, "remote", "add", "-d", "local", str(remote))

    # Files dropped into the raw folder before any snapshot: the first flow run snapshots them, trains v1, commits.
    first = watch_flow(root=str(root))
    assert first["ran"] and first["commit"] and first["pushed"]
    v1 = first["commit"]
    assert git(root, "rev-parse", "HEAD") == v1
    committed = set(git(root, "show", "--name-only", "--format=", v1).splitlines())
    assert {"data/raw.dvc", "models/pretrained.dvc", "dvc.lock", "reports/metrics.json",
            "reports/test_predictions.csv", "reports/promotion.json"} <= committed  # params.yaml: as committed before
    assert not any(name.startswith(("data/raw/", "models/")) and not name.endswith((".dvc", ".gitignore"))
                   for name in committed), committed
    message = git(root, "log", "-1", "--format=%s", v1)
    assert message.startswith("retrain: 1 new (batch1.csv) in data/raw; ") and " v1 champion" in message
    client = mlflow_client(root)
    version = client.get_model_version("sft-classifier", "1")
    assert version.tags["pinned.commit"] == v1
    assert version.tags["data.raw_dvc_md5"] == versions.snapshot_md5(root, Path("data/raw"))
    assert client.get_run(version.run_id).data.tags["pinned.commit"] == v1

    # A new file, not snapshotted yet: dvc status says so; the flow snapshots it, retrains, registers v2, commits.
    write_csv(root / "data/raw/batch2.csv", synthetic_rows(12, seed=12, prefix="new"))
    status = json.loads(dvc(root, "status", "--json").stdout)
    assert "data/raw.dvc" in status and "clean" in status
    second = watch_flow(root=str(root))
    assert second["ran"] and second["commit"] not in (None, v1)
    assert git(root, "log", "-1", "--format=%s").startswith("retrain: 1 new (batch2.csv) in data/raw; sft-classifier v2 ")
    assert mlflow_client(root).get_model_version("sft-classifier", "2").tags["pinned.commit"] == second["commit"]

    # A raw file edited in place is a new version; the old bytes stay restorable from the DVC cache.
    old_bytes = (root / "data/raw/batch2.csv").read_bytes()
    (root / "data/raw/batch2.csv").write_bytes(old_bytes.replace(b"new", b"edited", 1))
    before = versions.snapshot_md5(root, Path("data/raw"))
    versions.snapshot(root, versions.load(root / "params.yaml").paths)
    assert versions.snapshot_md5(root, Path("data/raw")) != before
    git(root, "checkout", "-q", second["commit"], "--", "data/raw.dvc")
    dvc(root, "checkout", "-q", "data/raw.dvc")
    assert (root / "data/raw/batch2.csv").read_bytes() == old_bytes

    # v1 rebuilt in a fresh clone, from the commit its version names and the remote's data: same validated rows (by
    # DVC's hash), same test predictions, byte for byte.
    monkeypatch.chdir(root)
    assert versions.main(["rebuild", "1", "--into", str(tmp_path / "rebuilt")]) == 0
    rebuilt = tmp_path / "rebuilt"
    assert git(rebuilt, "rev-parse", "HEAD") == v1
    v1_lock = git(root, "show", f"{v1}:dvc.lock")
    assert lock_md5((rebuilt / "dvc.lock").read_text(), "validate", "data/interim/validated.parquet") == \
        lock_md5(v1_lock, "validate", "data/interim/validated.parquet")
    recorded = subprocess.run(["git", "show", f"{v1}:reports/test_predictions.csv"], cwd=root, check=True,
                              capture_output=True).stdout
    assert (rebuilt / "reports/test_predictions.csv").read_bytes() == recorded
    assert len(pd.read_csv(rebuilt / "reports/test_predictions.csv")) > 0


def committed_project(tmp_path: Path, tiny_bert: Path) -> Path:
    """A tiny project, its raw data and base model snapshotted, trained once (v1, champion), all committed."""
    root = make_project(tmp_path / "project", tiny_bert, synthetic_rows(40, seed=11), epochs=2, batch_size=8)
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")
    subprocess.run([sys.executable, "-m", "sft_pipeline.versions", "snapshot"], cwd=root, check=True,
                   capture_output=True)
    dvc(root, "repro")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    return root


def stop_workers(root: Path) -> None:
    """End the queue's workers, also one left idle: `dvc queue stop`, then their pid files."""
    import signal

    dvc(root, "queue", "stop", check=False)
    for pid_file in (root / ".dvc/tmp/exps/celery").glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        except (ValueError, OSError):
            pass


@pytest.mark.slow
def test_temporary_and_queued_experiments_log_to_the_project_and_decide_the_champion_in_turn(tmp_path, tiny_bert):
    root = committed_project(tmp_path, tiny_bert)
    # --temp: a copy under .dvc/tmp/exps/, deleted afterwards; its run and version are in the project's store.
    dvc(root, "exp", "run", "--temp", "-S", "train.learning_rate=0.02", "-n", "temp-lr")
    # Two queued, run by two workers at once.
    for rate, name in ((0.001, "lr-small"), (0.01, "lr-large")):
        dvc(root, "exp", "run", "--queue", "-S", f"train.learning_rate={rate}", "-n", name)
    # The workers run detached and keep any pipe of `dvc queue start` open while they live; a worker whose
    # monitor shut down early (a known DVC/celery race) lives on idle. So no captured output here, and the queue's
    # own status says when both are done.
    subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=root, check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "DVC_NO_ANALYTICS": "1"})
    deadline = time.monotonic() + 900
    try:
        while "Queued" in (status := dvc(root, "queue", "status").stdout) or "Running" in status:
            assert time.monotonic() < deadline, status
            time.sleep(2)
    finally:
        stop_workers(root)
    assert status.count("Success") == 2, status

    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    experiments = {exp["name"]: exp["revs"][0]["data"] for base in shown for exp in base.get("experiments") or []}
    assert set(experiments) == {"temp-lr", "lr-small", "lr-large"}
    for name, rate in (("temp-lr", 0.02), ("lr-small", 0.001), ("lr-large", 0.01)):
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == rate
        assert 0 <= data["metrics"]["reports/metrics.json"]["data"]["macro"]["f1"] <= 1

    # Every experiment's run is in the project's own store (the copies are gone), with its params and test metrics.
    client = mlflow_client(root)
    runs = client.search_runs([client.get_experiment_by_name("sft-pipeline").experiment_id])
    by_rate = {r.data.params["train.learning_rate"]: r for r in runs}
    assert set(by_rate) == {"0.005", "0.02", "0.001", "0.01"}
    assert all(r.info.status == "FINISHED" and "test_macro_f1" in r.data.metrics for r in runs)
    assert not list((root / ".dvc/tmp/exps").rglob("mlflow.db"))

    # The decisions were taken one after the other: each compared with the champion of the moment, and the alias is
    # where the last decision put it, by the paired rule.
    revs = [exp["revs"][0]["rev"] for base in shown for exp in base.get("experiments") or []]
    decisions = sorted((json.loads(git(root, "show", f"{rev}:reports/promotion.json")) for rev in revs),
                       key=lambda d: int(d["version"]))
    champion = "1"
    for decision in decisions:
        assert decision["champion_before"] == champion, decisions
        if decision["alias"] == "champion":
            champion = decision["version"]
    assert str(client.get_model_version_by_alias("sft-classifier", "champion").version) == champion
