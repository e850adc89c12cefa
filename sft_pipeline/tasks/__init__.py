"""The tasks the pipeline can learn, by `task.type`; each is one module behind the interface in `base.py`.

    classification   text -> one of a declared set of labels (sft_pipeline/tasks/classification.py)
    instruction      a conversation -> the assistant's answer, a causal LM (sft_pipeline/tasks/instruction.py)
"""

from __future__ import annotations

import json
from pathlib import Path

from sft_pipeline.io import StageError
from sft_pipeline.tasks.base import Task
from sft_pipeline.tasks.classification import Classification
from sft_pipeline.tasks.instruction import Instruction

TASKS: dict[str, Task] = {task.name: task for task in (Classification(), Instruction())}
# Written by tokenize beside the tokenized data: the task and what train and evaluate need of it (the labels).
META_FILE = "task.json"


def read_meta(tokenized_dir: Path, task: Task) -> dict:
    """The task metadata tokenize wrote; an error if it was written for another task."""
    path = Path(tokenized_dir) / META_FILE
    if not path.is_file():
        raise StageError(f"{path}: not found; run `dvc repro tokenize` first")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("task") != task.name:
        raise StageError(f"{tokenized_dir} holds {meta.get('task')!r} data but task.type is {task.name!r}; "
                         f"run `dvc repro` so that tokenize runs again")
    return meta


def get(params) -> Task:
    """The task of a params object (or of a `task.type` name)."""
    name = params if isinstance(params, str) else params.task.type
    return TASKS[name]
