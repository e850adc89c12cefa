"""The watch flow decides from `dvc status` (a failed run is rerun once the data is fixed), and the Prefect CLI lists
what `make serve`'s own server holds, with the commands its banner prints."""

import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from flows.pipeline import (SKIPPED, describe_changes, describe_stale, dvc_status, raw_changes, raw_fingerprint,
                            watch_flow)
from tests.conftest import DEFAULT_PARAMS, ROOT, make_project, synthetic_rows, write_csv


def test_raw_changes_name_new_removed_and_changed_files(tmp_path):
    write_csv(tmp_path / "a.csv", synthetic_rows(2))
    write_csv(tmp_path / "b.csv", synthetic_rows(2, seed=1))
    before = raw_fingerprint(tmp_path)
    assert raw_changes(before, raw_fingerprint(tmp_path)) == {"new": [], "removed": [], "changed": []}
    assert describe_changes(raw_changes(before, before)) == "no new or changed annotations"
    write_csv(tmp_path / "a.csv", synthetic_rows(3))
    (tmp_path / "b.csv").unlink()
    write_csv(tmp_path / "sub" / "c.csv", synthetic_rows(1))
    changes = raw_changes(before, raw_fingerprint(tmp_path))
    assert changes == {"new": ["sub/c.csv"], "removed": ["b.csv"], "changed": ["a.csv"]}
    assert describe_changes(changes) == "1 new (sub/c.csv), 1 removed (b.csv), 1 changed (a.csv)"
    assert raw_changes(None, before)["new"] == ["a.csv", "b.csv"]


def test_describe_stale_puts_what_dvc_found_missing_first():
    status = {"validate": [{"changed deps": {"stages/validate.py": "modified", "data/interim/clean.parquet":
                                             "modified", "sft_pipeline/io.py": "modified", "sft_pipeline/data":
                                             "modified"}},
                           {"changed outs": {"data/interim/validated.parquet": "deleted"}}],
              "train": ["always changed"]}
    assert describe_stale(status) == [
        "validate: outs deleted (data/interim/validated.parquet); deps modified (stages/validate.py, "
        "data/interim/clean.parquet, sft_pipeline/io.py, ... 4 in all)",
        "train: always changed"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # the first start migrates a fresh SQLite database
        yield


def run_info(state) -> tuple[str, dict[str, str]]:
    """The flow run's name and {task run name: state name} of everything it ran, subflows included."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    async def fetch():
        async with get_client() as client:
            run_id = state.state_details.flow_run_id
            children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])), limit=100)
            ids = [run_id] + [child.id for child in children]
            tasks = {}
            for flow_run_id in ids:
                for task in await client.read_task_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=100):
                    tasks[task.name] = task.state.name
            return (await client.read_flow_run(run_id)).name, tasks

    return asyncio.run(fetch())


@pytest.mark.e2e
def test_a_failed_run_is_rerun_after_the_fix_and_an_up_to_date_one_skips(harness, tmp_path, tiny_bert):
    root = make_project(tmp_path, tiny_bert)
    first = watch_flow(root=str(root), return_state=True)
    assert first.is_completed() and first.name != SKIPPED
    assert run_info(first)[0] == "data/raw: 1 new"

    # 80 rows of an unknown label: validate rejects 80 of 170 rows, over max_reject_fraction, and fails.
    write_csv(root / "data/raw/bad.csv", [{"id": f"bad{i}", "text": f"Weather report {i} says rain all day",
                                           "label": "weather"} for i in range(80)])
    failed = watch_flow(root=str(root), return_state=True)
    assert failed.is_failed()
    name, tasks = run_info(failed)
    assert name == "data/raw: 1 new"
    assert tasks["clean"] == "Completed" and tasks["validate"] == "Failed" and "train" not in tasks
    stale = dvc_status(root)
    assert stale["validate"][-1]["changed outs"]["data/interim/validated.parquet"] == "deleted"

    # data/raw is back to what the last successful run saw; DVC still has a stage without outputs.
    (root / "data/raw/bad.csv").unlink()
    fixed = watch_flow(root=str(root), return_state=True)
    assert fixed.is_completed() and fixed.name != SKIPPED
    result = fixed.result()
    assert result["changes"] == {"new": [], "removed": [], "changed": []}
    assert {"clean", "validate"} <= set(result["stale"])
    assert result["stages"]["clean"] == "ran" and result["stages"]["validate"] == "ran"
    assert result["stages"]["train"] == SKIPPED  # the same validated rows as the first run: DVC keeps its model
    assert run_info(fixed)[0] == "data/raw: no change"
    assert dvc_status(root) == {}

    again = watch_flow(root=str(root), return_state=True)
    assert again.name == SKIPPED
    assert again.message.startswith("dvc status: data and pipelines are up to date; no new or changed annotations")
    assert run_info(again) == ("data/raw: no change", {})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Lines:
    """A process's output read by a thread, so the test can wait for a line with a deadline."""

    def __init__(self, process: subprocess.Popen):
        self.seen: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} within {seconds:.0f} s:\n" + "\n".join(self.seen[-40:]))


def wait_until_found(url: str, seconds: float) -> None:
    """Wait for `url` to answer 200 (a deployment is registered a moment after the banner is printed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            assert error.code == 404, error
        time.sleep(0.5)
    raise AssertionError(f"{url} not found within {seconds:.0f} s")


def test_the_prefect_cli_lists_what_make_serves_server_holds(tmp_path):
    params = yaml.safe_load(DEFAULT_PARAMS.read_text())
    params["watch"]["cron"] = "0 0 1 1 *"  # no scheduled run falls due while the test runs
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # COLUMNS: the CLI's tables cut names to fit the terminal, 80 columns without one.
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), DO_NOT_TRACK="1", PYTHONUNBUFFERED="1", COLUMNS="250")
    service = subprocess.Popen([sys.executable, "-m", "flows.serve", "schedule", "--root", str(tmp_path),
                                "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        out = Lines(service)
        out.wait_for("Stop with Ctrl+C", 300)  # the first start migrates the server's SQLite database
        commands = {" ".join(shlex.split(line)[-2:]): line.strip() for line in out.seen
                    if line.startswith("  PREFECT_API_URL=")}
        assert set(commands) == {"run watch-annotations/watch-annotations", "deployment ls", "flow-run ls",
                                 "flow ls"}, out.seen
        wait_until_found(f"http://127.0.0.1:{port}/api/deployments/name/watch-annotations/watch-annotations", 120)

        def paste(command: str) -> str:
            done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300,
                                  cwd=tmp_path)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            return done.stdout

        # Run later than the test lasts, so the served flow does not start; the run is listed all the same.
        created = paste(commands["run watch-annotations/watch-annotations"] + " --start-in '1 day'")
        run_name = re.search(r"Created flow run '([^']+)'", created).group(1)
        assert "watch-annotations/watch-annotations" in paste(commands["deployment ls"])
        listed = paste(commands["flow-run ls"])
        assert re.search(rf"watch-annotations\s*│\s*{run_name}\s*│\s*SCHEDULED", listed), listed
        assert "watch-annotations" in paste(commands["flow ls"])

        service.send_signal(signal.SIGTERM)  # what the banner's `kill <pid>` sends
        assert service.wait(timeout=120) == 0
        with pytest.raises(urllib.error.URLError):  # the server went with it
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5)
    finally:
        if service.poll() is None:  # a failed assertion: the service and its server, by process group
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()
