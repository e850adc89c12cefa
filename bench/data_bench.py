"""Data-stage benchmarks: tokenize against one tokenizer call, scale to a million rows, incremental `dvc repro`.

    python -m bench.run --only tokenize,scale,incremental [--quick]

Every stage of the scale benchmark runs as its own process (`python -m stages.<name>`), timed from outside, and its
peak RSS is read from the kernel (os.wait4's ru_maxrss), so the numbers are what `dvc repro` would see.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import synth
from bench.common import ROOT, copy_code, env, minilm_dir, project_params, ratio, tiny_bert, write_params

DATA_STAGES = ("clean", "validate", "split", "tokenize")


def run_stage(stage: str, params_file: Path) -> dict:
    """Run one stage as a child process (through bench.measure); wall seconds and peak RSS in MB."""
    result = subprocess.run([sys.executable, "-m", "bench.measure", sys.executable, "-m", f"stages.{stage}",
                             "--params", str(params_file)], cwd=ROOT, env=env(), capture_output=True, text=True)
    try:
        measured = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        measured = {"returncode": result.returncode}
    if result.returncode != 0 or measured["returncode"] != 0:
        raise RuntimeError(f"stages.{stage} failed:\n{result.stderr[-3000:]}")
    return {"seconds": measured["seconds"], "peak_rss_mb": measured["peak_rss_mb"]}


# ------------------------------------------------------------------------------------------------ tokenize


def tokenize_bench(work: Path, quick: bool) -> dict:
    """rows/s of stages.tokenize.run (reading Parquet, tokenizing, writing Arrow and its cache, starting from an empty
    cache) over one tokenizer call."""
    import pandas as pd

    from sft_pipeline.encoding import SPLITS
    from sft_pipeline.modeling import load_tokenizer
    from sft_pipeline.params import parse
    from stages import clean, split, tokenize, validate

    cases = {"synthetic_short_texts": (20_000 if quick else 200_000, 64)}
    out = {"repeats": 2 if quick else 3, "cases": {}}
    bbc = work / "bbc_articles"
    from bench.train_bench import bbc_raw

    raw = project_params(bbc, minilm_dir(), tokenize={"max_length": 256})
    params = parse(raw)
    params.paths.raw_dir.mkdir(parents=True, exist_ok=True)
    (params.paths.raw_dir / "bbc.csv").write_bytes(bbc_raw("articles"))
    clean.run(params)
    validate.run(params)
    split.run(params)
    prepared = {"bbc_articles_256": params}
    for name, (rows, max_length) in cases.items():
        folder = work / name
        raw = project_params(folder, minilm_dir(), tokenize={"max_length": max_length})
        params = parse(raw)
        synth.write_csv(params.paths.raw_dir / "synthetic.csv", rows)
        clean.run(params)
        validate.run(params)
        split.run(params)
        prepared[name] = params
    for name, params in prepared.items():
        texts = [t for s in SPLITS for t in pd.read_parquet(params.paths.split_dir / f"{s}.parquet")["text"]]
        tokenizer = load_tokenizer(params.model.name, params.model)
        call, stage = [], []
        for _ in range(out["repeats"]):
            started = time.perf_counter()
            tokenizer(texts, truncation=True, max_length=params.tokenize.max_length)
            call.append(time.perf_counter() - started)
            # A first run: the stage's cache (paths.cache_dir) would otherwise make every repeat after the first a
            # lookup instead of an encoding. Writing the cache is part of what is timed.
            shutil.rmtree(params.paths.cache_dir, ignore_errors=True)
            started = time.perf_counter()
            tokenize.run(params)
            stage.append(time.perf_counter() - started)
        # The best of the repeats: the machine is shared, and the minimum is the least disturbed measurement.
        best_call, best_stage = min(call), min(stage)
        out["cases"][name] = {
            "rows": len(texts), "max_length": params.tokenize.max_length,
            "one_call_s": round(best_call, 3), "stage_s": round(best_stage, 3),
            "one_call_rows_per_s": round(len(texts) / best_call), "stage_rows_per_s": round(len(texts) / best_stage),
            "ratio_stage_vs_call": ratio(best_call, best_stage),
            "all_call_s": [round(x, 3) for x in call], "all_stage_s": [round(x, 3) for x in stage],
        }
        print(f"bench tokenize: {name}: {out['cases'][name]}", flush=True)
    out["goal_ratio>=0.8"] = all(c["ratio_stage_vs_call"] >= 0.8 for c in out["cases"].values())
    return out


# ------------------------------------------------------------------------------------------------ scale


def scale_bench(work: Path, quick: bool) -> dict:
    sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
    out = {"sizes": sizes, "runs": {}, "startup_s": {}}
    # What a stage costs before it reads a row (interpreter and imports), so that small sizes can be read fairly.
    for stage in DATA_STAGES:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import stages.{stage}" + (
            "; import transformers, datasets" if stage == "tokenize" else "")], cwd=ROOT, env=env(), check=True)
        out["startup_s"][stage] = round(time.perf_counter() - started, 2)
    for n in sizes:
        folder = work / f"rows_{n}"
        raw = project_params(folder, minilm_dir())
        params_file = write_params(folder / "params.yaml", raw)
        synth.write_csv(Path(raw["paths"]["raw_dir"]) / "synthetic.csv", n)
        stages = {}
        for stage in DATA_STAGES:
            stages[stage] = run_stage(stage, params_file)
            print(f"bench scale: {n} rows: {stage}: {stages[stage]}", flush=True)
        out["runs"][str(n)] = stages
        shutil.rmtree(folder)
    largest, previous = str(sizes[-1]), str(sizes[-2])
    growth = sizes[-1] / sizes[-2]
    out["time_growth"] = {
        stage: {
            "rows_x": growth,
            "time_x": ratio(out["runs"][largest][stage]["seconds"], out["runs"][previous][stage]["seconds"]),
            "time_x_less_startup": ratio(out["runs"][largest][stage]["seconds"] - out["startup_s"][stage],
                                         out["runs"][previous][stage]["seconds"] - out["startup_s"][stage]),
        }
        for stage in DATA_STAGES
    }
    peak = max(s["peak_rss_mb"] for s in out["runs"][largest].values())
    out["peak_rss_mb_at_largest"] = peak
    # Linear: ten times the rows costs at most about ten times the time (1.25 slack for a shared machine).
    out["goal_linear_time"] = all(g["time_x_less_startup"] <= growth * 1.25 for g in out["time_growth"].values())
    out["goal_peak_rss<=2GB"] = peak <= 2048 if sizes[-1] == 1_000_000 else None
    return out


# ------------------------------------------------------------------------------------------------ incremental


def dvc(project: Path, *args: str) -> tuple[float, str]:
    seconds, log, _ = dvc_timed(project, *args)
    return seconds, log


def dvc_timed(project: Path, *args: str) -> tuple[float, str, dict[str, float]]:
    """Run dvc; (wall seconds, output, seconds per stage that ran), each stage timed from its "Running stage" line to
    the next one (the last to the end, which includes DVC saving the outputs)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=project, env={**env(), "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, marks = [], []
    for line in process.stdout:
        lines.append(line)
        found = re.search(r"Running stage '(\w+)'", line)
        if found:
            marks.append((found.group(1), time.perf_counter()))
    process.wait()
    seconds = time.perf_counter() - started
    log = "".join(lines)
    if process.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{log[-6000:]}")
    ends = [t for _, t in marks[1:]] + [started + seconds]
    per_stage = {name: round(end - begin, 2) for (name, begin), end in zip(marks, ends)}
    return seconds, log, per_stage


def incremental_bench(work: Path, quick: bool) -> dict:
    """A no-op `dvc repro`, and per size: cold data stages, then the data stages after 1% new rows in a new file."""
    sizes = [10_000] if quick else [100_000, 1_000_000]
    out = {"sizes": sizes, "runs": {}}
    for n in sizes:
        out["runs"][str(n)] = incremental_at(work / f"rows_{n}", n, noop=n == sizes[0])
        print(f"bench incremental: {n} rows: {out['runs'][str(n)]}", flush=True)
    first = out["runs"][str(sizes[0])]
    out["noop_scope"], out["noop_repro_s"], out["noop_repro_all_s"] = (first.pop("noop_scope"),
                                                                      first.pop("noop_repro_s"),
                                                                      first.pop("noop_repro_all_s"))
    largest = out["runs"][str(sizes[-1])]
    out["goal_noop<=3s"] = out["noop_repro_s"] <= 3.0
    out["goal_incremental<=15%"] = largest["incremental_over_cold"] <= 0.15
    return out


def incremental_at(project: Path, n: int, noop: bool) -> dict:
    copy_code(project)
    tiny_bert(project / "models/pretrained/tiny-bert")
    raw = project_params(Path("."), "models/pretrained/tiny-bert", train={"epochs": 0.05, "batch_size": 32})
    raw["paths"] = {k: None if v is None else str(Path(v)) for k, v in raw["paths"].items()}
    write_params(project / "params.yaml", raw)
    synth.write_csv(project / raw["paths"]["raw_dir"] / "base.csv", n)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")

    out = {"rows": n, "new_rows": n // 100}
    cold, _, out["cold_per_stage_s"] = dvc_timed(project, "repro", "tokenize")
    out["cold_stages_ran"] = list(out["cold_per_stage_s"])
    if noop:
        target = ()
        try:
            dvc(project, "repro")
            out["noop_scope"] = "whole pipeline (clean to evaluate)"
        except RuntimeError as exc:
            # Train or evaluate could not run here: time the data stages.
            out["noop_scope"] = f"data stages only (dvc repro tokenize); whole pipeline failed: {str(exc)[-300:]}"
            target = ("tokenize",)
        times = []
        for _ in range(3):
            seconds, log = dvc(project, "repro", *target)
            if re.findall(r"Running stage '(\w+)'", log):
                raise RuntimeError(f"a repeated `dvc repro` ran stages:\n{log}")
            times.append(seconds)
        out["noop_repro_s"] = round(min(times), 2)
        out["noop_repro_all_s"] = [round(x, 2) for x in times]
    synth.write_csv(project / raw["paths"]["raw_dir"] / "new.csv", n // 100, seed=1, start=n)
    incremental, log, out["incremental_per_stage_s"] = dvc_timed(project, "repro", "tokenize")
    out["incremental_stages_ran"] = list(out["incremental_per_stage_s"])
    out["incremental_cache_lines"] = [l.strip() for l in log.splitlines() if "cache" in l]
    out["cold_data_stages_s"] = round(cold, 2)
    out["incremental_data_stages_s"] = round(incremental, 2)
    out["incremental_over_cold"] = ratio(incremental, cold)
    out["per_stage_over_cold"] = {stage: ratio(out["incremental_per_stage_s"].get(stage), seconds)
                                  for stage, seconds in out["cold_per_stage_s"].items()}
    shutil.rmtree(project, ignore_errors=True)
    return out
