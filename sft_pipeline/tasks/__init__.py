"""The tasks the pipeline can learn, by `task.type`; each is one module behind the interface in `base.py`.

    classification   text -> one of a declared set of labels (sft_pipeline/tasks/classification.py)
"""

from __future__ import annotations

from sft_pipeline.tasks.base import Task
from sft_pipeline.tasks.classification import Classification

TASKS: dict[str, Task] = {task.name: task for task in (Classification(),)}


def get(params) -> Task:
    """The task of a params object (or of a `task.type` name)."""
    name = params if isinstance(params, str) else params.task.type
    return TASKS[name]
