"""Long-running services, all on 127.0.0.1, all offline, no telemetry.

    python -m flows.serve schedule     # `make serve`: a local Prefect server (SQLite under .prefect/) and a deployment
                                       #   of the watch flow on the cron of params.yaml watch.cron; UI on :4200
    python -m flows.serve server       # `make prefect-server`: the Prefect server alone, on :4200, for workers
                                       #   (another interface only if PREFECT_SERVER_API_HOST says so)
    python -m flows.serve deploy --pool sft-pipeline    # `make deploy`: the process work pool (created if missing)
                                       #   and the watch flow deployed into it as watch-annotations/<pool>, on
                                       #   watch.cron, run from --root
    python -m flows.serve worker --pool sft-pipeline    # `make worker`: a process worker of that pool; it runs each
                                       #   flow run in a subprocess, in the folder the deployment names
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
watch.cron is read once, when `make serve` starts (when `deploy` runs, for a work pool's deployment). Each service
stops on Ctrl+C or SIGTERM (`kill <pid>`); `schedule` then stops its Prefect server too. `deploy` and `worker` talk to
the server in --api, else PREFECT_API_URL, else http://127.0.0.1:4200/api.
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


def deployment_settings(root: Path) -> dict:
    """What the watch flow's deployment is, served (`schedule`) or in a work pool (`deploy`): the cron of params.yaml
    watch.cron, the project folder as `root`, one run at a time."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.pipeline import project_params

    return dict(
        name=DEPLOYMENT,
        cron=project_params(root).watch.cron,
        parameters={"root": str(root)},
        # One run at a time; a run due while another is busy is cancelled (and says so in the UI).
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description="Runs the DVC pipeline when annotation files in data/raw are new or changed.",
    )


def deployment(root: Path):
    """The watch flow's deployment as `schedule` serves it."""
    from flows.pipeline import watch_flow

    return watch_flow.to_deployment(**deployment_settings(root))


def prefect_server_command(port: int, host: str = HOST) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


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


def server(root: Path, port: int) -> int:
    """Replace this process with the Prefect server alone, for workers (`deploy`, `worker`) to use.

    It binds to 127.0.0.1 unless PREFECT_SERVER_API_HOST names another interface: reaching it from other machines is
    the user's choice, made in the environment, not a default (the server has no authentication).
    """
    host = os.environ.get("PREFECT_SERVER_API_HOST") or HOST
    env = {**quiet_env(root), "PREFECT_SERVER_API_HOST": host}
    print(f"Prefect server: http://{host}:{port}/api (PREFECT_HOME {env['PREFECT_HOME']}); deploy into a work pool and "
          f"start a worker with PREFECT_API_URL=http://<this machine>:{port}/api", flush=True)
    if host != HOST:
        print(f"Bound to {host}, not {HOST} (PREFECT_SERVER_API_HOST): anyone who can reach port {port} can use it. "
              "For the UI in a browser elsewhere, set PREFECT_UI_API_URL to the address it reaches the API at.",
              flush=True)
    os.chdir(root)
    os.execve(sys.executable, prefect_server_command(port, host), env)


DEFAULT_POOL = "sft-pipeline"
ENTRYPOINT = "flows/pipeline.py:watch_flow"


def default_api() -> str:
    return os.environ.get("PREFECT_API_URL") or f"http://{HOST}:4200/api"


def require_server(api: str, seconds: float = 15) -> None:
    """A clear error, not a stack of retries, when no Prefect server answers at `api`."""
    try:
        wait_for(f"{api.rstrip('/')}/health", seconds)
    except TimeoutError:
        raise SystemExit(f"no Prefect server answers at {api} (GET /health, {seconds:g} s): start one with `make "
                         "prefect-server` there, or give its API with --api or PREFECT_API_URL") from None


