"""One model's training: build, step, epoch, snapshot/restore, final evaluation.

:func:`fit_model` is the loop of :func:`flatmin.bench.train.train` for one split (one fold of a
cross-validated task); see that module for the whole run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flatmin.bench.device import autocast, grad_scaler, scaled_step
from flatmin.bench.distributed import DistContext, all_reduce_sum
from flatmin.bench.evaluation import (
    Counts,
    LossFn,
    evaluate_counts,
    final_counts,
    per_sample_losses,
)
from flatmin.bench.methods import BuildContext, Hyper, Method, get_method, start_epoch
from flatmin.bench.spec import RunSpec, average_key
from flatmin.bench.train_state import FitState
from flatmin.optim.averaging import WeightAveraging
from flatmin.optim.sam import SAM
from flatmin.tasks import Recipe, TaskData, correct_counts
from flatmin.tasks import correct_fn as _registry_correct_fn

__all__ = ["EpochCallback", "Fit", "Setup", "fit_model", "scheduler"]

EpochCallback = Callable[[int, int, dict[str, float]], None]


def scheduler(
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
class Fit:
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
    def restore(cls, summary: dict[str, Any], data: TaskData, starts: tuple[float, ...]) -> Fit:
        """A finished fold from its :meth:`summary` (no model: only its counts are reported)."""

        def counts(plain: dict[str, list[Any]]) -> dict[str, Counts]:
            return {k: Counts(float(v[0]), int(v[1]), int(v[2])) for k, v in plain.items()}

        averages = {s: counts(summary["averages"][average_key(s)]) for s in starts}
        return cls(
            summary["status"], summary["reason"], summary["steps"], summary["curves"],
            counts(summary["final"]), averages, nn.Module(), {}, data,
        )  # fmt: skip


@dataclass
class Setup:
    """How a run executes: device and precision (from the spec) and the process group."""

    device: torch.device
    precision: str
    dist: DistContext | None = None


_CURVES = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc")


@dataclass
class _Loop:
    """The live objects of one model's training (:func:`_build_loop`)."""

    setup: Setup
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
            if state.generator is None:
                raise ValueError("Invalid resume state: it has no batch-order generator state")
            data.train.generator.set_state(state.generator)
        if self.scaler is not None:
            if state.scaler is None:
                raise ValueError("Invalid resume state: it has no fp16 loss-scaler state")
            self.scaler.load_state_dict(state.scaler)
        torch.set_rng_state(state.rng)


def _build_loop(
    spec: RunSpec, method: Method, data: TaskData, starts: tuple[float, ...], setup: Setup
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
    sched = scheduler(opt, recipe, method, spec.hyper, len(data.train))
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


def fit_model(
    spec: RunSpec,
    method: Method,
    data: TaskData,
    starts: tuple[float, ...],
    eval_val: bool,
    on_epoch: EpochCallback | None,
    setup: Setup,
    resume: FitState | None = None,
    on_state: Callable[[FitState], None] | None = None,
) -> Fit:
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
) -> Fit:  # fmt: skip
    """Evaluate the final weights and every average (BN statistics recomputed) of a fit."""
    final: dict[str, Counts] = {}
    averages: dict[float, dict[str, Counts]] = {}
    # A tuning run is chosen on its validation accuracy alone: it evaluates nothing else.
    only = ("val",) if spec.stage == "tune" else None
    if status == "ok":
        final = final_counts(loop.model, data, only)
        for s, avg in loop.averagers.items():
            # BN statistics of the average, recomputed on the training set before evaluating it.
            avg.update_bn(data.train_eval)
            with avg.swap():
                averages[s] = final_counts(loop.model, data, only)
    return Fit(status, reason, step, curves, final, averages, loop.model, loop.averagers, data)
