"""Prefect flows under a test harness: DVC's stage order, skipped and failed stages, the watch flow and the lock."""

import json
import re
from pathlib import Path

import pytest
import yaml

from flows.pipeline import SKIPPED, acquire, pipeline_flow, raw_fingerprint, stage_order, watch_flow
from tests.conftest import DEFAULT_PARAMS, ROOT, make_project, synthetic_rows, write_csv


@pytest.fixture(scope="module", autouse=True)
def prefect_api(tmp_path_factory):
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    # The first start migrates a fresh SQLite database: give it time on a slow machine.
    with prefect_test_harness(server_startup_timeout=180):
        yield


def task_states(flow_state) -> dict[str, str]:
    """{task run name: state name} for the task runs of a finished flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def fetch():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100)
            return {run.name: run.state.name for run in runs}

    import asyncio

    return asyncio.run(fetch())


def test_stage_order_comes_from_dvc_not_from_the_file_order(tmp_path):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    spec["stages"] = dict(reversed(list(spec["stages"].items())))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "params.yaml").write_text((DEFAULT_PARAMS).read_text())
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    assert list(spec["stages"])[0] == "evaluate"
    assert stage_order(tmp_path) == ["clean", "validate", "split", "tokenize", "train", "evaluate"]


def test_raw_fingerprint_sees_content_not_mtime(tmp_path):
    write_csv(tmp_path / "a.csv", synthetic_rows(2))
    first = raw_fingerprint(tmp_path)
    (tmp_path / "a.csv").touch()
    (tmp_path / ".hidden").write_text("ignored")
    assert raw_fingerprint(tmp_path) == first
    write_csv(tmp_path / "sub" / "b.csv", synthetic_rows(1))
    assert raw_fingerprint(tmp_path)["files"] == 2 != first["files"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert) -> Path:
    return make_project(tmp_path_factory.mktemp("flow-project"), tiny_bert)


@pytest.fixture(scope="module")
def watched(project) -> dict:
    """Three watch runs: on the first data, again with nothing new, then after a new annotation file; each test that
    needs a project the pipeline has run on takes it from here, so none depends on another test having run first."""
    first = watch_flow(root=str(project), return_state=True)
    state_after_first = json.loads((project / "reports/watch_state.json").read_text())
    run_after_first = json.loads((project / "reports/mlflow_run.json").read_text())["run_id"]
    again = watch_flow(root=str(project), return_state=True)
    write_csv(project / "data/raw/batch2.csv", synthetic_rows(6, seed=42, prefix="new"))
    third = watch_flow(root=str(project), return_state=True)
    return {"root": project, "first": first, "state_after_first": state_after_first,
            "run_after_first": run_after_first, "again": again, "third": third}


def test_watch_flow_runs_once_then_skips_then_runs_on_a_new_file(watched):
    first, project = watched["first"], watched["root"]
    assert first.is_completed() and first.name != SKIPPED
    assert set(task_states(first).values()) == {"Completed"}
    state = watched["state_after_first"]
    assert state["files"] == 1 and set(state["stages"]) == {"clean", "validate", "split", "tokenize", "train",
                                                              "evaluate"}

    again = watched["again"]
    assert again.name == SKIPPED and "no new or changed annotations" in again.message
    assert task_states(again) == {}

    third = watched["third"]
    assert third.is_completed() and third.name != SKIPPED
    assert third.result()["stages"]["clean"] == "ran"
    assert json.loads((project / "reports/watch_state.json").read_text())["files"] == 2
    assert json.loads((project / "reports/mlflow_run.json").read_text())["run_id"] != watched["run_after_first"]
    assert json.loads((project / "reports/promotion.json").read_text())["version"] == "2"


def test_pipeline_flow_shows_up_to_date_stages_as_skipped(watched):
    state = pipeline_flow(root=str(watched["root"]), return_state=True)
    assert state.is_completed()
    assert state.result() == {stage: SKIPPED for stage in
                              ["clean", "validate", "split", "tokenize", "train", "evaluate"]}
    assert set(task_states(state).values()) == {SKIPPED}


def test_a_second_run_while_one_holds_the_lock_is_skipped_with_a_reason(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    held = acquire(project / params["paths"]["pipeline_lock"], 0)
    try:
        state = pipeline_flow(root=str(project), lock_timeout_s=0.5, return_state=True)
    finally:
        held.release()
    assert state.name == SKIPPED and "another pipeline run holds" in state.message
    assert task_states(state) == {}


def test_a_failing_stage_fails_the_flow_with_its_message(tmp_path, tiny_bert):
    rows = [r for r in synthetic_rows(30, seed=5) if r["label"] != "tech"] + \
           [r for r in synthetic_rows(30, seed=5) if r["label"] == "tech"][:3]
    root = make_project(tmp_path, tiny_bert, rows)
    state = pipeline_flow(root=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="class 'tech' has 3 rows"):
        state.result()
    tasks = task_states(state)
    assert tasks["clean"] == "Completed" and tasks["validate"] == "Failed"
    assert "train" not in tasks and "evaluate" not in tasks


def served_project(tmp_path: Path) -> Path:
    """A folder holding the project's params.yaml: what flows/serve.py reads to build the deployment."""
    (tmp_path / "params.yaml").write_text(DEFAULT_PARAMS.read_text())
    return tmp_path


