"""Checkpoints of benchmark runs (``flatmin train``) and their reloading for analysis.

A checkpoint is a plain ``dict`` saved with :func:`torch.save` (loadable with
``weights_only=True``): the run's configuration and record, the final live weights, and for the
averaging methods the averaged weights with their recomputed BatchNorm statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flatmin.bench.methods import Hyper
from flatmin.bench.train import RunSpec, TrainResult
from flatmin.tasks import Task, TaskData, get_task

__all__ = ["FORMAT", "LoadedCheckpoint", "load_checkpoint", "save_checkpoint"]

FORMAT = "flatmin-checkpoint/1"
WEIGHTS = ("auto", "final", "averaged")


def save_checkpoint(path: str | os.PathLike[str], result: TrainResult) -> None:
    """Save a run's final and averaged weights with its record."""
    rec = result.record
    payload: dict[str, Any] = {
        "format": FORMAT,
        "task": rec["task"],
        "method": rec["method"],
        "seed": rec["seed"],
        "budget": rec["budget"],
        "hyper": rec.get("hyper", {}),
        "epochs": rec["recipe"]["epochs"],
        "record": {k: v for k, v in rec.items() if k != "curves"},
        "final": result.model.state_dict(),
        "averaged": (
            result.averager.averaged_state_dict()
            if result.averager is not None and result.averager.n_averaged > 0
            else None
        ),
    }
    torch.save(payload, path)


@dataclass
class LoadedCheckpoint:
    """A checkpoint rebuilt on its task.

    Attributes:
        path: the file.
        label: short name for legends (``sam-s0``, ``swa-s1-avg``).
        model: the model with the selected weights.
        weights: ``"final"`` or ``"averaged"``.
        data: the task data (batches, loss and accuracy functions).
        meta: the checkpoint's configuration (task, method, seed, budget, hyper, record).
        final_model: the live final weights when ``model`` holds the average, else ``None``.
    """

    path: str
    label: str
    model: nn.Module
    weights: str
    data: TaskData
    meta: dict[str, Any]
    final_model: nn.Module | None = None


def load_checkpoint(
    path: str | os.PathLike[str], *, task: str | None = None, weights: str = "auto"
) -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint on its task's data.

    Args:
        path: a file written by :func:`save_checkpoint`.
        task: the task to evaluate on (default: the checkpoint's; another task must use the
            same dataset and model, e.g. a label-noise variant).
        weights: ``"auto"`` (the averaged weights when present — what the method reports — else
            the final ones), ``"final"`` or ``"averaged"``.

    Raises:
        ValueError: not a flatmin checkpoint, an incompatible task, or ``weights="averaged"``
            for a run without an average.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"Invalid weights: {weights!r} (expected one of {WEIGHTS})")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"Invalid checkpoint: {os.fspath(path)!r} is not a {FORMAT} file")
    own: Task = get_task(payload["task"])
    chosen = own if task is None else get_task(task)
    if (chosen.dataset, chosen.model) != (own.dataset, own.model):
        raise ValueError(
            f"Invalid task: {chosen.name!r} for a checkpoint of {own.name!r} (expected a task "
            f"with dataset {own.dataset!r} and model {own.model!r})"
        )
    spec = RunSpec(
        own.name, payload["method"], int(payload["seed"]), payload["budget"],
        Hyper(**payload["hyper"]), int(payload["epochs"]),
    )  # fmt: skip
    data = chosen.load(spec.budget, seed=spec.seed)
    averaged = payload.get("averaged")
    if weights == "averaged" and averaged is None:
        raise ValueError(f"Invalid weights: 'averaged' ({payload['method']} run has no average)")
    use_avg = averaged is not None and weights in ("auto", "averaged")
    model = data.make_model()
    model.load_state_dict(averaged if averaged is not None and use_avg else payload["final"])
    final_model = None
    if use_avg:
        final_model = data.make_model()
        final_model.load_state_dict(payload["final"])
    label = f"{payload['method']}-s{payload['seed']}" + ("-avg" if use_avg else "")
    meta = {k: v for k, v in payload.items() if k not in ("final", "averaged")}
    return LoadedCheckpoint(
        path=os.fspath(path), label=label, model=model,
        weights="averaged" if use_avg else "final", data=data, meta=meta,
        final_model=final_model,
    )  # fmt: skip
