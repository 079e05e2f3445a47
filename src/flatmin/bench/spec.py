"""What one benchmark run is (:class:`RunSpec`) and its configuration hash.

A run's hash is the SHA-256 of everything that determines its result (task name, method, seed,
budget, stage, resolved hyper-parameters, the recipe, the folds and averaging starts; the device
type and precision only off the CPU / ``fp32`` defaults; the cross-validation layout only for
cross-validated tasks), so ``results.jsonl`` is resumed by hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flatmin.bench.device import DEFAULT_DEVICE, DEFAULT_PRECISION, check_precision
from flatmin.bench.methods import START_GRID, Hyper, get_method
from flatmin.tasks import Recipe, Task, get_task

__all__ = ["CV_LAYOUT", "RunSpec", "average_key"]

CV_LAYOUT = "nested"
"""The cross-validation layout in the hash of a cross-validated task's runs."""


def average_key(start: float) -> str:
    """The key of the average from ``start`` in ``record["averages"]`` (``"0.75"``)."""
    return f"{float(start):g}"


@dataclass(frozen=True)
class RunSpec:
    """What one run is: task, method, seed, budget and the method's hyper-parameters.

    Attributes:
        task: task registry name.
        method: method registry name (a view such as ``swa`` trains its trajectory and reports
            the average from ``hyper.start``; the benchmark grid only plans trajectories).
        seed: model initialisation and batch order.
        budget: ``"quick"`` or ``"full"`` (the task's recipe).
        hyper: the method's hyper-parameters (``None`` fields: the method's defaults).
        epochs: override the recipe's epoch budget (``None``: the recipe's).
        stage: ``"eval"`` (a result), ``"tune"`` (a validation-grid run) or ``"ablation"``.
        device: where the run computes (``"cpu"``, ``"cuda:0"``, ``"mps"``; resolve ``auto``
            with :func:`flatmin.bench.device.resolve_device` first).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:mod:`flatmin.bench.device`).
    """

    task: str
    method: str
    seed: int
    budget: str = "quick"
    hyper: Hyper = field(default_factory=Hyper)
    epochs: int | None = None
    stage: str = "eval"
    device: str = DEFAULT_DEVICE
    precision: str = DEFAULT_PRECISION

    def __post_init__(self) -> None:
        check_precision(self.precision)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"Invalid device: {self.device!r} (expected cpu, cuda, cuda:N or mps)"
            ) from None

    def resolved(self) -> RunSpec:
        """The spec with the method's defaults filled in (what the hash is computed over)."""
        return replace(self, hyper=get_method(self.method).resolve(self.hyper))

    def recipe(self, task: Task | None = None) -> Recipe:
        """The task's recipe for this budget, with the epoch override applied."""
        recipe = (task or get_task(self.task)).recipe(self.budget)
        return recipe if self.epochs is None else replace(recipe, epochs=self.epochs)

    def starts(self) -> tuple[float, ...]:
        """The averaging starts this run keeps (see the module docstring)."""
        method = get_method(self.method)
        if method.is_trajectory and method.keeps_averages:
            return START_GRID
        if method.averaged:
            start = self.resolved().hyper.start
            return () if start is None else (start,)
        return ()

    def config(self, task: Task | None = None) -> dict[str, Any]:
        """Everything that determines the run's result, as plain JSON values.

        The device type (not its index) and the precision appear only when they differ from
        the CPU / ``fp32`` defaults, so CPU float32 runs keep their earlier hashes; the
        cross-validation layout (``cv``) appears only for cross-validated tasks.
        """
        spec = self.resolved()
        task = task or get_task(self.task)
        config = {
            "task": spec.task,
            "method": spec.method,
            "seed": spec.seed,
            "budget": spec.budget,
            "stage": spec.stage,
            "hyper": spec.hyper.as_dict(),
            "recipe": spec.recipe(task).config(),
            "folds": task.folds,
            "average_starts": [average_key(s) for s in spec.starts()],
        }
        if task.folds is not None:
            # Folds with an inner validation split of each outer training set (nested CV,
            # tasks.cross_validation_split); runs of the earlier layout keep their own hash.
            config["cv"] = CV_LAYOUT
        device_type = torch.device(spec.device).type
        if device_type != DEFAULT_DEVICE:
            config["device"] = device_type
        if spec.precision != DEFAULT_PRECISION:
            config["precision"] = spec.precision
        return config

    def config_hash(self, task: Task | None = None) -> str:
        """First 16 hex digits of the SHA-256 of :meth:`config` (sorted-key JSON)."""
        text = json.dumps(self.config(task), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]
