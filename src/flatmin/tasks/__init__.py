"""Benchmark tasks: real data + a small model + a default recipe, per domain.

Example:
    >>> from flatmin.tasks import get_task
    >>> data = get_task("digits").load("quick", seed=0)  # doctest: +SKIP
    >>> model = data.make_model()  # doctest: +SKIP
    >>> inputs, targets = next(iter(data.train))  # doctest: +SKIP
    >>> loss = data.loss_fn(model(inputs), targets)  # doctest: +SKIP
"""

from flatmin.tasks import catalog as _catalog  # registers the built-in tasks
from flatmin.tasks.registry import (
    BUDGETS,
    Recipe,
    Task,
    TaskData,
    correct_counts,
    correct_fn,
    cross_validation_split,
    get_task,
    list_tasks,
    loss_fn,
    register_task,
)

del _catalog

__all__ = [
    "BUDGETS",
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
]
