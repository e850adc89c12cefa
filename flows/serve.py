"""Long-running services, all on 127.0.0.1, all offline, no telemetry.

    python -m flows.serve schedule     # `make serve`: a local Prefect server (SQLite under .prefect/) and a deployment
                                       #   of the watch flow on the cron of params.yaml watch.cron; UI on :4200
    python -m flows.serve mlflow-ui    # `make ui`: the MLflow UI over the project's store, on :5000, one worker
                                       #   (--workers N, --jobs for MLflow's job runner: make ui UI_WORKERS=4 UI_JOBS=1)
    python -m flows.serve model        # `make serve-model`: the champion model's REST API, on :5001; it reads
                                       #   params.yaml at start, asks the registry every serve.model_poll_s seconds
                                       #   where `champion` points and switches to a new champion once it has
                                       #   loaded (GET /version says which serves); Ctrl-C stops it
                                       #   curl -X POST 127.0.0.1:5001/invocations -H 'Content-Type: application/json'
                                       #        -d '{"dataframe_records": [{"text": "Shares rose after the results"}]}'

Every other `prefect` command needs the server's API in PREFECT_API_URL (without it, the CLI starts a temporary
server of its own and finds nothing); `make serve` prints these with its port and this environment's CLI:
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run watch-annotations/watch-annotations
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect flow-run ls
watch.cron is read once, when `make serve` starts. Each service stops on Ctrl+C or SIGTERM (`kill <pid>`);
`schedule` then stops its Prefect server too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
DEPLOYMENT = "watch-annotations"


def quiet_env(root: Path) -> dict[str, str]:
    """Environment for Prefect and MLflow: local state under the project, no telemetry, loopback only."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DO_NOT_TRACK": "1",
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(root / ".prefect")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": HOST,
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "DVC_NO_ANALYTICS": "1",
    }


def wait_for(url: str, seconds: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


def deployment(root: Path):
    """The watch flow's deployment as `schedule` serves it: the cron of params.yaml watch.cron, one run at a time."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.pipeline import project_params, watch_flow

    return watch_flow.to_deployment(
        name=DEPLOYMENT,
        cron=project_params(root).watch.cron,
        parameters={"root": str(root)},
        # One run at a time; a run due while another is busy is cancelled (and says so in the UI).
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description="Runs the DVC pipeline when annotation files in data/raw are new or changed.",
    )


def prefect_server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]


def mlflow_ui_command(root: Path, port: int, workers: int = 1) -> list[str]:
    """`mlflow ui` over the project's store; one user on loopback needs one worker (MLflow's default is 4)."""
    from sft_pipeline.params import load
    from sft_pipeline.tracking import tracking_uri

    params = load(root / "params.yaml")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(params.paths, root),
            "--default-artifact-root", (root / params.paths.mlflow_artifacts).resolve().as_uri(),
            "--host", HOST, "--port", str(port), "--workers", str(workers)]


def prefect_cli() -> str:
    """This environment's Prefect CLI, as a shell word to paste: its script beside the interpreter, else `-m`."""
    script = Path(sys.executable).parent / "prefect"
    return shlex.quote(str(script)) if script.is_file() else f"{shlex.quote(sys.executable)} -m prefect"


def banner(port: int, cron: str) -> str:
    """What `make serve` prints: the UI, and commands that work when pasted into another shell."""
    api = f"http://{HOST}:{port}/api"
    cli = f"PREFECT_API_URL={api} {prefect_cli()}"
    return "\n".join([
        f"Prefect UI: http://{HOST}:{port}  deployment {DEPLOYMENT}/{DEPLOYMENT} on cron {cron!r} (watch.cron, read "
        "once, at start: restart to change it)",
        f"Other prefect commands need this server's API (or `export PREFECT_API_URL={api}` first):",
        f"  {cli} deployment run {DEPLOYMENT}/{DEPLOYMENT}",
        f"  {cli} deployment ls",
        f"  {cli} flow-run ls",
        f"  {cli} flow ls",
        f"Stop with Ctrl+C (or `kill {os.getpid()}`): the deployment and the server stop together.",
    ])


def _exit_on_sigterm(signum, frame):
    sys.exit(0)  # unwinds through schedule()'s `finally`, which stops the server


def schedule(root: Path, port: int) -> int:
    """Start the Prefect server, then serve the watch flow's deployment until interrupted."""
    # Python's default SIGTERM ends the process at once and leaves the server running; Prefect's runner installs
    # the same exit once it serves.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    env = quiet_env(root)
    api = f"http://{HOST}:{port}/api"
    server = subprocess.Popen(prefect_server_command(port), cwd=root, env=env)
    try:
        wait_for(f"{api}/health", 180, server)  # the first start migrates the SQLite database
        os.environ.update({k: env[k] for k in ("DO_NOT_TRACK", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")})
        os.environ["PREFECT_API_URL"] = api
        from prefect import serve

        watch = deployment(root)
        print(banner(port, watch.schedules[0].schedule.cron), flush=True)
        # Prefect's own starting message gives `prefect deployment run` without PREFECT_API_URL: the banner says it.
        serve(watch, print_starting_message=False)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


def mlflow_ui(root: Path, port: int, workers: int = 1, jobs: bool = False) -> int:
    """Replace this process with the MLflow UI over the project's store (made to follow the project first).

    MLflow's defaults start 4 uvicorn workers and a job runner with 7 huey consumers (16 processes, about 3.1 GB);
    the jobs run GenAI scorers and trace roll-ups, which this project does not log. One user needs one worker.
    """
    from sft_pipeline.params import load
    from sft_pipeline.tracking import experiment_id

    params = load(root / "params.yaml")
    experiment = experiment_id(params.paths, params.mlflow, root)
    command = mlflow_ui_command(root, port, workers)
    env = {**quiet_env(root), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(jobs).lower()}
    # The UI starts in its GenAI view unless the address asks for the machine-learning one (runs, registry).
    print(f"MLflow UI: http://{HOST}:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning "
          f"(experiment {params.mlflow.experiment}; {workers} worker{'s' * (workers > 1)}, "
          f"{'with' if jobs else 'no'} job runner)", flush=True)
    os.chdir(root)
    os.execve(sys.executable, command, env)


def serve_model(root: Path, port: int, alias: str) -> int:
    """The REST API of the version holding `alias`, reloaded when the alias moves (sft_pipeline/model_server.py)."""
    os.environ.update({k: v for k, v in quiet_env(root).items() if k in ("DO_NOT_TRACK", "MLFLOW_ENABLE_TELEMETRY")})
    from sft_pipeline.model_server import serve
    from sft_pipeline.params import load
    from sft_pipeline.tracking import follow_project, use_store

    params = load(root / "params.yaml")
    follow_project(params.paths, root)
    use_store(params.paths)
    return serve(params.mlflow.registered_model, alias, params.serve.model_poll_s, HOST, port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=["schedule", "mlflow-ui", "model"])
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--port", type=int, help="port (defaults: schedule 4200, mlflow-ui 5000, model 5001)")
    parser.add_argument("--alias", default="champion", help="registry alias to serve (model)")
    parser.add_argument("--workers", type=int, default=1, help="server processes of the MLflow UI (mlflow-ui)")
    parser.add_argument("--jobs", action="store_true", help="start MLflow's job runner too (mlflow-ui)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.service == "schedule":
        return schedule(root, args.port or 4200)
    if args.service == "mlflow-ui":
        return mlflow_ui(root, args.port or 5000, args.workers, args.jobs)
    return serve_model(root, args.port or 5001, args.alias)


if __name__ == "__main__":
    sys.exit(main())
