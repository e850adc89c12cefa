"""A work pool and a worker, the way to run the pipeline on another machine: a real Prefect server
(`python -m flows.serve server`), `deploy` into a process pool, a real worker (`python -m flows.serve worker`), and a
run of the deployment that the worker picks up and runs to the end: the watch flow's full pipeline on a tiny project."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT, make_project
from tests.test_services_watch import Lines, free_port

POOL = "test-pool"


def clean_env(prefect_home) -> dict[str, str]:
    """This environment without any PREFECT_ setting an earlier test module left, and a home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"PREFECT_HOME": str(prefect_home), "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    # Its own session: the teardown stops the whole group (the server's uvicorn, the worker's flow-run processes).
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def server(tmp_path):
    from flows.serve import wait_for

    port = free_port()
    process = start([sys.executable, "-m", "flows.serve", "server", "--root", str(tmp_path), "--port", str(port)],
                    clean_env(tmp_path / "server-home"))
    out = Lines(process)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_for(f"{api}/health", 300, process)  # the first start migrates a fresh SQLite database
        yield api, out
    finally:
        stop(process)


def read(api: str, call):
    """`call(client)` with a client of the test's server (not the settings of this process)."""
    import asyncio

    from prefect.client.orchestration import PrefectClient

    async def go():
        async with PrefectClient(api) as client:
            return await call(client)

    return asyncio.run(go())


def test_a_worker_runs_the_deployment_of_its_pool_to_completion(server, tmp_path, tiny_bert):
    api, server_out = server
    project = make_project(tmp_path / "project", tiny_bert)
    shutil.copytree(ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["watch"]["cron"] = "0 0 1 1 *"  # no scheduled run falls due while the test runs: only the one it makes
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = clean_env(tmp_path / "client-home")
    serve = [sys.executable, "-m", "flows.serve"]

    # A worker for a pool nobody made says so and stops, instead of polling an empty name.
    missing = subprocess.run(serve + ["worker", "--root", str(project), "--pool", "no-such-pool", "--api", api],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "work pool 'no-such-pool' not found" in missing.stderr, missing

    deployed = subprocess.run(serve + ["deploy", "--root", str(project), "--pool", POOL, "--api", api], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, (deployed.stdout, deployed.stderr)
    assert f"Work pool '{POOL}' (process): created" in deployed.stdout, deployed.stdout
    again = subprocess.run(serve + ["deploy", "--root", str(project), "--pool", POOL, "--api", api], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"Work pool '{POOL}' (process): already there" in again.stdout, again

    async def deployment_and_pool(client):
        deployment = await client.read_deployment_by_name(f"watch-annotations/{POOL}")
        return deployment, await client.read_work_pool(POOL)

    deployment, pool = read(api, deployment_and_pool)
    assert pool.type == "process"
    assert deployment.work_pool_name == POOL
    assert [s.schedule.cron for s in deployment.schedules] == ["0 0 1 1 *"]
    assert deployment.parameters == {"root": str(project)}
    assert deployment.entrypoint == "flows/pipeline.py:watch_flow"
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}]
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"

    # Prefect's own setting: the worker asks for due runs every second instead of every 10.
    worker = start(serve + ["worker", "--root", str(project), "--pool", POOL, "--api", api],
                   env | {"PREFECT_WORKER_QUERY_SECONDS": "1"})
    try:
        worker_out = Lines(worker)
        worker_out.wait_for("started!", 300)

        async def trigger(client):
            return await client.create_flow_run_from_deployment(deployment.id)

        run = read(api, trigger)

        async def current(client):
            return await client.read_flow_run(run.id)

        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            flow_run = read(api, current)
            if flow_run.state.is_final():
                break
            time.sleep(2)
        assert flow_run.state.is_final(), flow_run.state
        worker_out.wait_for(f"submitting flow run '{run.id}'", 10)
    finally:
        stop(worker)
    log = "\n".join(worker_out.seen)
    assert flow_run.state.is_completed(), (flow_run.state, log[-6000:])
    assert flow_run.work_pool_name == POOL and flow_run.deployment_id == deployment.id
    # The worker ran it in a process of its own (the pid it reported), not in the worker's process.
    assert flow_run.infrastructure_pid and int(flow_run.infrastructure_pid) != worker.pid

    # What the watch flow did on the worker, in the project folder the deployment names.
    state = json.loads((project / "reports/watch_state.json").read_text())
    assert state["files"] == 1
    assert state["stages"] == {s: "ran" for s in ("clean", "validate", "split", "tokenize", "train", "evaluate")}
    assert json.loads((project / "reports/promotion.json").read_text())["version"] == "1"
    assert flow_run.name == "data/raw: 1 new"
