"""Versions of data and models: the raw annotations and base models as DVC-tracked data, a git commit per retrain,
the project behind DVC's experiment copies, and the rebuild of a registered model version.

    python -m sft_pipeline.versions snapshot                 # `dvc add` the raw folder and the base models
    python -m sft_pipeline.versions rebuild 3 --into ../v3   # model version 3 (or a commit): clone, pull, repro

- **Snapshots.** paths.raw_dir and paths.pretrained_dir are DVC-tracked folders (`data/raw.dvc`,
  `models/pretrained.dvc` in git, their files in the DVC cache): a commit then pins the annotations and base weights a
  model was trained on, `dvc push` sends them to the remote, and `git checkout <commit> && dvc checkout` (or, in a
  fresh clone, `dvc pull`) gets them back. `make run` and the retraining flow take the snapshot; a file dropped into
  the folder is reported by `dvc status` until then. `dvc add` rehashes only files whose size or mtime changed.
- **A commit per retrain** (`commit`): the flow commits the files that pin the run (the .dvc files, dvc.lock,
  params.yaml, the small outputs dvc.yaml keeps out of the cache: reports and metrics) and nothing else, whatever
  else is staged; then `dvc push` when a DVC remote is configured.
- **Experiment copies.** `dvc exp run --temp` and queued experiments run in a copy of the project under
  `<project>/.dvc/tmp/exps/`; `project_home` finds the project from there, so that MLflow runs, the registry and the
  registry lock are the project's, not the copy's (which DVC deletes when the experiment ends).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from sft_pipeline.io import StageError, run_main
from sft_pipeline.params import Paths, add_params_argument, load

_EXPERIMENT_COPIES = (".dvc", "tmp", "exps")


def project_home(root: Path = Path(".")) -> Path:
    """The project a folder belongs to: `root` itself, or for a copy DVC made for an experiment (`--temp`, a queue
    worker: `<project>/.dvc/tmp/exps/...`), the project it was copied from."""
    root = Path(root).resolve()
    parts = root.parts
    for i in range(len(parts) - len(_EXPERIMENT_COPIES)):
        if parts[i:i + len(_EXPERIMENT_COPIES)] == _EXPERIMENT_COPIES:
            return Path(*parts[:i])
    return root


def in_experiment_copy(root: Path = Path(".")) -> bool:
    return project_home(root) != Path(root).resolve()


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}


def run(command: list[str], root: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=root, env=env(), capture_output=True, text=True, errors="replace")
    if check and result.returncode != 0:
        shown = " ".join(command[2:] if command[0] == sys.executable else command)
        raise StageError(f"`{shown}` failed in {root} (exit {result.returncode}):\n"
                         + (result.stderr or result.stdout).strip()[-2000:])
    return result


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], root, check)


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["git", *args], root, check)


def dvc_file(path: Path) -> Path:
    return Path(f"{Path(path)}.dvc")


def snapshot_md5(root: Path, path: Path) -> str | None:
    """The hash DVC recorded for a tracked folder (`<path>.dvc`), None if it is not tracked."""
    file = Path(root) / dvc_file(path)
    if not file.is_file():
        return None
    outs = (yaml.safe_load(file.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def snapshot(root: Path, paths: Paths) -> dict[str, tuple[str | None, str | None]]:
    """`dvc add` the raw folder and the base models' folder (each that exists); {folder: (md5 before, md5 after)}."""
    root = Path(root)
    changes = {}
    for folder in (paths.raw_dir, paths.pretrained_dir):
        if folder is None or not (root / folder).is_dir():
            continue
        before = snapshot_md5(root, folder)
        dvc(root, "add", str(folder))
        changes[str(folder)] = (before, snapshot_md5(root, folder))
    return changes


