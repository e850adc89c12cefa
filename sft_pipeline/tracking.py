"""MLflow tracking shared by train and evaluate: one run per training, the registry and the promotion gate.

The train stage opens the run (params, tags) and writes its id to paths.mlflow_run; while it trains, a Trainer
callback (`live_metrics`) logs each step's loss and each epoch's validation metrics into the run as they happen, so
the MLflow UI draws the loss curve of a run that is still going. evaluate logs the test metrics, reports, the confusion matrix and the model into the same run,
registers the model, scores the `champion` version again on the same test rows, and moves the alias by the rule of
`promotion_decision` on that paired comparison (a paired bootstrap gives its noise). No Trainer integration or
autolog runs beside it.

The store is SQLite at paths.mlflow_db, artifacts under paths.mlflow_artifacts; MLFLOW_TRACKING_URI overrides the store
(a server's experiments then keep their artifacts where the server puts them). MLflow stores every artifact location
as an absolute path, so a store whose two paths are relative in params.yaml records the project root it was opened
from; opened from another root (the project was moved or copied), its locations under the old root are rewritten to
the new one before anything is logged (`follow_project`), so that a copy never writes into the original.

    python -m sft_pipeline.tracking [--params params.yaml]   # do that now, e.g. before plain `mlflow` commands
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sft_pipeline.params import Mlflow, Params, Paths

CHAMPION = "champion"
CHALLENGER = "challenger"
# Transformers would otherwise start an MLflow run of its own when mlflow is importable.
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def tracking_uri(paths: Paths, root: Path = Path(".")) -> str:
    """MLFLOW_TRACKING_URI, else the project's SQLite store; in a copy DVC made for an experiment (`dvc exp run
    --temp`, a queue), the store of the project it was copied from (sft_pipeline.versions.project_home)."""
    from sft_pipeline.versions import project_home

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(project_home(root) / paths.mlflow_db).resolve()}"


# Where MLflow 3's SQLite schema holds artifact locations (absolute file URIs or paths), with the rows to look at.
LOCATIONS = (("experiments", "artifact_location", "1"), ("runs", "artifact_uri", "1"),
             ("logged_models", "artifact_location", "1"), ("model_versions", "source", "1"),
             ("model_versions", "storage_location", "1"), ("workspaces", "default_artifact_root", "1"),
             ("workspaces", "trace_archival_location", "1"),
             ("trace_tags", "value", "key = 'mlflow.artifactLocation'"))
# Our one table in MLflow's database: the project root the store's locations were written for.
ROOT_TABLE = "sft_pipeline_store"
# The UI's view of an experiment: runs, models and the registry (MLflow 3 offers GenAI traces and evaluations first).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def follow_project(paths: Paths, root: Path = Path(".")) -> tuple[str, str] | None:
    """Make the project's SQLite store follow the project; returns (old root, new root) when it moved.

    Only a store whose params paths are both relative belongs to the project (absolute paths are the user's fixed
    places) and only when MLFLOW_TRACKING_URI does not name another store. Every location under the recorded root is
    rewritten under this one in one transaction. A store made before the root was recorded gives it away through its
    experiments, whose artifact location ends in paths.mlflow_artifacts.
    """
    from sft_pipeline.versions import project_home

    if os.environ.get("MLFLOW_TRACKING_URI") or Path(paths.mlflow_db).is_absolute() \
            or Path(paths.mlflow_artifacts).is_absolute():
        return None
    root = project_home(root)
    db = root / paths.mlflow_db
    if not db.is_file():
        return None  # MLflow makes it; experiment_id records the root once the experiment exists
    new = root.resolve()
    con = sqlite3.connect(db, timeout=60, isolation_level=None)  # transactions written out below
    try:
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return None  # not initialised by MLflow yet
        if ROOT_TABLE in tables and con.execute(f"SELECT value FROM {ROOT_TABLE} WHERE key = 'root'").fetchone() \
                == (str(new),):
            return None  # the usual case, read without taking the write lock
        con.execute("BEGIN IMMEDIATE")  # no other writer between reading the root and moving it
        con.execute(f"CREATE TABLE IF NOT EXISTS {ROOT_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        found = con.execute(f"SELECT value FROM {ROOT_TABLE} WHERE key = 'root'").fetchone()
        old = Path(found[0]) if found else _root_of_old_store(con, Path(paths.mlflow_artifacts))
        moved = old is not None and old != new
        changes = con.total_changes
        if moved:
            for table, column, where in LOCATIONS:
                if table in tables and column in {row[1] for row in con.execute(f"PRAGMA table_info({table})")}:
                    for before, after in ((old.as_uri(), new.as_uri()), (str(old), str(new))):
                        con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE ({where}) AND "
                                    f"({column} = ? OR substr({column}, 1, ?) = ?)",
                                    (after, len(before) + 1, before, len(before) + 1, before + "/"))
        changes = con.total_changes - changes
        if moved or found is None:
            con.execute(f"INSERT OR REPLACE INTO {ROOT_TABLE} (key, value) VALUES ('root', ?)", (str(new),))
        con.execute("COMMIT")
    finally:
        con.close()
    if not moved:
        return None
    print(f"mlflow: the store {db.resolve()} was made in {old}; {changes} artifact locations of its experiments, "
          f"runs, models and versions now point under {new}")
    return str(old), str(new)


def _root_of_old_store(con: sqlite3.Connection, artifacts: Path) -> Path | None:
    from mlflow.utils.file_utils import local_file_uri_to_path

    suffix = "/" + artifacts.as_posix().strip("/")
    for (location,) in con.execute("SELECT artifact_location FROM experiments ORDER BY experiment_id"):
        path = local_file_uri_to_path(location or "")
        if path.endswith(suffix):
            return Path(path[:-len(suffix)])
    return None


def use_store(paths: Paths, root: Path = Path(".")) -> str:
    """Point this process's MLflow client at the project's store (made to follow the project); returns its URI.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI to os.environ, where it would outlive this project: a
    later call for another project (tests, flows) and every child process would take it for the user's choice. The
    environment is put back as it was.
    """
    import mlflow

    moved = follow_project(paths, root)
    uri = tracking_uri(paths, root)
    if moved or mlflow.get_tracking_uri() != uri:
        # MLflow keeps each run's artifact repository for the life of the process, keyed by run id alone: after a
        # move, or in another copy of the store (same run ids), it would still write to the other folder.
        getattr(sys.modules.get("mlflow.tracking._tracking_service.utils"), "_artifact_repos_cache", {}).clear()
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return uri


def experiment_id(paths: Paths, settings: Mlflow, root: Path = Path(".")) -> str:
    """Point MLflow at the project's store and return the experiment's id, creating it (artifacts under the project,
    or where a tracking server puts them) and giving it the UI's machine-learning view."""
    import mlflow
    from mlflow.tracking import MlflowClient

    use_store(paths, root)
    found = mlflow.get_experiment_by_name(settings.experiment)
    if found is None:
        location = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            from sft_pipeline.versions import project_home

            artifacts = (project_home(root) / paths.mlflow_artifacts).resolve()
            artifacts.mkdir(parents=True, exist_ok=True)
            location = artifacts.as_uri()
        created = mlflow.create_experiment(settings.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
        follow_project(paths, root)  # records the root of a store made just now
        return created
    for key, value in EXPERIMENT_KIND.items():
        if key not in found.tags:  # an experiment made before, unless the user chose its kind
            MlflowClient().set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


# Mappings whose keys are users' data (label names, role names): one param holding JSON, since a key of theirs may
# hold characters MLflow refuses in a param name (`refund?`); the whole params.yaml is an artifact of the run too.
WHOLE = ("validate.labels", "clean.roles")


def flatten(data, prefix: str = "") -> dict[str, str]:
    """{"train": {"epochs": 3}} -> {"train.epochs": "3"}; lists and the mappings in WHOLE stay whole (JSON)."""
    out: dict[str, str] = {}
    if prefix[:-1] in WHOLE:
        out[prefix[:-1]] = json.dumps(data, ensure_ascii=False)
    elif isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = json.dumps(data) if isinstance(data, (list, type(None), bool)) else str(data)
    return out


def git_tags(root: Path = Path("."), outputs: tuple[Path, ...] = ()) -> dict[str, str]:
    """The commit, and whether code or params differ from it (`outputs`, the pipeline's files, do not count)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    # dvc.lock and the reports git tracks change during every repro: they say what ran, not that the code or params
    # differ from the commit. A path outside the repository is no pathspec git takes, and is not in its status anyway.
    inside = []
    for path in (Path("dvc.lock"), *outputs):
        try:
            inside.append((root / path).resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            pass
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in inside))
    return {"git.commit": commit or "unknown", "git.dirty": "unknown" if status is None else str(bool(status)).lower()}


def data_tags(paths: Paths, lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """Content hashes DVC recorded for the raw folder and the validated rows, and the rows per split."""
    tags = {}
    if lock_file.is_file():
        lock = yaml.safe_load(lock_file.read_text()) or {}
        stages = lock.get("stages", {})

        def md5(stage: str, kind: str, path: Path) -> str | None:
            for entry in stages.get(stage, {}).get(kind, []):
                if Path(entry["path"]) == Path(path):
                    return entry.get("md5")
            return None

        tags["data.raw_md5"] = md5("clean", "deps", paths.raw_dir) or "unknown"
        tags["data.validated_md5"] = md5("validate", "outs", paths.validated) or "unknown"
    from sft_pipeline.versions import snapshot_tags

    tags.update(snapshot_tags(paths))
    if paths.split_report.is_file():
        rows = json.loads(paths.split_report.read_text())["rows"]
        tags.update({f"data.rows.{name}": str(n) for name, n in rows.items()})
    return tags


def coverage_metrics(paths: Paths) -> dict[str, float]:
    """The tokenizer's coverage of each split (reports/tokenize.json) as metrics: unknown-token share, share of texts
    mostly unknown, tokens per character."""
    if not paths.tokenize_report.is_file():
        return {}
    splits = json.loads(paths.tokenize_report.read_text()).get("coverage", {}).get("splits", {})
    names = {"unknown_fraction": "unknown_token_fraction", "mostly_unknown_fraction": "mostly_unknown_text_fraction",
             "tokens_per_character": "tokens_per_character"}
    return {f"data_{names[key]}_{split}": float(values[key]) for split, values in splits.items()
            for key in names if key in values}


def start_training_run(params: Params, resume_run_id: str | None, supersedes=(), reason: str = "") -> str:
    """Open (or, after an interrupted run, reopen) the MLflow run of this training; returns its id.

    `supersedes`: the runs of earlier trainings (train passes the ids it recorded). Each one other than the run
    opened here that is still RUNNING was left so by a kill, and nothing will continue it: it is ended as KILLED,
    tagged `superseded.by` (this run's id) and `superseded.reason` (`reason`). Finished runs are left as they are.
    """
    import mlflow

    exp = experiment_id(params.paths, params.mlflow)
    run_id = None
    if resume_run_id:
        try:
            mlflow.get_run(resume_run_id)
            mlflow.start_run(run_id=resume_run_id)
            run_id = resume_run_id
        except mlflow.exceptions.MlflowException:
            pass  # the store was reset since: start afresh
    if run_id is None:
        run = mlflow.start_run(experiment_id=exp, run_name=f"train-{time.strftime('%Y%m%d-%H%M%S')}")
        run_id = run.info.run_id
        flat = flatten(params.model_dump(mode="json", by_alias=True))
        items = list(flat.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[start:start + 100]))
        mlflow.log_dict(params.model_dump(mode="json", by_alias=True), "params.yaml")
        mlflow.log_metrics(coverage_metrics(params.paths))
        outputs = tuple(path for path in params.paths.model_dump().values() if path is not None)
        mlflow.set_tags({**git_tags(outputs=outputs), **data_tags(params.paths), "pipeline.stage": "train",
                         "model.base": params.model.name, "task.type": params.task.type,
                         "train.strategy": params.train.strategy})
    for old in dict.fromkeys(supersedes):
        if old != run_id:
            end_abandoned_run(old, run_id, reason)
    return run_id


def end_abandoned_run(run_id: str, superseded_by: str, reason: str) -> bool:
    """End `run_id` as KILLED if it is still RUNNING (a killed process cannot end its own run); True if it was."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        status = client.get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return False  # not in this store (reset since, or another store): nothing to end
    if status != "RUNNING":
        return False
    client.set_tag(run_id, "superseded.by", superseded_by)
    client.set_tag(run_id, "superseded.reason", f"left RUNNING by a process that was killed; {reason}")
    client.set_terminated(run_id, status="KILLED")
    print(f"train: MLflow run {run_id} was left RUNNING by a killed process; ended as KILLED, superseded by run "
          f"{superseded_by}")
    return True


METRIC_NAMES = {"loss": "train_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm"}
_NOT_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def history_metrics(entry: dict, step: int, timestamp_ms: int) -> list:
    """One Trainer log entry as MLflow metrics: train_loss, learning_rate, grad_norm per step; val_<metric> per
    validation (eval_loss -> val_loss, eval_macro_f1 -> val_macro_f1, ...)."""
    from mlflow.entities import Metric

    out = []
    for key, value in entry.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            continue
        if key in METRIC_NAMES and "eval_loss" not in entry:
            out.append(Metric(METRIC_NAMES[key], float(value), timestamp_ms, step))
        elif key.startswith("eval_") and key not in _NOT_METRICS:
            out.append(Metric("val_" + key.removeprefix("eval_"), float(value), timestamp_ms, step))
    return out


def live_metrics(run_id: str, client=None, retries: int = 3, backoff_s: float = 1.0):
    """A Trainer callback that logs every log entry into the MLflow run at once; `.logged` counts the points.

    Points are sent in the background (MLflow's asynchronous logging), so a step never waits for the store, and a
    store that stops answering (locked, full, a server down) does not stop training. `flush`, at the end of
    training, waits for them all and sends again, synchronously, whatever failed: up to `retries` times, `backoff_s`
    doubling in between. What still could not be logged is counted in `.lost` (with the last error in `.error`) and
    said once in a warning; the per-step history is in paths.train_history either way. After a resume the steps
    between the last checkpoint and the kill are trained, and logged, a second time: the run then holds two points
    for those steps, the later one from the run that finished.
    """
    from mlflow.tracking import MlflowClient
    from transformers import TrainerCallback

    class LiveMetrics(TrainerCallback):
        def __init__(self):
            self.client = client or MlflowClient()
            self.logged = self.lost = 0
            self.error: str | None = None
            self.pending: list = []  # (operations or None when the call itself failed, metrics)

        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = history_metrics(logs or {}, state.global_step, int(time.time() * 1000))
            if metrics:
                try:
                    operations = self.client.log_batch(run_id, metrics=metrics, synchronous=False)
                except Exception as exc:  # noqa: BLE001 - retried at the end; training goes on
                    operations, self.error = None, f"{type(exc).__name__}: {exc}"
                self.pending.append((operations, metrics))

        def on_train_end(self, args, state, control, **kwargs):
            self.flush()

        def flush(self) -> None:
            failed = []
            for operations, metrics in self.pending:
                try:
                    if operations is None:
                        raise RuntimeError(self.error)
                    operations.wait()
                    self.logged += len(metrics)
                except Exception as exc:  # noqa: BLE001
                    self.error = self.error or f"{type(exc).__name__}: {exc}"
                    failed.extend(metrics)
            self.pending = []
            delay = backoff_s
            for attempt in range(retries):
                if not failed:
                    break
                if attempt:
                    time.sleep(delay)
                    delay *= 2
                left = []
                for start in range(0, len(failed), 1000):  # MLflow takes at most 1000 metrics per batch
                    chunk = failed[start:start + 1000]
                    try:
                        self.client.log_batch(run_id, metrics=chunk)
                        self.logged += len(chunk)
                    except Exception as exc:  # noqa: BLE001
                        self.error = f"{type(exc).__name__}: {exc}"
                        left.extend(chunk)
                failed = left
            if failed:
                self.lost += len(failed)
                print(f"train: warning: {len(failed)} metric points could not be logged to MLflow run {run_id} "
                      f"after {retries} tries ({self.error}); the per-step and per-epoch history is in the train "
                      f"reports (paths.train_history, paths.eval_history)", file=sys.stderr)

    return LiveMetrics()


def check_store(params: Params, lock_timeout_s: float = 30) -> str:
    """Write to the tracking store once (the experiment, one experiment tag) before anything trains; returns the
    experiment id. A store that cannot be written (a locked or full SQLite file, a folder in its place, a server
    that does not answer) is a StageError naming it, instead of a failure at a random step of a long run.

    A SQLite store is tried first with sqlite3 itself: one write transaction, waiting `lock_timeout_s` for another
    writer, so that a broken file fails in seconds (MLflow retries opening it for about 100 s before it gives up).
    """
    from mlflow.tracking import MlflowClient

    from sft_pipeline.io import StageError

    uri = tracking_uri(params.paths)

    def refuse(exc: BaseException) -> StageError:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return StageError(f"the MLflow store {uri} cannot be written ({type(exc).__name__}: {message[:300]}); "
                          f"nothing was trained. Check that paths.mlflow_db is a writable SQLite file on a volume "
                          f"with free space and that no other program holds it locked (or that the server of "
                          f"MLFLOW_TRACKING_URI answers), then rerun")

    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            if db.exists():
                con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=lock_timeout_s, isolation_level=None)
                try:
                    con.execute("BEGIN IMMEDIATE")
                    con.execute("ROLLBACK")
                finally:
                    con.close()
        except (sqlite3.Error, OSError) as exc:
            raise refuse(exc) from exc
    try:
        exp = experiment_id(params.paths, params.mlflow)
        MlflowClient().set_experiment_tag(exp, "sft_pipeline.last_train_start", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    except Exception as exc:  # noqa: BLE001 - whatever the store raised, it cannot be written
        raise refuse(exc) from exc
    return exp


def end_run_best_effort(run_id: str, status: str, tags: dict | None = None) -> str | None:
    """End `run_id` with `status` (and `tags`), without raising: a store that fails here must not mask the error
    being reported. Returns the store's error, None when the run was ended."""
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, status=status)
    except Exception as exc:  # noqa: BLE001
        print(f"train: warning: the MLflow run {run_id} could not be ended as {status} ({type(exc).__name__}: "
              f"{str(exc)[:300]}); the next training ends it as KILLED", file=sys.stderr)
        return f"{type(exc).__name__}: {exc}"
    finally:
        if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
            try:
                mlflow.end_run(status=status)
            except Exception:  # noqa: BLE001 - the warning above said so
                pass
    return None


# The promotion gate. evaluate scores the champion on the same test rows as the new version (stages/evaluate.py) and
# hands the paired scores here; promotion_decision is the rule, promote applies it to the registry.
RESAMPLES = 1000
SEED = 0
# Floating-point slack for "difference >= margin": equal predictions give a difference of exactly 0, but a margin
# such as 0.01 against 0.91 - 0.90 must not fail on the last bit.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Comparison:
    """The new version and the champion scored with one metric on the same test rows, and the 95% paired bootstrap
    interval of new - champion."""

    metric: str
    new: float
    champion: float
    low: float
    high: float
    rows: int
    resamples: int
    seed: int

    @property
    def difference(self) -> float:
        return self.new - self.champion


def paired_bootstrap(scores: Callable[[Any, np.ndarray], dict], new_outputs, champion_outputs, metric: str,
                     resamples: int = RESAMPLES, seed: int = SEED) -> Comparison:
    """Score both models' per-row outputs on the same resamples of the rows (`scores`: the task's gate_scores).

    Each resample draws n row indices with replacement, seeded, and scores both models on those rows: a row that is
    hard for both is drawn for both, so the interval is that of the difference, narrower than two separate
    intervals would suggest. The interval is the 2.5th and 97.5th percentile of the resampled differences.
    """
    n = len(new_outputs)
    if len(champion_outputs) != n:
        raise ValueError(f"the new model has outputs for {n} rows, the champion for {len(champion_outputs)}")
    rng = np.random.default_rng(seed)
    whole = np.ones((1, n))
    new, champion = scores(new_outputs, whole)[metric], scores(champion_outputs, whole)[metric]
    differences = []
    chunk = max(1, 2_000_000 // max(n, 1))  # resamples x rows weights in memory at once: about 16 MB
    for start in range(0, resamples if n else 0, chunk):
        draws = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        # How often each row is drawn, per resample: one bincount over the resamples' rows laid end to end.
        offsets = draws + n * np.arange(len(draws))[:, None]
        weights = np.bincount(offsets.ravel(), minlength=len(draws) * n).reshape(len(draws), n)
        differences.append(scores(new_outputs, weights)[metric] - scores(champion_outputs, weights)[metric])
    differences = np.concatenate(differences) if differences else np.zeros(1)
    low, high = np.percentile(differences, [2.5, 97.5])
    return Comparison(metric, float(new[0]), float(champion[0]), float(low), float(high), n, resamples, seed)


def promotion_decision(new_value: float, champion_value: float | None, champion_version: str | None,
                       settings: Mlflow, interval: tuple[float, float] | None = None) -> tuple[str, str]:
    """(alias, reason) for a new version; pure, so that the gate is tested without a registry.

    `new_value` and `champion_value` are scores on the same test rows; `interval` is the 95% paired bootstrap
    interval of their difference (without one, the difference itself: no noise is known). The rule:
    margin <= 0: promote when new - champion >= margin (at 0, a tie promotes: at least as good on the same rows;
    the interval is reported, not required, so that a small test set does not freeze the champion);
    margin m > 0: promote when new - champion >= m and the interval's lower bound is above 0 (better by the margin,
    and not by the luck of the rows drawn).
    """
    metric, margin = settings.promotion_metric, settings.promotion_margin
    if champion_value is None:
        return CHAMPION, f"no champion yet; {metric} = {new_value:.4f}"
    difference = new_value - champion_value
    low, high = interval if interval is not None else (difference, difference)
    compared = (f"{metric} {new_value:.4f} vs champion v{champion_version}'s {champion_value:.4f} on the same rows: "
                f"difference {difference:+.4f} (95% paired bootstrap interval {low:+.4f} to {high:+.4f})")
    enough = difference >= margin - TOLERANCE
    if margin <= 0:
        if enough:
            return CHAMPION, f"{compared} >= margin {margin}"
        return CHALLENGER, f"{compared} < margin {margin}; champion stays v{champion_version}"
    if enough and low > 0:
        return CHAMPION, f"{compared} >= margin {margin} and the interval is above 0"
    why = f"< margin {margin}" if not enough else "but the interval reaches 0 (the gain may be noise)"
    return CHALLENGER, f"{compared} {why}; champion stays v{champion_version}"


def current_champion(settings: Mlflow):
    """The model version holding the `champion` alias, or None."""
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_model_version_by_alias(settings.registered_model, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


@dataclass(frozen=True)
class Gate:
    """What evaluate found about the champion before the decision.

    status: "none" (no champion yet), "self" (the champion is this run's own version: evaluate ran again without a
    new training), "scored" (the champion answered the same rows: `comparison`), "unloadable" (its model could not
    be loaded or did not answer: `note` says why; it is replaced). `new_value` is the new version's score (on the
    compared rows when scored)."""

    status: str
    new_value: float
    champion_version: str | None = None
    comparison: Comparison | None = None
    note: str | None = None


def promote(run_id: str, version: str, settings: Mlflow, gate: Gate) -> dict:
    """Apply the promotion gate to a registered version and record the decision on the run and the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name, version = settings.registered_model, str(version)
    champion = gate.champion_version
    comparison = gate.comparison
    if gate.status == "scored":
        alias, reason = promotion_decision(comparison.new, comparison.champion, champion, settings,
                                           (comparison.low, comparison.high))
        reason += f" ({comparison.rows} test rows, {comparison.resamples} resamples)"
    elif gate.status == "self":
        # Evaluate ran again on the same training: the decision that made it champion stands, word for word.
        alias = CHAMPION
        reason = client.get_model_version(name, version).tags.get("promotion.reason") or \
            f"v{version} is already the champion"
    elif gate.status == "unloadable":
        alias = CHAMPION
        reason = (f"champion v{champion} could not be scored on the test rows ({gate.note}); replaced; "
                  f"{settings.promotion_metric} = {gate.new_value:.4f}")
    elif gate.status == "none":
        alias, reason = promotion_decision(gate.new_value, None, None, settings)
    else:
        raise ValueError(f"unknown gate status {gate.status!r}")
    if gate.note and gate.status == "scored":
        reason += f"; {gate.note}"
    client.set_registered_model_alias(name, alias, version)
    if alias == CHAMPION:
        # One alias per version: a challenger that becomes champion is nobody's challenger any more. (A challenger
        # is never the champion: the gate above compares a version only with a champion that is another version.)
        try:
            if str(client.get_model_version_by_alias(name, CHALLENGER).version) == version:
                client.delete_registered_model_alias(name, CHALLENGER)
        except mlflow.exceptions.MlflowException:
            pass  # no challenger
    decision = {"model": name, "version": version, "alias": alias, "reason": reason,
                "metric": settings.promotion_metric, "value": round(gate.new_value, 6),
                "margin": settings.promotion_margin,
                "champion_before": champion if gate.status != "self" else version, "champion_status": gate.status}
    tags = {"promotion.decision": alias, "promotion.reason": reason, "promotion.champion_status": gate.status}
    if champion is not None:
        tags["promotion.champion_version"] = champion
    if comparison is not None:
        decision["comparison"] = {
            "rows": comparison.rows, "new": round(comparison.new, 6), "champion": round(comparison.champion, 6),
            "difference": round(comparison.difference, 6),
            "interval_95": [round(comparison.low, 6), round(comparison.high, 6)],
            "resamples": comparison.resamples, "seed": comparison.seed,
            # What the champion's run logged when it was registered: on the test rows of its day.
            "champion_when_registered": registered_value(client, name, champion, settings.promotion_metric)}
        metric = settings.promotion_metric
        client.log_batch(run_id, metrics=[
            _metric(f"champion_{metric}", comparison.champion), _metric(f"paired_{metric}", comparison.new),
            _metric("promotion_difference", comparison.difference), _metric("promotion_interval_low", comparison.low),
            _metric("promotion_interval_high", comparison.high), _metric("promotion_rows", comparison.rows)])
    if gate.note:
        decision["note"] = gate.note
        tags["promotion.note"] = gate.note[:5000]
    if gate.status == "self":  # the tags of the decision that made it champion stay as they are
        return decision
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
        client.set_tag(run_id, key, value)
    if gate.status == "unloadable":  # on the old version too, where a reader of the registry looks first
        client.set_model_version_tag(name, champion, "promotion.unloadable",
                                     f"replaced by v{version}: {gate.note}"[:5000])
    client.set_tag(run_id, "registry.version", version)
    return decision


def registered_value(client, name: str, version: str | None, metric: str) -> float | None:
    if version is None:
        return None
    import mlflow

    try:
        return client.get_run(client.get_model_version(name, version).run_id).data.metrics.get(metric)
    except mlflow.exceptions.MlflowException:  # its run may be deleted; this number is only for the reader
        return None


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def registered_version_of(run_id: str, settings: Mlflow) -> str | None:
    """The version already registered from this run (evaluate ran again without a new training), if any."""
    from mlflow.tracking import MlflowClient

    versions = MlflowClient().search_model_versions(f"name='{settings.registered_model}' and run_id='{run_id}'")
    found = max((int(v.version) for v in versions), default=None)
    return None if found is None else str(found)


def main(argv: list[str] | None = None) -> int:
    from sft_pipeline.params import load

    parser = argparse.ArgumentParser(description="Make the project's MLflow store follow the project (moved or "
                                                 "copied) and give its experiment the UI's machine-learning view.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load(args.params)
    root = args.params.resolve().parent
    print(f"mlflow: experiment {params.mlflow.experiment} is {experiment_id(params.paths, params.mlflow, root)} in "
          f"{tracking_uri(params.paths, root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
