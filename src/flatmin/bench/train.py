"""One training run of the benchmark: a linear, commented loop shared by every method.

The loop (nanoGPT style: no trainer class, no hidden state)::

    data   = task.load(budget, seed)                 # batches, loss, accuracy
    model  = data.make_model()                       # initialised from the seed
    opt, avg = method.build(BuildContext(model, base, kw, hyper, ...))  # + averager or None
    sched  = recipe.make_scheduler(opt)              # the task's per-step LR schedule
    for epoch in 1..E:
        for batch: opt.step(closure); sched.step()   # SAM calls the closure twice
        avg.update()                                 # one SWA snapshot per epoch (from start)
        avg.update_bn(train)                         # BN statistics of the new average
        evaluate the reported weights (the average once it exists, else the live weights)

Model selection: the reported result is the final epoch's; the epoch with the best validation
accuracy is recorded separately (``best_val``), as is the live (non-averaged) final model of the
averaging methods. A non-finite training loss ends the run with ``status="failed"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from flatmin.bench.methods import BuildContext, Hyper, get_method, start_epoch
from flatmin.data import IGNORE_INDEX, Dataset
from flatmin.data.batching import Batches, GraphBatch
from flatmin.optim.averaging import WeightAveraging
from flatmin.optim.sam import SAM
from flatmin.tasks import Recipe, Task, TaskData, get_task

__all__ = [
    "EpochCallback",
    "NonFiniteLossError",
    "RunSpec",
    "TrainResult",
    "evaluate",
    "per_sample_losses",
    "train",
]

SCHEMA = 1
EpochCallback = Callable[[int, int, dict[str, float]], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class RunSpec:
    """What one run is: task, method, seed, budget and the method's hyper-parameters.

    Attributes:
        task: task registry name.
        method: method registry name.
        seed: model initialisation and batch order.
        budget: ``"quick"`` or ``"full"`` (the task's recipe).
        hyper: ``rho`` / ``start`` (``None`` fields: the method's defaults).
        epochs: override the recipe's epoch budget (``None``: the recipe's).
        stage: ``"eval"`` (a result) or ``"tune"`` (a validation-grid run).
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
        hp = get_method(self.method).resolve(self.hyper.rho, self.hyper.start)
        return replace(self, hyper=hp)

    def recipe(self, task: Task | None = None) -> Recipe:
        """The task's recipe for this budget, with the epoch override applied."""
        recipe = (task or get_task(self.task)).recipe(self.budget)
        return recipe if self.epochs is None else replace(recipe, epochs=self.epochs)

    def config(self, task: Task | None = None) -> dict[str, Any]:
        """Everything that determines the run's result, as plain JSON values."""
        spec = self.resolved()
        return {
            "task": spec.task,
            "method": spec.method,
            "seed": spec.seed,
            "budget": spec.budget,
            "stage": spec.stage,
            "hyper": spec.hyper.as_dict(),
            "recipe": asdict(spec.recipe(task)),
        }

    def config_hash(self, task: Task | None = None) -> str:
        """First 16 hex digits of the SHA-256 of :meth:`config` (sorted-key JSON)."""
        text = json.dumps(self.config(task), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    """A finished (or failed) run: its record and, for checkpoints, the trained objects.

    Attributes:
        record: the JSON record appended to ``results.jsonl``.
        model: the model with its final live (non-averaged) weights.
        averager: the SWA averager (BN statistics recomputed) or ``None``.
        data: the task data the run used.
    """

    record: dict[str, Any]
    model: nn.Module
    averager: WeightAveraging | None
    data: TaskData


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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    correct_fn: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]],
) -> tuple[float, float]:
    """Mean loss and accuracy over labelled targets, in eval mode (the mode is restored).

    Returns:
        ``(loss, accuracy)`` with the loss averaged per labelled sample.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, counted = 0.0, 0, 0
    try:
        for inputs, targets in batches:
            out = model(inputs)
            c, n = correct_fn(out, targets)
            if n:
                total_loss += float(loss_fn(out, targets)) * n
            correct, counted = correct + c, counted + n
    finally:
        model.train(was_training)
    if counted == 0:
        return math.nan, math.nan
    return total_loss / counted, correct / counted


def _versions() -> dict[str, str]:
    from flatmin import __version__

    return {
        "flatmin": __version__,
        "torch": str(torch.__version__),
        "python": sys.version.split()[0],
    }


def train(
    spec: RunSpec,
    *,
    task: Task | None = None,
    dataset: Dataset | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train one run of the benchmark and return its record.

    Args:
        spec: the run.
        task: the task record (default: ``get_task(spec.task)``; tests pass their own).
        dataset: an already loaded dataset of the task (reused across runs of one process).
        on_epoch: ``on_epoch(epoch, epochs, metrics)`` after every epoch (progress bars).

    Returns:
        A :class:`TrainResult`; ``record["status"]`` is ``"ok"`` or ``"failed"`` (non-finite
        loss, with ``record["reason"]``).
    """
    spec = spec.resolved()
    task = task or get_task(spec.task)
    method = get_method(spec.method)
    t0 = time.perf_counter()

    # -- data, model, optimizer, schedule --------------------------------------------------------
    data = task.load(spec.budget, seed=spec.seed, dataset=dataset)
    recipe = spec.recipe(task)
    epochs = recipe.epochs
    model = data.make_model()
    opt, averager = method.build(
        BuildContext(
            model, recipe.optimizer_class, recipe.optimizer_kwargs(), spec.hyper, epochs, spec.seed
        )
    )
    # The task's schedule, per step, attached to the optimizer the method built (SAM shares its
    # param groups with the base optimizer, so the scheduler drives both).
    sched = recipe.make_scheduler(opt, len(data.train))
    step_kw: dict[str, Any] = {"model": model} if isinstance(opt, SAM) else {}
    loss_fn, correct_fn = data.loss_fn, data.correct_fn

    curves: dict[str, list[float]] = {
        k: []
        for k in (
            "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
            "test_acc", "live_test_acc",
        )
    }  # fmt: skip
    status, reason, step = "ok", None, 0

    # -- training ---------------------------------------------------------------------------------
    for epoch in range(1, epochs + 1):
        model.train()
        run_loss, run_correct, run_count = 0.0, 0, 0
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
            loss = cast(torch.Tensor, opt.step(cast(Callable[[], float], closure), **step_kw))
            loss = loss.mean()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                status = "failed"
                reason = f"non-finite training loss {loss_value} at epoch {epoch}, step {step + 1}"
                break
            sched.step()
            step += 1
            c, n = correct_fn(outputs[0], targets)
            run_loss, run_correct, run_count = (
                run_loss + loss_value * n,
                run_correct + c,
                run_count + n,
            )
        if status != "ok":
            break

        # One SWA snapshot per epoch (from the start epoch on); the LR schedule is untouched.
        if averager is not None and averager.update():
            # BN statistics of the new average, before any evaluation of it.
            averager.update_bn(data.train_eval)

        # Evaluate the reported weights: the average once it exists, else the live weights.
        live_test = evaluate(model, data.test, loss_fn, correct_fn)
        if averager is not None and averager.n_averaged > 0:
            with averager.swap():
                val = evaluate(model, data.val, loss_fn, correct_fn)
                test = evaluate(model, data.test, loss_fn, correct_fn)
        else:
            val = evaluate(model, data.val, loss_fn, correct_fn)
            test = live_test
        metrics = {
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": run_loss / max(1, run_count),
            "train_acc": run_correct / max(1, run_count),
            "val_loss": val[0],
            "val_acc": val[1],
            "test_loss": test[0],
            "test_acc": test[1],
            "live_test_acc": live_test[1],
        }
        for k, v in metrics.items():
            curves[k].append(float(v))
        if on_epoch is not None:
            on_epoch(epoch, epochs, metrics)

    # -- final metrics of the reported weights -----------------------------------------------------
    record: dict[str, Any] = {
        "schema": SCHEMA,
        **spec.config(task),
        "hash": spec.config_hash(task),
        "domain": task.domain,
        "model": task.model,
        "status": status,
        "reason": reason,
        "sizes": {
            "train": len(data.dataset.train),
            "val": len(data.dataset.val),
            "test": len(data.dataset.test),
        },
        "epochs": len(curves["epoch"]),
        "epochs_planned": epochs,
        "steps": step,
        "averaging_start_epoch": (
            start_epoch(spec.hyper.start, epochs) if spec.hyper.start is not None else None
        ),
    }
    if status == "ok":
        clean = data.dataset.train.clean_targets
        with averager.swap() if averager is not None else nullcontext():
            train_loss, train_acc = evaluate(model, data.train_eval, loss_fn, correct_fn)
            train_acc_clean = None
            if clean is not None:
                clean_split = replace(data.dataset.train, targets=clean)
                clean_batches = Batches(clean_split, data.train_eval.batch_size)
                train_acc_clean = evaluate(model, clean_batches, loss_fn, correct_fn)[1]
        best = max(range(len(curves["val_acc"])), key=lambda i: (curves["val_acc"][i], -i))
        record["final"] = {
            "test_acc": curves["test_acc"][-1],
            "test_loss": curves["test_loss"][-1],
            "val_acc": curves["val_acc"][-1],
            "val_loss": curves["val_loss"][-1],
            "train_acc": train_acc,
            "train_loss": train_loss,
            "train_acc_clean": train_acc_clean,
            "live_test_acc": curves["live_test_acc"][-1],
        }
        record["best_val"] = {
            "epoch": int(curves["epoch"][best]),
            "val_acc": curves["val_acc"][best],
            "test_acc": curves["test_acc"][best],
            "test_loss": curves["test_loss"][best],
        }
    record["wall_time"] = time.perf_counter() - t0
    record["versions"] = _versions()
    # Curves feed the figures only: 7 significant digits keep results.jsonl small.
    record["curves"] = {k: [float(f"{v:.7g}") for v in vals] for k, vals in curves.items()}
    return TrainResult(record=record, model=model, averager=averager, data=data)