def pinned_files(root: Path) -> list[str]:
    """What a commit of a run holds: the .dvc files, dvc.lock, params.yaml, the .gitignore files DVC writes, and the
    outputs dvc.yaml keeps out of the DVC cache (`cache: false`: reports, metrics, plots' data) that exist."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    with Repo(str(root)) as repo:
        small = [Path(out.fs_path) for stage in repo.index.stages for out in stage.outs
                 if not out.use_cache and not stage.is_data_source]
        tracked = [Path(stage.path) for stage in repo.index.stages if stage.is_data_source]
    candidates = [*tracked, *(p.parent / ".gitignore" for p in tracked), root / "dvc.lock", root / "params.yaml",
                  *small]
    return sorted({p.relative_to(root).as_posix() for p in candidates if p.is_file()})


def commit(root: Path, message: str) -> str | None:
    """Commit the pinned files (and only them: other staged changes stay staged); returns the new commit, or None
    when they are as committed already."""
    root = Path(root)
    files = pinned_files(root)
    git(root, "add", "--", *files)
    if git(root, "diff", "--cached", "--quiet", "--", *files, check=False).returncode == 0:
        return None
    # A machine with no git identity (a CI runner, a fresh server) still gets the commit, under the pipeline's name.
    identity = [] if has_identity(root) else ["-c", "user.name=sft-pipeline", "-c", "user.email=sft-pipeline@localhost"]
    git(root, *identity, "commit", "--quiet", "--no-verify", "-m", message, "--only", "--", *files)
    return git(root, "rev-parse", "HEAD").stdout.strip()


def has_identity(root: Path) -> bool:
    return git(root, "config", "user.email", check=False).returncode == 0


def remote_configured(root: Path) -> bool:
    return bool(dvc(root, "remote", "list", check=False).stdout.strip())


def push(root: Path) -> bool:
    """`dvc push` (data, models and the stages' outputs in the cache) when a DVC remote is configured."""
    if not remote_configured(root):
        return False
    dvc(root, "push", "--quiet")
    return True


def snapshot_tags(paths: Paths, root: Path = Path(".")) -> dict[str, str]:
    """`data.raw_dvc_md5` and `model.pretrained_dvc_md5`: the hashes of the DVC snapshots (`dvc add`: data/raw.dvc,
    models/pretrained.dvc) of the folders the stages read, where the folders have one."""
    tags = {}
    for key, folder in (("data.raw_dvc_md5", paths.raw_dir), ("model.pretrained_dvc_md5", paths.pretrained_dir)):
        md5 = snapshot_md5(root, folder) if folder is not None else None
        if md5:
            tags[key] = md5
    return tags


def tag_lineage(paths: Paths, commit_sha: str, root: Path = Path(".")) -> dict[str, str]:
    """Tag the MLflow run of paths.mlflow_run and the model version of paths.promotion with the commit that pins them
    and the DVC hashes of the raw folder and base models: `pinned.commit`, `data.raw_dvc_md5`,
    `model.pretrained_dvc_md5`."""
    import json

    from mlflow.tracking import MlflowClient

    from sft_pipeline import tracking

    tags = {"pinned.commit": commit_sha, **snapshot_tags(paths, root)}
    tracking.use_store(paths, root)
    client = MlflowClient()
    run_file, promotion = Path(root) / paths.mlflow_run, Path(root) / paths.promotion
    if run_file.is_file():
        run_id = json.loads(run_file.read_text())["run_id"]
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    if promotion.is_file():
        decision = json.loads(promotion.read_text())
        for key, value in tags.items():
            client.set_model_version_tag(decision["model"], str(decision["version"]), key, value)
    return tags


# ------------------------------------------------------------------------------------------------ rebuild


def version_commit(paths: Paths, model: str, version: str, root: Path = Path(".")) -> str:
    """The commit that pins a registered version: its `pinned.commit` tag, else its run's clean `git.commit`."""
    from mlflow.tracking import MlflowClient

    from sft_pipeline import tracking

    tracking.use_store(paths, root)
    client = MlflowClient()
    found = client.get_model_version(model, version)
    if found.tags.get("pinned.commit"):
        return found.tags["pinned.commit"]
    run = client.get_run(found.run_id)
    if run.data.tags.get("git.dirty") == "false" and run.data.tags.get("git.commit", "unknown") != "unknown":
        return run.data.tags["git.commit"]
    raise StageError(f"{model} v{version} has no pinned.commit tag, and its run was made from uncommitted code or "
                     f"params (git.dirty {run.data.tags.get('git.dirty')!r}): no commit holds what it was trained on")


def rebuild(root: Path, commit_sha: str, into: Path) -> dict:
    """Clone the project at `commit_sha` into `into`, get the raw data and base models of that commit (`dvc pull`
    from the remote, or from this project's cache when there is none), rebuild every stage (`dvc repro`) and compare
    the rebuilt test predictions with the committed ones."""
    root, into = Path(root).resolve(), Path(into).resolve()
    if into.exists() and any(into.iterdir()):
        raise StageError(f"{into}: not empty; rebuild into a new folder")
    git(root, "clone", "--quiet", "--no-checkout", str(root), str(into))
    git(into, "checkout", "--quiet", commit_sha)
    params = load(into / "params.yaml")
    inputs = [str(dvc_file(p)) for p in (params.paths.raw_dir, params.paths.pretrained_dir)
              if p is not None and (into / dvc_file(p)).is_file()]
    if not inputs:
        raise StageError(f"commit {commit_sha} tracks no raw data with DVC ({dvc_file(params.paths.raw_dir)} is not "
                         f"in it): it cannot be rebuilt")
    if remote_configured(into):
        dvc(into, "pull", "--quiet", *inputs)
    else:  # the same machine: this project's cache holds them
        dvc(into, "config", "--local", "cache.dir", str(root / ".dvc" / "cache"))
        dvc(into, "checkout", "--quiet", *inputs)
    # --no-run-cache: every stage runs again; outputs found in the run cache would be restored, not rebuilt.
    dvc(into, "repro", "--quiet", "--no-run-cache")
    predictions = params.paths.predictions
    same = git(into, "diff", "--quiet", "--", str(predictions), check=False).returncode == 0
    return {"commit": commit_sha, "folder": str(into), "predictions": str(into / predictions),
            "predictions_equal": same}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("snapshot", help="`dvc add` the raw folder and the base models' folder")
    again = sub.add_parser("rebuild", help="rebuild a registered model version (or a commit) in a new folder")
    again.add_argument("version", help="a version number of mlflow.registered_model, or a git commit")
    again.add_argument("--into", required=True, type=Path, help="a new folder to rebuild in")
    args = parser.parse_args(argv)

    def body():
        params = load(args.params)
        if args.command == "snapshot":
            for folder, (before, after) in snapshot(Path("."), params.paths).items():
                said = "unchanged" if before == after else f"snapshot {after}" + (f" (was {before})" if before else "")
                print(f"versions: {folder}: {said}")
            return
        target = args.version
        if target.isdigit():
            target = version_commit(params.paths, params.mlflow.registered_model, target)
            print(f"versions: {params.mlflow.registered_model} v{args.version} was trained at commit {target}")
        result = rebuild(Path("."), target, args.into)
        print(f"versions: rebuilt commit {result['commit']} in {result['folder']}; test predictions "
              f"{'equal' if result['predictions_equal'] else 'DIFFER from'} the recorded ones ({result['predictions']})")
        if not result["predictions_equal"]:
            raise StageError("the rebuilt model's test predictions differ from the recorded ones")

    return run_main(body, "versions")


if __name__ == "__main__":
    sys.exit(main())
