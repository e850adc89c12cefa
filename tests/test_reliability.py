"""Reliability: kill -9 and resume, kill during the data stages, determinism of cold runs, and model-loading safety.

The kill tests run `dvc repro` on a tiny copy of the project (tiny random BERT, a few hundred rows or a few tens of
thousands for the data stages) and are marked `slow`; they still run under plain `pytest` and in CI.

    .venv/bin/python -m pytest -m slow tests/test_reliability.py    # only these
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sft_pipeline import training
from sft_pipeline.io import StageError
from sft_pipeline.params import Model, parse
from stages import clean, evaluate, split, tokenize, train, validate
from tests.conftest import DEFAULT_PARAMS, ROOT, copy_code, project_params, synthetic_rows, write_csv
from tests.test_pipeline import dvc, ran_stages

# Resumed and uninterrupted runs see the same batches in the same order (the Trainer restores the RNG states and
# skips the batches already seen), so on CPU they agree to float rounding; the tolerance allows for that only.
RESUME_TOLERANCE = 0.02


def files_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def make_project(root: Path, model_dir: Path, rows: list[dict], **overrides) -> Path:
    """A copy of the project (dvc.yaml, stages/, sft_pipeline/, params.yaml with tiny settings) with `rows` as its raw
    data."""
    copy_code(root)
    raw = project_params(Path("."), model="models/pretrained/tiny-bert", **overrides)
    raw["paths"] = {key: str(Path(value)) for key, value in raw["paths"].items()}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(model_dir, root / "models/pretrained/tiny-bert")
    write_csv(root / "data/raw/batch1.csv", rows)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    return root


def reference_run(root: Path, model_dir: Path, rows: list[dict], through: str = "evaluate", **overrides):
    """The same pipeline run in this process, uninterrupted, in its own folder."""
    raw = project_params(root, model=model_dir, **overrides)
    params = parse(raw)
    write_csv(params.paths.raw_dir / "batch1.csv", rows)
    clean.run(params)
    validate.run(params)
    split.run(params)
    tokenize.run(params)
    if through == "evaluate":
        train.run(params, track=False)
        evaluate.run(params, track=False)
    return params


def start_repro(root: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    # Its own session, so that kill -9 reaches dvc and the stage it runs, as a crash or an OOM kill would.
    return subprocess.Popen([sys.executable, "-m", "dvc", "repro", *args], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def complete_checkpoints(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")
                  if (p / "trainer_state.json").is_file())


# ---------------------------------------------------------------------------------------------- kill and resume

TRAIN = {"train__epochs": 3, "train__batch_size": 8, "train__save_every_steps": 10}
# LoRA checkpoints hold the adapter and the optimizer state of its weights only.
STRATEGIES = {"full": {}, "lora": {"train__strategy": "lora", "train__learning_rate": 1e-2,
                                   "train__lora": {"r": 4, "alpha": 8}}}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_train_killed_mid_epoch_resumes_from_its_last_checkpoint(tmp_path, tiny_bert, strategy):
    rows = synthetic_rows(160, seed=21)
    settings = {**TRAIN, **STRATEGIES[strategy]}
    root = make_project(tmp_path / "project", tiny_bert, rows, **settings)
    dvc(root, "repro", "tokenize")
    train_rows = json.loads((root / "reports/split.json").read_text())["rows"]["train"]
    per_epoch = -(-train_rows // 8)
    total = 3 * per_epoch

    proc = start_repro(root)
    checkpoints = root / "models/checkpoints"
    deadline = time.monotonic() + 600
    while not complete_checkpoints(checkpoints) or complete_checkpoints(checkpoints)[-1] < 20:
        assert proc.poll() is None, "train finished before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    kill_group(proc)
    last = complete_checkpoints(checkpoints)[-1]
    assert 0 < last < total
    assert not (root / "reports/train.json").exists()
    saved = {p.name for p in (checkpoints / f"checkpoint-{last}").iterdir()}
    if strategy == "lora":
        assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved, saved
    else:
        assert "model.safetensors" in saved

    result = dvc(root, "repro")
    assert ran_stages(result.stdout) == ["train", "evaluate"]
    report = json.loads((root / "reports/train.json").read_text())
    assert report["resumed_from"] is not None, "the rerun started again from step 0"
    resumed_at = int(report["resumed_from"].rsplit("-", 1)[1])
    assert resumed_at >= last and resumed_at > 0
    assert report["global_steps"] == total

    reference = reference_run(tmp_path / "reference", tiny_bert, rows, **settings)
    expected = json.loads(reference.paths.train_report.read_text())
    assert expected["resumed_from"] is None and expected["global_steps"] == total
    assert report["best_validation_macro_f1"] == pytest.approx(expected["best_validation_macro_f1"],
                                                               abs=RESUME_TOLERANCE)
    got, want = (json.loads(p.read_text()) for p in (root / "reports/metrics.json", reference.paths.metrics))
    # The tiny task is easy (F1 reaches 1.0), so the validation loss per epoch is the sharper comparison.
    losses = pd.read_csv(root / "reports/eval_history.csv")["eval_loss"].tolist()
    expected_losses = pd.read_csv(reference.paths.eval_history)["eval_loss"].tolist()
    print(f"killed after checkpoint-{last}, resumed from checkpoint-{resumed_at} of {total} steps; test macro-F1 "
          f"{got['macro']['f1']} resumed vs {want['macro']['f1']} uninterrupted; validation loss per epoch "
          f"{losses} vs {expected_losses}")
    assert losses == pytest.approx(expected_losses, abs=RESUME_TOLERANCE)
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=RESUME_TOLERANCE)
    assert got["macro"]["f1"] == pytest.approx(want["macro"]["f1"], abs=RESUME_TOLERANCE)


def test_a_half_written_checkpoint_is_not_resumed(tmp_path):
    folder = tmp_path / "ck"
    training.prepare_checkpoints(folder, {"train": 1})
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-20").mkdir()  # killed while saving: weights may be there, trainer_state.json is not
    (folder / "checkpoint-20" / "model.safetensors").write_bytes(b"partial")
    assert training.prepare_checkpoints(folder, {"train": 1}).endswith("checkpoint-10")
    assert not (folder / "checkpoint-20").exists()


# ---------------------------------------------------------------------------------------------- kill a data stage


def output_digest(path: Path) -> dict[str, str] | None:
    """The bytes of a stage output (a file, or every file of a folder); None when it does not exist."""
    if path.is_dir():
        return files_digest(path)
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()} if path.is_file() else None


def writing(final: Path) -> set[Path]:
    """The temporary siblings that atomic_path (sft_pipeline/io.py) writes `final` as: .<name>.<random>.tmp."""
    folder = final.parent
    if not folder.is_dir():
        return set()
    return {folder / e.name for e in os.scandir(folder) if e.name.startswith(f".{final.name}.") and
            e.name.endswith(".tmp")}


def kill_while_writing(root: Path, final: Path, command: list[str], attempts: int = 3) -> None:
    """Run `command` in `root` and kill -9 its process group the moment a temporary sibling of `final` appears, that
    is while the stage writes that output. A kill that lands after the stage renamed it into place interrupts nothing
    of interest: the run is repeated (at most `attempts` times), never accepted."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    for _ in range(attempts):
        left_over = writing(final)  # from an earlier kill: kill -9 leaves a hidden temporary behind
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while not (started := writing(final) - left_over):
            assert proc.poll() is None, f"{' '.join(command[2:])} ended ({proc.returncode}) before writing {final}"
            assert time.monotonic() < deadline, f"{final} was not written within 300 s"
            time.sleep(0.001)
        kill_group(proc)
        if any(p.exists() for p in started):
            return
    raise AssertionError(f"{attempts} kills came after {final.name} was complete; use more rows so it takes longer")


