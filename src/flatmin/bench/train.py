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
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from flatmin.bench.methods import START_GRID, BuildContext, Hyper, Method, get_method, start_epoch
from flatmin.data import IGNORE_INDEX, Dataset
from flatmin.data.batching import Batches, GraphBatch
from flatmin.optim.averaging import WeightAveraging
from flatmin.optim.sam import SAM
from flatmin.tasks import Recipe, Task, TaskData, get_task

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
EpochCallback = Callable[[int, int, dict[str, float]], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


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
    """

    task: str
    method: str
    seed: int
    budget: str = "quick"
    hyper: Hyper = field(default_factory=Hyper)
    epochs: int | None = None
    stage: str = "eval"

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
        """Everything that determines the run's result, as plain JSON values."""
        spec = self.resolved()
        task = task or get_task(self.task)
        return {
            "task": spec.task,
            "method": spec.method,
            "seed": spec.seed,
            "budget": spec.budget,
            "stage": spec.stage,
            "hyper": spec.hyper.as_dict(),
            "recipe": asdict(spec.recipe(task)),
            "folds": task.folds,
            "average_starts": [average_key(s) for s in spec.starts()],
        }

    def config_hash(self, task: Task | None = None) -> str:
        """First 16 hex digits of the SHA-256 of :meth:`config` (sorted-key JSON)."""
        text = json.dumps(self.config(task), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Counts:
    """Summed loss, correct predictions and labelled samples of one evaluation (poolable)."""

    loss: float = 0.0
    correct: int = 0
    n: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.loss + other.loss, self.correct + other.correct, self.n + other.n)

    @property
    def acc(self) -> float:
        """Accuracy (NaN without samples)."""
        return self.correct / self.n if self.n else math.nan

    @property
    def mean_loss(self) -> float:
        """Loss per labelled sample (NaN without samples)."""
        return self.loss / self.n if self.n else math.nan


@torch.no_grad()
def evaluate_counts(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    correct_fn: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]],
) -> Counts:
    """Summed loss and correct predictions over labelled targets, in eval mode (restored)."""
    was_training = model.training
    model.eval()
    total = Counts()
    try:
        for inputs, targets in batches:
            out = model(inputs)
            c, n = correct_fn(out, targets)
            if n:
                total = total + Counts(float(loss_fn(out, targets)) * n, c, n)
    finally:
        model.train(was_training)
    return total


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    correct_fn: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]],
) -> tuple[float, float]:
    """Mean loss and accuracy over labelled targets, in eval mode (the mode is restored).

    Returns:
        ``(loss, accuracy)`` with the loss averaged per labelled sample (NaN without samples).
    """
    counts = evaluate_counts(model, batches, loss_fn, correct_fn)
    return counts.mean_loss, counts.acc


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


def _graph_subset(g: GraphBatch, index: torch.Tensor) -> GraphBatch:
    """The graphs ``index`` of a merged batch, as a new batch (graph ``j`` is ``index[j]``)."""
    new_id = torch.full((g.num_graphs,), -1, dtype=torch.long)
    new_id[index] = torch.arange(index.numel())
    node_graph = new_id[g.batch]
    keep = node_graph >= 0
    renumber = torch.cumsum(keep.long(), 0) - 1
    edges = g.edge_index[:, keep[g.edge_index[0]]]  # edges never cross graphs
    return GraphBatch(g.x[keep], renumber[edges], node_graph[keep], int(index.numel()))