def test_the_served_deployment_runs_one_at_a_time_on_the_cron_of_params_yaml(tmp_path):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows import serve
    from sft_pipeline.params import load

    root = served_project(tmp_path)
    deployment = serve.deployment(root)
    assert (deployment.flow_name, deployment.name) == ("watch-annotations", "watch-annotations")
    assert deployment.parameters == {"root": str(root)}
    assert [s.schedule.cron for s in deployment.schedules] == [load(DEFAULT_PARAMS).watch.cron]
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW


def test_the_cron_of_params_yaml_schedules_runs_of_the_deployment(tmp_path):
    """The server path that puts scheduled runs in the database (it broke with SQLAlchemy 2.1)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    from flows import serve

    deployment_id = serve.deployment(served_project(tmp_path)).apply()

    async def scheduled_runs():
        async with get_client() as client:
            response = await client._client.post(f"/deployments/{deployment_id}/schedule", json={})
            response.raise_for_status()
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=50)

    runs = asyncio.run(scheduled_runs())
    assert len(runs) >= 2
    assert {run.state.name for run in runs} == {"Scheduled"}
    gaps = {(b.expected_start_time - a.expected_start_time).total_seconds() for a, b in zip(runs, runs[1:])}
    assert gaps == {600.0}  # watch.cron is every 10 minutes


def test_a_run_due_while_one_runs_is_cancelled_by_the_deployments_limit(tmp_path):
    """CANCEL_NEW as the Prefect server enforces it: the states a runner proposes for each run go through the server's
    orchestration rules, which hold one slot of the deployment's concurrency limit per run (our pipeline lock plays no
    part here)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Pending, Running

    from flows import serve

    deployment_id = serve.deployment(served_project(tmp_path)).apply()

    async def propose(client, run, state):
        result = await client.set_flow_run_state(run.id, state)
        return result.status.value, result.state.type.value, result.state.message

    async def scenario():
        async with get_client() as client:
            first, second, third = [await client.create_flow_run_from_deployment(deployment_id) for _ in range(3)]
            outcomes = {"first pending": await propose(client, first, Pending()),
                        "first running": await propose(client, first, Running()),
                        "second while first runs": await propose(client, second, Pending())}
            outcomes["first completed"] = await propose(client, first, Completed())
            outcomes["third after first"] = await propose(client, third, Pending())
            outcomes["second now"] = (await client.read_flow_run(second.id)).state.type.value
            return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes == {
        "first pending": ("ACCEPT", "PENDING", None),
        "first running": ("ACCEPT", "RUNNING", None),
        "second while first runs": ("REJECT", "CANCELLED", "Deployment concurrency limit reached."),
        "first completed": ("ACCEPT", "COMPLETED", None),
        "third after first": ("ACCEPT", "PENDING", None),
        "second now": "CANCELLED",
    }


