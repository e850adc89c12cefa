"""Run the benchmarks and write bench/results/*.json and bench/results/README.md.

    make bench                                   # everything, about 65 minutes on 2 CPU cores
    python -m bench.run --quick                  # smaller sizes and fewer steps, a few minutes
    python -m bench.run --only train,tokenize    # a subset: train, tokenize, scale, incremental, strategies,
                                                 # instruction
    python -m bench.run --device cuda            # make bench DEVICE=cuda: train and strategies on the GPU, at the
                                                 # precision train.precision auto picks there; results in
                                                 # bench/results/cuda/ (the CPU's stay where they are)

Every benchmark measures its baseline in the same run and reports ratios, because absolute times on a shared
machine move with its load; the machine is described in each JSON file and in the README.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, machine, save

BENCHES = ("train", "tokenize", "scale", "incremental", "strategies", "instruction")
# The benchmarks that train on --device; the others measure CPU work (the data stages) or set the CPU themselves.
DEVICE_BENCHES = ("train", "strategies")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps (a smoke run)")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    parser.add_argument("--results", type=Path, default=None,
                        help="where to write the JSON and the README (default bench/results, bench/results/cuda "
                             "with --device cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where train and strategies train (default cpu; auto: cuda when there is one)")
    args = parser.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    import bench.common as common
    from sft_pipeline.io import StageError

    try:
        device = common.set_device(args.device)
    except StageError as exc:
        parser.error(str(exc).replace("train.device", "--device"))
    on_cpu_only = [b for b in chosen if b not in DEVICE_BENCHES]
    if device == "cuda" and on_cpu_only:
        print(f"bench: {', '.join(on_cpu_only)} measure(s) on the CPU whatever --device says (the data stages "
              f"{'and the instruction contenders ' if 'instruction' in on_cpu_only else ''}run there)", flush=True)
    common.RESULTS = args.results or (RESULTS / "cuda" if device == "cuda" else RESULTS)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB, torch {info['torch']}; training "
          f"benchmarks on {device}" + (f" ({info['gpu']}, {info['bench_precision']})" if device == "cuda" else ""),
          flush=True)
    for name in chosen:
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        started = time.perf_counter()
        try:
            if name == "train":
                from bench.train_bench import run

                data = run(work, args.quick)
            elif name == "strategies":
                from bench.strategies_bench import run

                data = run(work, args.quick)
            elif name == "instruction":
                from bench.instruction_bench import run

                data = run(work, args.quick)
            else:
                from bench import data_bench

                data = getattr(data_bench, f"{name}_bench")(work, args.quick)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        data = {"benchmark": name, "quick": args.quick, "bench_wall_s": round(time.perf_counter() - started, 1),
                "machine": info, **data}
        path = save(name, data)
        print(f"{name}: wrote {path}", flush=True)
    write_readme(common.RESULTS)
    print(f"wrote {common.RESULTS / 'README.md'}")
    return 0


def _mark(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def write_readme(results: Path) -> None:
    """The Markdown summary, rebuilt from whatever JSON files are in `results`."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    lines = ["# Benchmark results", "",
             "Written by `make bench` (`python -m bench.run`); every ratio compares contenders measured in the same "
             "run. Each JSON file holds the raw numbers.", ""]
    any_info = next(iter(found.values()), {}).get("machine")
    if any_info:
        lines += ["## Machine", "", f"- CPU: {any_info['cpu']}, {any_info['cores']} cores, "
                  f"{any_info['ram_gb']} GB RAM, GPU: {any_info['gpu'] or 'none'}; training benchmarks on "
                  f"{any_info.get('bench_device', 'cpu')} at {any_info.get('bench_precision', 'fp32')}",
                  f"- {any_info['os']}, Python {any_info['python']}",
                  f"- torch {any_info['torch']} ({any_info['torch_threads']} threads), transformers "
                  f"{any_info['transformers']}, tokenizers {any_info['tokenizers']}, datasets {any_info['datasets']}, "
                  f"pandas {any_info['pandas']}, pyarrow {any_info['pyarrow']}, dvc {any_info['dvc']}",
                  f"- Run: {any_info['date']}; load average at start {any_info['load_average_at_start']} "
                  "(the machine is shared)", ""]
    if "train" in found:
        t = found["train"]
        lines += ["## 1. Training throughput (MiniLM, batch 32, same steps for every contender)", "",
                  "samples/s and tokens/s: the fastest repeat; validation macro-F1: mean and standard deviation over "
                  "the repeats, one seed each.", "",
                  "| task | max_length | steps | seeds | contender | samples/s | real tokens/s | val macro-F1 (mean) "
                  "| std | per seed |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
        for task, d in t["tasks"].items():
            for c in d["contenders"]:
                std = "" if c.get("val_macro_f1_std") is None else f"{c['val_macro_f1_std']:.4f}"
                per_seed = ", ".join(f"{x:.4f}" for x in c.get("repeats_val_macro_f1", []))
                lines.append(f"| {task} | {d['max_length']} | {d['steps']} | {d.get('repeats', 1)} "
                             f"| {c['contender']} | {c['samples_per_s']} | {c['real_tokens_per_s']} "
                             f"| {c['val_macro_f1']:.4f} | {std} | {per_seed} |")
        lines += ["", "| task | ours / seed recipe | ours / HF dynamic | ours / bare loop "
                  "| F1 gap vs seed (points, means over seeds) |",
                  "|---|---:|---:|---:|---:|"]
        for task, d in t["tasks"].items():
            r = d["ratios"]
            lines.append(f"| {task} | {r['ours_vs_seed']} | {r['ours_vs_hf_dynamic']} | {r['ours_vs_bare_loop']} "
                         f"| {d['f1_gap_ours_minus_seed_points']} |")
        lines += ["", "Goals: " + "; ".join(f"{k}: {_mark(v)}" for k, v in t["goals"].items()), ""]
    if "tokenize" in found:
        t = found["tokenize"]
        lines += ["## 2. Tokenize stage against one tokenizer call", "",
                  "| data | rows | max_length | one call rows/s | stage rows/s (Arrow written) | stage / call |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, c in t["cases"].items():
            lines.append(f"| {name} | {c['rows']} | {c['max_length']} | {c['one_call_rows_per_s']} "
                         f"| {c['stage_rows_per_s']} | {c['ratio_stage_vs_call']} |")
        lines += ["", f"Goal stage / call >= 0.8: {_mark(t['goal_ratio>=0.8'])}", ""]
    if "scale" in found:
        t = found["scale"]
        lines += ["## 3. Data stages at scale (each stage a separate process)", "",
                  "| rows | stage | seconds | peak RSS (MB) |", "|---:|---|---:|---:|"]
        for n, stages in t["runs"].items():
            for stage, m in stages.items():
                lines.append(f"| {int(n):,} | {stage} | {m['seconds']} | {m['peak_rss_mb']} |")
        lines += ["", "Growth from the second-largest to the largest size (interpreter start-up subtracted): "
                  + ", ".join(f"{s} {g['time_x_less_startup']}x for {g['rows_x']:.0f}x rows"
                              for s, g in t["time_growth"].items()),
                  "", f"Goals: time linear: {_mark(t['goal_linear_time'])}; peak RSS <= 2 GB at 1M rows: "
                  f"{_mark(t['goal_peak_rss<=2GB'])} (largest peak {t['peak_rss_mb_at_largest']} MB)", ""]
    if "incremental" in found:
        t = found["incremental"]
        lines += ["## 4. Incremental work", "",
                  f"No-op `dvc repro` ({t['noop_scope']}): {t['noop_repro_s']} s (best of 3; goal <= 3 s: "
                  f"{_mark(t['goal_noop<=3s'])})", "",
                  "Data stages (`dvc repro tokenize`) cold, then after 1% new rows arrive in a new file; each stage "
                  "timed from DVC's \"Running stage\" line to the next:", "",
                  "| rows | stage | cold s | after +1% s | ratio |", "|---:|---|---:|---:|---:|"]
        for n, r in t["runs"].items():
            for stage, cold in r["cold_per_stage_s"].items():
                lines.append(f"| {int(n):,} | {stage} | {cold} | {r['incremental_per_stage_s'].get(stage)} "
                             f"| {r['per_stage_over_cold'].get(stage)} |")
            lines.append(f"| {int(n):,} | **all (wall)** | {r['cold_data_stages_s']} "
                         f"| {r['incremental_data_stages_s']} | **{r['incremental_over_cold']}** |")
        lines += ["", f"Goal after +1% <= 0.15 of cold at the largest size: {_mark(t['goal_incremental<=15%'])}", ""]
    if "strategies" in found:
        t = found["strategies"]
        lines += ["## 5. Training strategies (`train.strategy`, one `dvc repro` each after a one-line change)", "",
                  f"{t['data']}; {t['model']}, {t['epochs']} epochs, batch {t['batch_size']}, max_length "
                  f"{t['max_length']}; learning rate `auto` (the strategy's own). Times: the train stage on "
                  "this machine; an epoch is its optimizer steps (validation and checkpoints excluded); freeze's "
                  "first epoch includes computing the frozen features once.", "",
                  f"Run: {t['machine']['date']} on {t['machine']['cpu']}, {t['machine']['cores']} cores "
                  f"(load average at start {t['machine']['load_average_at_start']:.2f}).", "",
                  "| strategy | test macro-F1 | vs full (points, 95% paired bootstrap) | best val macro-F1 "
                  "| trainable params | share "
                  "| learning rate "
                  "| first epoch s | later epochs s | epoch speed-up vs full (after the first) | train stage s "
                  "| peak RSS MB | saved MB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in t["strategies"]:
            v = r["vs_full"]
            ci = v["macro_f1_points_95ci"]
            lines.append(f"| {r['strategy']} | {r['test_macro_f1']:.4f} | {v['macro_f1_points']:+.2f} "
                         f"[{ci['low_points']:+.1f}, {ci['high_points']:+.1f}] | {r['best_validation_macro_f1']:.4f} "
                         f"| {r['trainable_params']:,} | {r['trainable_fraction']:.2%} | {r['learning_rate']:g} "
                         f"| {r['first_epoch_s']} | {r['later_epoch_mean_s']} | {v['epoch_after_first_speedup']}x "
                         f"| {r['train_stage_s']} | {r['peak_rss_mb']} | {r['saved_mb']} |")
        lines += ["", "Goals: " + "; ".join(f"{k}: {_mark(v)}" for k, v in t["goals"].items()), ""]
    if "instruction" in found:
        t = found["instruction"]
        lines += ["## 6. Instruction SFT throughput (answer tokens/s)", "",
                  f"{t['data']}; {t['model']}; batch {t['batch_size']}, {t['steps']} timed steps after "
                  f"{t['warmup_steps']} warm-up; same rows, adapter and optimizer for every contender.", "",
                  "| contender | train s (fastest repeat) | repeats s | CPU/wall | answer tokens/s | real tokens/s "
                  "| pad fraction | first-step loss |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for c in t["contenders"]:
            lines.append(f"| {c['contender']} | {c['train_s']} | {', '.join(map(str, c['repeats_train_s']))} "
                         f"| {c['cpu_per_wall_s']} | {c['answer_tokens_per_s']} | {c['real_tokens_per_s']} "
                         f"| {c['pad_fraction']:.1%} | {c['first_step_loss']:.5f} |")
        lines += ["", "Ratios (answer tokens/s): " + ", ".join(f"{k} {v}" for k, v in t["ratios"].items()), "",
                  "Ratios (real tokens/s): " + ", ".join(f"{k} {v}" for k, v in
                                                         t["ratios_real_tokens_per_s"].items()), "",
                  "Goals: " + "; ".join(f"{k}: {_mark(g['met'])} ({g['value']})" for k, g in t["goals"].items()),
                  ""]
    notes = results / "NOTES.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    (results / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