def per_sample_losses(
    model: nn.Module, inputs: Any, targets: torch.Tensor, outputs: list[torch.Tensor]
) -> Callable[[torch.Tensor | None], torch.Tensor]:
    """ESAM's ``loss_fn(index)``: per-sample cross-entropy of the batch or of samples ``index``.

    Samples are the labelled targets: images or documents (a sub-batch is sliced), graphs (a
    sub-batch of graphs is re-merged), or the labelled nodes of a node-classification graph (the
    whole graph is run and the selected nodes' losses kept). The outputs of the whole-batch call
    are appended to ``outputs`` (for the running train accuracy).
    """
    labelled = torch.nonzero(targets != IGNORE_INDEX).flatten()
    node_level = isinstance(inputs, GraphBatch) and targets.numel() != inputs.num_graphs

    def loss_fn(index: torch.Tensor | None) -> torch.Tensor:
        if index is None:
            out = model(inputs)
            outputs.append(out.detach())
            return F.cross_entropy(out[labelled], targets[labelled], reduction="none")
        rows = labelled[index]
        if node_level:
            out = model(inputs)[rows]
        elif isinstance(inputs, GraphBatch):
            out = model(_graph_subset(inputs, rows))
        else:
            out = model(inputs[rows])
        return F.cross_entropy(out, targets[rows], reduction="none")

    return loss_fn


def _versions() -> dict[str, str]:
    from flatmin import __version__

    return {
        "flatmin": __version__,
        "torch": str(torch.__version__),
        "python": sys.version.split()[0],
    }


def _scheduler(
    opt: torch.optim.Optimizer, recipe: Recipe, method: Method, hyper: Hyper, spe: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The task's per-step schedule; ``swa-lr`` holds ``swa_lr`` × peak LR from its start epoch."""
    if not method.constant_lr_from_start:
        return recipe.make_scheduler(opt, spe)
    if hyper.start is None or hyper.swa_lr is None:
        raise ValueError(
            f"Invalid hyper-parameters for {method.name!r}: {hyper} (need start, swa_lr)"
        )
    switch = (start_epoch(hyper.start, recipe.epochs) - 1) * spe
    swa_lr = hyper.swa_lr
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: recipe.lr_factor(s, spe) if s < switch else swa_lr
    )


@dataclass
class _Fit:
    """One model trained on one split (one fold of a cross-validated task)."""

    status: str
    reason: str | None
    steps: int
    curves: dict[str, list[float]]
    final: dict[str, Counts]
    averages: dict[float, dict[str, Counts]]
    model: nn.Module
    averagers: dict[float, WeightAveraging]
    data: TaskData


_SPLITS = ("test", "val", "train", "train_clean", "noise_memorised")
_ACC_KEY = {
    "test": "test_acc",
    "val": "val_acc",
    "train": "train_acc",
    "train_clean": "train_acc_clean",
    "noise_memorised": "noise_memorised",
}


def _eval_splits(data: TaskData) -> Iterator[tuple[str, Batches]]:
    """The evaluation streams of the final weights (see :func:`_final_counts`)."""
    yield "test", data.test
    yield "val", data.val
    yield "train", data.train_eval
    train = data.dataset.train
    clean = train.clean_targets
    if clean is None:
        return
    bs = data.train_eval.batch_size
    yield "train_clean", Batches(replace(train, targets=clean), bs)
    # Accuracy w.r.t. the *noisy* label on the flipped samples only (the others are ignored):
    # the fraction of the label noise that the model reproduces, i.e. has memorised.
    flipped = torch.where(train.targets != clean, train.targets, IGNORE_INDEX)
    yield "noise_memorised", Batches(replace(train, targets=flipped), bs)


def _final_counts(model: nn.Module, data: TaskData) -> dict[str, Counts]:
    return {
        name: evaluate_counts(model, batches, data.loss_fn, data.correct_fn)
        for name, batches in _eval_splits(data)
    }


