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

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from flatmin.bench.device import (
    DEFAULT_DEVICE,
    DEFAULT_PRECISION,
    autocast,
    check_precision,
    check_support,
    grad_scaler,
    scaled_step,
)
from flatmin.bench.distributed import DistContext, all_reduce_sum
from flatmin.bench.methods import START_GRID, BuildContext, Hyper, Method, get_method, start_epoch
from flatmin.bench.train_state import STATE_FORMAT, FitState, TrainState
from flatmin.data import IGNORE_INDEX, Dataset
from flatmin.data.batching import Batches, GraphBatch
from flatmin.optim.averaging import WeightAveraging
from flatmin.optim.sam import SAM
from flatmin.tasks import Recipe, Task, TaskData, correct_counts, get_task
from flatmin.tasks import correct_fn as _registry_correct_fn
from flatmin.tasks import loss_fn as _registry_loss_fn

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
StateCallback = Callable[[TrainState], None]
CV_LAYOUT = "nested"
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
            "recipe": asdict(spec.recipe(task)),
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
    new_id = torch.full((g.num_graphs,), -1, dtype=torch.long, device=g.batch.device)
    new_id[index] = torch.arange(index.numel(), device=g.batch.device)
    node_graph = new_id[g.batch]
    keep = node_graph >= 0
    renumber = torch.cumsum(keep.long(), 0) - 1
    edges = g.edge_index[:, keep[g.edge_index[0]]]  # edges never cross graphs
    return GraphBatch(g.x[keep], renumber[edges], node_graph[keep], int(index.numel()))


