"""Training strategies (`train.strategy`): how a pretrained model is adapted, the same way for every task.

    full            every weight trains (the default)
    freeze          the pretrained model is frozen; the task's new head trains, and the top `freeze.trainable_layers`
                    transformer blocks. With no block training, the backbone's output for a row never changes, so
                    train computes it once and trains the head on it (sft_pipeline/training.py, `cache_features`).
    lora            peft LoRA adapters (rank, alpha, dropout, target modules); the new head trains in full and is
                    saved with the adapter
    prompt_tuning   a peft soft prompt of `num_virtual_tokens` (random, or started from `init_text`); the model is
                    frozen, a new head trains

The "new head" is what the task's model class adds to the pretrained model: the parameters `from_pretrained` had to
initialise (a classifier's `classifier` or `score`, a replaced head when the number of labels changed).

Saving (`save`): full and freeze write the whole model as safetensors; lora and prompt_tuning write the adapter only
(`adapter_model.safetensors`, `adapter_config.json`), a few MB whatever the size of the base. Either way the folder
holds the tokenizer and `sft_model.json` (task, strategy, base model, the task's metadata), and `load_trained`
rebuilds the model from it in one call. A LoRA adapter can be merged into a standalone full copy on demand:
`python -m sft_pipeline.merge`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sft_pipeline.io import StageError
from sft_pipeline.params import Model, Train

MODEL_INFO = "sft_model.json"
ADAPTERS = ("lora", "prompt_tuning")
# train.learning_rate: auto. Full fine-tuning moves pretrained weights a little; a new head alone, or a soft prompt,
# starts from random values and needs far larger steps (a linear head on frozen MiniLM features: 0.31 validation
# macro-F1 after 3 epochs at 1e-3, 0.93 at 1e-1). Chosen on BBC News with MiniLM at the default budget
# (bench/results/strategies.json); set a number for another model or budget.
AUTO_LEARNING_RATE = {"full": 1e-4, "freeze": 1e-1, "lora": 2e-3, "prompt_tuning": 3e-2}
# freeze with transformer blocks training: pretrained weights move again, with a random head on top (two blocks of
# MiniLM at 1e-3: validation macro-F1 0.9845 on BBC News, as full's).
AUTO_FREEZE_WITH_BLOCKS = 1e-3
# Module names of a task head, when loading reports none as new (the checkpoint already had a head of that shape).
HEAD_NAMES = ("classifier", "score")


def learning_rate(options: Train) -> float:
    """train.learning_rate, with `auto` resolved for the strategy."""
    if options.learning_rate != "auto":
        return float(options.learning_rate)
    if options.strategy == "freeze" and options.options().trainable_layers:
        return AUTO_FREEZE_WITH_BLOCKS
    return AUTO_LEARNING_RATE[options.strategy]


@dataclass
class Prepared:
    """A model ready for the Trainer, and what the strategy made trainable."""

    model: object
    strategy: str
    head: list[str]
    counts: dict
    # freeze with nothing below the head training: train the head on features computed once (training.py)
    cache_features: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def is_adapter(self) -> bool:
        return self.strategy in ADAPTERS


def head_modules(model, new_parameters: list[str], required: bool = True) -> list[str]:
    """The smallest set of module names that holds every new parameter; a known head name if there are none.

    Without one, `full` trains every weight anyway (`required=False` gives []); the other strategies cannot run.
    """
    modules = sorted({name.rsplit(".", 1)[0] for name in new_parameters if "." in name})
    top = [m for m in modules if not any(m.startswith(other + ".") for other in modules if other != m)]
    if top:
        return top
    names = dict(model.named_modules())
    found = [name for name in HEAD_NAMES if name in names]
    if not found and required:
        raise StageError("cannot tell which modules of the model are the task's head: loading initialised nothing "
                         f"new and it has none of {', '.join(HEAD_NAMES)}; use train.strategy: full")
    return found[:1]


def transformer_blocks(model) -> list[str]:
    """Names of the repeated blocks (the longest ModuleList of one module class), bottom to top."""
    import torch

    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                best = [f"{name}.{i}" for i in range(len(module))]
    return best


def _set_trainable(model, prefixes: list[str]) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad = any(name == p or name.startswith(p + ".") for p in prefixes)


def prepare(model, new_parameters: list[str], options: Train, task, tokenizer_dir: Path,
            max_length: int | None = None) -> Prepared:
    """Apply `options.strategy` to a freshly loaded model (see the module docstring); `max_length` is the longest
    tokenized row, which a soft prompt's positions come on top of."""
    from sft_pipeline.modeling import parameter_counts

    strategy = options.strategy
    head = head_modules(model, new_parameters, required=strategy != "full") if task.new_head else []
    if strategy == "full":
        for parameter in model.parameters():
            parameter.requires_grad = True
        return Prepared(model, strategy, head, parameter_counts(model))
    if strategy == "freeze":
        settings = options.options()
        blocks = transformer_blocks(model)
        if settings.trainable_layers > len(blocks):
            raise StageError(f"train.freeze.trainable_layers = {settings.trainable_layers}, but the model has "
                             f"{len(blocks)} transformer blocks")
        top = blocks[len(blocks) - settings.trainable_layers:] if settings.trainable_layers else []
        if not head and not top:
            raise StageError(f"train.strategy freeze: task {task.name!r} adds no new head to the model, so nothing "
                             f"would train; set train.freeze.trainable_layers to 1 or more")
        _set_trainable(model, head + top)
        cached = settings.cache_features and not top
        parts = ([", ".join(head)] if head else []) + ([f"the top {len(top)} blocks"] if top else [])
        notes = ["trainable: " + " and ".join(parts)]
        return Prepared(model, strategy, head, parameter_counts(model), cache_features=cached, notes=notes)
    if strategy == "lora":
        from peft import LoraConfig, get_peft_model

        settings = options.options()
        config = LoraConfig(task_type=task.peft_task_type, r=settings.r, lora_alpha=settings.alpha,
                            lora_dropout=settings.dropout, target_modules=settings.target_modules,
                            modules_to_save=list(head) or None)
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as exc:
            raise StageError(f"train.lora.target_modules: {exc}") from None
        return Prepared(wrapped, strategy, head, parameter_counts(wrapped))
    if strategy == "prompt_tuning":
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        if head == ["score"]:
            # Decoder classifiers (GPT-2, Llama, ...) pool the last real token, found from the token ids; a soft
            # prompt reaches them as embeddings, so they would pool whatever sits last, padding included.
            raise StageError(f"train.strategy prompt_tuning: {type(model).__name__} pools its last real token, "
                             f"which it cannot find once peft feeds it embeddings; use lora or freeze for it")
        settings = options.options()
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and max_length is not None and max_length + settings.num_virtual_tokens > positions:
            raise StageError(f"tokenize.max_length {max_length} + train.prompt_tuning.num_virtual_tokens "
                             f"{settings.num_virtual_tokens} > the model's {positions} positions; lower one of them")
        text = settings.init_text
        config = PromptTuningConfig(
            task_type=task.peft_task_type, num_virtual_tokens=settings.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=text, tokenizer_name_or_path=str(tokenizer_dir) if text else None,
            modules_to_save=list(head) or None)
        wrapped = get_peft_model(model, config)
        notes = [f"{settings.num_virtual_tokens} virtual tokens before every input"
                 + (f" (the model takes {positions} positions in all)" if positions else "")]
        return Prepared(wrapped, strategy, head, parameter_counts(wrapped), notes=notes)
    raise AssertionError(f"unknown strategy {strategy!r}")


