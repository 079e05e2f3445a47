"""Benchmark tasks: data + a model + a loss + a default recipe, per domain.

The built-in tasks use real data and small models; a user's own task is a :class:`Task` found by
import path (``get_task("mypkg.tasks:my_task")``, see ``docs/own_task.md``).

Example:
    >>> from flatmin.tasks import get_task
    >>> data = get_task("digits").load("quick", seed=0)  # doctest: +SKIP
    >>> model = data.make_model()  # doctest: +SKIP
    >>> inputs, targets = next(iter(data.train))  # doctest: +SKIP
    >>> loss = data.loss_fn(model(inputs), targets)  # doctest: +SKIP
"""

from flatmin.tasks import catalog as _catalog  # registers the built-in tasks
from flatmin.tasks.registry import get_task, list_tasks, register_task, register_variant
from flatmin.tasks.task import (
    BUDGETS,
    DataSource,
    Recipe,
    Task,
    TaskData,
    correct_counts,
    correct_fn,
    cross_validation_split,
    loss_fn,
    split_fold_name,
)

del _catalog

__all__ = [
    "BUDGETS",
    "DataSource",
    "Recipe",
    "Task",
    "TaskData",
    "correct_counts",
    "correct_fn",
    "cross_validation_split",
    "get_task",
    "list_tasks",
    "loss_fn",
    "register_task",
    "register_variant",
    "split_fold_name",
]