class PerSampleLosses:
    """ESAM's per-sample cross-entropy of one batch (see :func:`per_sample_losses`).

    The labelled samples are found only when needed — node classification alone has unlabelled
    targets — so building one per step costs no host sync.
    """

    def __init__(
        self, model: nn.Module, inputs: Any, targets: torch.Tensor, outputs: list[torch.Tensor],
        loss_fn: LossFn = _registry_loss_fn,
    ) -> None:  # fmt: skip
        self.model, self.inputs, self.targets, self.outputs = model, inputs, targets, outputs
        self.loss_fn = loss_fn
        self.node_level = isinstance(inputs, GraphBatch) and targets.numel() != inputs.num_graphs
        self._labelled: torch.Tensor | None = None

    @property
    def labelled(self) -> torch.Tensor:
        """Indices of the labelled targets (the samples)."""
        if self._labelled is None:
            self._labelled = torch.nonzero(self.targets != IGNORE_INDEX).flatten()
        return self._labelled

    def per_sample(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task's loss of every sample: cross-entropy, or a user's loss mapped per sample."""
        if self.loss_fn is _registry_loss_fn:
            return F.cross_entropy(out, targets, reduction="none")
        loss_fn = self.loss_fn
        return torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, targets)

    def losses(self, out: torch.Tensor) -> torch.Tensor:
        """Per-sample losses of the whole batch's outputs ``out``."""
        if not self.node_level:  # every image, document or graph is labelled
            return self.per_sample(out, self.targets)
        rows = self.labelled
        return self.per_sample(out[rows], self.targets[rows])

    def __call__(self, index: torch.Tensor | None) -> torch.Tensor:
        if index is None:
            out = self.model(self.inputs)
            self.outputs.append(out.detach())
            return self.losses(out)
        rows = self.labelled[index]
        if self.node_level:
            out = self.model(self.inputs)[rows]
        elif isinstance(self.inputs, GraphBatch):
            out = self.model(_graph_subset(self.inputs, rows))
        else:
            out = self.model(self.inputs[rows])
        return self.per_sample(out, self.targets[rows])


def per_sample_losses(
    model: nn.Module, inputs: Any, targets: torch.Tensor, outputs: list[torch.Tensor],
    loss_fn: LossFn = _registry_loss_fn,
) -> PerSampleLosses:  # fmt: skip
    """ESAM's ``loss_fn(index)``: per-sample cross-entropy of the batch or of samples ``index``.

    Samples are the labelled targets: images or documents (a sub-batch is sliced), graphs (a
    sub-batch of graphs is re-merged), or the labelled nodes of a node-classification graph (the
    whole graph is run and the selected nodes' losses kept). The outputs of the whole-batch call
    are appended to ``outputs`` (for the running train accuracy). A task's own ``loss_fn`` is
    applied to each sample alone (``torch.func.vmap``).
    """
    return PerSampleLosses(model, inputs, targets, outputs, loss_fn)


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

    def summary(self) -> dict[str, Any]:
        """What a finished fold contributes to the record, as plain values (resume states)."""

        def plain(counts: dict[str, Counts]) -> dict[str, list[float | int]]:
            return {k: [c.loss, c.correct, c.n] for k, c in counts.items()}

        return {
            "status": self.status, "reason": self.reason, "steps": self.steps,
            "curves": self.curves, "final": plain(self.final),
            "averages": {average_key(s): plain(c) for s, c in self.averages.items()},
        }  # fmt: skip

    @classmethod
    def restore(cls, summary: dict[str, Any], data: TaskData, starts: tuple[float, ...]) -> _Fit:
        """A finished fold from its :meth:`summary` (no model: only its counts are reported)."""

        def counts(plain: dict[str, list[Any]]) -> dict[str, Counts]:
            return {k: Counts(float(v[0]), int(v[1]), int(v[2])) for k, v in plain.items()}

        averages = {s: counts(summary["averages"][average_key(s)]) for s in starts}
        return cls(
            summary["status"], summary["reason"], summary["steps"], summary["curves"],
            counts(summary["final"]), averages, nn.Module(), {}, data,
        )  # fmt: skip


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
    bs, device = data.train_eval.batch_size, data.train_eval.device
    yield "train_clean", Batches(replace(train, targets=clean), bs, device=device)
    # Accuracy w.r.t. the *noisy* label on the flipped samples only (the others are ignored):
    # the fraction of the label noise that the model reproduces, i.e. has memorised.
    flipped = torch.where(train.targets != clean, train.targets, IGNORE_INDEX)
    yield "noise_memorised", Batches(replace(train, targets=flipped), bs, device=device)


def _final_counts(
    model: nn.Module, data: TaskData, only: tuple[str, ...] | None = None
) -> dict[str, Counts]:
    return {
        name: evaluate_counts(model, batches, data.loss_fn, data.correct_fn)
        for name, batches in _eval_splits(data)
        if only is None or name in only
    }


@dataclass
class _Setup:
    """How a run executes: device and precision (from the spec) and the process group."""

    device: torch.device
    precision: str
    dist: DistContext | None = None


_CURVES = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc")


@dataclass
class _Loop:
    """The live objects of one model's training (:func:`_build_loop`)."""

    setup: _Setup
    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    averagers: dict[float, WeightAveraging]
    scaler: torch.amp.GradScaler | None
    sam_kw: dict[str, Any]
    step_kw: dict[str, Any]
    counts: Callable[[torch.Tensor, torch.Tensor], tuple[Any, Any]]

    def step(self, closure: Callable[..., torch.Tensor]) -> torch.Tensor:
        """One optimizer step for every method (fp16: through the GradScaler recipe)."""
        if self.scaler is not None:
            return scaled_step(self.opt, self.scaler, closure, self.net, **self.sam_kw)
        # SAM's step takes model=; mypy knows only torch.optim.Optimizer.step.
        step_fn: Callable[..., Any] = self.opt.step
        return step_fn(closure, **self.step_kw)

    def snapshot(self, data: TaskData, epoch: int, step: int, curves: dict) -> FitState:
        """The complete state after ``epoch`` (live tensors: save it before training on)."""
        generator = data.train.generator
        return FitState(
            epoch=epoch, step=step, curves=curves, model=self.model.state_dict(),
            optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
            averagers={average_key(s): a.state_dict() for s, a in self.averagers.items()},
            generator=None if generator is None else generator.get_state(),
            scaler=None if self.scaler is None else self.scaler.state_dict(),
            rng=torch.get_rng_state(),
        )  # fmt: skip

    def restore(self, data: TaskData, state: FitState) -> None:
        """Continue from ``state`` (same run, same fold)."""
        self.model.load_state_dict(state.model)
        self.opt.load_state_dict(state.optimizer)
        self.sched.load_state_dict(state.scheduler)
        for s, avg in self.averagers.items():
            avg.load_state_dict(state.averagers[average_key(s)])
        if data.train.generator is not None:
            data.train.generator.set_state(state.generator)
        if self.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        torch.set_rng_state(state.rng)


def _build_loop(
    spec: RunSpec, method: Method, data: TaskData, starts: tuple[float, ...], setup: _Setup
) -> _Loop:
    """Model (from the run's seed), optimizer, schedule, averages and step options."""
    recipe, epochs = data.recipe, data.recipe.epochs
    trajectory = get_method(method.trajectory)
    model = data.make_model()
    if setup.dist is not None:
        setup.dist.shard(model)  # FSDP2 only: before the optimizer and the averages see the weights
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
    dist = setup.dist
    net = model if dist is None else dist.wrap(model)
    sam_kw = {"per_replica": True} if dist is not None and dist.per_replica else {}
    # The SAM family freezes BN statistics in its extra passes (model=) and, under DDP, may
    # perturb per replica; a plain optimizer takes only the closure.
    step_kw: dict[str, Any] = {"model": net, **sam_kw} if isinstance(opt, SAM) else {}
    # The registry's accuracy has a device-side twin; a task's own correct_fn syncs each step.
    counts = correct_counts if data.correct_fn is _registry_correct_fn else data.correct_fn
    return _Loop(
        setup, model, net, opt, sched, averagers, grad_scaler(setup.device, setup.precision),
        sam_kw, step_kw, counts,
    )  # fmt: skip


def _closure(
    loop: _Loop, loss_fn: LossFn, inputs: Any, targets: torch.Tensor, outputs: list[torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """The closure contract of every optimizer: zero, forward, backward, per-sample losses.

    ESAM selects data with the returned losses and calls ``closure(index)``; SAM calls it twice
    (``outputs[0]`` is the pass at ``w``, the one reported).
    """
    subset = per_sample_losses(loop.net, inputs, targets, outputs, loss_fn)
    device, precision, scaler = loop.setup.device, loop.setup.precision, loop.scaler

    def closure(index: torch.Tensor | None = None) -> torch.Tensor:
        loop.opt.zero_grad(set_to_none=True)
        if index is not None:
            with autocast(device, precision):
                losses = subset(index)
            mean = losses.mean()
            (mean if scaler is None else scaler.scale(mean)).backward()
            return losses.detach()
        with autocast(device, precision):  # fp32: no autocast at all
            out = loop.net(inputs)
            loss = loss_fn(out, targets) if torch.is_grad_enabled() else None
        if loss is not None:  # ESAM's selection pass runs without gradients
            (loss if scaler is None else scaler.scale(loss)).backward()
        outputs.append(out.detach())
        return subset.losses(out.detach())

    return closure


@dataclass
class _Epoch:
    """One epoch's training sums (on the device until read) and per-step losses."""

    per_step: torch.Tensor
    loss: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor


def _train_epoch(loop: _Loop, data: TaskData) -> _Epoch:
    """One pass over the training batches; sums stay on the device (no host sync per step)."""
    loop.model.train()
    device = loop.setup.device
    run_loss = torch.zeros((), dtype=torch.float64, device=device)
    run_correct = torch.zeros((), dtype=torch.int64, device=device)
    run_count = torch.zeros((), dtype=torch.int64, device=device)
    losses: list[torch.Tensor] = []
    for inputs, targets in data.train:
        outputs: list[torch.Tensor] = []
        loss = loop.step(_closure(loop, data.loss_fn, inputs, targets, outputs)).detach().mean()
        losses.append(loss)
        loop.sched.step()
        c, n = loop.counts(outputs[0], targets)
        run_loss += loss.double() * n
        run_correct += c
        run_count += n
    per_step = torch.stack(losses).double()
    dist = loop.setup.dist
    if dist is not None:  # summed over the processes
        sums = torch.stack([run_loss, run_correct.double(), run_count.double()])
        totals = all_reduce_sum(torch.cat([per_step, sums]))
        per_step = totals[: len(losses)] / dist.world_size
        run_loss, run_correct, run_count = totals[len(losses) :].unbind()
    return _Epoch(per_step, run_loss, run_correct, run_count)


def _fit(
    spec: RunSpec,
    method: Method,
    data: TaskData,
    starts: tuple[float, ...],
    eval_val: bool,
    on_epoch: EpochCallback | None,
    setup: _Setup,
    resume: FitState | None = None,
    on_state: Callable[[FitState], None] | None = None,
) -> _Fit:
    """Train one model on ``data`` and evaluate its final weights and averages."""
    epochs = data.recipe.epochs
    loop = _build_loop(spec, method, data, starts, setup)
    curves: dict[str, list[float]] = {k: [] for k in _CURVES}
    status, reason, step, first_epoch = "ok", None, 0, 1
    if resume is not None:
        loop.restore(data, resume)
        curves, step, first_epoch = resume.curves, resume.step, resume.epoch + 1
    for epoch in range(first_epoch, epochs + 1):
        run = _train_epoch(loop, data)
        step += len(run.per_step)
        # Once per epoch: the non-finite check (the first non-finite step ends the run,
        # reported as if it had been checked at that step).
        bad = torch.nonzero(~torch.isfinite(run.per_step)).flatten()
        if bad.numel():
            first = int(bad[0])
            step += first - len(run.per_step)
            status = "failed"
            reason = (
                f"non-finite training loss {float(run.per_step[first])} at epoch {epoch}, "
                f"step {step + 1}"
            )
            break
        count, correct = int(run.count), int(run.correct)
        # One snapshot per epoch from each average's start; the schedule is untouched.
        for avg in loop.averagers.values():
            avg.update()
        metrics = {
            "epoch": epoch, "lr": loop.opt.param_groups[0]["lr"],
            "train_loss": float(run.loss) / max(1, count), "train_acc": correct / max(1, count),
        }  # fmt: skip
        if eval_val:
            val = evaluate_counts(loop.model, data.val, data.loss_fn, data.correct_fn)
            metrics.update(val_loss=val.mean_loss, val_acc=val.acc)
        for k, v in metrics.items():
            curves[k].append(float(v))
        if on_state is not None:
            on_state(loop.snapshot(data, epoch, step, curves))
        if on_epoch is not None:
            on_epoch(epoch, epochs, metrics)
    return _finish(spec, loop, data, status, reason, step, curves)


def _finish(
    spec: RunSpec, loop: _Loop, data: TaskData, status: str, reason: str | None, step: int,
    curves: dict[str, list[float]],
) -> _Fit:  # fmt: skip
    """Evaluate the final weights and every average (BN statistics recomputed) of a fit."""
    final: dict[str, Counts] = {}
    averages: dict[float, dict[str, Counts]] = {}
    # A tuning run is chosen on its validation accuracy alone: it evaluates nothing else.
    only = ("val",) if spec.stage == "tune" else None
    if status == "ok":
        final = _final_counts(loop.model, data, only)
        for s, avg in loop.averagers.items():
            # BN statistics of the average, recomputed on the training set before evaluating it.
            avg.update_bn(data.train_eval)
            with avg.swap():
                averages[s] = _final_counts(loop.model, data, only)
    return _Fit(status, reason, step, curves, final, averages, loop.model, loop.averagers, data)


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
    spec: RunSpec, task: Task, method: Method, fits: list[_Fit], starts: tuple[float, ...],
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
        live = _metrics(_pool(f.final for f in fits))
        averages = {average_key(s): _metrics(_pool(f.averages[s] for f in fits)) for s in starts}
        if method.averaged:
            key = average_key(spec.hyper.start)  # type: ignore[arg-type]
            record["final"] = {**averages[key], "live_test_acc": live["test_acc"]}
            reported = last.averagers[spec.hyper.start]  # type: ignore[index]
        else:
            record["final"] = {**live, "live_test_acc": live["test_acc"]}
        if method.keeps_averages and method.is_trajectory:
            record["averages"] = averages
    return record, reported


def _placement(record: dict[str, Any], spec: RunSpec, setup: _Setup, world: int) -> None:
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
    setup = _Setup(torch.device(spec.device), spec.precision, dist)
    if eval_val is None:
        eval_val = spec.stage == "eval"
    t0 = time.perf_counter()
    starts = spec.starts()
    config_hash = spec.config_hash(task)
    folds: list[int | None] = list(range(task.folds)) if task.folds else [None]
    fits: list[_Fit] = []

    def load(fold: int | None) -> TaskData:
        data = task.load(spec.budget, seed=spec.seed, dataset=dataset, fold=fold)
        if spec.epochs is not None:
            data = replace(data, recipe=replace(data.recipe, epochs=spec.epochs))
        data = data.to(setup.device)
        if dist is not None:
            data = replace(data, train=data.train.sharded(dist.rank, dist.world_size))
        return data

    first_fold, elapsed = 0, 0.0
    if resume is not None:
        resume = resume if isinstance(resume, TrainState) else TrainState.from_dict(resume)
        _check_resume(resume, config_hash, world)
        first_fold, elapsed = resume.fold, resume.elapsed
        for done, fold in zip(resume.done, folds, strict=False):
            fits.append(_Fit.restore(done, load(fold), starts))
    for index in range(first_fold, len(folds)):

        def fold_state(fit_state: FitState, index: int = index) -> None:
            assert on_state is not None
            on_state(TrainState(
                config_hash, world, index, tuple(f.summary() for f in fits), fit_state,
                elapsed + time.perf_counter() - t0,
            ))  # fmt: skip

        fit = _fit(
            spec, method, load(folds[index]), starts, eval_val, on_epoch, setup,
            resume=resume.fit if resume is not None and index == first_fold else None,
            on_state=fold_state if on_state is not None else None,
        )  # fmt: skip
        fits.append(fit)
        if fit.status != "ok":
            break
    record, reported = _record(spec, task, method, fits, starts, task.folds)
    record["wall_time"] = elapsed + time.perf_counter() - t0
    _placement(record, spec, setup, world)
    # Curves feed the figures only: 7 significant digits keep results.jsonl small.
    record["curves"] = _mean_curves(fits) if record["status"] == "ok" else fits[-1].curves
    last = fits[-1]
    return TrainResult(
        record=record, model=last.model, averager=reported, data=last.data,
        averagers=last.averagers,
    )  # fmt: skip