def _fit(
    spec: RunSpec,
    method: Method,
    data: TaskData,
    starts: tuple[float, ...],
    eval_val: bool,
    on_epoch: EpochCallback | None,
) -> _Fit:
    """Train one model on ``data`` and evaluate its final weights and averages."""
    recipe = data.recipe
    epochs = recipe.epochs
    trajectory = get_method(method.trajectory)
    model = data.make_model()
    assert trajectory.build is not None  # a trajectory always has a builder
    opt = trajectory.build(
        BuildContext(
            model, recipe.optimizer_class, recipe.optimizer_kwargs(), spec.hyper, epochs, spec.seed
        )
    )
    # The schedule is attached to the optimizer the method built (SAM shares its param groups with
    # the base optimizer, so the scheduler drives both).
    sched = _scheduler(opt, recipe, method, spec.hyper, len(data.train))
    averagers = {
        s: WeightAveraging(model, mode="swa", start=start_epoch(s, epochs)) for s in starts
    }
    step_kw: dict[str, Any] = {"model": model} if isinstance(opt, SAM) else {}
    loss_fn, correct_fn = data.loss_fn, data.correct_fn
    curves: dict[str, list[float]] = {
        k: [] for k in ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc")
    }
    status, reason, step = "ok", None, 0
    # SAM's step takes model=; mypy knows only torch.optim.Optimizer.step.
    step_fn: Callable[..., Any] = opt.step

    for epoch in range(1, epochs + 1):
        model.train()
        # Accumulated on the device and read once per epoch: no host sync per step.
        run_loss = torch.zeros((), dtype=torch.float64)
        run_correct, run_count = 0, 0
        for inputs, targets in data.train:
            outputs: list[torch.Tensor] = []
            labelled = torch.nonzero(targets != IGNORE_INDEX).flatten()
            subset = per_sample_losses(model, inputs, targets, outputs)

            def closure(
                index: torch.Tensor | None = None,
                inputs: Any = inputs,
                targets: torch.Tensor = targets,
                outputs: list = outputs,
                labelled: torch.Tensor = labelled,
                subset: Callable = subset,
            ) -> torch.Tensor:
                # The closure contract of every optimizer: zero, forward, backward, return the
                # per-sample losses (ESAM selects data with them and calls closure(index)).
                opt.zero_grad(set_to_none=True)
                if index is not None:
                    losses = subset(index)
                    losses.mean().backward()
                    return losses.detach()
                out = model(inputs)
                if torch.is_grad_enabled():  # ESAM's selection pass runs without gradients
                    loss_fn(out, targets).backward()
                outputs.append(out.detach())  # SAM: [0] is the pass at w (the one we report)
                return F.cross_entropy(out.detach()[labelled], targets[labelled], reduction="none")

            # One call for every method; SAM's family keeps the BN statistics of the first pass.
            loss = step_fn(closure, **step_kw).mean()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                status = "failed"
                reason = f"non-finite training loss {loss_value} at epoch {epoch}, step {step + 1}"
                break
            sched.step()
            step += 1
            c, n = correct_fn(outputs[0], targets)
            run_loss += loss_value * n
            run_correct, run_count = run_correct + c, run_count + n
        if status != "ok":
            break

        # One snapshot per epoch from each average's start; the schedule is untouched.
        for avg in averagers.values():
            avg.update()
        metrics = {
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": float(run_loss) / max(1, run_count),
            "train_acc": run_correct / max(1, run_count),
        }
        if eval_val:
            val = evaluate_counts(model, data.val, loss_fn, correct_fn)
            metrics.update(val_loss=val.mean_loss, val_acc=val.acc)
        for k, v in metrics.items():
            curves[k].append(float(v))
        if on_epoch is not None:
            on_epoch(epoch, epochs, metrics)

    final: dict[str, Counts] = {}
    averages: dict[float, dict[str, Counts]] = {}
    if status == "ok":
        final = _final_counts(model, data)
        for s, avg in averagers.items():
            # BN statistics of the average, recomputed on the training set before evaluating it.
            avg.update_bn(data.train_eval)
            with avg.swap():
                averages[s] = _final_counts(model, data)
    return _Fit(status, reason, step, curves, final, averages, model, averagers, data)