DATA_OUTPUTS = {"clean": "data/interim/clean.parquet", "validate": "data/interim/validated.parquet",
                "split": "data/split", "tokenize": "data/tokenized"}


@pytest.mark.slow
def test_killed_data_stages_leave_nothing_that_passes_for_complete(tmp_path, tiny_bert):
    rows = synthetic_rows(6_000, seed=8)
    root = make_project(tmp_path / "project", tiny_bert, rows)
    reference = tmp_path / "reference"
    reference_run(reference, tiny_bert, rows, through="tokenize")
    complete = {stage: output_digest(reference / path) for stage, path in DATA_OUTPUTS.items()}

    # Under `dvc repro`, killed while a stage writes its output (a file, then a folder): every output under its final
    # name is the uninterrupted run's, byte for byte, or absent, and dvc.lock records only the stages that finished.
    for stage in ("validate", "split"):
        kill_while_writing(root, root / DATA_OUTPUTS[stage], [sys.executable, "-m", "dvc", "repro", "tokenize"])
        assert not (root / DATA_OUTPUTS[stage]).exists()  # what it was writing is the hidden temporary only
        done = list(yaml.safe_load((root / "dvc.lock").read_text())["stages"])
        assert done == list(DATA_OUTPUTS)[:list(DATA_OUTPUTS).index(stage)]
        assert {s: output_digest(root / p) for s, p in DATA_OUTPUTS.items() if s in done} == \
            {s: complete[s] for s in done}

    dvc(root, "repro", "tokenize")
    assert {stage: output_digest(root / path) for stage, path in DATA_OUTPUTS.items()} == complete

    # A stage run by hand over its complete output, with inputs that change it: killed while it writes the new output,
    # the old one stays byte for byte (a file is replaced by one rename, a folder by two), and DVC finds every output
    # as it recorded it.
    write_csv(root / "data/raw/batch2.csv", synthetic_rows(300, seed=9, prefix="new"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tokenize"]["max_length"] = 16
    (root / "shorter.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage, params_file in (("clean", "params.yaml"), ("tokenize", "shorter.yaml")):
        kill_while_writing(root, root / DATA_OUTPUTS[stage],
                           [sys.executable, "-m", f"stages.{stage}", "--params", params_file])
        assert output_digest(root / DATA_OUTPUTS[stage]) == complete[stage]
    status = json.loads(dvc(root, "status", "--json").stdout)
    assert [key for entry in status["clean"] for key in entry] == ["changed deps"]  # data/raw, not its outputs
    assert not {"validate", "split", "tokenize"} & set(status), status


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_two_cold_runs_give_identical_data_and_metrics(tmp_path, tiny_bert):
    rows = synthetic_rows(40, seed=3)
    first = reference_run(tmp_path / "one", tiny_bert, rows, train__epochs=3)
    second = reference_run(tmp_path / "two", tiny_bert, rows, train__epochs=3)
    assert files_digest(first.paths.split_dir) == files_digest(second.paths.split_dir)
    assert files_digest(first.paths.tokenized_dir) == files_digest(second.paths.tokenized_dir)
    assert first.paths.metrics.read_text() == second.paths.metrics.read_text()
    assert pd.read_csv(first.paths.predictions).equals(pd.read_csv(second.paths.predictions))

    # Security, on the same output: weights are written as safetensors only, in the model and in the checkpoints.
    pickles = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
    assert {p.suffix for p in first.paths.model_dir.iterdir()} & pickles == set()
    assert (first.paths.model_dir / "model.safetensors").is_file()
    for checkpoint in first.paths.checkpoints_dir.glob("checkpoint-*"):
        assert (checkpoint / "model.safetensors").is_file()
        assert not list(checkpoint.glob("pytorch_model*.bin"))


# ---------------------------------------------------------------------------------------------- security


def test_remote_code_is_off_by_default_and_passed_to_every_loader(monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sft_pipeline import modeling
    from sft_pipeline.modeling import load_pretrained

    assert Model(name="x").trust_remote_code is False
    assert yaml.safe_load((DEFAULT_PARAMS).read_text())["model"]["trust_remote_code"] is False
    seen = []

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise Stop

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", capture)
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", capture)
    for allowed in (False, True):
        for load in (lambda m: modeling.load_tokenizer("x", m),
                     lambda m: load_pretrained("x", m, "AutoModelForSequenceClassification", {"num_labels": 2})):
            with pytest.raises(Stop):
                load(Model(name="x", trust_remote_code=allowed))
    assert seen == [False, False, True, True]


def test_a_model_that_needs_remote_code_is_refused_and_its_code_never_runs(tmp_path, tiny_bert):
    folder = tmp_path / "evil-model"
    shutil.copytree(tiny_bert, folder)
    marker = tmp_path / "code-ran"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (folder / "configuration_evil.py").write_text(payload + "from transformers import PretrainedConfig\n"
                                                  "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "modeling_evil.py").write_text(payload)
    with pytest.raises(StageError, match="cannot load"):
        from sft_pipeline.modeling import load_pretrained

        load_pretrained(folder, Model(name=str(folder)), "AutoModelForSequenceClassification", {"num_labels": 2})
    assert not marker.exists()


def test_no_service_listens_beyond_localhost(monkeypatch):
    """Servers the project starts (flows/serve.py and anything later) bind to 127.0.0.1, never to all interfaces."""
    sources = [*ROOT.glob("stages/*.py"), *ROOT.glob("sft_pipeline/**/*.py"), *ROOT.glob("flows/*.py"),
               ROOT / "Makefile", ROOT / "params.yaml",
               ROOT / "dvc.yaml"]
    wide = re.compile(r"0\.0\.0\.0|\"::\"|'::'|--host[= ]+(?!\$|\"\$|127\.0\.0\.1|localhost)[\w.:]+")
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in sources if p.is_file()
                 for m in wide.finditer(p.read_text())]
    assert offenders == []
    # The commands flows/serve.py runs, as it builds them: each names its host, and that host is loopback.
    from flows import serve

    commands = [serve.prefect_server_command(4200), serve.mlflow_ui_command(ROOT, 5000)]
    assert [command[command.index("--host") + 1] for command in commands] == ["127.0.0.1"] * 2
    # The model server runs in-process (sft_pipeline/model_server.py): the host it is handed.
    import sft_pipeline.model_server as model_server

    bound = []
    monkeypatch.setattr(model_server, "serve", lambda name, alias, poll, host, port: bound.append(host) or 0)
    assert serve.serve_model(ROOT, 5001, "champion") == 0 and bound == ["127.0.0.1"]
    assert serve.quiet_env(ROOT)["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
