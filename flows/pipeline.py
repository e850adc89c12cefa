"""Prefect flows over the DVC pipeline: run it stage by stage, and run it only when annotations changed.

    python -m flows.pipeline                # the pipeline flow, once (a temporary Prefect API, no server needed)
    python -m flows.pipeline --watch        # the watch flow, once: runs the pipeline only if data/raw changed

The flows run DVC; they never re-implement it. The stage order comes from DVC's own graph of dvc.yaml, each stage
is one Prefect task running `dvc repro --single-item <stage>` with DVC's output in the task log, a stage DVC finds up
to date ends in a `Skipped` state, and a failing stage fails its task and the flow with DVC's message. Results are
never cached by Prefect: DVC alone decides what is stale.

Only one pipeline run at a time: the flow holds paths.pipeline_lock while DVC runs. A second run waits
watch.lock_timeout_s seconds for it, then ends as `Skipped` with a log line saying why, so it never meets DVC's lock.
The watch flow compares a content hash of data/raw with the one recorded after the last successful run
(paths.watch_state) and runs the pipeline only when they differ. The state is written to a temporary file and
renamed into place, so a kill or a full disk while writing it leaves the previous state; a state file that cannot be
read anyway is reported and treated as absent (the pipeline runs, and DVC skips what is up to date).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

# Before Prefect reads its settings: no telemetry, and time for a temporary API server to start on a busy machine
# (the default 20 s is not always enough on 2 cores).
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed  # noqa: E402

from sft_pipeline.io import write_json  # noqa: E402
from sft_pipeline.params import Params, load  # noqa: E402

SKIPPED = "Skipped"
_UNCHANGED = re.compile(r"Stage '[^']+' didn't change, skipping")


class StageFailed(RuntimeError):
    """`dvc repro` of one stage exited non-zero; the message carries the end of its output."""


def project_params(root: Path) -> Params:
    return load(Path(root) / "params.yaml")


def stage_order(root: Path) -> list[str]:
    """The stages of dvc.yaml in the order DVC runs them (dependencies first), read from DVC's graph."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        return [stage.name for stage in reversed(list(nx.topological_sort(graph)))]


def dvc_env() -> dict[str, str]:
    """DVC runs `python -m stages.<name>`: put this interpreter's folder first on PATH; no telemetry."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=0)
def run_stage(stage: str, root: str):
    """`dvc repro --single-item <stage>`, its output streamed to this task's log."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    logger.info("$ %s", " ".join(command[1:]))
    tail: deque[str] = deque(maxlen=40)
    unchanged = False
    with subprocess.Popen(command, cwd=root, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            logger.info(line)
            tail.append(line)
            unchanged |= bool(_UNCHANGED.search(line))
    if proc.returncode != 0:
        raise StageFailed(f"stage {stage!r} failed (dvc exit {proc.returncode}):\n" + "\n".join(tail))
    if unchanged:
        return Completed(name=SKIPPED, message=f"{stage}: up to date, DVC skipped it", data=SKIPPED)
    return Completed(message=f"{stage}: ran", data="ran")


class PipelineBusy(Exception):
    pass


def acquire(lock_path: Path, timeout_s: float):
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise PipelineBusy(f"another pipeline run holds {lock_path}; waited {timeout_s:g} s") from None
    return lock


@flow(name="sft-pipeline", log_prints=True)
def pipeline_flow(root: str = ".", lock_timeout_s: float | None = None):
    """Run every DVC stage in DVC's order, one task each; returns {stage: "ran" | "Skipped"}."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    params = project_params(root_path)
    timeout = params.watch.lock_timeout_s if lock_timeout_s is None else lock_timeout_s
    try:
        lock = acquire(root_path / params.paths.pipeline_lock, timeout)
    except PipelineBusy as busy:
        logger.warning("%s: skipping this run, the running one will finish the work", busy)
        return Completed(name=SKIPPED, message=str(busy), data={"skipped": str(busy)})
    try:
        order = stage_order(root_path)
        logger.info("stage order from dvc.yaml: %s", " -> ".join(order))
        outcome = {}
        for stage in order:
            state = run_stage(stage, str(root_path), return_state=True)
            outcome[stage] = state.result()  # raises StageFailed: the flow fails and later stages do not start
        ran = [s for s, r in outcome.items() if r != SKIPPED]
        logger.info("done: ran %s; up to date %s", ran or "nothing", [s for s in order if s not in ran] or "none")
        return outcome
    finally:
        lock.release()


def raw_fingerprint(raw_dir: Path) -> dict:
    """Content hash of every non-hidden file under the raw folder (names and bytes)."""
    digest = hashlib.sha256()
    files = sorted(p for p in raw_dir.rglob("*") if p.is_file() and not any(s.startswith(".") for s in
                                                                             p.relative_to(raw_dir).parts))
    for path in files:
        digest.update(path.relative_to(raw_dir).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return {"sha256": digest.hexdigest(), "files": len(files)}


@flow(name="watch-annotations", log_prints=True)
def watch_flow(root: str = "."):
    """Run the pipeline flow when data/raw changed since the last successful run; otherwise say so and stop."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    params = project_params(root_path)
    raw_dir = root_path / params.paths.raw_dir
    state_file = root_path / params.paths.watch_state
    current = raw_fingerprint(raw_dir)
    previous = read_state(state_file)
    if previous is None and state_file.exists():
        logger.warning("%s cannot be read (not a JSON object); running the pipeline as if it were absent",
                       state_file)
    if previous and previous.get("sha256") == current["sha256"]:
        message = (f"no new or changed annotations in {params.paths.raw_dir} since the last successful run "
                   f"({previous.get('finished_at')}, {current['files']} files); nothing to do")
        logger.info(message)
        return Completed(name=SKIPPED, message=message, data={"ran": False, "reason": message})
    logger.info("annotations changed in %s (%d files, sha256 %s...); running the pipeline",
                params.paths.raw_dir, current["files"], current["sha256"][:12])
    outcome = pipeline_flow(root=str(root_path))
    if isinstance(outcome, dict) and "skipped" in outcome:
        return Completed(name=SKIPPED, message=outcome["skipped"], data={"ran": False, "reason": outcome["skipped"]})
    write_json(state_file, {**current, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": outcome})
    return {"ran": True, "stages": outcome}


def read_state(state_file: Path) -> dict | None:
    """The recorded watch state, or None when there is none or it cannot be read."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="project root (default: the current folder)")
    parser.add_argument("--watch", action="store_true", help="run the watch flow instead of the pipeline flow")
    args = parser.parse_args(argv)
    state = (watch_flow if args.watch else pipeline_flow)(root=args.root, return_state=True)
    print(f"{state.name}: {state.message or ''}".strip())
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