# ------------------------------------------------------------------------------------------------ save and load


def base_reference(model: Model) -> dict:
    """Where the base model of an adapter is found again: its name (hub id or folder), revision, absolute folder."""
    local = Path(model.name)
    return {"name": model.name, "revision": model.revision,
            "path": str(local.resolve()) if local.is_dir() else None}


def save(prepared: Prepared, tokenizer, out: Path, info: dict, state_dict: dict | None = None) -> None:
    """Write the trained model into `out` (an empty folder): weights or adapter, tokenizer, sft_model.json.
    `state_dict`: the model's full weights where its own are shards (FSDP; training.full_state_dict)."""
    prepared.model.save_pretrained(str(out), **({} if state_dict is None else {"state_dict": state_dict}))
    (out / "README.md").unlink(missing_ok=True)  # peft's model card template; sft_model.json says what this is
    tokenizer.save_pretrained(str(out))
    (out / MODEL_INFO).write_text(json.dumps({**info, "strategy": prepared.strategy, "head": prepared.head},
                                             indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_info(model_dir: Path) -> dict:
    path = Path(model_dir) / MODEL_INFO
    if not path.is_file():
        raise StageError(f"{model_dir}: no {MODEL_INFO}; it is not a model trained by this pipeline "
                         f"(run `dvc repro train`)")
    return json.loads(path.read_text(encoding="utf-8"))


def resolve_base(info: dict, override: str | None = None) -> str:
    """The base model's location: `override`, else its name where it exists or is a hub id, else its absolute path."""
    if override:
        return override
    base = info["base"]
    if Path(base["name"]).exists() or base["path"] is None:
        return base["name"]
    if Path(base["path"]).exists():
        return base["path"]
    raise StageError(f"the base model of this adapter, {base['name']!r} (at {base['path']}), is not here; pass its "
                     f"location, or serve a merged copy (python -m sft_pipeline.merge)")


def serving_needs(info: dict) -> tuple[dict, list[str]]:
    """(serving config entries, pip requirements) the served model needs beyond the task's: for an adapter, its base
    model's location (a hub id, or the folder made absolute) and peft."""
    if info["strategy"] not in ADAPTERS:
        return {"strategy": info["strategy"]}, []
    import peft

    base = resolve_base(info)
    if Path(base).exists():
        base = str(Path(base).resolve())
    return {"strategy": info["strategy"], "base_model": base}, [f"peft=={peft.__version__}"]


def load_trained(model_dir: Path, base: str | None = None, trust_remote_code: bool = False, device: str = "cpu"):
    """(model in eval mode, tokenizer, info) for a folder written by `save`, whatever the strategy."""
    from sft_pipeline import tasks
    from sft_pipeline.modeling import auto_class, load_tokenizer

    model_dir = Path(model_dir)
    info = read_info(model_dir)
    task = tasks.get(info["task"])
    source = Model(name=str(model_dir), trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, source)
    if info["strategy"] in ADAPTERS:
        from peft import PeftModel

        model = PeftModel.from_pretrained(_base_model(info, tokenizer, base, trust_remote_code), str(model_dir))
    else:
        try:
            model = auto_class(task.auto_class).from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise StageError(f"cannot load the trained model in {model_dir}: {exc}") from None
    return model.to(device).eval(), tokenizer, info


def _base_model(info: dict, tokenizer, base: str | None, trust_remote_code: bool):
    """The pretrained model named by a trained folder's info, shaped for its task (labels, pad token)."""
    from sft_pipeline import tasks
    from sft_pipeline.modeling import load_pretrained

    task = tasks.get(info["task"])
    source = Model(name=resolve_base(info, base), revision=info["base"]["revision"],
                   trust_remote_code=trust_remote_code)
    model, _ = load_pretrained(source.name, source, task.auto_class, task.model_kwargs(info["meta"], tokenizer))
    return model


def load_base(model_dir: Path, base: str | None = None, trust_remote_code: bool = False, device: str = "cpu"):
    """The base model a folder written by `save` was trained from, untuned, shaped for its task, in eval mode."""
    from sft_pipeline.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir, Model(name=str(model_dir), trust_remote_code=trust_remote_code))
    return _base_model(read_info(model_dir), tokenizer, base, trust_remote_code).to(device).eval()


def merge(model_dir: Path, out: Path, base: str | None = None) -> dict:
    """A standalone full copy of a LoRA-trained model (weights merged, safetensors) in `out`; returns its info."""
    info = read_info(model_dir)
    if info["strategy"] == "prompt_tuning":
        raise StageError("a soft prompt cannot be merged into the weights (it is an input, not a weight change); "
                         "serve the adapter with its base model, as evaluate and the MLflow model do")
    if info["strategy"] not in ADAPTERS:
        raise StageError(f"{model_dir} was trained with strategy {info['strategy']!r}: it is a full model already")
    model, tokenizer, _ = load_trained(model_dir, base=base)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    merged_info = {**info, "strategy": "full", "merged_from": {"strategy": info["strategy"], "folder": str(model_dir)}}
    (out / MODEL_INFO).write_text(json.dumps(merged_info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return merged_info