@pytest.mark.slow
def test_two_pipeline_runs_started_at_once(tmp_path, tiny_bert):
    """One runs the pipeline, the other is refused with a clear message; one MLflow run, a consistent dvc.lock."""
    import os
    import queue
    import signal
    import subprocess
    import sys
    import threading

    from mlflow.tracking import MlflowClient

    root = make_project(tmp_path, tiny_bert)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "flows.pipeline", "--root", str(root)]

    def start(i: int) -> subprocess.Popen:
        # Each process starts its own temporary Prefect API: separate homes, so only the pipeline lock is shared.
        return subprocess.Popen(command, cwd=ROOT, env={**env, "PREFECT_HOME": str(tmp_path / f"prefect-{i}")},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Both start at once. Whether the later one meets the other's lock would depend on how fast each temporary Prefect
    # API starts and how long the pipeline takes; so the one that holds the lock (it logs the stage order only then)
    # is paused there (kill -STOP) until the other has ended, and the other always meets a held lock.
    runs, lines, holders = [start(0), start(1)], ([], []), queue.Queue()

    def read(i: int) -> None:
        for line in runs[i].stdout:
            lines[i].append(line)
            if "stage order from dvc.yaml" in line:
                holders.put(i)

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in (0, 1)]
    for reader in readers:
        reader.start()
    try:
        holder = holders.get(timeout=300)
        runs[holder].send_signal(signal.SIGSTOP)
        try:
            runs[1 - holder].wait(timeout=300)
        finally:
            runs[holder].send_signal(signal.SIGCONT)
        runs[holder].wait(timeout=600)
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    for reader in readers:
        reader.join(timeout=30)
    ran, refused = "".join(lines[holder]), "".join(lines[1 - holder])
    assert [runs[holder].returncode, runs[1 - holder].returncode] == [0, 0], (ran, refused)
    assert "another pipeline run holds" in refused and "Running stage" not in refused, refused
    assert "done: ran ['clean'" in ran and "another pipeline run holds" not in ran, ran

    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True,
                            env={**env, "DVC_NO_ANALYTICS": "1"})
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sft-pipeline")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert len(client.search_model_versions("name='sft-classifier'")) == 1


def test_sigterm_to_the_flow_during_train_cancels_the_stage_and_the_next_run_resumes(tmp_path, tiny_bert,
                                                                                     monkeypatch):
    """What Prefect's cancel, a worker or systemd send the flow's process: the flow passes it to the stage, train
    saves a checkpoint at the end of its step, the train task and the flow end Cancelled, evaluate does not start."""
    import os
    import signal
    import threading
    import time

    from tests.test_faults import SLOW_STEPS
    from tests.test_reliability import complete_checkpoints

    root = make_project(tmp_path / "project", tiny_bert, synthetic_rows(30, seed=11), save_every_steps=1000)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_STEPS)
    step_log = tmp_path / "steps.log"
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("STEP_LOG", str(step_log))
    monkeypatch.setenv("STEP_SLEEP", "0.5")

    def stop_after_two_steps():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if step_log.is_file() and len(step_log.read_text().split()) >= 2:
                os.kill(os.getpid(), signal.SIGTERM)  # to this process, which runs the flow
                return
            time.sleep(0.05)

    sender = threading.Thread(target=stop_after_two_steps, daemon=True)
    before = signal.getsignal(signal.SIGTERM)
    sender.start()
    state = pipeline_flow(root=str(root), return_state=True)
    sender.join(timeout=5)
    assert state.is_cancelled(), state
    assert re.match(r"train: cancelled by SIGTERM \(dvc exit \d+\); train: stopped by SIGTERM at step \d+; "
                    r"checkpoint-\d+ saved", state.message), state.message
    tasks = task_states(state)
    assert [tasks[s] for s in ("clean", "validate", "split", "tokenize")] == ["Completed"] * 4
    assert tasks["train"] == "Cancelled" and "evaluate" not in tasks
    step = int(state.message.split("at step ")[1].split(";")[0])
    assert complete_checkpoints(root / "models/checkpoints") == [step]
    assert signal.getsignal(signal.SIGTERM) is before  # what the flow and the stage task set is undone

    # DVC recorded nothing for train (it failed), so the next run runs it again; it resumes from that checkpoint as
    # after any stop (tests/test_faults.py, tests/test_reliability.py).
    assert "train" not in yaml.safe_load((root / "dvc.lock").read_text())["stages"]
