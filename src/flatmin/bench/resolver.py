"""How a run finds its task and dataset by name, in this process and in workers."""

from __future__ import annotations

from typing import Any, Protocol

from flatmin.data import Dataset
from flatmin.tasks import Task, get_task

__all__ = ["RegistryResolver", "Resolver"]


class Resolver(Protocol):
    """Finds a task and its (cached) dataset by name; picklable (``jobs > 1``, Ray)."""

    def task(self, name: str) -> Task:
        """The task record."""
        ...

    def dataset(self, task: Task) -> Dataset | None:
        """The task's loaded dataset (``None``: let ``Task.load`` load it)."""
        ...


class RegistryResolver:
    """The task registry and the data cache; keeps each loaded dataset for the process."""

    def __init__(self) -> None:
        self._datasets: dict[str, Dataset] = {}

    def task(self, name: str) -> Task:
        """``flatmin.tasks.get_task(name)``."""
        return get_task(name)

    def dataset(self, task: Task) -> Dataset | None:
        """The task's dataset, loaded once per process."""
        if task.dataset not in self._datasets:
            self._datasets[task.dataset] = task.load_dataset()
        return self._datasets[task.dataset]

    def __getstate__(self) -> dict[str, Any]:
        return {"_datasets": {}}  # workers load their own copy