def use_server(root: Path, api: str) -> None:
    """Point Prefect in this process at the server `api`, before Prefect is imported (it reads its settings then)."""
    env = quiet_env(root)
    os.environ.update({k: env[k] for k in ("DO_NOT_TRACK", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")})
    os.environ["PREFECT_API_URL"] = api
    require_server(api)


def process_pool(name: str, create: bool) -> bool:
    """Check that the work pool `name` exists with type process; with `create`, make it (with the process worker's
    default job template) when missing. Returns whether it was created. A pool of another type is an error: a process
    worker would not run it; so is a missing one without `create`: a worker would poll an empty name for ever."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            if not create:
                raise SystemExit(f"work pool {name!r} not found on {os.environ['PREFECT_API_URL']}: create it and its "
                                 f"deployment first (`python -m flows.serve deploy --pool {name}`)") from None
            # The template from the worker class itself (what `prefect work-pool create --type process` uses when it
            # finds the type installed), so nothing asks Prefect's online collection registry.
            client.create_work_pool(WorkPoolCreate(name=name, type=ProcessWorker.type,
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return True
    if pool.type != ProcessWorker.type:
        raise SystemExit(f"work pool {name!r} exists with type {pool.type!r}, not {ProcessWorker.type!r}: choose "
                         "another --pool, or delete it (`prefect work-pool delete`)")
    return False


def deploy(root: Path, pool: str, api: str) -> int:
    """Create the process work pool if missing and deploy the watch flow into it, from the project folder `root`.

    The deployment names `root` twice: as the folder a worker runs the flow's code from (Prefect's local source, a
    `set_working_directory` pull step) and as the flow's `root` parameter. So a worker on another machine needs a clone
    of the repository at that same path: run `deploy` there, on the worker's machine, with the server's API.
    """
    entry = root / ENTRYPOINT.split(":")[0]
    if not entry.is_file():
        raise SystemExit(f"{entry} not found: --root must be the project's folder (a clone of the repository), "
                         "which the worker runs the flow from")
    use_server(root, api)
    created = process_pool(pool, create=True)
    from prefect import flow

    watch = flow.from_source(source=str(root), entrypoint=ENTRYPOINT)
    # Named after its pool, so it never replaces the deployment `make serve` serves (watch-annotations/
    # watch-annotations) on the same server, nor another machine's pool's.
    settings = {**deployment_settings(root), "name": pool}
    # ignore_warnings: Prefect's hint that a process pool could use `.serve` instead; `make serve` is that path.
    deployment_id = watch.deploy(work_pool_name=pool, build=False, push=False, print_next_steps=False,
                                 ignore_warnings=True, **settings)
    cli = f"PREFECT_API_URL={api} {prefect_cli()}"
    print("\n".join([
        f"Work pool {pool!r} (process): {'created' if created else 'already there'}",
        f"Deployment {watch.name}/{pool} ({deployment_id}) in pool {pool!r} on cron {settings['cron']!r} "
        f"(watch.cron, read now: deploy again to change it), run from {root}",
        f"Start a worker on a machine with this project at {root} (this one, or a clone at the same path):",
        f"  {shlex.quote(sys.executable)} -m flows.serve worker --root {shlex.quote(str(root))} --pool {pool} "
        f"--api {api}",
        "Then, from anywhere the server is reachable:",
        f"  {cli} deployment run {watch.name}/{pool}",
        f"  {cli} flow-run ls",
    ]), flush=True)
    return 0


def worker(root: Path, pool: str, api: str) -> int:
    """Replace this process with `prefect worker start --pool <pool> --type process` against the server at `api`.

    Each flow run of the pool becomes a subprocess of this worker (`python -m prefect.engine`, this environment's
    interpreter) in the folder its deployment names. The pool must exist (`deploy` creates it): a worker does not make
    one for a mistyped name.
    """
    use_server(root, api)
    process_pool(pool, create=False)
    env = {**quiet_env(root), "PREFECT_API_URL": api}
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
               "--install-policy", "never", "--no-create-pool-if-not-found"]
    print(f"Prefect worker of pool {pool!r} on {api}: runs its flow runs here, as subprocesses; Ctrl+C (or "
          f"`kill {os.getpid()}`) stops it", flush=True)
    os.chdir(root)
    os.execve(sys.executable, command, env)


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
    parser.add_argument("service", choices=["schedule", "server", "deploy", "worker", "mlflow-ui", "model"])
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--port", type=int, help="port (defaults: schedule and server 4200, mlflow-ui 5000, "
                                                 "model 5001)")
    parser.add_argument("--pool", default=DEFAULT_POOL, help="Prefect work pool (deploy, worker)")
    parser.add_argument("--api", help="the Prefect server's API (deploy, worker; default: PREFECT_API_URL, else "
                                      f"http://{HOST}:4200/api)")
    parser.add_argument("--alias", default="champion", help="registry alias to serve (model)")
    parser.add_argument("--workers", type=int, default=1, help="server processes of the MLflow UI (mlflow-ui)")
    parser.add_argument("--jobs", action="store_true", help="start MLflow's job runner too (mlflow-ui)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.service == "schedule":
        return schedule(root, args.port or 4200)
    if args.service == "server":
        return server(root, args.port or 4200)
    if args.service == "deploy":
        return deploy(root, args.pool, args.api or default_api())
    if args.service == "worker":
        return worker(root, args.pool, args.api or default_api())
    if args.service == "mlflow-ui":
        return mlflow_ui(root, args.port or 5000, args.workers, args.jobs)
    return serve_model(root, args.port or 5001, args.alias)


if __name__ == "__main__":
    sys.exit(main())
