"""Prefect flows over the DVC pipeline: run it stage by stage, and run it only when annotations changed.

    python -m flows.pipeline                # the pipeline flow, once (a temporary Prefect API, no server needed)
    python -m flows.pipeline --watch        # the watch flow, once: runs the pipeline unless `dvc status` is clean

The flows run DVC; they never re-implement it. The stage order comes from DVC's own graph of dvc.yaml, each stage
is one Prefect task running `dvc repro --single-item <stage>` with DVC's output in the task log, a stage DVC finds up
to date ends in a `Skipped` state, and a failing stage fails its task and the flow with DVC's message. Results are
never cached by Prefect: DVC alone decides what is stale. A stop signal to the flow's process (Prefect's cancel, a
worker or systemd stopping it) is passed on to the running stage, which stops cleanly (train saves a checkpoint);
its task and the flow end `Cancelled`, and later stages do not start.

Only one pipeline run at a time: the flow holds paths.pipeline_lock while DVC runs. A second run waits
watch.lock_timeout_s seconds for it, then ends as `Skipped` with a log line saying why, so it never meets DVC's lock.
The watch flow asks DVC what is stale (`dvc status --json`) and runs the pipeline unless DVC says every stage is up
to date, so a run that failed (DVC removed the failed stage's outputs) is rerun once the data is fixed. The content
hashes of data/raw recorded after the last successful run (paths.watch_state) only say what changed since: new,
removed and changed files, in the flow's log and in its run name. The state is written to a
temporary file and renamed into place, so a kill or a full disk while writing it leaves the previous state; a state
file that cannot be read anyway is reported and treated as absent.
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
from prefect.states import Cancelled, Completed  # noqa: E402

from sft_pipeline import versions  # noqa: E402
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
        # `dvc add`ed data (data/raw.dvc, models/pretrained.dvc) is in the graph too, but it is not a stage to run:
        # the watch flow snapshots it first.
        return [stage.name for stage in reversed(list(nx.topological_sort(graph))) if not stage.is_data_source]


def dvc_env() -> dict[str, str]:
    """DVC runs `python -m stages.<name>`: put this interpreter's folder first on PATH; no telemetry."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}


# DVC itself, with a SIGTERM handler that does nothing: a stop signal sent to the stage's process group then reaches
# the stage (train saves a checkpoint and exits 143) while dvc waits for it, reports it and releases its locks instead
# of dying first. A Python handler, not SIG_IGN: an ignored signal stays ignored in the processes dvc starts. (DVC
# already ignores SIGINT while a stage runs.)
DVC_KEEPING_SIGTERM = ("import signal, sys; signal.signal(signal.SIGTERM, lambda *a: None); "
                       "from dvc.cli import main; sys.exit(main(sys.argv[1:]))")


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-c", DVC_KEEPING_SIGTERM, *args]


def run_command(command: list[str], root: str, on_line, settle_s: float = 60) -> tuple[int, int | None]:
    """Run `command` in its own process group, each line of its output to `on_line`; returns (exit status, the stop
    signal this process received meanwhile, or None).

    While it runs, SIGTERM and SIGINT sent to this process (Prefect's cancel, a worker or systemd stopping it) are
    passed on to the whole group instead, so the stage dvc runs gets them and stops cleanly; then this waits for the
    group to empty (at most `settle_s`), not only for dvc. Prefect's own handlers are put back afterwards. Outside
    the main thread no handler can be installed and signals are left as they are.
    """
    import signal
    import threading

    received: list[int] = []
    with subprocess.Popen(command, cwd=root, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", start_new_session=True) as proc:
        def forward(signum, frame):
            received.append(signum)
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, forward)
        try:
            for line in proc.stdout:
                on_line(line.rstrip())
            proc.wait()
            deadline = time.monotonic() + settle_s
            while received and time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)  # a stage dvc started, still saving
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return proc.returncode, received[0] if received else None


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=0)
def run_stage(stage: str, root: str):
    """`dvc repro --single-item <stage>`, its output streamed to this task's log. A stop signal during the stage
    ends the task `Cancelled` (train has saved a checkpoint; the next run resumes), not failed."""
    import signal

    logger = get_run_logger()
    logger.info("$ dvc repro --single-item %s", stage)
    tail: deque[str] = deque(maxlen=40)
    unchanged = False

    def on_line(line: str) -> None:
        nonlocal unchanged
        if line:
            logger.info(line)
            tail.append(line)
            unchanged |= bool(_UNCHANGED.search(line))

    grace = project_params(Path(root)).train.stop_grace_s
    code, stopped_by = run_command(dvc_command("repro", "--single-item", stage), root, on_line, settle_s=grace + 10)
    if stopped_by is not None:
        said = [line for line in tail if "stopped by" in line]
        message = (f"{stage}: cancelled by {signal.Signals(stopped_by).name} (dvc exit {code})"
                   + (f"; {said[-1]}" if said else ""))
        logger.warning(message)
        return Cancelled(message=message)
    if code != 0:
        raise StageFailed(f"stage {stage!r} failed (dvc exit {code}):\n" + "\n".join(tail))
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
            if state.is_cancelled():  # stopped by a signal: later stages do not start, the flow is cancelled too
                logger.warning("%s; stages not run: %s", state.message, order[order.index(stage) + 1:] or "none")
                return Cancelled(message=state.message)
            outcome[stage] = state.result()  # raises StageFailed: the flow fails and later stages do not start
        ran = [s for s, r in outcome.items() if r != SKIPPED]
        logger.info("done: ran %s; up to date %s", ran or "nothing", [s for s in order if s not in ran] or "none")
        return outcome
    finally:
        lock.release()


