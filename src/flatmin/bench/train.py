"""One training run of the benchmark: a linear, commented loop shared by every method.

The loop (nanoGPT style: no trainer class, no hidden state)::

    data   = task.load(budget, seed[, fold])             # batches, loss, accuracy
    model  = data.make_model()                           # initialised from the seed
    opt    = method.build(BuildContext(model, ...))      # SGD/AdamW, SAM, ASAM, LookSAM, ...
    sched  = the task's per-step LR schedule (swa-lr: constant swa_lr from the start epoch)
    averages = {start: WeightAveraging(model, start=start_epoch(start, E))}  # SWA, WASAM views
    for epoch in 1..E:
        for batch: opt.step(closure); sched.step()       # SAM calls the closure twice
        for avg in averages: avg.update()                # one snapshot per epoch from its start
        (eval runs) validation accuracy of the live weights, for the curves
    for avg in averages: avg.update_bn(train); evaluate the average
    evaluate the final weights: test, validation, train on the labels trained on and on the true
    labels, and how many flipped labels the model reproduces (memorisation)

Shared trajectories: SWA under the task's schedule is the average of the baseline's iterates and
WASAM the average of SAM's, so a baseline or SAM run keeps one average per start of the SWA start
grid (:data:`~flatmin.bench.methods.START_GRID`) and reports each in ``record["averages"]`` — the
views ``swa`` and ``wasam`` read them instead of training again. Averaging never changes training:
the live weights of a run are those of the same run without averages.

Cross-validated tasks (``task.folds = k``): one run trains ``k`` models, one per fold, and pools the
counts (correct, samples, summed loss) over the folds, so the reported accuracy is over every
sample of the dataset, each tested exactly once.

A non-finite training loss ends the run with ``status="failed"`` and the reason.

Scale (:mod:`flatmin.bench.device`, :mod:`flatmin.bench.distributed`): ``spec.device`` and
``spec.precision`` place the run on an accelerator (data moved once, forward passes under
autocast, fp16 with a ``GradScaler``) — the defaults ``cpu`` / ``fp32`` run exactly the plain
float32 loop. The training loop never waits for the device: the epoch's loss and accuracy are
accumulated on the device and read once per epoch, where the non-finite check also happens (the
first non-finite step is reported as before). Under ``torchrun`` (``dist``) the model is wrapped
in DDP and each rank trains on its shard of every batch.

Resume (``flatmin train --resume``): ``on_state`` receives the complete training state after
every epoch (weights, optimizer with the base's state, schedule, averages, the batch-order
generator, the loss scale, finished folds) and ``train(resume=state)`` continues from it to the
same final weights, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from flatmin.bench.device import check_support
from flatmin.bench.distributed import DistContext
from flatmin.bench.evaluation import (
    Counts,
    evaluate,
    evaluate_counts,
    per_sample_losses,
    pool_counts,
    split_metrics,
)
from flatmin.bench.loop import EpochCallback, Fit, Setup, fit_model
from flatmin.bench.methods import Method, get_method, start_epoch
from flatmin.bench.spec import RunSpec, average_key
from flatmin.bench.train_state import STATE_FORMAT, FitState, TrainState
from flatmin.data import Dataset
from flatmin.optim.averaging import WeightAveraging
from flatmin.tasks import Task, TaskData, get_task

__all__ = [
    "Counts",
    "EpochCallback",
    "NonFiniteLossError",
    "RunSpec",
    "TrainResult",
    "average_key",
    "evaluate",
    "evaluate_counts",
    "per_sample_losses",
    "train",
]

SCHEMA = 2
StateCallback = Callable[[TrainState], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainResult:
    """A finished (or failed) run: its record and, for checkpoints, the trained objects.

    Attributes:
        record: the JSON record appended to ``results.jsonl``.
        model: the model with its final live (non-averaged) weights (the last fold's for a
            cross-validated task).
        averager: the average the method reports (BN statistics recomputed) or ``None``.
        averagers: every average the run kept, by start.
        data: the task data the run used (the last fold's).
    """

    record: dict[str, Any]
    model: nn.Module
    averager: WeightAveraging | None
    data: TaskData
    averagers: dict[float, WeightAveraging] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    from flatmin import __version__

    return {
        "flatmin": __version__,
        "torch": str(torch.__version__),
        "python": sys.version.split()[0],
    }


def _mean_curves(fits: list[Fit]) -> dict[str, list[float]]:
    """Per-epoch curves averaged over folds (the fold's own curves for one split)."""
    keys = fits[0].curves
    out: dict[str, list[float]] = {}
    for k in keys:
        columns = list(zip(*(f.curves[k] for f in fits)))
        out[k] = [float(f"{sum(col) / len(col):.7g}") for col in columns]
    return out


def _fold_data(
    task: Task, spec: RunSpec, fold: int | None, dataset: Dataset | None, setup: Setup
) -> TaskData:
    """The data of one fold: the epoch override, on the device, this process's shard."""
    data = task.load(spec.budget, seed=spec.seed, dataset=dataset, fold=fold)
    if spec.epochs is not None:
        data = replace(data, recipe=replace(data.recipe, epochs=spec.epochs))
    data = data.to(setup.device)
    if setup.dist is not None:
        data = replace(data, train=data.train.sharded(setup.dist.rank, setup.dist.world_size))
    return data


def _check_resume(state: TrainState, config_hash: str, world: int) -> None:
    """Refuse the state of another run, or of another number of processes."""
    if state.hash != config_hash:
        raise ValueError(
            f"Invalid resume state: it belongs to run {state.hash!r} ({state.format}), not to "
            f"this run {config_hash!r} ({STATE_FORMAT})"
        )
    if state.world_size != world:
        raise ValueError(
            f"Invalid resume state: saved by {state.world_size} processes, resumed by "
            f"{world} (the per-process batches and BatchNorm statistics would differ)"
        )


def _record(
    spec: RunSpec, task: Task, method: Method, fits: list[Fit], starts: tuple[float, ...],
    folds: int | None,
) -> tuple[dict[str, Any], WeightAveraging | None]:  # fmt: skip
    """The run's record (without timing and placement) and the average it reports."""
    last = fits[-1]
    status = "ok" if all(f.status == "ok" for f in fits) else "failed"
    epochs = last.data.recipe.epochs
    record: dict[str, Any] = {
        "schema": SCHEMA,
        **spec.config(task),
        "hash": spec.config_hash(task),
        "domain": task.domain,
        "model": task.model,
        "status": status,
        "reason": next((f.reason for f in fits if f.reason), None),
        "sizes": {
            split: sum(len(getattr(f.data.dataset, split)) for f in fits)
            for split in ("train", "val", "test")
        },
        "epochs": len(last.curves["epoch"]),
        "epochs_planned": epochs,
        "steps": sum(f.steps for f in fits),
        "averaging_start_epoch": (
            start_epoch(spec.hyper.start, epochs)
            if method.averaged and spec.hyper.start is not None
            else None
        ),
    }
    if folds:
        record["sizes"]["folds"] = folds
    reported: WeightAveraging | None = None
    if status == "ok":
        live = split_metrics(pool_counts(f.final for f in fits))
        averages = {
            average_key(s): split_metrics(pool_counts(f.averages[s] for f in fits)) for s in starts
        }
        if method.averaged:
            key = average_key(spec.hyper.start)  # type: ignore[arg-type]
            record["final"] = {**averages[key], "live_test_acc": live["test_acc"]}
            reported = last.averagers[spec.hyper.start]  # type: ignore[index]
        else:
            record["final"] = {**live, "live_test_acc": live["test_acc"]}
        if method.keeps_averages and method.is_trajectory:
            record["averages"] = averages
    return record, reported


def _placement(record: dict[str, Any], spec: RunSpec, setup: Setup, world: int) -> None:
    """Where it ran (outside the hash for the CPU / fp32 / one-process defaults)."""
    record["versions"] = _versions()
    record["device"] = str(setup.device)
    record["precision"] = spec.precision
    record["world_size"] = world
    if setup.dist is not None:
        record["sam_mode"] = setup.dist.sam_mode
        record["fsdp"] = setup.dist.fsdp
    if setup.device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(setup.device)


def _result(
    spec: RunSpec, task: Task, method: Method, fits: list[Fit], setup: Setup, wall_time: float
) -> TrainResult:
    """The finished run: its record (timing, placement, curves) and its last fold's objects."""
    record, reported = _record(spec, task, method, fits, spec.starts(), task.folds)
    record["wall_time"] = wall_time
    world = 1 if setup.dist is None else setup.dist.world_size
    _placement(record, spec, setup, world)
    # Curves feed the figures only: 7 significant digits keep results.jsonl small.
    record["curves"] = _mean_curves(fits) if record["status"] == "ok" else fits[-1].curves
    last = fits[-1]
    return TrainResult(
        record=record, model=last.model, averager=reported, data=last.data,
        averagers=last.averagers,
    )  # fmt: skip


def train(
    spec: RunSpec,
    *,
    task: Task | None = None,
    dataset: Dataset | None = None,
    on_epoch: EpochCallback | None = None,
    eval_val: bool | None = None,
    dist: DistContext | None = None,
    resume: TrainState | Mapping[str, Any] | None = None,
    on_state: StateCallback | None = None,
) -> TrainResult:
    """Train one run of the benchmark and return its record.

    Args:
        spec: the run (its ``device`` must exist: resolve ``auto`` first).
        task: the task record (default: ``get_task(spec.task)``; tests pass their own).
        dataset: an already loaded dataset of the task (reused across runs of one process).
        on_epoch: ``on_epoch(epoch, epochs, metrics)`` after every epoch (progress bars, pruning:
            an exception raised there ends the run and propagates). ``metrics`` holds ``lr``,
            ``train_loss``, ``train_acc`` and, when validating every epoch, ``val_loss`` and
            ``val_acc``.
        eval_val: validate the live weights after every epoch (default: for ``eval`` runs only;
            tuning runs need only the final validation accuracy — pass ``True`` to prune on it).
        dist: this process's place in a ``torchrun`` group (``None``: one process).
        resume: a state passed to ``on_state`` by an earlier, interrupted call with the same spec
            (and number of processes), or its :meth:`~TrainState.as_dict` form: training
            continues after its epoch.
        on_state: ``on_state(state)`` after every epoch with the complete
            :class:`~flatmin.bench.train_state.TrainState` (its tensors are the live ones: save
            it before returning).

    Returns:
        A :class:`TrainResult`; ``record["status"]`` is ``"ok"`` or ``"failed"`` (non-finite
        loss, with ``record["reason"]``).

    Raises:
        ValueError: an unsupported method/precision/processes combination
            (:func:`check_support`), or a ``resume`` state of another run or malformed.
    """
    spec = spec.resolved()
    task = task or get_task(spec.task)
    method = get_method(spec.method)
    world = 1 if dist is None else dist.world_size
    check_support(spec, world)
    setup = Setup(torch.device(spec.device), spec.precision, dist)
    if eval_val is None:
        eval_val = spec.stage == "eval"
    t0 = time.perf_counter()
    starts = spec.starts()
    config_hash = spec.config_hash(task)
    state = None
    if resume is not None:
        state = resume if isinstance(resume, TrainState) else TrainState.from_dict(resume)
        _check_resume(state, config_hash, world)
    fits: list[Fit] = []
    elapsed = 0.0 if state is None else state.elapsed
    folds: list[int | None] = list(range(task.folds)) if task.folds else [None]
    for done, fold in zip(state.done if state else (), folds, strict=False):
        fits.append(Fit.restore(done, _fold_data(task, spec, fold, dataset, setup), starts))
    for index in range(len(fits), len(folds)):

        def fold_state(fit_state: FitState, index: int = index) -> None:
            assert on_state is not None
            on_state(TrainState(
                config_hash, world, index, tuple(f.summary() for f in fits), fit_state,
                elapsed + time.perf_counter() - t0,
            ))  # fmt: skip

        fit = fit_model(
            spec, method, _fold_data(task, spec, folds[index], dataset, setup), starts, eval_val,
            on_epoch, setup,
            resume=state.fit if state is not None and index == state.fold else None,
            on_state=fold_state if on_state is not None else None,
        )  # fmt: skip
        fits.append(fit)
        if fit.status != "ok":
            break
    return _result(spec, task, method, fits, setup, elapsed + time.perf_counter() - t0)
