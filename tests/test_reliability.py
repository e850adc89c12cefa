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


@pytest.mark.slow
def test_killed_data_stages_leave_nothing_that_passes_for_complete(tmp_path, tiny_bert):
    rows = synthetic_rows(15_000, seed=8)
    root = make_project(tmp_path / "project", tiny_bert, rows)
    reference = reference_run(tmp_path / "reference", tiny_bert, rows, through="tokenize")

    interrupted = 0
    for delay in (1.5, 3.0, 4.5, 6.0, 8.0):
        proc = start_repro(root, "tokenize")
        time.sleep(delay)
        if proc.poll() is None:
            kill_group(proc)
            interrupted += 1
        lock = yaml.safe_load((root / "dvc.lock").read_text()) if (root / "dvc.lock").exists() else {}
        done = set(lock.get("stages", {}))
        # A stage recorded in dvc.lock has all its outputs, unchanged since; `dvc status` says so.
        status = json.loads(dvc(root, "status", "--json").stdout or "{}")
        assert not done & set(status), f"a completed stage changed after a kill: {status}"
        # No temporary output under a final name: a half-written file or folder is a hidden .tmp sibling.
        for name in ("data/interim/clean.parquet", "data/interim/validated.parquet"):
            path = root / name
            if path.exists():
                pd.read_parquet(path)  # complete and readable, or absent
    assert interrupted >= 2, "the kills came too late to interrupt a stage; use more rows"
    print(f"{interrupted} runs of `dvc repro tokenize` killed")

    final = dvc(root, "repro", "tokenize")
    assert json.loads(dvc(root, "status", "--json").stdout or "{}").keys() <= {"train", "evaluate"}, final.stdout
    assert files_digest(root / "data/split") == files_digest(reference.paths.split_dir)
    assert files_digest(root / "data/tokenized") == files_digest(reference.paths.tokenized_dir)


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


def test_no_service_listens_beyond_localhost():
    """Servers the project starts (flows/serve.py and anything later) bind to 127.0.0.1, never to all interfaces."""
    sources = [*ROOT.glob("stages/*.py"), *ROOT.glob("sft_pipeline/**/*.py"), *ROOT.glob("flows/*.py"),
               ROOT / "Makefile", ROOT / "params.yaml",
               ROOT / "dvc.yaml"]
    wide = re.compile(r"0\.0\.0\.0|\"::\"|'::'|--host[= ]+(?!\$|\"\$|127\.0\.0\.1|localhost)[\w.:]+")
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in sources if p.is_file()
                 for m in wide.finditer(p.read_text())]
    assert offenders == []
    hosts = re.findall(r"^HOST\s*=\s*[\"']([^\"']+)", (ROOT / "flows/serve.py").read_text(), re.M) \
        if (ROOT / "flows/serve.py").is_file() else []
    assert set(hosts) <= {"127.0.0.1"}