def raw_fingerprint(raw_dir: Path) -> dict:
    """Content hash of every non-hidden file under the raw folder: one over names and bytes, and one per file."""
    digest = hashlib.sha256()
    hashes = {}
    files = sorted(p for p in raw_dir.rglob("*") if p.is_file() and not any(s.startswith(".") for s in
                                                                             p.relative_to(raw_dir).parts))
    for path in files:
        name = path.relative_to(raw_dir).as_posix()
        file_digest = hashlib.sha256()
        digest.update(name.encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
                file_digest.update(block)
        digest.update(b"\0")
        hashes[name] = file_digest.hexdigest()
    return {"sha256": digest.hexdigest(), "files": len(files), "hashes": hashes}


def raw_changes(previous: dict | None, current: dict) -> dict[str, list[str]]:
    """{"new", "removed", "changed": [file names]} between two fingerprints (everything is new without a previous)."""
    before = (previous or {}).get("hashes")
    if before is None and previous and previous.get("sha256") == current["sha256"]:
        before = current["hashes"]  # a state written before per-file hashes were recorded, same content
    before = before or {}
    after = current["hashes"]
    return {"new": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
            "changed": sorted(n for n in set(after) & set(before) if after[n] != before[n])}


def describe_changes(changes: dict[str, list[str]], limit: int = 3) -> str:
    if not any(changes.values()):
        return "no new or changed annotations"
    return ", ".join(f"{len(names)} {kind} ({', '.join(names[:limit])}{', ...' if len(names) > limit else ''})"
                     for kind, names in changes.items() if names)


class DvcStatusFailed(RuntimeError):
    """`dvc status` exited non-zero; the message carries its output."""


def dvc_status(root: Path) -> dict:
    """`dvc status --json`: {stage: [changes]} for each stage DVC would run again; {} when all are up to date."""
    command = [sys.executable, "-m", "dvc", "status", "--json"]
    result = subprocess.run(command, cwd=root, env=dvc_env(), capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        raise DvcStatusFailed(f"`dvc status` failed in {root} (exit {result.returncode}):\n"
                              + (result.stderr or result.stdout).strip()[-2000:])
    return json.loads(result.stdout or "{}")


def describe_stale(status: dict, limit: int = 3) -> list[str]:
    """One line per stale stage, outputs first: "validate: outs deleted (data/interim/validated.parquet); ..."."""
    lines = []
    for stage, entries in status.items():
        found: dict[str, list[str]] = {}
        for entry in entries:
            if isinstance(entry, str):  # "always changed", "changed checksum"
                found.setdefault(entry, [])
                continue
            for kind, paths in entry.items():
                for path, change in (paths.items() if isinstance(paths, dict) else [(paths, "")]):
                    found.setdefault(f"{kind.removeprefix('changed ')} {change}".strip(), []).append(path)
        parts = [f"{what} ({', '.join(paths[:limit])}{f', ... {len(paths)} in all' if len(paths) > limit else ''})"
                 if paths else what for what, paths in sorted(found.items(), key=lambda kv: "outs" not in kv[0])]
        lines.append(f"{stage}: {'; '.join(parts)}")
    return lines


def name_this_run(name: str) -> None:
    """Rename the running flow run, so the list of runs says what each one saw."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id is None:  # the flow's function called directly, outside a flow run: nothing to rename
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name[:200])


@flow(name="watch-annotations", log_prints=True)
def watch_flow(root: str = "."):
    """Run the pipeline flow unless DVC says every stage is up to date; log what changed in data/raw since the last
    successful run."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    params = project_params(root_path)
    raw = params.paths.raw_dir
    state_file = root_path / params.paths.watch_state
    current = raw_fingerprint(root_path / raw)
    previous = read_state(state_file)
    if previous is None and state_file.exists():
        logger.warning("%s cannot be read (not a JSON object); taking it as absent", state_file)
    changes = raw_changes(previous, current)
    since = (f"since the last successful run ({previous.get('finished_at')}, {current['files']} files)" if previous
             else f"({current['files']} files, no successful run recorded in {params.paths.watch_state})")
    seen = f"{describe_changes(changes)} in {raw} {since}"
    counts = ", ".join(f"{len(v)} {k}" for k, v in changes.items() if v) or "no change"
    name_this_run(f"{raw}: {counts}")
    logger.info(seen)
    # DVC's own lock refuses `dvc status` while a stage runs: wait for the running pipeline like a second run does.
    try:
        lock = acquire(root_path / params.paths.pipeline_lock, params.watch.lock_timeout_s)
    except PipelineBusy as busy:
        logger.warning("%s: skipping this run, the running one will finish the work", busy)
        return Completed(name=SKIPPED, message=str(busy), data={"ran": False, "reason": str(busy)})
    try:
        # The annotations as they are now become the DVC snapshot the run is made from (and a commit can pin).
        for folder, (before, after) in versions.snapshot(root_path, params.paths).items():
            if before != after:
                logger.info("dvc add %s: snapshot %s%s", folder, after, f" (was {before})" if before else "")
        stale = dvc_status(root_path)
    finally:
        lock.release()
    if not stale:
        message = f"dvc status: data and pipelines are up to date; {seen}; nothing to do"
        logger.info(message)
        return Completed(name=SKIPPED, message=message, data={"ran": False, "reason": message})
    logger.info("dvc status: %d stage(s) to run again:\n  %s", len(stale), "\n  ".join(describe_stale(stale)))
    outcome = pipeline_flow(root=str(root_path))
    if isinstance(outcome, dict) and "skipped" in outcome:
        return Completed(name=SKIPPED, message=outcome["skipped"], data={"ran": False, "reason": outcome["skipped"]})
    if not isinstance(outcome, dict):  # Cancelled: nothing to record
        return outcome
    write_json(state_file, {**current, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": outcome})
    pinned = pin_run(root_path, params, changes) if params.watch.commit else None
    return {"ran": True, "stages": outcome, "changes": changes, "stale": sorted(stale), **(pinned or {})}


def commit_message(params: Params, changes: dict[str, list[str]], root: Path) -> str:
    """"retrain: 1 new (batch2.csv) in data/raw; text-classifier v2 champion: <the gate's reason>"."""
    decision = read_state(root / params.paths.promotion) or {}
    registry = (f"{decision.get('model')} v{decision.get('version')} {decision.get('alias')}: {decision.get('reason')}"
                if decision else "no registry decision recorded")
    return f"retrain: {describe_changes(changes)} in {params.paths.raw_dir}; {registry}"


def pin_run(root: Path, params: Params, changes: dict[str, list[str]]) -> dict:
    """Commit what pins the run just made, push data and models to the DVC remote if there is one, and tag the MLflow
    run and model version with the commit."""
    logger = get_run_logger()
    lock = acquire(root / params.paths.pipeline_lock, max(params.watch.lock_timeout_s, 60))
    try:
        message = commit_message(params, changes, root)
        sha = versions.commit(root, message)
        if sha is None:
            logger.info("git: the run's files are as committed; no commit")
            return {"commit": None}
        logger.info("git commit %s: %s", sha[:12], message)
        pushed = versions.push(root)
        logger.info("dvc push: %s", "done" if pushed else "no DVC remote configured, nothing pushed")
        tags = versions.tag_lineage(params.paths, sha, root)
        logger.info("MLflow run and model version tagged %s", ", ".join(f"{k}={v}" for k, v in tags.items()))
        return {"commit": sha, "pushed": pushed}
    finally:
        lock.release()


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