def _metrics(counts: dict[str, Counts]) -> dict[str, float | None]:
    """Accuracies and losses of pooled counts (``None`` for a split that does not exist)."""
    out: dict[str, float | None] = {}
    for name in _SPLITS:
        c = counts.get(name)
        out[_ACC_KEY[name]] = None if c is None else c.acc
        if name in ("test", "val", "train") and c is not None:
            out[f"{name}_loss"] = c.mean_loss
    return out


def _pool(parts: Iterable[dict[str, Counts]]) -> dict[str, Counts]:
    total: dict[str, Counts] = {}
    for part in parts:
        for k, c in part.items():
            total[k] = total.get(k, Counts()) + c
    return total


def _mean_curves(fits: list[_Fit]) -> dict[str, list[float]]:
    """Per-epoch curves averaged over folds (the fold's own curves for one split)."""
    keys = fits[0].curves
    out: dict[str, list[float]] = {}
    for k in keys:
        columns = list(zip(*(f.curves[k] for f in fits)))
        out[k] = [float(f"{sum(col) / len(col):.7g}") for col in columns]
    return out


def train(
    spec: RunSpec,
    *,
    task: Task | None = None,
    dataset: Dataset | None = None,
    on_epoch: EpochCallback | None = None,
    eval_val: bool | None = None,
) -> TrainResult:
    """Train one run of the benchmark and return its record.

    Args:
        spec: the run.
        task: the task record (default: ``get_task(spec.task)``; tests pass their own).
        dataset: an already loaded dataset of the task (reused across runs of one process).
        on_epoch: ``on_epoch(epoch, epochs, metrics)`` after every epoch (progress bars, pruning:
            an exception raised there ends the run and propagates). ``metrics`` holds ``lr``,
            ``train_loss``, ``train_acc`` and, when validating every epoch, ``val_loss`` and
            ``val_acc``.
        eval_val: validate the live weights after every epoch (default: for ``eval`` runs only;
            tuning runs need only the final validation accuracy — pass ``True`` to prune on it).

    Returns:
        A :class:`TrainResult`; ``record["status"]`` is ``"ok"`` or ``"failed"`` (non-finite
        loss, with ``record["reason"]``).
    """
    spec = spec.resolved()
    task = task or get_task(spec.task)
    method = get_method(spec.method)
    if eval_val is None:
        eval_val = spec.stage == "eval"
    t0 = time.perf_counter()
    starts = spec.starts()

    folds: list[int | None] = list(range(task.folds)) if task.folds else [None]
    fits: list[_Fit] = []
    for fold in folds:
        data = task.load(spec.budget, seed=spec.seed, dataset=dataset, fold=fold)
        if spec.epochs is not None:
            data = replace(data, recipe=replace(data.recipe, epochs=spec.epochs))
        fit = _fit(spec, method, data, starts, eval_val, on_epoch)
        fits.append(fit)
        if fit.status != "ok":
            break
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
    if folds != [None]:
        record["sizes"]["folds"] = len(folds)
    reported: WeightAveraging | None = None
    if status == "ok":
        live = _metrics(_pool(f.final for f in fits))
        averages = {average_key(s): _metrics(_pool(f.averages[s] for f in fits)) for s in starts}
        if method.averaged:
            key = average_key(spec.hyper.start)  # type: ignore[arg-type]
            final = {**averages[key], "live_test_acc": live["test_acc"]}
            reported = last.averagers[spec.hyper.start]  # type: ignore[index]
        else:
            final = {**live, "live_test_acc": live["test_acc"]}
        record["final"] = final
        if method.keeps_averages and method.is_trajectory:
            record["averages"] = averages
    record["wall_time"] = time.perf_counter() - t0
    record["versions"] = _versions()
    # Curves feed the figures only: 7 significant digits keep results.jsonl small.
    record["curves"] = _mean_curves(fits) if status == "ok" else last.curves
    return TrainResult(
        record=record, model=last.model, averager=reported, data=last.data,
        averagers=last.averagers,
    )  # fmt: skip
